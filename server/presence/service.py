"""Presence: sources register here, whatever their transport; changes go out as ephemeral events.

Flapping is coalesced: when a user's last source goes, "offline" is announced only after a
grace period, and a source that comes back within it cancels the announcement, so a reconnect
produces no offline/online pair. Sources that stop sending heartbeats without a clean
disconnect are dropped by the sweeper after the heartbeat timeout.

Several nodes (a shared ``RedisPresenceStore``): every decision is taken from the shared
state, never from what this node alone has seen, because a user's tabs and Jabber sessions
may sit on any node. Why each piece is where it is:

- The published status is changed by compare-and-set in the store, and only the winner
  announces. Several nodes may decide the same transition (two tabs connecting on two nodes,
  every survivor noticing a dead node's user); one announcement must come out, not one per
  node. A loser simply decides again from the fresh state, so nodes converge.
- Each node keeps the sources of its own connections (``_own``): only it can close them, so
  only it sweeps them for silence; another node's connections are its business, or, if that
  node died, the TTL's. The copy also lets a heartbeat re-create a source Redis lost.
- Who notices a dead node's users? Nobody is told when a key expires, so every sweep compares
  who is published with who still has sources, and decides again for the users that differ.
  That also repairs a node that died between storing a source and announcing it.
- Any node may run a grace task for a user (the one whose tab closed, any that noticed the
  loss). The grace counts from the shared offline mark, not from when this node heard of it,
  so a later observer does not lengthen it and an earlier task does not cut short the grace of
  a second disconnect; "offline" is swapped in only if no source has come back meanwhile.
- The snapshot view (``published()``) is the store's local copy, which follows Redis, so a
  snapshot made on one node shows users online only through another.

With the in-memory store these steps reduce to what one node did before: the swap always
wins and there is no offline mark.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from server.background import raise_if_stopping, stop
from server.caching import BatchLoad
from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.events.streams import user_stream
from server.presence.rules import (
    WEB,
    Manual,
    ManualStatus,
    Shown,
    Source,
    Status,
    own_status,
    resources_seen,
    stale,
    status_seen_by_others,
)
from server.presence.store import PresenceStore
from server.store.database import Store, utcnow

log = logging.getLogger(__name__)

ViewersOf = Callable[[str], Awaitable[list[str]]]
Undo = Callable[[list[Source]], list[Source]]  # the sources now -> as they were before a change
NOT_SHOWN = Shown()
DropSource = Callable[[str, str], Awaitable[None]]  # (transport, source id): close it


RACE_RETRIES = 5  # lost compare-and-sets in a row before one decision gives up (logged)


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
        self._own: dict[str, tuple[str, Source]] = {}  # source id -> (user, source): this node's
        self._pending_offline: dict[str, asyncio.Task[None]] = {}
        self._pending_web: dict[str, asyncio.Task[None]] = {}  # the web resource's grace
        self._droppers: dict[str, DropSource] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False
        # The stored states that the first connects of one moment read, read together.
        self._stored_reads: BatchLoad[str, Any] = BatchLoad(self._read_stored)

    def on_drop(self, transport: str, dropper: DropSource) -> None:
        """How to close a source of ``transport`` the sweeper found dead."""
        self._droppers[transport] = dropper

    # sources -----------------------------------------------------------------------------------

    async def connected(
        self,
        user_id: str,
        source_id: str,
        transport: str,
        active: bool = True,
        dnd: bool = False,
        *,
        resource: str = "",
        shown: Shown = NOT_SHOWN,
    ) -> None:
        """A new source; ``resource`` and ``shown`` for a Jabber session (its own resource)."""
        source = Source(source_id, transport, active, time.monotonic(), dnd, resource, shown)
        await self._sources.put(user_id, source)
        self._own[source_id] = (user_id, source)
        await self._recompute(user_id, before=_without(source_id))

    async def heartbeat(
        self,
        user_id: str,
        source_id: str,
        active: bool,
        dnd: bool | None = None,
        shown: Shown | None = None,
    ) -> None:
        """A sign of life from a source, with its activity (and, for XMPP, its dnd flag and
        what its resource shows)."""
        own = self._own.get(source_id)
        if own is None or own[0] != user_id:
            return  # unknown, or dropped by the sweeper already
        source = own[1]
        keep_dnd = source.dnd if dnd is None else dnd
        beat = replace(
            source,
            active=active,
            last_heartbeat=time.monotonic(),
            dnd=keep_dnd,
            shown=source.shown if shown is None else shown,
        )
        await self._sources.put(user_id, beat)  # also brings back one the store lost
        self._own[source_id] = (user_id, beat)
        if (source.active, source.dnd, source.shown) != (beat.active, beat.dnd, beat.shown):
            await self._recompute(user_id, before=_instead(source))

    async def disconnected(self, user_id: str, source_id: str) -> None:
        if self._closed:
            return  # shutting down: close() has taken this node's sources away already
        own = self._own.pop(source_id, None)
        # Also when the store had lost it already (expired): this node still owned it.
        if await self._sources.remove(user_id, source_id) or own is not None:
            await self._recompute(user_id, before=_with(own[1]) if own else _unchanged)

    # manual state ------------------------------------------------------------------------------

    async def manual(self, user_id: str) -> Manual:
        cached = await self._sources.manual(user_id)
        if cached is not None:
            return cached
        doc = await self._stored_reads.load(user_id)
        stored = (doc or {}).get("presence") or {}
        manual = await self._sources.keep_manual(
            user_id,
            Manual(stored.get("status"), stored.get("until"), bool(stored.get("invisible"))),
            if_missing=True,  # a value set meanwhile (here or on another node) is newer
        )
        if doc and doc.get("last_seen"):
            await self._sources.keep_last_seen(user_id, doc["last_seen"], if_missing=True)
        return manual

    async def _read_stored(self, user_ids: list[str]) -> dict[str, Any]:
        return {
            doc["_id"]: doc
            async for doc in self._db.users.find(
                {"_id": {"$in": user_ids}}, projection={"presence": True, "last_seen": True}
            )
        }

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
        old = await self.manual(user_id)
        await self._sources.keep_manual(user_id, manual)
        await self._recompute(user_id, force_own=True, before=_unchanged, manual_before=old)
        return await self.own_view(user_id)

    # views -------------------------------------------------------------------------------------

    async def own_status(self, user_id: str) -> Status:
        return own_status(
            await self._sources.sources(user_id), await self.manual(user_id), datetime.now(UTC)
        )

    async def seen_status(self, user_id: str) -> Status:
        """What colleagues see: the last published status (flaps are not shown)."""
        published = await self._sources.published_status(user_id)
        if published != "offline":
            return published
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
            "last_seen": _iso(await self._sources.last_seen(user_id)),
        }

    async def view(self, viewer_id: str, user_id: str) -> dict[str, Any]:
        if viewer_id == user_id:
            return await self.own_view(user_id)
        status = await self.seen_status(user_id)
        manual = await self.manual(user_id)
        view: dict[str, Any] = {
            "user_id": user_id,
            "status": status,
            "last_seen": _iso(await self._sources.last_seen(user_id)),
        }
        if status == "dnd" and manual.until is not None:
            view["until"] = _iso(manual.until)
        return view

    def published(self) -> dict[str, Status]:
        """What colleagues currently see of everyone not offline (flaps are not shown)."""
        return self._sources.published()

    async def sources_of(self, user_id: str) -> list[Source]:
        return await self._sources.sources(user_id)

    async def resources_seen(self, user_id: str) -> dict[str, Shown]:
        """What colleagues see of each resource of the user (``rules.resources_seen``): the
        shared state, so sessions on every node count."""
        return resources_seen(
            await self._sources.sources(user_id), await self.manual(user_id), datetime.now(UTC)
        )

    async def online_user_ids(self) -> set[str]:
        return set(await self._sources.users())

    # announcing --------------------------------------------------------------------------------

    async def _recompute(
        self,
        user_id: str,
        force_own: bool = False,
        *,
        before: Undo | None = None,
        manual_before: Manual | None = None,
    ) -> None:
        """Decide the merged status again; with ``before`` (how the sources were before this
        change) also tell colleagues' Jabber sessions when what a resource shows changed."""
        # One user's changes are decided one at a time: two tabs connecting together must not
        # both see "was offline" and both announce "online". (Across nodes the store's
        # compare-and-set does the same.)
        # (One small lock per user who ever connected: bounded by the directory's size.)
        async with self._locks.setdefault(user_id, asyncio.Lock()):
            await self._decide(user_id, force_own)
            if before is not None:
                await self._resources_changed(user_id, before, manual_before)

    async def _resources_changed(
        self, user_id: str, before: Undo, manual_before: Manual | None
    ) -> None:
        """Announce ``presence.resources`` when the change this node just made (one source,
        or the manual state) changed what some resource shows. Only a trigger: each
        transport reads the shared state when it handles it, so events from several nodes,
        late or doubled, still leave every client with the latest state.

        The web's resource is given the grace period before it is said to be gone: a reload
        (its last tab closing and coming back) is no unavailable/available pair."""
        sources = await self._sources.sources(user_id)
        manual = await self.manual(user_id)
        now = datetime.now(UTC)
        after = resources_seen(sources, manual, now)
        earlier = resources_seen(before(sources), manual_before or manual, now)
        if after == earlier:
            return
        if WEB in earlier and WEB not in after and not manual.invisible:
            if user_id not in self._pending_web:
                self._pending_web[user_id] = asyncio.create_task(
                    self._web_gone_after_grace(user_id), name=f"presence-web-grace:{user_id}"
                )
            return
        await self._announce_resources(user_id)

    async def _web_gone_after_grace(self, user_id: str) -> None:
        try:
            await asyncio.sleep(self.grace_seconds)
            await self._announce_resources(user_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("announcing the web resource of %s gone failed", user_id)
        finally:
            if self._pending_web.get(user_id) is asyncio.current_task():
                del self._pending_web[user_id]

    async def _announce_resources(self, user_id: str) -> None:
        # No streams: browsers show the merged status only. Each node's XMPP server finds
        # which of its sessions may see the user.
        await self._bus.publish_ephemeral(
            EphemeralEvent("presence.resources", {"user_id": user_id})
        )

    async def _decide(self, user_id: str, force_own: bool) -> None:
        for _ in range(RACE_RETRIES):
            manual = await self.manual(user_id)
            own = own_status(await self._sources.sources(user_id), manual, datetime.now(UTC))
            seen = status_seen_by_others(own, manual)
            previous = await self._sources.published_status(user_id)
            if seen == "offline" and previous != "offline":
                if own == "offline":
                    await self._went_offline(user_id)
                    return
                if await self._publish(user_id, seen, previous):  # went invisible: at once
                    return
                continue  # another node changed it meanwhile: decide again
            if own != "offline":
                await self._sources.clear_offline(user_id)
            pending = self._pending_offline.pop(user_id, None)
            if pending is not None:
                pending.cancel()
            if seen == previous:
                if force_own:
                    await self._announce_to_self(user_id)
                return
            if await self._publish(user_id, seen, previous):
                return
        log.warning("presence of %s: lost %s races in a row, left as it is", user_id, RACE_RETRIES)

    async def _went_offline(self, user_id: str) -> None:
        now = utcnow()
        _, first = await self._sources.mark_offline(user_id, now)
        if first:
            await self._sources.keep_last_seen(user_id, now)
            await self._db.users.update_one({"_id": user_id}, {"$set": {"last_seen": now}})
        if user_id not in self._pending_offline:
            self._pending_offline[user_id] = asyncio.create_task(
                self._offline_after_grace(user_id), name=f"presence-grace:{user_id}"
            )

    async def _offline_after_grace(self, user_id: str) -> None:
        try:
            await asyncio.sleep(self.grace_seconds)
            # Several nodes: the grace counts from when the last source went, wherever.
            while (since := await self._sources.offline_since(user_id)) is not None:
                left = self.grace_seconds - (utcnow() - since).total_seconds()
                if left <= 0:
                    break
                await asyncio.sleep(left)
            if await self.own_status(user_id) == "offline":
                previous = await self._sources.published_status(user_id)
                if previous != "offline":
                    await self._publish(user_id, "offline", previous, only_if_gone=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("publishing offline for %s failed", user_id)
        finally:
            if self._pending_offline.get(user_id) is asyncio.current_task():
                del self._pending_offline[user_id]

    async def _publish(
        self, user_id: str, seen: Status, previous: Status, *, only_if_gone: bool = False
    ) -> bool:
        """Announce ``seen`` if the published status still is ``previous``; False if not."""
        if not await self._sources.swap_published(
            user_id, previous, seen, only_if_gone=only_if_gone
        ):
            return False
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
        return True

    async def _announce_to_self(self, user_id: str) -> None:
        # The user's own devices get their full state (manual state, invisible flag).
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "presence.changed", await self.own_view(user_id), (user_stream(user_id),)
            )
        )

    # sweeping ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._sources.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="presence-sweeper")

    async def ready(self) -> None:
        """Once this returns, ``published()`` knows what other nodes published before."""
        await self._sources.ready()

    async def sweep(self) -> None:
        """Drop this node's sources without a recent heartbeat; let expired do-not-disturb
        lapse; decide again for users whose sources vanished elsewhere (a dead node)."""
        deadline = time.monotonic() - self.heartbeat_timeout
        now = datetime.now(UTC)
        mine: dict[str, list[Source]] = {}
        for user_id, source in list(self._own.values()):
            mine.setdefault(user_id, []).append(source)
        dead_by_user = {u: set(stale(s, deadline)) for u, s in mine.items()}
        for user_id in dict.fromkeys([*await self._sources.users(), *mine]):
            dead = dead_by_user.get(user_id, set())
            for source in mine.get(user_id, []):
                if source.id in dead:
                    log.info(
                        "presence: %s source %s of %s timed out",
                        source.transport,
                        source.id,
                        user_id,
                    )
                    self._own.pop(source.id, None)
                    await self._sources.remove(user_id, source.id)
                    dropper = self._droppers.get(source.transport)
                    if dropper is not None:
                        await dropper(source.transport, source.id)
            manual = await self._sources.manual(user_id)
            expired = bool(manual is not None and manual.status and manual.current(now) is None)
            if manual is not None and expired:
                # A lapsed away/dnd is cleared once, in the cache and in the database (by
                # one node: the others lose the swap).
                cleared = Manual(None, None, manual.invisible)
                if await self._sources.replace_manual(user_id, manual, cleared):
                    await self._db.users.update_one(
                        {
                            "_id": user_id,
                            "presence.status": manual.status,
                            "presence.until": manual.until,
                        },
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
                else:
                    expired = False  # cleared by another node, or set anew
            if dead or expired:
                gone = [s for s in mine.get(user_id, []) if s.id in dead]
                await self._recompute(
                    user_id,
                    force_own=expired,
                    before=_with(*gone),
                    manual_before=manual if expired else None,
                )
        await self._reconcile()

    async def _reconcile(self) -> None:
        """Decide again wherever what was published and who has sources disagree: a user
        published but without sources (a dead node's, expired), or with sources but published
        offline (a node died before announcing; Redis lost its state). Invisible users are in
        the second kind too, and deciding again leaves them as they are."""
        live = set(await self._sources.users())
        published = await self._sources.published_now()
        for user_id in published.keys() - live:
            if user_id not in self._pending_offline:
                await self._recompute(user_id)
        for user_id in live - published.keys():
            await self._recompute(user_id)

    async def _sweep_forever(self) -> None:
        interval = max(0.2, min(self.heartbeat_timeout / 4, 10.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:
                raise_if_stopping()
                log.exception("presence sweep failed")

    async def close(self) -> None:
        """Stop; this node's sources go from the store at once (other nodes then announce
        them offline after the grace period), and later disconnects are ignored."""
        self._closed = True
        tasks = [*self._pending_offline.values(), *self._pending_web.values()]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        await stop(*tasks)
        own, self._own = self._own, {}
        for source_id, (user_id, _) in own.items():
            try:
                await self._sources.remove(user_id, source_id)
            except Exception:
                log.warning("presence: could not remove source %s at shutdown", source_id)
                break  # the store is unreachable: the TTL will do it
        await self._sources.close()


def _without(source_id: str) -> Undo:
    return lambda now: [s for s in now if s.id != source_id]


def _with(*sources: Source) -> Undo:
    ids = {s.id for s in sources}
    return lambda now: [*[s for s in now if s.id not in ids], *sources]


def _instead(source: Source) -> Undo:
    return lambda now: [source if s.id == source.id else s for s in now]


def _unchanged(now: list[Source]) -> list[Source]:
    return now


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat().replace("+00:00", "Z")
