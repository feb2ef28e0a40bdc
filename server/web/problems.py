"""RFC 9457 problem details: every REST error has this shape and a stable ``type``."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:portalhub:problem:"

# Stable problem types, by HTTP status, for errors raised by aiohttp itself.
_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("body-too-large", "Request body too large"),
}


class BodyTimeout(TimeoutError):
    """The request body did not arrive in time (``server/web/limits.py``); set on the body
    stream, so that whoever reads it gets this, and the client a 408. A TimeoutError, so that
    aiohttp, draining the rest of the body after the answer, gives up quietly."""


class Problem(Exception):
    """Raise anywhere below a handler to answer with a problem document."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    def document(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": TYPE_PREFIX + self.slug,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        doc.update(self.extensions)
        return doc

    def response(self, instance: str | None = None) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.document(instance)),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )


def not_found(what: str) -> Problem:
    return Problem(404, "not-found", "Not found", f"{what} does not exist")


def forbidden(detail: str) -> Problem:
    return Problem(403, "forbidden", "Forbidden", detail)


def conflict(detail: str) -> Problem:
    return Problem(409, "conflict", "Conflict", detail)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error, ours or aiohttp's, into problem+json; never leak a traceback."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response(request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug, title = _HTTP_SLUGS.get(exc.status, ("http-error", exc.reason))
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        http_problem = Problem(exc.status, slug, title, detail or exc.reason)
        response = http_problem.response(request.path)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except BodyTimeout:
        # Logged once where the deadline passed; the connection is not reused.
        timed_out = Problem(
            408, "request-timeout", "Request timeout", "the request body did not arrive in time"
        ).response(request.path)
        timed_out.force_close()
        return timed_out
    except PyMongoError as exc:
        # The database failed or hung (socket timeout): the client may retry, and writes
        # that must not happen twice carry their own keys (client_id for messages).
        log.warning("database error on %s %s: %s", request.method, request.path, exc)
        return Problem(
            503,
            "unavailable",
            "Service unavailable",
            "the database did not complete the request; retry in a moment",
            headers={"Retry-After": "1"},
        ).response(request.path)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return Problem(
            500, "internal-error", "Internal server error", "the error was logged"
        ).response(request.path)
