"""Open sessions end when their credentials do: revocation and expiry, on every node.

Socket.IO connections (opened with a token) and Jabber sessions (opened with a password)
register here while they are open. A session is ended - its transport's ``close`` is called
with a reason - as soon as it is no longer backed by what it was opened with:

- its token was deleted (logout, a new password, deactivation) -> ``logout``, unless one of
  the two below says more;
- its token's ``expires_at`` passed -> ``expired`` (a timer per session, nothing polled);
- its user was deactivated (or is gone) -> ``deactivated``;
- its user's password changed since it was opened (``users.password_stamp``) ->
  ``password_changed``.

Whoever revokes calls ``announce_revocation``: it writes a durable record to ``revocations``
and publishes the ephemeral ``session.revoked``. Each node re-checks the named user's sessions
when either reaches it: the event at once (on every node, with Redis), the record within
``POLL_SECONDS`` + ``POLLER_GAP_WAIT`` through a poll of one indexed query per node, four a
second, each sent in the gap after a batch of events when one comes within
``POLLER_GAP_WAIT`` (``background.Gap``), so that it does not land beside a message's
inserts. The record is what reaches a hub from the ``portalhub`` CLI (a process of its own,
whose bus has no subscribers) and what survives a Redis outage. The check asks the database,
never trusts the hint: a session opened after the revocation (a new login with the new
password) is left alone, and a duplicate hint costs one query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from server.background import (
    POLLER_GAP_WAIT,
    Gap,
    SideTasks,
    no_gap,
    raise_if_stopping,
    stop,
)
from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.events.streams import user_stream
from server.store.database import Document, Store, new_id, utcnow

log = logging.getLogger(__name__)

REVOKED = "session.revoked"
POLL_SECONDS = 0.25
# Records are read again for this long: a record written with a slightly late clock, or
# committed after a poll that already saw later ones, is still found.
LOOKBACK = timedelta(seconds=10)
RECORD_RETENTION = timedelta(days=1)

Close = Callable[[str], Awaitable[None]]


@dataclass(eq=False)
class LiveSession:
    """An open session as the guard sees it. ``key`` is unique per node (transport + id)."""

    key: str
    user_id: str
    close: Close
    token_hash: str | None = None  # a session opened with a token
    expires_at: datetime | None = None
    password_stamp: Any = None  # the user's stamp when the session was opened
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


def session_verdict(
    session: LiveSession, user: Document | None, tokens: dict[str, datetime], now: datetime
) -> str | None:
    """Why ``session`` must end now (the reason its client is told), or None. Pure.

    ``user`` is the user's document now (None if gone); ``tokens`` the expiry of each of the
    session's tokens still stored.
    """
    if user is None or not user.get("is_active", True):
        return "deactivated"
    if user.get("password_stamp") != session.password_stamp:
        return "password_changed"
    if session.token_hash is not None:
        expires = tokens.get(session.token_hash)
        if expires is None:
            return "logout"
        if expires <= now:
            return "expired"
    return None


async def announce_revocation(
    store: Store, bus: EventBus, user_id: str, reason: str, token_hash: str | None = None
) -> None:
    """Tell every node to check this user's open sessions. Call it after the write that ends
    them (tokens deleted, user deactivated, password changed): the check reads that."""
    record_id = new_id()
    record: Document = {"_id": record_id, "user_id": user_id, "reason": reason, "at": utcnow()}
    if token_hash is not None:
        record["token_hash"] = token_hash
    await store.revocations.insert_one(record)
    await bus.publish_ephemeral(
        EphemeralEvent(
            REVOKED,
            {"reason": reason},
            (user_stream(user_id),),
            private={"revocation_id": record_id},
        )
    )


class SessionGuard:
    """This node's open sessions, ended when revoked or expired (see the module's doc)."""

    def __init__(self, store: Store, bus: EventBus, *, poll_seconds: float = POLL_SECONDS):
        self._store = store
        self._poll_seconds = poll_seconds
        # Set by the node that writes events (``StreamLog.after_batch``); at once otherwise.
        self.gap: Gap = no_gap
        self._sessions: dict[str, LiveSession] = {}
        self._by_user: dict[str, set[str]] = {}
        self._hints = 0  # revocation hints received so far; see mark()
        self._seen: dict[str, datetime] = {}  # revocation records already handled
        self._watcher: asyncio.Task[None] | None = None
        self._tasks = SideTasks("session check", log)
        self._failing = False
        self._closed = False
        self._listeners: list[tuple[Callable[[str], None], Callable[[], bool]]] = []
        bus.subscribe_ephemeral(self._on_ephemeral)

    def on_revocation(
        self, listener: Callable[[str], None], *, wants_records: Callable[[], bool]
    ) -> None:
        """Also tell ``listener`` the user named by each revocation hint (the event, or a
        record), before the user's sessions are checked: the auth service drops what it
        cached of the user's tokens. The records are polled while ``wants_records()`` says
        so, as well as while sessions are open here."""
        self._listeners.append((listener, wants_records))

    def _tell(self, user_id: str) -> None:
        for listener, _ in self._listeners:
            try:
                listener(user_id)
            except Exception:
                log.exception("revocation listener failed")

    # transports ------------------------------------------------------------------------------

    def mark(self) -> int:
        """Take this before reading the credentials a session will be opened with, and give it
        to ``track``: a revocation that arrived in between gets the new session checked."""
        return self._hints

    def track(self, session: LiveSession, mark: int) -> None:
        self.untrack(session.key)
        self._sessions[session.key] = session
        self._by_user.setdefault(session.user_id, set()).add(session.key)
        if session.expires_at is not None:
            delay = (session.expires_at - datetime.now(UTC)).total_seconds()
            session.timer = asyncio.get_running_loop().call_later(
                max(0.0, delay), self._expired, session
            )
        if mark != self._hints:
            self._spawn(self.check_user(session.user_id))

    def untrack(self, key: str) -> None:
        session = self._sessions.pop(key, None)
        if session is None:
            return
        if session.timer is not None:
            session.timer.cancel()
        keys = self._by_user.get(session.user_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[session.user_id]

    @property
    def count(self) -> int:
        return len(self._sessions)

    # checking --------------------------------------------------------------------------------

    async def check_user(self, user_id: str) -> None:
        """End those of the user's sessions here that their credentials no longer back."""
        keys = self._by_user.get(user_id)
        if not keys:
            return
        sessions = [self._sessions[k] for k in list(keys) if k in self._sessions]
        user = await self._store.users.find_one(
            {"_id": user_id}, projection={"is_active": True, "password_stamp": True}
        )
        hashes = sorted({s.token_hash for s in sessions if s.token_hash is not None})
        tokens: dict[str, datetime] = {}
        if hashes:
            async for doc in self._store.tokens.find(
                {"_id": {"$in": hashes}}, projection={"expires_at": True}
            ):
                tokens[doc["_id"]] = doc["expires_at"]
        now = datetime.now(UTC)
        for session in sessions:
            reason = session_verdict(session, user, tokens, now)
            if reason is not None:
                await self._end(session, reason)

    async def _end(self, session: LiveSession, reason: str) -> None:
        if self._sessions.get(session.key) is not session:
            return  # already ended (or gone)
        self.untrack(session.key)
        try:
            await session.close(reason)
        except Exception:
            log.exception("ending session %s failed", session.key)

    def _expired(self, session: LiveSession) -> None:
        session.timer = None
        self._spawn(self._end(session, "expired"))

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type != REVOKED:
            return
        self._hints += 1
        for stream in event.streams:
            kind, _, user_id = stream.partition(":")
            if kind == "user":
                self._tell(user_id)
                await self.check_user(user_id)
        # Only once checked: after a failed check the poll finds the record and tries again.
        record_id = event.private.get("revocation_id")
        if isinstance(record_id, str):
            self._seen[record_id] = datetime.now(UTC)

    # the durable records ---------------------------------------------------------------------

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="revocation-watcher")

    async def close(self) -> None:
        self._closed = True  # the transports end their sessions themselves from now on
        await stop(self._watcher, *self._tasks)
        for session in self._sessions.values():
            if session.timer is not None:
                session.timer.cancel()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # On a fixed beat (the poll's rate does not grow with the waits for a gap), each
            # poll at most POLLER_GAP_WAIT after its beat.
            due = max(due + self._poll_seconds, loop.time())
            await asyncio.sleep(due - loop.time())
            if not self._sessions and not any(wants() for _, wants in self._listeners):
                continue  # nothing here to end (a session opened later reads the new state)
            await self.gap(POLLER_GAP_WAIT)
            try:
                await self.poll()
                if self._failing:
                    log.info("revocation records readable again")
                self._failing = False
            except Exception:
                raise_if_stopping()
                if not self._failing:  # once per outage, not four times a second
                    log.exception("reading revocation records failed; retrying")
                self._failing = True

    async def poll(self) -> None:
        """Check the users named by revocation records not seen yet (one query)."""
        now = datetime.now(UTC)
        found: dict[str, dict[str, datetime]] = {}  # user -> {record id: at}
        async for doc in self._store.revocations.find(
            {"at": {"$gt": now - LOOKBACK}}, projection={"user_id": True, "at": True}
        ):
            if doc["_id"] not in self._seen:
                found.setdefault(doc["user_id"], {})[doc["_id"]] = doc["at"]
        horizon = now - 2 * LOOKBACK
        self._seen = {k: at for k, at in self._seen.items() if at > horizon}
        if found:
            self._hints += 1
        for user_id, records in found.items():
            self._tell(user_id)
            await self.check_user(user_id)
            self._seen.update(records)  # a failed check leaves them for the next poll

    async def prune(self) -> int:
        """Drop records nobody reads any more (maintenance)."""
        result = await self._store.revocations.delete_many(
            {"at": {"$lte": datetime.now(UTC) - RECORD_RETENTION}}
        )
        return result.deleted_count

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coro.close()
            return
        self._tasks.spawn(coro)
