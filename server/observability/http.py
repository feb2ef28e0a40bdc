"""HTTP: the request id of every request, its count and duration, and ``GET /metrics``.

``/metrics`` is for the operators' scraper, not for portal users. With no
``PORTALHUB_METRICS_TOKEN`` it is served to loopback peers only, and not to requests that
came through a proxy (``Forwarded`` / ``X-Forwarded-For`` / ``X-Real-IP``): a proxy on the
same host would otherwise make the whole world loopback. With a token set, it is served to
whoever sends ``Authorization: Bearer <token>``, from anywhere (loopback included).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from server.observability.context import REQUEST_ID, new_request_id, valid_request_id
from server.observability.instruments import HTTP_REQUESTS, HTTP_SECONDS, REGISTRY
from server.observability.metrics import CONTENT_TYPE, render
from server.observability.runtime import OBSERVABILITY
from server.web.api import Call
from server.web.problems import PROBLEM_CONTENT_TYPE, Problem
from server.web.routes import api

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
CLIENT_GONE = 499  # the client closed the connection before the answer (nginx's code)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    """Requests under way in this process, so that a draining node can let them finish
    before aiohttp's shutdown stops reading from their connections."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        self.count += 1
        self._idle.clear()

    def finished(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is under way; False when ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


IN_FLIGHT = InFlight()


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gives the request its id (the client's ``X-Request-ID`` when usable, else a new one),
    sets it for the logs of the request's work, answers with it, and counts the request."""
    request_id = valid_request_id(request.headers.get(REQUEST_ID_HEADER)) or new_request_id()
    token = REQUEST_ID.set(request_id)
    started = time.perf_counter()
    status = 500
    IN_FLIGHT.started()
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:  # a websocket has sent its headers already
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except web.HTTPException as exc:  # the ones below 400 (errors became problems inside)
        status = exc.status
        exc.headers[REQUEST_ID_HEADER] = request_id
        raise
    except BaseException as exc:
        status = CLIENT_GONE if isinstance(exc, asyncio.CancelledError) else 500
        raise
    finally:
        IN_FLIGHT.finished()
        elapsed = time.perf_counter() - started
        method = request.method if request.method in METHODS else "OTHER"
        HTTP_REQUESTS.inc(method=method, status=str(status))
        HTTP_SECONDS.observe(elapsed)
        log.debug(
            "%s %s %s %.1f ms",
            request.method,
            request.rel_url.path,
            status,
            elapsed * 1000,
        )
        REQUEST_ID.reset(token)


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_scraper(request: web.Request) -> None:
    """Refuse a scrape that is neither from loopback nor carries the metrics token."""
    configured = request.app[OBSERVABILITY].settings.metrics_token
    if configured is not None and configured.get_secret_value():
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), configured.get_secret_value().encode()):
            raise Problem(
                401,
                "unauthorized",
                "Authentication required",
                "send the metrics token as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="portalhub-metrics"'},
            )
        return
    proxied = any(name in request.headers for name in PROXY_HEADERS)
    if proxied or not is_loopback(request.remote):
        raise Problem(
            403,
            "forbidden",
            "Forbidden",
            "metrics are served to loopback only; set PORTALHUB_METRICS_TOKEN to scrape "
            "from elsewhere",
        )


def _problem(description: str) -> dict[str, object]:
    return {
        "description": description,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


@api.route(
    "GET",
    "/metrics",
    summary="This node's metrics, for Prometheus",
    tag="health",
    auth="none",
    description="Text exposition format 0.0.4. Served to loopback only, or with "
    "PORTALHUB_METRICS_TOKEN set, to requests carrying it as a bearer token.",
    extra_responses={
        "200": {
            "description": "The metrics",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        "401": _problem("PORTALHUB_METRICS_TOKEN is set and was not sent"),
        "403": _problem("No token configured and the request is not from loopback"),
    },
)
async def metrics(call: Call) -> web.Response:
    check_scraper(call.request)
    observability = call.request.app[OBSERVABILITY]
    text = render([*REGISTRY.collect(), *await observability.collect()])
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})
