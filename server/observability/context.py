"""Who the current work is for: a request id and an event id, carried in context variables.

The request id comes from an HTTP request (``X-Request-ID``, or made up), an XMPP session or a
received mail; the event id (``stream#seq``) is set while the bus hands an event to this
node's transports. Log records pick both up (``server.observability.logs``), so the lines of
one request, and of one event from its store to its deliveries, can be found together.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import secrets
from collections.abc import Iterator

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "portalhub_request_id", default=None
)
EVENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "portalhub_event_id", default=None
)

# Short and inert: it is echoed in a response header and written into every log line.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,63}")


def new_request_id() -> str:
    return secrets.token_hex(8)


def valid_request_id(value: str | None) -> str | None:
    """``value`` when it is a usable request id (1-64 of ``A-Z a-z 0-9 . _ : @ + = / -``)."""
    if value is not None and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return None


def event_id(stream: str, seq: int) -> str:
    return f"{stream}#{seq}"


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def current_event_id() -> str | None:
    return EVENT_ID.get()


@contextlib.contextmanager
def traced(*, request_id: str | None, event: str | None = None) -> Iterator[None]:
    """Within the block, work is for ``request_id`` (None: for no request) and ``event``."""
    request_token = REQUEST_ID.set(request_id)
    event_token = EVENT_ID.set(event) if event is not None else None
    try:
        yield
    finally:
        if event_token is not None:
            EVENT_ID.reset(event_token)
        REQUEST_ID.reset(request_token)


def context_for(request_id: str) -> contextvars.Context:
    """A copy of the current context in which the request id is ``request_id``: for a task
    that serves one source from start to end (an XMPP session)."""
    context = contextvars.copy_context()
    context.run(REQUEST_ID.set, request_id)
    return context
