"""The Socket.IO hub: authenticated connections, replay-then-live delivery, authorised rooms.

Delivery order per stream is guaranteed on the server, not left to clients to sort out. While a
connection catches up on a stream it is skipped by live emits to that stream's room, and the
events it was skipped for are kept in its buffer. After the replay from the database, the
buffer is drained (dropping what the replay already sent), and only when it is empty - checked
and cleared with no await in between - does the connection take live emits again. Every event
is therefore either in the database read or in the buffer, and is sent exactly once, in order.

Memberships travel on personal streams: an event carrying ``join_stream``/``from_seq`` makes
the member's live connections subscribe to that stream from that position, and a reconnecting
client that replays such an event has the stream replayed from there too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import socketio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.auth.service import AuthService, token_hash
from server.auth.sessions import LiveSession
from server.background import SideTasks, stop
from server.channels.emit import HubManager, HubServer
from server.channels.frames import BadFrame, StrictPacket, event_namespace
from server.channels.ratelimit import TokenBucket
from server.channels.rooms import may_subscribe
from server.channels.state import HeldStates
from server.channels.websocket import end_session, install_drivers
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, Event, VersionedState
from server.events.streams import StreamLog, user_stream
from server.observability import instruments
from server.presence.service import PresenceService
from server.settings import Settings
from server.store.database import Document

log = logging.getLogger(__name__)

TRANSPORT = "socketio"
SnapshotPart = Callable[[Document], Awaitable[Any]]
# Given the part's value in the snapshot, to send only what may have changed since.
CaughtUpPart = Callable[[Document, Any], Awaitable[Any]]
MemberStreams = Callable[[Document], Awaitable[list[str]]]
ClientHandler = Callable[["Connection", Any], Awaitable[dict[str, Any]]]

MAX_STREAM_NAME = 200
CONNECT_WAIT_SECONDS = 10.0
# A client that keeps flooding after being told is cut off.
FLOOD_STRIKES_BEFORE_DISCONNECT = 20
STRIKE_MEMORY_SECONDS = 10.0
# Draining clients reconnect after a random delay up to this, not all in the same instant.
DRAIN_RECONNECT_SPREAD_MS = 3000
ENGINE_CLOSE_WAIT = 2.0

# The connection a task works for alone (its session start, a join, a subscribe): what the
# task sends that connection waits while its client is behind, so that a replay of thousands
# of events goes at the client's pace instead of piling up in memory (and past the backlog
# limit). Emits from shared paths (the bus) never wait.
_paced: ContextVar[str | None] = ContextVar("paced", default=None)


class ConnectAuth(BaseModel):
    model_config = ConfigDict(extra="ignore")

    token: str = Field(min_length=1, max_length=256)
    since: dict[str, int] = Field(default_factory=dict, max_length=500)
    active: bool = True


class SubscribeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: str = Field(min_length=1, max_length=MAX_STREAM_NAME)
    since: int | None = Field(default=None, ge=0)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    active: bool = True


class Typing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chat_id: str = Field(min_length=1, max_length=64)


@dataclass(slots=True)
class Connection:
    """One Socket.IO connection's state. Slotted, and what an idle connection does not use
    is not made: the token bucket comes with the first client event, and ``buffers`` holds
    a stream only while the connection catches up on it."""

    sid: str
    user: Document
    since: dict[str, int]
    bucket: TokenBucket | None = None
    active: bool = True
    streams: set[str] = field(default_factory=set)
    buffers: dict[str, deque[Event]] = field(default_factory=dict)
    token_hash: str = ""
    strikes: int = 0
    last_strike: float = 0.0
    registered: bool = False
    states: HeldStates = field(default_factory=HeldStates)

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
        presence: PresenceService,
        *,
        member_streams: MemberStreams = no_member_streams,
        client_manager: socketio.AsyncManager | None = None,
    ) -> None:
        self.settings = settings
        self._auth = auth
        self._streams = streams
        self._presence = presence
        self.member_streams = member_streams
        self._snapshot_parts: dict[str, SnapshotPart] = {}
        self._caught_up_parts: dict[str, CaughtUpPart] = {}
        self._client_events: dict[str, ClientHandler] = {}
        self._bus = bus
        # python-socketio's server, writing to websockets itself (server/channels/emit.py,
        # engine.py)
        self.sio = HubServer(
            async_mode="aiohttp",
            client_manager=client_manager if client_manager is not None else HubManager(),
            max_http_buffer_size=settings.socket_max_message_bytes,
            always_connect=False,
            serializer=StrictPacket,  # a packet it cannot decode raises BadFrame
            logger=_library_logger("socketio.server"),
            engineio_logger=_library_logger("engineio.server"),
            backlog_limit=settings.socket_send_backlog_bytes,
        )
        install_drivers(self.sio.eio)
        self.sio.on_connected = self._connected
        # Tasks waiting for a connection's CONNECT packet to go out.
        self._connect_waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Engine.IO connections that have not authenticated yet, and when they must have.
        self._auth_deadlines: dict[str, asyncio.TimerHandle] = {}
        self._wrap_engine_handlers()
        self._connections: dict[str, Connection] = {}
        # Connections whose snapshot has not gone out: a room's ephemeral event skips them
        # (nothing may reach a client before its snapshot, which holds that state anyway).
        self._before_snapshot: set[str] = set()
        self._by_user: dict[str, set[str]] = {}
        self._replaying: dict[str, set[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background = SideTasks("hub background task", log)
        self.draining = False  # readiness answers "draining"; set on SIGTERM
        self._refusing = False  # after drain(): new connections are refused
        bus.subscribe(self._on_event)
        bus.subscribe_ephemeral(self._on_ephemeral)
        presence.on_drop(TRANSPORT, self._drop)
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("*", self._on_client_event)
        self.on_client_event("subscribe", self._on_subscribe)
        self.on_client_event("unsubscribe", self._on_unsubscribe)
        self.on_client_event("ping", self._on_ping)
        self.on_client_event("presence.heartbeat", self._on_heartbeat)

    def _wrap_engine_handlers(self) -> None:
        """python-socketio's Engine.IO handlers, with a bad packet closing the connection (one
        log line, not the library's traceback) and a deadline for authenticating."""
        engine = self.sio.eio
        on_connect, on_message = engine.handlers["connect"], engine.handlers["message"]
        on_disconnect = engine.handlers["disconnect"]

        async def connected(eio_sid: str, environ: dict[str, Any]) -> Any:
            result = await on_connect(eio_sid, environ)
            self._auth_deadlines[eio_sid] = asyncio.get_running_loop().call_later(
                self.settings.socket_auth_timeout_seconds, self._auth_deadline_passed, eio_sid
            )
            return result

        async def message(eio_sid: str, data: Any) -> None:
            engine_socket = engine.sockets.get(eio_sid)
            if engine_socket is None or engine_socket.closing or engine_socket.closed:
                return  # what was still on its way when a bad frame closed the connection
            try:
                namespace = event_namespace(data)
                if namespace is not None and not self.sio.manager.is_connected(
                    self.sio.manager.sid_from_eio_sid(eio_sid, namespace), namespace
                ):
                    # python-socketio would log a warning for each and carry on
                    raise BadFrame("event while not connected")
                await on_message(eio_sid, data)
            except BadFrame as problem:
                await self._bad_frame(eio_sid, problem)

        async def disconnected(eio_sid: str, reason: Any = None) -> None:
            deadline = self._auth_deadlines.pop(eio_sid, None)
            if deadline is not None:
                deadline.cancel()
            await on_disconnect(eio_sid, reason)

        engine.on("connect", connected)
        engine.on("message", message)
        engine.on("disconnect", disconnected)

    def _connected(self, sid: str) -> None:
        """The CONNECT packet of ``sid`` has gone out: whatever waited for it may send."""
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        deadline = self._auth_deadlines.pop(eio_sid, None) if eio_sid is not None else None
        if deadline is not None:
            deadline.cancel()  # authenticated: no need to keep the timer for its 30 s
        for waiter in self._connect_waiters.pop(sid, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _until_connected(self, sid: str) -> bool:
        """Wait (up to ``CONNECT_WAIT_SECONDS``) for the CONNECT packet of ``sid`` to go out;
        False if it does not, or the connection ends first."""
        if self.sio.manager.is_connected(sid, "/"):
            return True
        if sid not in self._connections:
            return False
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._connect_waiters.setdefault(sid, [])
        waiters.append(waiter)
        try:
            async with asyncio.timeout(CONNECT_WAIT_SECONDS):
                await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters and self._connect_waiters.get(sid) is waiters:
                    del self._connect_waiters[sid]
        return bool(self.sio.manager.is_connected(sid, "/"))

    def _peer(self, eio_sid: str) -> str:
        request = self.sio.environ.get(eio_sid, {}).get("aiohttp.request")
        return str(request.remote) if request is not None else "?"

    async def _bad_frame(self, eio_sid: str, problem: BadFrame) -> None:
        sid = self.sio.manager.sid_from_eio_sid(eio_sid, "/")
        conn = self._connections.get(sid) if sid is not None else None
        log.info(
            "closing Socket.IO connection from %s (%s): bad frame: %s",
            self._peer(eio_sid),
            f"user {conn.user_id}" if conn is not None else "not authenticated",
            problem,
        )
        await end_session(self.sio.eio, eio_sid)

    def _auth_deadline_passed(self, eio_sid: str) -> None:
        self._auth_deadlines.pop(eio_sid, None)
        sid = self.sio.manager.sid_from_eio_sid(eio_sid, "/")
        if (sid is not None and sid in self._connections) or eio_sid not in self.sio.eio.sockets:
            return
        log.debug("closing Engine.IO connection from %s: not authenticated", self._peer(eio_sid))
        self._spawn(end_session(self.sio.eio, eio_sid))

    async def _emit(self, event: str, data: Any, **target: Any) -> int:
        """To this node's own connections, written now, in one pass (``HubServer.emit_local``);
        returns to how many. Every node gets every event from the bus and delivers it to its
        connections, in order; the Socket.IO manager's queue (Redis, with several nodes) would
        deliver a second copy, later and unordered.

        In a paced task (``_paced``) an emit to one connection then waits while that
        connection's client is behind."""
        count = self.sio.emit_local(event, data, **target)
        if count is None:
            skip = target.get("skip_sid")
            if isinstance(skip, set | frozenset):
                target["skip_sid"] = list(skip)  # python-socketio takes a list
            await self.sio.emit(event, data, ignore_queue=True, **target)
            return 0
        sid = target.get("to")
        if count and sid is not None and sid == _paced.get():
            socket = self.sio.engine_socket(sid)
            if socket is not None and socket.backlog is not None:
                await socket.flushed()
        return count

    async def _disconnect(self, sid: str) -> None:
        await self.sio.disconnect(sid, ignore_queue=True)

    def add_snapshot_part(
        self, key: str, part: SnapshotPart, caught_up: CaughtUpPart | None = None
    ) -> None:
        """Register one piece of the ephemeral state a connecting client receives.
        ``caught_up``: what of it is sent again once the streams are caught up (only the
        counters are), given what the snapshot had of it; by default the whole part again."""
        self._snapshot_parts[key] = part
        self._caught_up_parts[key] = caught_up or (lambda user, _before: part(user))

    def on_client_event(self, name: str, handler: ClientHandler) -> None:
        """Register a client-to-server event; its return value is the acknowledgement."""
        self._client_events[name] = handler

    def load(self) -> tuple[int, int]:
        """Open connections, and live events held for connections still catching up."""
        held = sum(len(b) for conn in self._connections.values() for b in conn.buffers.values())
        return len(self._connections), held

    def connections_of(self, user_id: str) -> list[Connection]:
        return [
            self._connections[s] for s in self._by_user.get(user_id, ()) if s in self._connections
        ]

    # connect / disconnect ----------------------------------------------------------------------

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        if self._refusing:
            raise socketio.exceptions.ConnectionRefusedError(
                "this node is shutting down: connect again", {"code": "draining"}
            )
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
        mark = self._auth.sessions.mark()
        found = await self._auth.session_for(parsed.token)
        if found is None:
            raise socketio.exceptions.ConnectionRefusedError(
                "invalid or expired token", {"code": "invalid_token"}
            )
        user, token = found
        # Counted and registered below with no await in between: concurrent connects of one
        # user cannot slip past the limit together.
        limit = self.settings.socket_max_connections_per_user
        if len(self._by_user.get(str(user["_id"]), ())) >= limit:
            raise socketio.exceptions.ConnectionRefusedError(
                f"too many connections: at most {limit} per user; close another tab or device",
                {"code": "too_many_connections"},
            )
        since = {s: n for s, n in parsed.since.items() if len(s) <= MAX_STREAM_NAME}
        conn = Connection(
            sid,
            self._same_user(user),
            since,
            active=parsed.active,
            token_hash=token_hash(parsed.token),
        )
        self._connections[sid] = conn
        self._before_snapshot.add(sid)
        self._by_user.setdefault(conn.user_id, set()).add(sid)
        # Ended when the token is revoked or expires, on whichever node that happens.
        self._auth.sessions.track(
            LiveSession(
                f"{TRANSPORT}:{sid}",
                conn.user_id,
                functools.partial(self._end_session, sid),
                token_hash=conn.token_hash,
                expires_at=token["expires_at"],
                password_stamp=user.get("password_stamp"),
            ),
            mark,
        )
        self._tasks[sid] = asyncio.create_task(self._start_session(sid), name=f"session:{sid}")

    def _same_user(self, user: Document) -> Document:
        """``user``, or the equal document another connection of the user holds already: each
        connection keeping its own copy cost a few KiB per connection."""
        for other in self._by_user.get(str(user["_id"]), ()):
            conn = self._connections.get(other)
            if conn is not None:
                return conn.user if conn.user == user else user
        return user

    async def _on_disconnect(self, sid: str, reason: Any = None) -> None:
        self._auth.sessions.untrack(f"{TRANSPORT}:{sid}")
        task = self._tasks.pop(sid, None)
        if task is not None and not task.done():
            task.cancel()
        conn = self._connections.pop(sid, None)
        self._before_snapshot.discard(sid)
        for waiter in self._connect_waiters.pop(sid, ()):
            if not waiter.done():
                waiter.set_result(None)  # it finds the connection gone
        if conn is None:
            return
        sids = self._by_user.get(conn.user_id)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self._by_user[conn.user_id]
        for stream in conn.streams:
            self._stop_replaying(stream, sid)
        if conn.registered:
            await self._presence.disconnected(conn.user_id, sid)

    async def _drop(self, transport: str, sid: str) -> None:
        """The presence sweeper found this connection silent for too long."""
        if sid in self._connections:
            await self._disconnect(sid)

    async def _start_session(self, sid: str) -> None:
        _paced.set(sid)
        try:
            await self._wait_connected(sid)
            conn = self._connections.get(sid)
            if conn is None:
                return
            requested = set(conn.since)
            streams = [
                s
                for s in [user_stream(conn.user_id), *await self.member_streams(conn.user)]
                # a chat joined live meanwhile is already being caught up by _join_live
                if s not in conn.streams
            ]
            self._join_all(conn, streams)
            snapshot = await self._snapshot(conn)
            # No await between noting what the connection holds and sending it: a push
            # handled in between would be diffed against a state it does not have yet.
            # The stream heads (one per chat of the user) are numbers the hub read itself:
            # only the parts may hold versioned states.
            sent = _in_full(conn, {k: v for k, v in snapshot.items() if k != "streams"})
            sent["streams"] = snapshot["streams"]
            await self._emit("snapshot", sent, to=sid)
            self._before_snapshot.discard(sid)
            conn.registered = True
            await self._presence.connected(conn.user_id, sid, TRANSPORT, conn.active)
            await self._emit(
                "presence.changed", await self._presence.own_view(conn.user_id), to=sid
            )
            for stream in streams:
                # Without a position the client loads current state after the snapshot, so
                # what it needs live is what comes after the snapshot's head.
                await self._catch_up(
                    conn, stream, conn.since.get(stream), snapshot["streams"].get(stream)
                )
            counters = self._caught_up_parts.get("counters")
            if counters is not None:
                # Counters in the snapshot were computed before the stream heads were read:
                # once caught up, the authoritative values close that window.
                # Versioned parts go only as far as what this connection lacks (the CRM's),
                # or whole unless it holds newer (the tasks', the unread ones).
                update = _changes_only(conn, await counters(conn.user, snapshot.get("counters")))
                await self._emit("counters.changed", update, to=sid)
            # A client that asked for streams it does not belong to learns it plainly.
            for stream in requested - conn.streams:
                await self._emit("subscribe_error", {"stream": stream, "code": "forbidden"}, to=sid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session start failed for %s", sid)
            await self._disconnect(sid)
        finally:
            self._tasks.pop(sid, None)

    def _join_all(self, conn: Connection, streams: list[str]) -> None:
        """Mark ``conn`` as catching up on each of ``streams`` and put it in their rooms, in
        one synchronous pass: no event can land between a stream's mark and its room. python-
        socketio's ``enter_room`` is a coroutine per room (with a log call) that ends in the
        manager's ``basic_enter_room`` for a connection of this node, Redis or not; with the
        connection gone meanwhile, the Redis manager would publish the join to the other
        nodes instead."""
        manager = self.sio.manager
        if self._connections.get(conn.sid) is not conn or not manager.is_connected(conn.sid, "/"):
            raise asyncio.CancelledError  # gone meanwhile: its session start ends here
        for stream in streams:
            self._mark_joining(conn, stream)
        manager.enter_rooms(conn.sid, "/", streams)

    async def _wait_connected(self, sid: str) -> None:
        # The connect handler runs before the CONNECT packet goes out; nothing may be sent
        # to the client before that packet, so wait for it (HubServer.on_connected).
        if not await self._until_connected(sid):
            raise asyncio.CancelledError

    async def _snapshot(self, conn: Connection) -> dict[str, Any]:
        snapshot: dict[str, Any] = {}
        for key, part in self._snapshot_parts.items():
            snapshot[key] = await part(conn.user)
        heads = await self._streams.heads_of(sorted(conn.streams))  # one query at most
        snapshot["streams"] = dict(sorted(heads.items()))
        return snapshot

    # streams -----------------------------------------------------------------------------------

    def _mark_joining(self, conn: Connection, stream: str) -> None:
        """From now on live events of ``stream`` for ``conn`` are buffered until caught up."""
        conn.streams.add(stream)
        conn.buffers[stream] = deque()
        self._replaying.setdefault(stream, set()).add(conn.sid)

    async def _catch_up(
        self, conn: Connection, stream: str, since: int | None, floor: int | None = None
    ) -> None:
        """Send what ``conn`` missed on ``stream`` after ``since``, then switch it to live.

        Without ``since``, nothing is replayed and live delivery starts after ``floor``.
        """
        last = floor if floor is not None else -1
        if since is not None:
            missed = await self._streams.replay(stream, since)
            if missed is None:
                last = await self._streams.last_seq(stream)
                await self._emit("resync", {"stream": stream, "seq": last}, to=conn.sid)
            else:
                last = since
                for event in missed:
                    self._note_membership(conn, event)
                    await self._emit(event.type, event.envelope(), to=conn.sid)
                    last = event.seq
                instruments.socketio_caught_up(replayed=len(missed))
        if last > 0 and not self._streams.published(stream, last):
            # An event read from the database may not be published yet; its live copy must
            # land in the buffer (and be dropped there), not reach the client a second time.
            # (Checked first without a coroutine: a connect does this for each of its chats.)
            await self._streams.wait_published(stream, last)
        if last >= 0:
            # The same for events stored by other nodes, whose live copies may still be on
            # their way through Redis: the bus pulls them now and drops the copies later.
            live_from = await self._bus.caught_up(stream, last)
            # Another reader on this node may have read further first, and the bus then took
            # its position without passing what lies between (two members of a new chat on
            # one node): what this connection lacks of it, and has not buffered, comes from
            # the database.
            buffer = conn.buffers.get(stream)
            through = min(live_from, buffer[0].seq - 1) if buffer else live_from
            if through > last:
                skipped = await self._streams.read_range(stream, last, through)
                for event in skipped:
                    self._note_membership(conn, event)
                    await self._emit(event.type, event.envelope(), to=conn.sid)
                    last = event.seq
                instruments.socketio_caught_up(replayed=len(skipped))
        buffer = conn.buffers.get(stream)
        while buffer:
            event = buffer.popleft()
            if event.seq > last:
                self._note_membership(conn, event)
                await self._emit(event.type, event.envelope(), to=conn.sid)
                instruments.socketio_caught_up(buffered=1)
                last = event.seq
            buffer = conn.buffers.get(stream)
        self._stop_replaying(stream, conn.sid)

    def _note_membership(self, conn: Connection, event: Event) -> None:
        """A replayed join of a stream the client has no position for: replay it from the join."""
        joined = event.data.get("join_stream") if isinstance(event.data, dict) else None
        if isinstance(joined, str) and joined not in conn.since:
            conn.since[joined] = int(event.data.get("from_seq", 0))

    def _stop_replaying(self, stream: str, sid: str) -> None:
        sids = self._replaying.get(stream)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self._replaying[stream]
        conn = self._connections.get(sid)
        if conn is not None and conn.buffers:
            conn.buffers.pop(stream, None)
            if not conn.buffers:
                conn.buffers = {}  # a dict emptied keeps its table; a new empty one has none

    async def _on_event(self, event: Event) -> None:
        replaying = self._replaying.get(event.stream)
        if replaying:
            for sid in replaying:
                conn = self._connections.get(sid)
                if conn is not None and event.stream in conn.buffers:
                    conn.buffers[event.stream].append(event)
        # One synchronous pass over the room (HubServer.emit_local): the set of replaying
        # connections cannot change under it.
        copies = await self._emit(
            event.type, event.envelope(), room=event.stream, skip_sid=replaying or None
        )
        instruments.socketio_delivered(event, copies)
        if event.stream.startswith("user:"):
            self._follow_membership(event)

    def _follow_membership(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        user_id = event.stream.partition(":")[2]
        joined, left = data.get("join_stream"), data.get("leave_stream")
        for conn in self.connections_of(user_id):
            if isinstance(joined, str) and joined not in conn.streams:
                self._mark_joining(conn, joined)  # synchronously: nothing can slip past
                self._spawn(self._join_live(conn, joined, int(data.get("from_seq", 0))))
            if isinstance(left, str) and left in conn.streams:
                conn.streams.discard(left)
                self._stop_replaying(left, conn.sid)
                self._spawn(self.sio.leave_room(conn.sid, left))

    async def _join_live(self, conn: Connection, stream: str, from_seq: int) -> None:
        _paced.set(conn.sid)  # a task of its own (_spawn), for this connection alone
        await self.sio.enter_room(conn.sid, stream)
        await self._catch_up(conn, stream, from_seq)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        self._background.spawn(coro)

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type == "session.revoked":
            return  # the SessionGuard checks the sessions and calls _end_session
        elif (state := VersionedState.from_private(event.private)) is not None:
            await self._offer_state(event, state)
        elif event.streams:
            # A connection still before its snapshot would get the event ahead of it; the
            # snapshot it is about to get holds the state as it was read. The set itself: the
            # pass over the room is synchronous (as with ``replaying`` above), and a copy per
            # event cost one per connection of a connect burst.
            skip = self._before_snapshot or None
            await self._emit(event.type, event.data, room=list(event.streams), skip_sid=skip)

    async def _offer_state(self, event: EphemeralEvent, state: VersionedState) -> None:
        """Each of the user's connections gets the difference from what it holds."""
        for stream in event.streams:
            if not stream.startswith("user:"):
                continue
            for conn in self.connections_of(stream.partition(":")[2]):
                update = conn.states.offer(state)
                if update:
                    await self._emit(event.type, {state.key: update}, to=conn.sid)

    async def _end_session(self, sid: str, reason: str) -> None:
        """The connection's token was revoked or expired: say why, then disconnect."""
        # revoked while connecting: nothing may go out before CONNECT
        connected = await self._until_connected(sid)
        if sid in self._connections:
            if connected:
                await self._emit("session.revoked", {"reason": reason}, to=sid)
            await self._disconnect(sid)

    # client events -----------------------------------------------------------------------------

    async def _on_client_event(self, event: str, sid: str, data: Any = None) -> dict[str, Any]:
        """Every client event: rate-limited, validated, answered through the ack."""
        conn = self._connections.get(sid)
        if conn is None:
            return {"ok": False, "error": "not_ready"}
        if not await self._allow(conn):
            return {"ok": False, "error": "rate_limited"}
        handler = self._client_events.get(event)
        if handler is None:
            await self._emit(
                "error",
                {"code": "unknown_event", "message": f"unknown event {event[:100]!r}"},
                to=sid,
            )
            return {"ok": False, "error": "unknown_event"}
        try:
            return await handler(conn, data)
        except ValidationError as exc:
            return {
                "ok": False,
                "error": "bad_request",
                "detail": exc.errors(include_url=False, include_input=False)[0]["msg"],
            }

    async def _allow(self, conn: Connection) -> bool:
        now = time.monotonic()
        if conn.bucket is None:  # made on first use: the same as made full at connect
            conn.bucket = TokenBucket(
                self.settings.socket_events_per_second, self.settings.socket_event_burst, now
            )
        if conn.bucket.take(now):
            return True
        if now - conn.last_strike > STRIKE_MEMORY_SECONDS:
            conn.strikes = 0  # an old burst is forgiven: only a sustained flood is cut off
        conn.last_strike = now
        conn.strikes += 1
        if conn.strikes == 1 or conn.strikes % 10 == 0:
            await self._emit(
                "error",
                {"code": "rate_limited", "message": "too many events; slow down"},
                to=conn.sid,
            )
        if conn.strikes >= FLOOD_STRIKES_BEFORE_DISCONNECT:
            log.warning("disconnecting %s (user %s): flooding", conn.sid, conn.user_id)
            await self._disconnect(conn.sid)
        return False

    async def _on_subscribe(self, conn: Connection, data: Any) -> dict[str, Any]:
        _paced.set(conn.sid)  # this client event's own task
        request = SubscribeRequest.model_validate(data)
        member = await self.member_streams(conn.user)
        if not may_subscribe(conn.user_id, request.stream, member):
            return {"ok": False, "error": "forbidden"}
        if request.stream not in conn.streams:
            self._mark_joining(conn, request.stream)
            await self.sio.enter_room(conn.sid, request.stream)
            head = await self._streams.last_seq(request.stream)
            await self._catch_up(conn, request.stream, request.since, head)
        return {"ok": True, "seq": await self._streams.last_seq(request.stream)}

    async def _on_unsubscribe(self, conn: Connection, data: Any) -> dict[str, Any]:
        request = SubscribeRequest.model_validate(data)
        if request.stream == user_stream(conn.user_id):
            return {"ok": False, "error": "forbidden", "detail": "the personal stream stays"}
        if request.stream in conn.streams:
            conn.streams.discard(request.stream)
            self._stop_replaying(request.stream, conn.sid)
            await self.sio.leave_room(conn.sid, request.stream)
        return {"ok": True}

    async def _on_ping(self, conn: Connection, data: Any) -> dict[str, Any]:
        return {"ok": True}

    async def _on_heartbeat(self, conn: Connection, data: Any) -> dict[str, Any]:
        beat = Heartbeat.model_validate(data or {})
        conn.active = beat.active
        if conn.registered:
            await self._presence.heartbeat(conn.user_id, conn.sid, beat.active)
        return {"ok": True}

    async def drain(self, reconnect_spread_ms: int = DRAIN_RECONNECT_SPREAD_MS) -> None:
        """The node is going away: refuse new connections, tell every client to reconnect
        (through the load balancer, to another node) after a random delay, and disconnect it.
        The client reconnects with its ``since`` positions and misses nothing."""
        self.draining = self._refusing = True
        sids = list(self._connections)
        engine_sids: list[str] = []
        for sid in sids:
            delay = random.randint(0, max(0, reconnect_spread_ms))
            engine_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
            try:
                await self._emit("server.draining", {"reconnect_after_ms": delay}, to=sid)
                await self._disconnect(sid)
            except Exception:
                log.debug("drain of %s failed", sid, exc_info=True)
            if engine_sid is not None:
                engine_sids.append(engine_sid)
        # A Socket.IO disconnect leaves the Engine.IO connection open: close it as well, or a
        # long-poll request would hold up the HTTP server's shutdown. The close waits for the
        # client to fetch what is queued, briefly.
        engines = [self.sio.eio.sockets.get(e) for e in engine_sids]
        await asyncio.gather(
            *(asyncio.wait_for(self.sio.eio.disconnect(e), ENGINE_CLOSE_WAIT) for e in engine_sids),
            return_exceptions=True,
        )
        # A client that closed first leaves its last long-poll waiting out the ping timeout
        # (python-engineio answers it only then): answer it now, empty. A websocket closes.
        for engine in engines:
            if engine is not None:
                engine.close_now()
        if sids:
            log.info("drained %s Socket.IO connections", len(sids))

    async def close(self) -> None:
        for deadline in self._auth_deadlines.values():
            deadline.cancel()
        self._auth_deadlines.clear()
        await self.sio.eio.shutdown()  # the ping timer, closes under way
        await stop(*self._tasks.values(), *self._background)
        for sid in list(self._connections):
            try:
                await self._disconnect(sid)
            except Exception:
                log.debug("disconnect of %s at shutdown failed", sid, exc_info=True)
        # With Redis, python-socketio's manager runs a listener it never stops by itself. Its
        # reconnect loop catches every exception, so a cancellation that lands while Redis is
        # away is swallowed (a test's teardown waited on it for ever after a Redis restart):
        # stop() cancels again and gives up on it rather than hold the shutdown.
        listener = getattr(self.sio.manager, "thread", None)
        if isinstance(listener, asyncio.Task):
            await stop(listener)


def _library_logger(name: str) -> logging.Logger:
    """python-socketio's and python-engineio's logger. They log every packet, message text
    included, at INFO: unless logging was set up otherwise, theirs stops at WARNING (and
    ``configure_logging`` holds it there). Given explicitly, so that the libraries add no
    handler of their own (which wrote a second, unformatted copy of each line)."""
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    return logger


def typing_handler(typing: Callable[[str, str], Awaitable[bool]]) -> ClientHandler:
    """``im.typing``: relayed live to the chat's members, never stored."""

    async def handle(conn: Connection, data: Any) -> dict[str, Any]:
        request = Typing.model_validate(data)
        if not await typing(conn.user_id, request.chat_id):
            return {"ok": False, "error": "forbidden"}
        return {"ok": True}

    return handle


def _in_full(conn: Connection, data: Any) -> Any:
    """``data`` with each versioned state in it whole, noted as what ``conn`` now holds."""
    if isinstance(data, VersionedState):
        return conn.states.reset(data)
    if isinstance(data, dict):
        # Called only on what may hold a state: a snapshot's presence and stream heads are
        # dicts of a hundred strings and numbers, a call each for nothing.
        return {
            key: _in_full(conn, value) if isinstance(value, dict | VersionedState) else value
            for key, value in data.items()
        }
    return data


def _changes_only(conn: Connection, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each versioned state in it cut to what ``conn`` lacks, or left out when
    it holds newer (``HeldStates.again``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, VersionedState):
            update = conn.states.again(value)
            if update:
                out[key] = update
        else:
            out[key] = value
    return out
