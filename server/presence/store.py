"""Where presence state lives: the sources, what colleagues were last told, the cached manual
state and the pending-offline mark. In-process for one node; ``RedisPresenceStore``
(``redis_store.py``) implements the same protocol for several nodes, so that every node
decides from the same state and an announcement is made by one node only.

The in-memory store is the one-node case of that protocol: its compare-and-set always wins
(one event loop, no other writer), and it keeps no pending-offline mark, since the grace
task of the only node is the only one."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from server.presence.rules import Manual, Source, Status


class PresenceStore(Protocol):
    # sources: one per connection, aggregated per user ------------------------------------------

    async def put(self, user_id: str, source: Source) -> None: ...

    async def remove(self, user_id: str, source_id: str) -> bool:
        """False when the source was not (or no longer) there."""
        ...

    async def sources(self, user_id: str) -> list[Source]: ...

    async def users(self) -> list[str]:
        """The users who have sources."""
        ...

    # what colleagues were told -------------------------------------------------------------------

    def published(self) -> dict[str, Status]:
        """This node's copy of the published status of everyone not offline (for snapshots)."""
        ...

    async def published_now(self) -> dict[str, Status]:
        """The same, read from the shared state (slower, never behind)."""
        ...

    async def published_status(self, user_id: str) -> Status: ...

    async def swap_published(
        self, user_id: str, expected: Status, new: Status, *, only_if_gone: bool = False
    ) -> bool:
        """Set the published status to ``new`` if it still is ``expected`` (and, with
        ``only_if_gone``, if the user has no source left). True: the caller announces it."""
        ...

    # manual state: a cache of ``users.presence`` -----------------------------------------------

    async def manual(self, user_id: str) -> Manual | None:
        """The cached manual state; None when not cached."""
        ...

    async def keep_manual(
        self, user_id: str, manual: Manual, *, if_missing: bool = False
    ) -> Manual:
        """Cache ``manual`` (with ``if_missing``, only if nothing is cached); the cached value."""
        ...

    async def replace_manual(self, user_id: str, old: Manual, new: Manual) -> bool:
        """Cache ``new`` if ``old`` still is the cached value."""
        ...

    async def last_seen(self, user_id: str) -> datetime | None: ...

    async def keep_last_seen(
        self, user_id: str, when: datetime, *, if_missing: bool = False
    ) -> None: ...

    # the grace period ----------------------------------------------------------------------------

    async def mark_offline(self, user_id: str, when: datetime) -> tuple[datetime, bool]:
        """The user's last source is gone: since when, and whether this call is the first to
        say so in this offline period (the one that records ``last_seen``)."""
        ...

    async def offline_since(self, user_id: str) -> datetime | None:
        """When the current offline period began, if it is marked (grace counts from it)."""
        ...

    async def clear_offline(self, user_id: str) -> None:
        """The user has a source again."""
        ...

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None: ...

    async def ready(self) -> None:
        """Return once ``published()`` holds what was published before this node started."""
        ...

    async def close(self) -> None: ...


class InMemoryPresenceStore:
    def __init__(self) -> None:
        self._sources: dict[str, dict[str, Source]] = {}
        self._published: dict[str, Status] = {}
        self._manual: dict[str, Manual] = {}
        self._last_seen: dict[str, datetime] = {}

    async def put(self, user_id: str, source: Source) -> None:
        self._sources.setdefault(user_id, {})[source.id] = source

    async def remove(self, user_id: str, source_id: str) -> bool:
        sources = self._sources.get(user_id)
        if sources is None or source_id not in sources:
            return False
        del sources[source_id]
        if not sources:
            del self._sources[user_id]
        return True

    async def sources(self, user_id: str) -> list[Source]:
        return list(self._sources.get(user_id, {}).values())

    async def users(self) -> list[str]:
        return list(self._sources)

    def published(self) -> dict[str, Status]:
        return dict(self._published)

    async def published_now(self) -> dict[str, Status]:
        return dict(self._published)

    async def published_status(self, user_id: str) -> Status:
        return self._published.get(user_id, "offline")

    async def swap_published(
        self, user_id: str, expected: Status, new: Status, *, only_if_gone: bool = False
    ) -> bool:
        if self._published.get(user_id, "offline") != expected:
            return False
        if only_if_gone and self._sources.get(user_id):
            return False
        if new == "offline":
            self._published.pop(user_id, None)
        else:
            self._published[user_id] = new
        return True

    async def manual(self, user_id: str) -> Manual | None:
        return self._manual.get(user_id)

    async def keep_manual(
        self, user_id: str, manual: Manual, *, if_missing: bool = False
    ) -> Manual:
        if if_missing:
            return self._manual.setdefault(user_id, manual)
        self._manual[user_id] = manual
        return manual

    async def replace_manual(self, user_id: str, old: Manual, new: Manual) -> bool:
        if self._manual.get(user_id) != old:
            return False
        self._manual[user_id] = new
        return True

    async def last_seen(self, user_id: str) -> datetime | None:
        return self._last_seen.get(user_id)

    async def keep_last_seen(
        self, user_id: str, when: datetime, *, if_missing: bool = False
    ) -> None:
        if if_missing:
            self._last_seen.setdefault(user_id, when)
        else:
            self._last_seen[user_id] = when

    async def mark_offline(self, user_id: str, when: datetime) -> tuple[datetime, bool]:
        return when, True  # one node: every observation is its own (last_seen follows it)

    async def offline_since(self, user_id: str) -> datetime | None:
        return None  # one node: the grace task started at the offline moment itself

    async def clear_offline(self, user_id: str) -> None:
        return None

    def start(self) -> None:
        return None

    async def ready(self) -> None:
        return None

    async def close(self) -> None:
        return None
