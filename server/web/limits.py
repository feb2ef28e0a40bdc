"""Slow and greedy HTTP clients: header and body deadlines, and connections per address.

Without a proxy in front (``make run``), the hub's own HTTP server meets every client:

- **Request heads.** aiohttp closes a connection whose next request head has not fully
  arrived ``keepalive_timeout`` seconds after the connection opened or after the previous
  answer. Dribbled header bytes do not reset that clock, so ``http_header_timeout_seconds``
  is given to aiohttp as its keep-alive timeout: a silent, an idle and a dribbling connection
  are all closed after it.
- **Request bodies** (``body_deadline``): a body must have arrived ``http_body_timeout_seconds``
  after its head, plus a second for every ``BODY_MIN_BYTES_PER_SECOND`` bytes received, so
  that a large upload on a slow line still makes it and a dribbler does not. Past that, the
  body stream fails with ``BodyTimeout``: the reader answers ``408`` and the connection
  closes.
- **Connections per address** (``LimitedSite``): at most ``http_max_connections_per_address``
  open connections from one client address (an IPv6 /64 counts as one address, as a client
  usually holds all of it). One more gets a ``429`` problem and is closed before aiohttp
  sees it. The address is the TCP peer's: nothing the client sends can change it (a
  ``X-Forwarded-For`` header is only read once the connection is accepted). Behind a proxy
  every connection is the proxy's, so a proxied deployment sets 0 (no cap) and limits
  connections per client on the proxy (``deploy/haproxy.cfg``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from server.settings import Settings
from server.web.problems import PROBLEM_CONTENT_TYPE, TYPE_PREFIX, BodyTimeout

log = logging.getLogger(__name__)

BODY_MIN_BYTES_PER_SECOND = 4096
REFUSED_LINGER_SECONDS = 2.0  # a refused client may finish sending before the socket closes
REFUSAL_LOG_INTERVAL = 60.0  # per address: one line, not one per refused connection
RETRY_AFTER_SECONDS = 5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# request bodies ------------------------------------------------------------------------------


class _BodyWatch:
    """Fails ``request``'s body stream once it is late; gone when the body is complete."""

    def __init__(self, request: web.Request, timeout: float) -> None:
        self._request = request
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._bytes_before = request.content.total_bytes
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            self._started + timeout, self._check
        )
        request.content.on_eof(self.cancel)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        body = self._request.content
        if body.is_eof():
            return
        received = body.total_bytes - self._bytes_before
        allowed = self._timeout + received / BODY_MIN_BYTES_PER_SECOND
        elapsed = self._loop.time() - self._started
        if elapsed < allowed:
            self._handle = self._loop.call_at(self._started + allowed, self._check)
            return
        log.info(
            "HTTP %s %s from %s: body not complete after %.0f s (%s bytes); closing",
            self._request.method,
            self._request.path,
            self._request.remote,
            elapsed,
            received,
        )
        body.set_exception(BodyTimeout(f"request body not complete after {elapsed:.0f} s"))


def body_deadline(timeout: float) -> Middleware:
    """Middleware: the body of each request must arrive in time (see the module docstring)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.content.is_eof():  # no body, or all of it here already
            return await handler(request)
        watch = _BodyWatch(request, timeout)
        try:
            return await handler(request)
        finally:
            watch.cancel()

    return middleware


# connections per address -----------------------------------------------------------------------


def address_key(peer: Any) -> str | None:
    """What connections are counted under: the IPv4 address, or the IPv6 /64."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None  # a Unix socket: no address to tell clients apart
    try:
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return peer[0]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AddressCap:
    """Open connections per address, and the refusal of one too many."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no cap
        self.open: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def admit(self, key: str | None) -> bool:
        if key is None or self.limit <= 0:
            return True
        count = self.open.get(key, 0)
        if count >= self.limit:
            self._log_refusal(key)
            return False
        self.open[key] = count + 1
        return True

    def release(self, key: str | None) -> None:
        if key is None or self.limit <= 0:
            return
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)

    def _log_refusal(self, key: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged[key] = now
        log.warning(
            "refusing HTTP connections from %s: %s open already "
            "(PORTALHUB_HTTP_MAX_CONNECTIONS_PER_ADDRESS; logged once a minute)",
            key,
            self.limit,
        )


def _refusal(limit: int) -> bytes:
    body = json.dumps(
        {
            "type": TYPE_PREFIX + "too-many-connections",
            "title": "Too many connections",
            "status": 429,
            "detail": f"at most {limit} connections at once from one address",
            "retry_after": RETRY_AFTER_SECONDS,
        }
    ).encode()
    head = (
        "HTTP/1.1 429 Too Many Requests\r\n"
        f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {RETRY_AFTER_SECONDS}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _CountedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the per-address count. A refused
    connection never reaches aiohttp: it gets the 429 and is closed."""

    def __init__(self, make_inner: Callable[[], asyncio.Protocol], cap: AddressCap) -> None:
        self._make_inner = make_inner
        self._cap = cap
        self._inner: asyncio.Protocol | None = None
        self._key: str | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        key = address_key(transport.get_extra_info("peername"))
        if not self._cap.admit(key):
            self._refuse(transport)
            return
        self._key = key
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.write(_refusal(self._cap.limit))
        if transport.can_write_eof():
            transport.write_eof()
        # Closed once the client has read the answer and hung up, or after a moment: closing
        # at once, with its request still arriving, would reset the connection before the
        # client reads the 429.
        asyncio.get_running_loop().call_later(REFUSED_LINGER_SECONDS, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._cap.release(self._key)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        if self._transport is not None:
            self._transport.close()
        return None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class LimitedSite(web.TCPSite):
    """A TCPSite whose connections go through an ``AddressCap`` first."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int | None,
        max_per_address: int,
    ) -> None:
        super().__init__(runner, host, port)
        self.cap = AddressCap(max_per_address)

    async def start(self) -> None:
        # TCPSite.start, with the protocol factory wrapped (aiohttp has no hook for it).
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        cap = self.cap
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _CountedConnection(server, cap),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


REQUEST_LINE_BYTES = 16 * 1024


def http_runner(app: web.Application, settings: Settings, **kwargs: Any) -> web.AppRunner:
    """The AppRunner of the hub's HTTP server, with the header deadline (as aiohttp's
    keep-alive timeout: see the module docstring)."""
    return web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=settings.http_header_timeout_seconds,
        # GET /presence takes up to 500 ids (docs/api.md): a 12.5 KB request line, past
        # aiohttp's default of 8190 bytes. 16 KiB fits it and HAProxy's default buffer.
        max_line_size=REQUEST_LINE_BYTES,
        **kwargs,
    )
