"""Where presence sources live. In-process for one node; a Redis store (per-connection keys with
a TTL, aggregated per user) implements the same protocol for several nodes."""

from __future__ import annotations

from typing import Protocol

from server.presence.rules import Source


class PresenceStore(Protocol):
    async def put(self, user_id: str, source: Source) -> None: ...

    async def remove(self, user_id: str, source_id: str) -> bool: ...

    async def sources(self, user_id: str) -> list[Source]: ...

    async def users(self) -> list[str]: ...


class InMemoryPresenceStore:
    def __init__(self) -> None:
        self._sources: dict[str, dict[str, Source]] = {}

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
