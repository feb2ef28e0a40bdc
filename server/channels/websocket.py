"""python-engineio's aiohttp driver, adjusted: no per-message compression, and every frame a
client sends checked before the library parses it (``server/channels/frames.py``).

Compression: the driver accepts permessage-deflate from every browser, so each frame is
compressed separately for each connection, with a zlib state per socket. Measured by the
benchmark: 150 KiB of memory per idle connection instead of 37 KiB, and a third fewer
deliveries per second in fan-out. Node's socket.io leaves it off by default; so do we.

Frames: a bad frame on a websocket ends the connection as if the client had closed it; a bad
long-polling payload ends the Engine.IO session with a 400. One log line each. A long-polling
body that does not arrive in time (``server/web/limits.py``, logged there) ends the session
the same way.

The driver has no public switches, so the hub swaps in these for its own server only.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web import WebSocketResponse
from engineio.async_drivers import aiohttp as engineio_aiohttp
from engineio.async_drivers.aiohttp import WebSocket
from engineio.exceptions import EngineIOError

from server.channels.frames import BadFrame, check_engine_packet, check_engine_payload
from server.web.problems import BodyTimeout

log = logging.getLogger(__name__)


def log_bad_frame(request: web.Request, transport: str, problem: BadFrame) -> None:
    log.info(
        "closing Socket.IO connection from %s (%s): bad frame: %s",
        request.remote,
        transport,
        problem,
    )


class CheckedWebSocket(WebSocket):  # type: ignore[misc]
    async def __call__(self, environ: dict[str, Any]) -> WebSocketResponse:
        request = environ["aiohttp.request"]
        self._sock = WebSocketResponse(
            max_msg_size=self.server.max_http_buffer_size, compress=False
        )
        await self._sock.prepare(request)
        self.environ = environ
        await self.handler(self)
        return self._sock

    async def wait(self) -> Any:
        frame = await super().wait()
        try:
            check_engine_packet(frame)
        except BadFrame as problem:
            log_bad_frame(self.environ["aiohttp.request"], "websocket", problem)
            return None  # the library's "closed by the client": it closes the session
        return frame


async def _close_now(engineio_server: Any, eio_sid: str) -> None:
    """python-engineio's ``disconnect`` sends CLOSE and then waits for the client to fetch it:
    on long-polling, for as long as the client likes. Here the socket is closed without
    waiting (the disconnect handlers run, CLOSE is queued), and an empty item makes its writer
    stop: a websocket closes, a waiting long-poll is answered."""
    engine_socket = engineio_server.sockets.get(eio_sid)
    if engine_socket is not None:
        await engine_socket.close(wait=False)
        engine_socket.queue.put_nowait(None)


async def end_session(engineio_server: Any, eio_sid: str) -> None:
    """End an Engine.IO session from this side, now (see ``_close_now``)."""
    await _close_now(engineio_server, eio_sid)
    await engineio_server.disconnect(eio_sid)  # closed already: only forgets it


class _CheckedBody:
    """The long-polling POST body as python-engineio reads it, checked first. A bad one ends
    the session; the EngineIOError raised then makes the library answer 400."""

    def __init__(self, engineio_server: Any, request: web.Request) -> None:
        self._server = engineio_server
        self._request = request

    async def read(self, length: int = -1) -> bytes:
        try:
            body = await self._request.content.read(length)
            check_engine_payload(body)
        except (BodyTimeout, BadFrame) as problem:
            if isinstance(problem, BadFrame):
                log_bad_frame(self._request, "polling", problem)
            # The library forgets the session on the EngineIOError (and answers 400 only
            # while it still knows it).
            await _close_now(self._server, self._request.query.get("sid", ""))
            raise EngineIOError(str(problem)) from None
        return body


def install_drivers(engineio_server: Any) -> None:
    """Make ``engineio_server`` (an AsyncServer on aiohttp) use the drivers above."""

    def translate_request(request: web.Request) -> dict[str, Any]:
        environ: dict[str, Any] = engineio_aiohttp.translate_request(request)
        environ["wsgi.input"] = _CheckedBody(engineio_server, request)
        return environ

    drivers = dict(engineio_server._async)
    drivers["websocket"] = CheckedWebSocket
    drivers["translate_request"] = translate_request
    engineio_server._async = drivers
