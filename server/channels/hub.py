"""The Socket.IO hub: authenticated connections, replay-then-live delivery, authorised rooms.

Delivery order per stream is guaranteed on the server, not left to clients to sort out. While a
connection catches up on a stream it is skipped by live emits to that stream's room, and the
events it was skipped for are kept in its buffer. After the replay from the database, the
buffer is drained (dropping what the replay already sent), and only when it is empty - checked
and cleared with no await in between - does the connection take live emits again. Every event
is therefore either in the database read or in the buffer, and is sent exactly once, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import socketio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.auth.service import AuthService
from server.channels.ratelimit import TokenBucket
from server.channels.rooms import may_subscribe
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, Event
from server.events.streams import StreamLog, user_stream
from server.presence.tracker import PresenceTracker
from server.settings import Settings
from server.store.database import Document

log = logging.getLogger(__name__)

StreamName = str
SnapshotPart = Callable[[Document], Awaitable[dict[str, Any]]]
MemberStreams = Callable[[Document], Awaitable[list[str]]]

MAX_STREAM_NAME = 200
CONNECT_WAIT_SECONDS = 10.0
# A client that keeps flooding after being told is cut off.
FLOOD_STRIKES_BEFORE_DISCONNECT = 20


class ConnectAuth(BaseModel):
    model_config = ConfigDict(extra="ignore")

    token: str = Field(min_length=1, max_length=256)
    since: dict[str, int] = Field(default_factory=dict, max_length=500)


class SubscribeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: str = Field(min_length=1, max_length=MAX_STREAM_NAME)
    since: int | None = Field(default=None, ge=0)


@dataclass
class Connection:
    sid: str
    user: Document
    since: dict[str, int]
    bucket: TokenBucket
    streams: set[str] = field(default_factory=set)
    buffers: dict[str, deque[Event]] = field(default_factory=dict)
    strikes: int = 0

    @property
    def user_id(self) -> str:
        return str(self.user["_id"])


async def no_member_streams(_user: Document) -> list[str]:
    return []


class Hub:
    def __init__(
        self,
        settings: Settings,
        auth: AuthService,
        streams: StreamLog,
        bus: EventBus,
        presence: PresenceTracker,
        *,
        member_streams: MemberStreams = no_member_streams,
    ) -> None:
        self.settings = settings
        self._auth = auth
        self._streams = streams
        self._presence = presence
        self._member_streams = member_streams
        self._snapshot_parts: dict[str, SnapshotPart] = {}
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            max_http_buffer_size=settings.socket_max_message_bytes,
            always_connect=False,
            logger=False,
            engineio_logger=False,
        )
        self._connections: dict[str, Connection] = {}
        self._replaying: dict[StreamName, set[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        bus.subscribe(self._on_event)
        bus.subscribe_ephemeral(self._on_ephemeral)
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("subscribe", self._guarded(self._on_subscribe))
        self.sio.on("unsubscribe", self._guarded(self._on_unsubscribe))
        self.sio.on("ping", self._guarded(self._on_ping))
        self.sio.on("*", self._on_unknown)

    def add_snapshot_part(self, key: str, part: SnapshotPart) -> None:
        """Register one piece of the ephemeral state a connecting client receives."""
        self._snapshot_parts[key] = part

    # connect / disconnect ----------------------------------------------------------------------

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        if not isinstance(auth, dict):
            raise socketio.exceptions.ConnectionRefusedError(
                "authentication required: connect with auth {token}", {"code": "auth_required"}
            )
        try:
            parsed = ConnectAuth.model_validate(auth)
        except ValidationError:
            raise socketio.exceptions.ConnectionRefusedError(
                "malformed auth: expected {token: string, since?: {stream: seq}}",
                {"code": "bad_auth"},
            ) from None
        user = await self._auth.authenticate(parsed.token)
        if user is None:
            raise socketio.exceptions.ConnectionRefusedError(
                "invalid or expired token", {"code": "invalid_token"}
            )
        since = {s: n for s, n in parsed.since.items() if len(s) <= MAX_STREAM_NAME}
        self._connections[sid] = Connection(
            sid,
            user,
            since,
            TokenBucket(
                self.settings.socket_events_per_second,
                self.settings.socket_event_burst,
                time.monotonic(),
            ),
        )
        self._tasks[sid] = asyncio.create_task(self._start_session(sid), name=f"session:{sid}")

    async def _on_disconnect(self, sid: str, reason: Any = None) -> None:
        task = self._tasks.pop(sid, None)
        if task is not None and not task.done():
            task.cancel()
        conn = self._connections.pop(sid, None)
        if conn is None:
            return
        for stream in conn.streams:
            self._stop_replaying(stream, sid)
        await self._presence.disconnected(conn.user_id, sid)

    async def _start_session(self, sid: str) -> None:
        try:
            await self._wait_connected(sid)
            conn = self._connections.get(sid)
            if conn is None:
                return
            streams = [user_stream(conn.user_id), *await self._member_streams(conn.user)]
            for stream in streams:
                await self._join(conn, stream)
            await self.sio.emit("snapshot", await self._snapshot(conn), to=sid)
            await self._presence.connected(conn.user_id, sid)
            for stream in streams:
                await self._catch_up(conn, stream, conn.since.get(stream))
            # A client that asked for streams it does not belong to learns it plainly.
            for stream in conn.since.keys() - set(streams):
                await self.sio.emit(
                    "subscribe_error", {"stream": stream, "code": "forbidden"}, to=sid
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session start failed for %s", sid)
            await self.sio.disconnect(sid)
        finally:
            self._tasks.pop(sid, None)

    async def _wait_connected(self, sid: str) -> None:
        # The connect handler runs before the CONNECT packet goes out; nothing may be sent
        # to the client before that packet, so wait for the manager to register it.
        deadline = time.monotonic() + CONNECT_WAIT_SECONDS
        while not self.sio.manager.is_connected(sid, "/"):
            if sid not in self._connections or time.monotonic() > deadline:
                raise asyncio.CancelledError
            await asyncio.sleep(0.005)

    async def _snapshot(self, conn: Connection) -> dict[str, Any]:
        snapshot: dict[str, Any] = {}
        for key, part in self._snapshot_parts.items():
            snapshot[key] = await part(conn.user)
        snapshot["streams"] = {s: await self._streams.last_seq(s) for s in sorted(conn.streams)}
        return snapshot

    # streams -----------------------------------------------------------------------------------

    async def _join(self, conn: Connection, stream: str) -> None:
        conn.streams.add(stream)
        conn.buffers[stream] = deque()
        self._replaying.setdefault(stream, set()).add(conn.sid)
        await self.sio.enter_room(conn.sid, stream)

    async def _catch_up(self, conn: Connection, stream: str, since: int | None) -> None:
        """Send what ``conn`` missed on ``stream`` after ``since``, then switch it to live."""
        last = since if since is not None else 0
        if since is not None:
            status = await self._streams.position_status(stream, since)
            missed = await self._streams.read_since(stream, since) if status == "ok" else None
            if missed is None:
                await self.sio.emit(
                    "resync",
                    {"stream": stream, "seq": await self._streams.last_seq(stream)},
                    to=conn.sid,
                )
                last = await self._streams.last_seq(stream)
            else:
                for event in missed:
                    await self.sio.emit(event.type, event.envelope(), to=conn.sid)
                    last = event.seq
        else:
            last = -1  # no position: everything that arrives from now on is live
        buffer = conn.buffers.get(stream)
        while buffer:
            event = buffer.popleft()
            if event.seq > last:
                await self.sio.emit(event.type, event.envelope(), to=conn.sid)
                last = event.seq
            buffer = conn.buffers.get(stream)
        self._stop_replaying(stream, conn.sid)

    def _stop_replaying(self, stream: str, sid: str) -> None:
        sids = self._replaying.get(stream)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self._replaying[stream]
        conn = self._connections.get(sid)
        if conn is not None:
            conn.buffers.pop(stream, None)

    async def _on_event(self, event: Event) -> None:
        replaying = self._replaying.get(event.stream)
        skip: list[str] | None = None
        if replaying:
            skip = list(replaying)
            for sid in skip:
                conn = self._connections.get(sid)
                if conn is not None and event.stream in conn.buffers:
                    conn.buffers[event.stream].append(event)
        await self.sio.emit(event.type, event.envelope(), room=event.stream, skip_sid=skip)

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.streams:
            await self.sio.emit(event.type, event.data, room=list(event.streams))

    # client events -----------------------------------------------------------------------------

    def _guarded(
        self, handler: Callable[[Connection, Any], Awaitable[dict[str, Any]]]
    ) -> Callable[[str, Any], Awaitable[dict[str, Any]]]:
        """Rate-limit and shield a client event handler; the reply goes to the ack callback."""

        async def guarded(sid: str, data: Any = None) -> dict[str, Any]:
            conn = self._connections.get(sid)
            if conn is None:
                return {"ok": False, "error": "not_ready"}
            if not await self._allow(conn):
                return {"ok": False, "error": "rate_limited"}
            try:
                return await handler(conn, data)
            except ValidationError as exc:
                return {
                    "ok": False,
                    "error": "bad_request",
                    "detail": exc.errors(include_url=False, include_input=False)[0]["msg"],
                }

        return guarded

    async def _allow(self, conn: Connection) -> bool:
        if conn.bucket.take(time.monotonic()):
            return True
        conn.strikes += 1
        if conn.strikes == 1 or conn.strikes % 10 == 0:
            await self.sio.emit(
                "error",
                {"code": "rate_limited", "message": "too many events; slow down"},
                to=conn.sid,
            )
        if conn.strikes >= FLOOD_STRIKES_BEFORE_DISCONNECT:
            log.warning("disconnecting %s (user %s): flooding", conn.sid, conn.user_id)
            await self.sio.disconnect(conn.sid)
        return False

    async def _on_subscribe(self, conn: Connection, data: Any) -> dict[str, Any]:
        request = SubscribeRequest.model_validate(data)
        member = await self._member_streams(conn.user)
        if not may_subscribe(conn.user_id, request.stream, member):
            return {"ok": False, "error": "forbidden"}
        if request.stream not in conn.streams:
            await self._join(conn, request.stream)
            await self._catch_up(conn, request.stream, request.since)
        return {"ok": True, "seq": await self._streams.last_seq(request.stream)}

    async def _on_unsubscribe(self, conn: Connection, data: Any) -> dict[str, Any]:
        request = SubscribeRequest.model_validate(data)
        if request.stream == user_stream(conn.user_id):
            return {"ok": False, "error": "personal stream cannot be left"}
        if request.stream in conn.streams:
            conn.streams.discard(request.stream)
            self._stop_replaying(request.stream, conn.sid)
            await self.sio.leave_room(conn.sid, request.stream)
        return {"ok": True}

    async def _on_ping(self, conn: Connection, data: Any) -> dict[str, Any]:
        return {"ok": True}

    async def _on_unknown(self, event: str, sid: str, data: Any = None) -> dict[str, Any]:
        conn = self._connections.get(sid)
        if conn is not None and not await self._allow(conn):
            return {"ok": False, "error": "rate_limited"}
        await self.sio.emit(
            "error", {"code": "unknown_event", "message": f"unknown event {event[:100]!r}"}, to=sid
        )
        return {"ok": False, "error": "unknown_event"}

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sid in list(self._connections):
            try:
                await self.sio.disconnect(sid)
            except Exception:
                log.debug("disconnect of %s at shutdown failed", sid, exc_info=True)
