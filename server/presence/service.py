"""Presence: sources register here, whatever their transport; changes go out as ephemeral events.

Flapping is coalesced: when a user's last source goes, "offline" is announced only after a
grace period, and a source that comes back within it cancels the announcement, so a reconnect
produces no offline/online pair. Sources that stop sending heartbeats without a clean
disconnect are dropped by the sweeper after the heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.events.streams import user_stream
from server.presence.rules import (
    Manual,
    ManualStatus,
    Source,
    Status,
    own_status,
    stale,
    status_seen_by_others,
)
from server.presence.store import PresenceStore
from server.store.database import Store, utcnow

log = logging.getLogger(__name__)

ViewersOf = Callable[[str], Awaitable[list[str]]]
DropSource = Callable[[str, str], Awaitable[None]]  # (transport, source id): close it


class PresenceService:
    def __init__(
        self,
        store: Store,
        sources: PresenceStore,
        bus: EventBus,
        viewers_of: ViewersOf,
        *,
        grace_seconds: float,
        heartbeat_timeout_seconds: float,
    ) -> None:
        self._db = store
        self._sources = sources
        self._bus = bus
        self._viewers_of = viewers_of
        self.grace_seconds = grace_seconds
        self.heartbeat_timeout = heartbeat_timeout_seconds
        self._manual: dict[str, Manual] = {}
        self._published: dict[str, Status] = {}
        self._last_seen: dict[str, datetime] = {}
        self._pending_offline: dict[str, asyncio.Task[None]] = {}
        self._droppers: dict[str, DropSource] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    def on_drop(self, transport: str, dropper: DropSource) -> None:
        """How to close a source of ``transport`` the sweeper found dead."""
        self._droppers[transport] = dropper

    # sources -----------------------------------------------------------------------------------

    async def connected(
        self, user_id: str, source_id: str, transport: str, active: bool = True, dnd: bool = False
    ) -> None:
        source = Source(source_id, transport, active, time.monotonic(), dnd)
        await self._sources.put(user_id, source)
        await self._recompute(user_id)

    async def heartbeat(
        self, user_id: str, source_id: str, active: bool, dnd: bool | None = None
    ) -> None:
        """A sign of life from a source, with its activity (and, for XMPP, its dnd flag)."""
        for source in await self._sources.sources(user_id):
            if source.id == source_id:
                keep_dnd = source.dnd if dnd is None else dnd
                await self._sources.put(
                    user_id,
                    Source(source_id, source.transport, active, time.monotonic(), keep_dnd),
                )
                if source.active != active or source.dnd != keep_dnd:
                    await self._recompute(user_id)
                return

    async def disconnected(self, user_id: str, source_id: str) -> None:
        if await self._sources.remove(user_id, source_id):
            await self._recompute(user_id)

    # manual state ------------------------------------------------------------------------------

    async def manual(self, user_id: str) -> Manual:
        if user_id not in self._manual:
            doc = await self._db.users.find_one(
                {"_id": user_id}, projection={"presence": True, "last_seen": True}
            )
            stored = (doc or {}).get("presence") or {}
            self._manual[user_id] = Manual(
                stored.get("status"), stored.get("until"), bool(stored.get("invisible"))
            )
            if doc and doc.get("last_seen"):
                self._last_seen.setdefault(user_id, doc["last_seen"])
        return self._manual[user_id]

    async def set_manual(
        self, user_id: str, status: ManualStatus | None, until: datetime | None, invisible: bool
    ) -> dict[str, Any]:
        manual = Manual(status, until if status else None, invisible)
        await self._db.users.update_one(
            {"_id": user_id},
            {
                "$set": {
                    "presence": {
                        "status": manual.status,
                        "until": manual.until,
                        "invisible": manual.invisible,
                    }
                }
            },
        )
        self._manual[user_id] = manual
        await self._recompute(user_id, force_own=True)
        return await self.own_view(user_id)

    # views -------------------------------------------------------------------------------------

    async def own_status(self, user_id: str) -> Status:
        return own_status(
            await self._sources.sources(user_id), await self.manual(user_id), datetime.now(UTC)
        )

    async def seen_status(self, user_id: str) -> Status:
        """What colleagues see: the last published status (flaps are not shown)."""
        if user_id in self._published:
            return self._published[user_id]
        own = await self.own_status(user_id)
        return status_seen_by_others(own, await self.manual(user_id))

    async def own_view(self, user_id: str) -> dict[str, Any]:
        manual = await self.manual(user_id)
        return {
            "user_id": user_id,
            "status": await self.own_status(user_id),
            "manual": manual.current(datetime.now(UTC)),
            "until": _iso(manual.until) if manual.current(datetime.now(UTC)) else None,
            "invisible": manual.invisible,
            "last_seen": _iso(self._last_seen.get(user_id)),
        }

    async def view(self, viewer_id: str, user_id: str) -> dict[str, Any]:
        if viewer_id == user_id:
            return await self.own_view(user_id)
        status = await self.seen_status(user_id)
        manual = await self.manual(user_id)
        view: dict[str, Any] = {
            "user_id": user_id,
            "status": status,
            "last_seen": _iso(self._last_seen.get(user_id)),
        }
        if status == "dnd" and manual.until is not None:
            view["until"] = _iso(manual.until)
        return view

    def published(self) -> dict[str, Status]:
        """What colleagues currently see of everyone not offline (flaps are not shown)."""
        return dict(self._published)

    async def sources_of(self, user_id: str) -> list[Source]:
        return await self._sources.sources(user_id)

    async def online_user_ids(self) -> set[str]:
        return {u for u in await self._sources.users() if await self._sources.sources(u)}

    # announcing --------------------------------------------------------------------------------

    async def _recompute(self, user_id: str, force_own: bool = False) -> None:
        # One user's changes are decided one at a time: two tabs connecting together must not
        # both see "was offline" and both announce "online".
        # (One small lock per user who ever connected: bounded by the directory's size.)
        async with self._locks.setdefault(user_id, asyncio.Lock()):
            await self._decide(user_id, force_own)

    async def _decide(self, user_id: str, force_own: bool) -> None:
        manual = await self.manual(user_id)
        own = own_status(await self._sources.sources(user_id), manual, datetime.now(UTC))
        seen = status_seen_by_others(own, manual)
        previous = self._published.get(user_id, "offline")
        if seen == "offline" and previous != "offline":
            if own == "offline":
                self._last_seen[user_id] = utcnow()
                await self._db.users.update_one(
                    {"_id": user_id}, {"$set": {"last_seen": self._last_seen[user_id]}}
                )
                if user_id not in self._pending_offline:
                    self._pending_offline[user_id] = asyncio.create_task(
                        self._offline_after_grace(user_id), name=f"presence-grace:{user_id}"
                    )
                return
            await self._publish(user_id, seen)  # went invisible: at once
            return
        pending = self._pending_offline.pop(user_id, None)
        if pending is not None:
            pending.cancel()
        if seen != previous:
            await self._publish(user_id, seen)
        elif force_own:
            await self._announce_to_self(user_id)

    async def _offline_after_grace(self, user_id: str) -> None:
        try:
            await asyncio.sleep(self.grace_seconds)
            if await self.own_status(user_id) == "offline":
                await self._publish(user_id, "offline")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("publishing offline for %s failed", user_id)
        finally:
            if self._pending_offline.get(user_id) is asyncio.current_task():
                del self._pending_offline[user_id]

    async def _publish(self, user_id: str, seen: Status) -> None:
        if seen == "offline":
            self._published.pop(user_id, None)
        else:
            self._published[user_id] = seen
        online = await self.online_user_ids()
        viewers = [v for v in await self._viewers_of(user_id) if v in online and v != user_id]
        if viewers:
            await self._bus.publish_ephemeral(
                EphemeralEvent(
                    "presence.changed",
                    await self.view("", user_id),
                    tuple(user_stream(v) for v in viewers),
                )
            )
        await self._announce_to_self(user_id)

    async def _announce_to_self(self, user_id: str) -> None:
        # The user's own devices get their full state (manual state, invisible flag).
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "presence.changed", await self.own_view(user_id), (user_stream(user_id),)
            )
        )

    # sweeping ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="presence-sweeper")

    async def sweep(self) -> None:
        """Drop sources without a recent heartbeat; let expired do-not-disturb lapse."""
        deadline = time.monotonic() - self.heartbeat_timeout
        now = datetime.now(UTC)
        for user_id in await self._sources.users():
            sources = await self._sources.sources(user_id)
            dead = set(stale(sources, deadline))
            for source in sources:
                if source.id in dead:
                    log.info(
                        "presence: %s source %s of %s timed out",
                        source.transport,
                        source.id,
                        user_id,
                    )
                    await self._sources.remove(user_id, source.id)
                    dropper = self._droppers.get(source.transport)
                    if dropper is not None:
                        await dropper(source.transport, source.id)
            manual = self._manual.get(user_id)
            expired = manual is not None and manual.status and manual.current(now) is None
            if manual is not None and expired:
                # A lapsed away/dnd is cleared once, in memory and in the database.
                cleared = Manual(None, None, manual.invisible)
                self._manual[user_id] = cleared
                await self._db.users.update_one(
                    {"_id": user_id},
                    {
                        "$set": {
                            "presence": {
                                "status": None,
                                "until": None,
                                "invisible": cleared.invisible,
                            }
                        }
                    },
                )
            if dead or expired:
                await self._recompute(user_id, force_own=bool(expired))

    async def _sweep_forever(self) -> None:
        interval = max(0.2, min(self.heartbeat_timeout / 4, 10.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("presence sweep failed")

    async def close(self) -> None:
        tasks = list(self._pending_offline.values())
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat().replace("+00:00", "Z")
