"""python-engineio's aiohttp driver, adjusted: no per-message compression, and every frame a
client sends checked before the library parses it (``server/channels/frames.py``).

Compression: the driver accepts permessage-deflate from every browser, so each frame is
compressed separately for each connection, with a zlib state per socket. Measured by the
benchmark: 150 KiB of memory per idle connection instead of 37 KiB, and a third fewer
deliveries per second in fan-out. Node's socket.io leaves it off by default; so do we.

Frames: a bad frame on a websocket ends the connection as if the client had closed it; a bad
long-polling payload ends the Engine.IO session with a 400. One log line each. A long-polling
body that does not arrive in time (``server/web/limits.py``, logged there) ends the session
the same way. (Once a websocket is up, ``HubSocket`` in ``server/channels/engine.py`` reads its
frames and checks them the same way; ``CheckedWebSocket.wait`` checks those of an upgrade.)

The driver has no public switches, so the hub swaps in these for its own server only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from aiohttp.web import WebSocketResponse
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
    waiting (the disconnect handlers run, CLOSE is sent or queued), and then let go: a
    websocket closes, a waiting long-poll is answered (``HubSocket.close_now``)."""
    engine_socket = engineio_server.sockets.get(eio_sid)
    if engine_socket is not None:
        await engine_socket.close(wait=False)
        engine_socket.close_now()


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


_FIXED_ENVIRON: dict[str, Any] = {
    "wsgi.errors": sys.stderr,
    "wsgi.version": (1, 0),
    "wsgi.async": True,
    "wsgi.multithread": False,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
    "SERVER_SOFTWARE": "aiohttp",
    "REMOTE_ADDR": "127.0.0.1",
    "REMOTE_PORT": "0",
    "SERVER_NAME": "aiohttp",
    "SERVER_PORT": "0",
    "SCRIPT_NAME": "",
}
_REQUEST_ENVIRON: dict[str, Callable[[web.Request], Any]] = {
    "REQUEST_METHOD": lambda r: r.method,
    "QUERY_STRING": lambda r: r.query_string or "",
    "RAW_URI": lambda r: r.path_qs,
    "SERVER_PROTOCOL": lambda r: f"HTTP/{r.version[0]}.{r.version[1]}",
    "PATH_INFO": lambda r: r.path,
    "aiohttp.request": lambda r: r,
}


class RequestEnviron(Mapping[str, Any]):
    """python-engineio's WSGI-like environ of an aiohttp request (what its aiohttp driver's
    ``translate_request`` builds), read from the request when asked for instead of copied.
    python-socketio keeps the environ of a connection's first request for as long as the
    connection lasts: a copy of every header, about 1.3 KiB per idle connection."""

    __slots__ = ("_request", "_server")

    def __init__(self, request: web.Request, engineio_server: Any) -> None:
        self._request = request
        self._server = engineio_server

    def __getitem__(self, key: str) -> Any:
        request = self._request
        fixed = _FIXED_ENVIRON.get(key, _MISSING)
        if fixed is not _MISSING:
            return fixed
        read = _REQUEST_ENVIRON.get(key)
        if read is not None:
            return read(request)
        if key == "wsgi.input":
            return _CheckedBody(self._server, request)
        if key == "wsgi.url_scheme":
            return request.headers.get("X-Forwarded-Proto", "http")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            name = key.replace("_", "-")
        elif key.startswith("HTTP_") and key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            name = key[5:].replace("_", "-")
        else:
            raise KeyError(key)
        values = request.headers.getall(name, None)
        if values is None:
            # a header named with "_" is in the environ under the same key as with "-"
            values = [v for k, v in request.headers.items() if _environ_key(k) == key]
            if not values:
                raise KeyError(key)
        return values[-1] if name in ("CONTENT-TYPE", "CONTENT-LENGTH") else ",".join(values)

    def __iter__(self) -> Iterator[str]:
        yield from _FIXED_ENVIRON
        yield from _REQUEST_ENVIRON
        yield from ("wsgi.input", "wsgi.url_scheme")
        seen: set[str] = set()
        for name in self._request.headers:
            key = _environ_key(name)
            if key not in seen:
                seen.add(key)
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


_MISSING = object()


def _environ_key(header: str) -> str:
    upper = header.upper()
    if upper in ("CONTENT-TYPE", "CONTENT-LENGTH"):
        return upper.replace("-", "_")
    return "HTTP_" + upper.replace("-", "_")


def install_drivers(engineio_server: Any) -> None:
    """Make ``engineio_server`` (an AsyncServer on aiohttp) use the drivers above."""

    def translate_request(request: web.Request) -> Mapping[str, Any]:
        return RequestEnviron(request, engineio_server)

    drivers = dict(engineio_server._async)
    drivers["websocket"] = CheckedWebSocket
    drivers["translate_request"] = translate_request
    engineio_server._async = drivers
