"""python-engineio's server, with websockets written to directly and pings on one shared timer.

python-engineio (4.15.1, on aiohttp 3.14) keeps, for each websocket: the aiohttp handler task,
a writer task polling an ``asyncio.Queue``, a task per received frame (``ensure_future`` under
``wait_for``) and a task sleeping ``ping_interval`` between pings. In fan-out its writer tasks
took about half of the hub's time, and an idle connection cost those tasks, the queue and
their timers. Here, for a socket on the websocket transport:

- **Writes are synchronous.** A packet becomes a websocket frame and goes to the transport at
  once (``HubSocket.write_frame``). A broadcast builds the frame once and writes the same
  bytes to every socket (server frames are not masked). The frames a socket gets in one turn
  of the event loop go out in one ``transport.write`` at the end of the turn (``corked``, one
  ``call_soon`` for all sockets): a batch of messages published together costs each socket one
  send system call, not one per message. When the transport's buffer is above
  its high-water mark (asyncio pauses the protocol: 64 KiB), frames wait in a per-socket
  backlog, in order, and are written when the transport resumes (a callback on aiohttp's
  drain future, no task). A socket whose backlog passes ``backlog_limit`` bytes belongs to a
  client that does not read: its connection is cut (one log line), and nobody else waits.
- **Reading is the aiohttp handler's own loop**, one frame after another, with no task per
  frame and no timeout of its own: the ping timer finds dead clients.
- **Pings come from one timer** (``PingClock``): a wheel of one-second slots with each
  socket's next ping or pong deadline, one ``call_at`` for all of them. A socket that does
  not answer a ping within ``ping_timeout`` is closed.
- **No queue until one is needed.** The ``asyncio.Queue`` of python-engineio is created only
  for long-polling, which keeps the library's behaviour (its queue and writer) unchanged.

Written against python-engineio 4.15.1, python-socketio 5.18.1 and aiohttp 3.14.5; it copies
``AsyncServer._handle_connect`` and ``AsyncSocket._websocket_handler`` (and opens a websocket
session without going through them, ``HubEngineServer._open_websocket``), and relies on
aiohttp's ``BaseProtocol._paused``/``_drain_waiter``, ``WebSocketWriter.transport``/``protocol``
and, to free what a websocket no longer needs, ``RequestHandler._parser`` and
``StreamResponse._headers``.
``tests/test_socket_transport.py`` fails when any of these versions changes: read the new
library code, adjust this module, then update the versions there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import engineio
from aiohttp import WSMsgType, web
from aiohttp.web import WebSocketResponse
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket
from multidict import CIMultiDict

from server.channels.frames import BadFrame, check_engine_packet

log = logging.getLogger(__name__)

# a close of a websocket waits this long for the client to take what is still buffered
CLOSE_GRACE_SECONDS = 2.0

_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
_CLOSE_FRAME = b"\x88\x02\x03\xe8"  # a websocket close frame, code 1000
_PING = eio_packet.Packet(eio_packet.PING)
_CLOSE = eio_packet.Packet(eio_packet.CLOSE)


def websocket_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked websocket frame (a server's): the same bytes fit every client."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return _LEN2(0x80 | opcode, 126, size) + payload
    return _LEN3(0x80 | opcode, 127, size) + payload


# Frames a socket gets in one turn of the loop are written together up to this many bytes
# (asyncio's default high-water mark): beyond it they go now, and the transport may pause.
CORK_BYTES = 64 * 1024


def text_frame(text: str) -> bytes:
    return websocket_frame(text.encode())


def packet_frame(pkt: eio_packet.Packet) -> bytes:
    encoded = pkt.encode()
    if isinstance(encoded, bytes):
        return websocket_frame(encoded, 0x2)
    return text_frame(encoded)


class PingClock:
    """Every socket's next ping (or pong deadline) on one timer: slots of ``resolution``
    seconds (a second, or a quarter of the ping interval or timeout if that is shorter), each
    a list of sockets, and one ``call_at`` for the next slot. A deadline is rounded up to its
    slot. A socket rescheduled before its slot comes stays in the old slot's list and is
    skipped there (``HubSocket.ping_slot``)."""

    def __init__(self) -> None:
        self._slots: dict[int, list[HubSocket]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resolution = 1.0

    def start(self, interval: float, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.resolution = min(1.0, interval / 4, timeout / 4)

    def schedule(self, socket: HubSocket, delay: float) -> None:
        loop = self._loop
        assert loop is not None
        slot = math.ceil((loop.time() + delay) / self.resolution)
        socket.ping_slot = slot
        sockets = self._slots.get(slot)
        if sockets is None:
            self._slots[slot] = [socket]
        else:
            sockets.append(socket)
        if self._handle is None:
            self._handle = loop.call_at(slot * self.resolution, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time() / self.resolution + 1e-6  # a timer may fire a hair early
        for slot in sorted(s for s in self._slots if s <= now):
            for socket in self._slots.pop(slot):
                if socket.ping_slot == slot and not socket.closed:
                    try:
                        socket.ping_due()
                    except Exception:
                        log.exception("ping of Engine.IO socket %s failed", socket.sid)
        self._handle = None
        if self._slots:
            self._handle = self._loop.call_at(min(self._slots) * self.resolution, self._tick)

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._slots.clear()


class HubSocket(AsyncSocket):  # type: ignore[misc]
    """An Engine.IO session. On long-polling it is python-engineio's; on a websocket it writes
    to the transport itself (see the module docstring)."""

    def __init__(self, server: HubEngineServer, sid: str) -> None:
        # BaseSocket.__init__'s attributes, without its queue (made when first needed) and
        # with the session dict also made on first use
        self.server = server
        self.sid = sid
        self.last_ping: float | None = None
        self.connected = False
        self.upgrading = False
        self.upgraded = False
        self.closing = False
        self.closed = False
        self._queue: asyncio.Queue[Any] | None = None
        self._session: dict[str, Any] | None = None
        # websocket mode
        self.opening: eio_packet.Packet | None = None  # OPEN, for a websocket's first frame
        self.websocket: Any = None  # the aiohttp WebSocketResponse, once frames go direct
        self.transport: asyncio.Transport | None = None
        self._protocol: Any = None
        self._reader: asyncio.Task[Any] | None = None
        self.backlog: deque[bytes] | None = None
        self.backlog_bytes = 0
        # frames of this turn of the loop, written together by HubEngineServer._uncork
        self.corked: list[bytes] | None = None
        self.corked_bytes = 0
        self._flushed: asyncio.Future[None] | None = None
        self._end_reason: str | None = None
        # pings
        self.ping_slot = 0
        self.awaiting_pong = False

    # python-engineio's attributes, made on first use ------------------------------------------

    @property
    def queue(self) -> asyncio.Queue[Any]:
        if self._queue is None:
            self._queue = self.server.create_queue()
        return self._queue

    @property
    def session(self) -> dict[str, Any]:
        if self._session is None:
            self._session = {}
        return self._session

    @session.setter
    def session(self, value: dict[str, Any]) -> None:
        self._session = value

    # sending ---------------------------------------------------------------------------------

    async def send(self, pkt: eio_packet.Packet) -> None:
        self.send_now(pkt)

    def send_now(self, pkt: eio_packet.Packet) -> None:
        """Send ``pkt``: written now on a websocket, queued for the next poll otherwise."""
        if self.closed:
            return
        if self.websocket is not None:
            self.write_frame(packet_frame(pkt))
        else:
            self.queue.put_nowait(pkt)

    def write_frame(self, frame: bytes) -> None:
        """Write one websocket frame (at the end of this turn of the loop, with the others of
        the turn), or add it to the backlog behind what waits already."""
        backlog = self.backlog
        if backlog is None:
            corked = self.corked
            if corked is not None:
                corked.append(frame)
                self.corked_bytes += len(frame)
                if self.corked_bytes >= CORK_BYTES:
                    # enough for one write: the transport's buffer (and its pause) sees it now
                    self.uncork()
                return
            if not self._protocol._paused:
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    self.corked = [frame]
                    self.corked_bytes = len(frame)
                    self.server.cork(self)
                return
            backlog = self.backlog = deque()
            self._when_writable()
        elif self._end_reason is not None:
            return  # closing: its close frame is the last thing in the backlog
        backlog.append(frame)
        self.backlog_bytes += len(frame)
        if self.backlog_bytes > self.server.backlog_limit:
            self._too_slow()

    def uncork(self) -> None:
        """Write the frames of this turn in one write (before anything written after them)."""
        corked = self.corked
        if corked is None:
            return
        self.corked = None
        self.corked_bytes = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def _when_writable(self) -> None:
        """Flush the backlog when the transport resumes writing: a callback on the future
        aiohttp's own writers wait on (made here if none waits yet)."""
        protocol = self._protocol
        waiter = protocol._drain_waiter
        if waiter is None or waiter.done():
            waiter = protocol._drain_waiter = protocol._loop.create_future()
        waiter.add_done_callback(self._flush)

    def _flush(self, _waiter: Any = None) -> None:
        backlog = self.backlog
        if backlog is None:
            return
        transport = self.transport
        if transport is None or transport.is_closing() or self._protocol.transport is None:
            self._drop_backlog()
            return
        while backlog:
            if self._protocol._paused:
                self._when_writable()
                return
            frame = backlog.popleft()
            self.backlog_bytes -= len(frame)
            transport.write(frame)
        self.backlog = None
        self.backlog_bytes = 0
        self._wake_flushed()
        if self._end_reason is not None and not transport.is_closing():
            self._close_transport()  # a close waited for the backlog

    def _drop_backlog(self) -> None:
        self.backlog = None
        self.backlog_bytes = 0
        self.corked = None
        self.corked_bytes = 0
        self._wake_flushed()

    def _wake_flushed(self) -> None:
        flushed, self._flushed = self._flushed, None
        if flushed is not None and not flushed.done():
            flushed.set_result(None)

    async def flushed(self) -> None:
        """Wait until the backlog has gone to the transport (or the socket has closed)."""
        if self.backlog is None:
            return
        if self._flushed is None:
            self._flushed = asyncio.get_running_loop().create_future()
        await self._flushed

    def _too_slow(self) -> None:
        """The client stopped reading: cut the connection, drop what waits for it. The reader
        loop then closes the session (the disconnect handlers run there)."""
        request = getattr(self.websocket, "_req", None)
        log.warning(
            "closing Engine.IO connection %s from %s: it does not read what is sent to it "
            "(%s bytes waiting)",
            self.sid,
            getattr(request, "remote", "?"),
            self.backlog_bytes + self.corked_bytes,
        )
        self._drop_backlog()
        self._end_reason = self.server.reason.TRANSPORT_ERROR
        if self.transport is not None:
            self.transport.abort()

    # pings -----------------------------------------------------------------------------------

    def schedule_ping(self) -> None:
        self.awaiting_pong = False
        server = self.server
        if server.clock._loop is None:
            server.clock.start(server.ping_interval, server.ping_timeout)
        server.clock.schedule(self, server.ping_interval)

    def ping_due(self) -> None:
        """Called by the clock: send a ping, or, with the last one unanswered, close."""
        if self.awaiting_pong:
            log.info("Engine.IO connection %s did not answer a ping: closing it", self.sid)
            self.server.logger.info("%s: Client is gone, closing socket", self.sid)
            if self.websocket is not None:
                self.end_websocket(self.server.reason.PING_TIMEOUT)
            else:
                self.server.close_later(self, self.server.reason.PING_TIMEOUT)
            return
        self.awaiting_pong = True
        self.last_ping = time.time()
        self.send_now(_PING)
        self.server.clock.schedule(self, self.server.ping_timeout)

    def _pong(self) -> None:
        if self.awaiting_pong:
            self.schedule_ping()

    async def check_ping_timeout(self) -> bool:
        if self.closed:
            raise engineio.exceptions.SocketIsClosedError()
        return True  # the clock closes a socket whose ping went unanswered

    async def receive(self, pkt: eio_packet.Packet) -> None:
        if pkt.packet_type == eio_packet.PONG:
            self._pong()
        else:
            await super().receive(pkt)

    # closing ---------------------------------------------------------------------------------

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        if self.closed or self.closing:
            return
        self.closing = True
        await self.server._trigger_event(
            "disconnect", self.sid, reason or self.server.reason.SERVER_DISCONNECT, run_async=False
        )
        if not abort:
            self.send_now(_CLOSE)
        self.closed = True
        if self.websocket is not None:
            if asyncio.current_task() is not self._reader:
                self.end_websocket(reason)  # the reader loop then ends (a closed transport)
        elif wait:
            await self.queue.join()

    def close_now(self) -> None:
        """Make a closed socket let go at once: a websocket's connection is closed, a waiting
        long-poll is answered (empty)."""
        if self.websocket is not None:
            self.end_websocket(self.server.reason.SERVER_DISCONNECT)
        else:
            self.queue.put_nowait(None)

    def end_websocket(self, reason: str | None) -> None:
        """Close the websocket from this side: a close frame after whatever waits, then the
        connection (cut if the client has not taken it all within ``CLOSE_GRACE_SECONDS``)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._end_reason is None:
            self._end_reason = reason or self.server.reason.SERVER_DISCONNECT
        self.uncork()  # what was sent before the close goes before it
        if self.backlog is not None:
            self.backlog.append(_CLOSE_FRAME)
            self._protocol._loop.call_later(CLOSE_GRACE_SECONDS, _abort, transport)
            return  # _flush closes it
        transport.write(_CLOSE_FRAME)
        self._close_transport()

    def _close_transport(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.close()
        if transport.get_write_buffer_size():
            self._protocol._loop.call_later(CLOSE_GRACE_SECONDS, _abort, transport)

    # the websocket ---------------------------------------------------------------------------

    async def _websocket_handler(self, ws: Any) -> None:
        """python-engineio's handler for a websocket: the upgrade from long-polling as there,
        then frames written direct and read here, with no task of its own."""
        if self.connected:
            # an upgrade from long-polling: python-engineio's probe exchange
            self.upgrading = True
            try:
                pkt = await ws.wait()
            except OSError:  # pragma: no cover
                self.upgrading = False
                return
            probe = eio_packet.Packet(encoded_packet=pkt) if pkt else None
            if probe is None or probe.packet_type != eio_packet.PING or probe.data != "probe":
                self.server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
                self.upgrading = False
                return
            await ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
            self.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # ends the poll
            try:
                pkt = await ws.wait()
            except OSError:  # pragma: no cover
                self.upgrading = False
                return
            upgrade = eio_packet.Packet(encoded_packet=pkt) if pkt else None
            if upgrade is None or upgrade.packet_type != eio_packet.UPGRADE:
                self.server.logger.info(
                    "%s: Failed websocket upgrade, expected UPGRADE packet, received %s instead.",
                    self.sid,
                    pkt,
                )
                self.upgrading = False
                return
            self.upgraded = True
            self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True
        await self.serve(ws._sock, ws.environ)

    async def serve(self, sock: WebSocketResponse, environ: Mapping[str, Any]) -> None:
        """The websocket is up: write to it directly from now on, and read its frames until
        it closes (in the aiohttp handler's own task), then close the session."""
        writer = sock._writer
        assert writer is not None
        self.transport = writer.transport
        self._protocol = writer.protocol
        self._reader = asyncio.current_task()
        self.websocket = sock
        # From here every send is a direct write: first what was queued, in order.
        if self.opening is not None:
            self.write_frame(packet_frame(self.opening))
            self.opening = None
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            queued = queue.get_nowait()
            queue.task_done()
            if queued is not None:
                self.write_frame(packet_frame(queued))
        queue = queued = None  # this frame lasts as long as the websocket
        self.server.logger.info("%s: Upgrade to websocket successful", self.sid)
        limit = self.server.max_http_buffer_size
        try:
            while not self.closed:
                msg = await sock.receive()
                if msg.type is not WSMsgType.TEXT:
                    if msg.type is WSMsgType.BINARY:
                        _log_bad_frame(environ, BadFrame("binary frame"))
                    break  # closed by the client, or broken
                frame: str = msg.data
                try:
                    check_engine_packet(frame)
                except BadFrame as problem:
                    _log_bad_frame(environ, problem)
                    break
                if len(frame) > limit:
                    break
                kind = frame[0]
                if kind == "4":
                    await self.server._trigger_event(
                        "message", self.sid, frame[1:], run_async=False
                    )
                elif kind == "3":
                    self._pong()
                elif kind == "1":
                    await self.close(
                        wait=False, abort=True, reason=self.server.reason.CLIENT_DISCONNECT
                    )
                elif kind == "5":
                    self.send_now(eio_packet.Packet(eio_packet.NOOP))
                # OPEN, PING and NOOP from a client mean nothing (python-engineio ignores them)
        finally:
            self._drop_backlog()
            await self.close(
                wait=False,
                abort=True,
                reason=self._end_reason or self.server.reason.TRANSPORT_CLOSE,
            )


def _forget_handshake(request: web.Request, sock: WebSocketResponse) -> None:
    """Let go of what aiohttp keeps of the HTTP request once it is a websocket: its HTTP parser
    (unused after an upgrade; aiohttp checks for None) and the answer's headers (sent). About
    2.5 KiB of each idle connection (aiohttp 3.14; see the module docstring)."""
    protocol = request.protocol
    if protocol is not None and protocol._upgraded and protocol._payload_parser is not None:
        protocol._parser = None
    sock._headers = CIMultiDict()


def _abort(transport: asyncio.Transport) -> None:
    if not transport.is_closing() or transport.get_write_buffer_size():
        transport.abort()


def _log_bad_frame(environ: Mapping[str, Any], problem: BadFrame) -> None:
    request = environ.get("aiohttp.request")
    log.info(
        "closing Socket.IO connection from %s (websocket): bad frame: %s",
        getattr(request, "remote", "?"),
        problem,
    )


class HubEngineServer(engineio.AsyncServer):  # type: ignore[misc]
    """python-engineio's server with ``HubSocket`` sessions and one ping timer.

    ``backlog_limit``: bytes a websocket may have waiting for its client (beyond the
    transport's own buffer) before the connection is cut."""

    def __init__(self, *args: Any, backlog_limit: int = 1024 * 1024, **kwargs: Any) -> None:
        kwargs["monitor_clients"] = False  # the clock checks pings; no task walks the sockets
        super().__init__(*args, **kwargs)
        self.backlog_limit = backlog_limit
        self.clock = PingClock()
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._corked: list[HubSocket] = []

    def cork(self, socket: HubSocket) -> None:
        """``socket`` has frames of this turn: write them at its end (one callback for all)."""
        if not self._corked:
            asyncio.get_running_loop().call_soon(self._uncork)
        self._corked.append(socket)

    def _uncork(self) -> None:
        corked, self._corked = self._corked, []
        for socket in corked:
            try:
                socket.uncork()
            except Exception:
                # one transport's failure must not leave the others' frames unwritten
                log.exception("writing to socket %s failed", socket.sid)

    def close_later(self, socket: HubSocket, reason: str) -> None:
        """Close a long-polling ``socket`` (its disconnect handlers run in a task of ours)."""

        async def close() -> None:
            try:
                await socket.close(wait=False, abort=False, reason=reason)
                socket.queue.put_nowait(None)  # a waiting poll is answered
            finally:
                if self.sockets.get(socket.sid) is socket:
                    del self.sockets[socket.sid]

        task = asyncio.create_task(close())
        self._closing_tasks.add(task)
        task.add_done_callback(self._closing_tasks.discard)

    async def shutdown(self) -> None:
        self.clock.stop()
        for task in list(self._closing_tasks):
            task.cancel()
        await asyncio.gather(*self._closing_tasks, return_exceptions=True)
        await super().shutdown()

    async def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        """python-engineio's entry point, with a short way for what most clients do: open a
        session straight on a websocket. Fewer coroutines stay suspended under the websocket
        for its whole life (each one a frame of memory)."""
        request = args[0] if args else None
        if isinstance(request, web.Request) and not kwargs and self._new_websocket(request):
            response = await self._open_websocket(request)
            if response is not None:
                return response
        return await super().handle_request(*args, **kwargs)

    def _new_websocket(self, request: web.Request) -> bool:
        # (a function of its own: what it parses is not kept in a frame that stays suspended
        # as long as the websocket lasts; nor on the request, as request.query would be)
        query = parse_qs(request.query_string)
        return (
            request.method == "GET"
            and query.get("transport") == ["websocket"]
            and "sid" not in query
            and "j" not in query
            and query.get("EIO") == ["4"]
            and "websocket" in self.transports
            and request.headers.get("Upgrade", "").lower() == "websocket"
        )

    async def _open_websocket(self, request: web.Request) -> web.StreamResponse | None:
        """``_handle_connect`` and the websocket handler in one, for a new websocket session;
        None when python-engineio must answer (a refused origin)."""
        environ = self._async["translate_request"](request)
        if self.cors_allowed_origins != []:
            origin = environ.get("HTTP_ORIGIN")
            if origin:
                allowed = self._cors_allowed_origins(environ)
                if allowed is not None and origin not in allowed:
                    return None  # python-engineio's answer and log line
        sid = self.generate_id()
        s = HubSocket(self, sid)
        self.sockets[sid] = s
        s.opening = self._open_packet(sid, "websocket")
        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            self.logger.warning("Application rejected connection")
            response: web.StreamResponse = await self._make_response(
                self._unauthorized(ret or None), environ
            )
            return response
        s.schedule_ping()
        sock = WebSocketResponse(max_msg_size=self.max_http_buffer_size, compress=False)
        try:
            await sock.prepare(request)
            _forget_handshake(request, sock)
        except BaseException:
            await s.close(wait=False, abort=True, reason=self.reason.TRANSPORT_ERROR)
            self.sockets.pop(sid, None)
            raise
        s.connected = s.upgraded = True
        try:
            await s.serve(sock, environ)
        finally:
            if self.sockets.get(sid) is s:
                del self.sockets[sid]
        return sock

    def _open_packet(self, sid: str, transport: str) -> eio_packet.Packet:
        return eio_packet.Packet(
            eio_packet.OPEN,
            {
                "sid": sid,
                "upgrades": self._upgrades(sid, transport),
                "pingTimeout": int(self.ping_timeout * 1000),
                "pingInterval": int(self.ping_interval + self.ping_interval_grace_period) * 1000,
                "maxPayload": self.max_http_buffer_size,
            },
        )

    async def _handle_connect(
        self, environ: dict[str, Any], transport: str, jsonp_index: int | None = None
    ) -> Any:
        """python-engineio's, with a ``HubSocket``; on a websocket the OPEN packet is the
        first frame written once the websocket is up, and no queue is made."""
        sid = self.generate_id()
        s = HubSocket(self, sid)
        self.sockets[sid] = s
        pkt = self._open_packet(sid, transport)
        if transport == "websocket":
            s.opening = pkt
        else:
            s.send_now(pkt)
        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            self.logger.warning("Application rejected connection")
            return self._unauthorized(ret or None)
        s.schedule_ping()
        if transport == "websocket":
            ret = await s.handle_get_request(environ)
            if s.closed and sid in self.sockets:
                del self.sockets[sid]
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            attributes = (
                self.cookie
                if isinstance(self.cookie, dict)
                else {"name": self.cookie, "path": "/", "SameSite": "Lax"}
            )
            headers = [("Set-Cookie", self._generate_sid_cookie(sid, attributes))]
        try:
            return self._ok(await s.poll(), headers=headers, jsonp_index=jsonp_index)
        except engineio.exceptions.QueueEmpty:
            return self._bad_request()
