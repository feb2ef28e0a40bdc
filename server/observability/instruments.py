"""The metrics that instrumented code updates, and the one-line helpers it calls.

Kept free of the hub's other modules, so that any of them may import it.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC

from server.events.models import Event
from server.observability.context import current_event_id
from server.observability.metrics import Registry
from server.store.database import utcnow

trace_log = logging.getLogger("server.observability.trace")

REGISTRY = Registry()

TRANSPORTS = ("socketio", "xmpp")
MAIL_OUTCOMES = ("done", "duplicate", "unmatched", "refused", "bounce", "ignored")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")

EVENTS_PUBLISHED = REGISTRY.counter(
    "portalhub_events_published_total",
    "Events stored by this node, by stream kind (the stream name before ':')",
    ["kind"],
)
EVENTS_DELIVERED = REGISTRY.counter(
    "portalhub_events_delivered_total",
    "Live copies of stored events sent to this node's clients (one per connection), by transport",
    ["transport"],
)
EVENTS_REPLAYED = REGISTRY.counter(
    "portalhub_events_replayed_total",
    "Stored events sent from history to Socket.IO clients catching up",
)
FANOUT_SECONDS = REGISTRY.histogram(
    "portalhub_fanout_seconds",
    "From an event's store time (its ts) to its emit to this node's Socket.IO connections",
)
MAIL_MESSAGES = REGISTRY.counter(
    "portalhub_mail_messages_total",
    "Received mails that reached an outcome in this node's pipeline, by outcome",
    ["outcome"],
)
HTTP_REQUESTS = REGISTRY.counter(
    "portalhub_http_requests_total",
    "HTTP requests answered (Socket.IO's included), by method and status",
    ["method", "status"],
)
HTTP_SECONDS = REGISTRY.histogram(
    "portalhub_http_request_duration_seconds",
    "Time to answer an HTTP request (a websocket counts until it closes)",
)

for _kind in ("user", "chat"):
    EVENTS_PUBLISHED.touch(kind=_kind)
for _transport in TRANSPORTS:
    EVENTS_DELIVERED.touch(transport=_transport)
for _outcome in MAIL_OUTCOMES:
    MAIL_MESSAGES.touch(outcome=_outcome)


def stream_kind(stream: str) -> str:
    """``user`` for ``user:<id>``; ``other`` for a name without a plain prefix."""
    kind, colon, _ = stream.partition(":")
    return kind if colon and _KIND.fullmatch(kind) else "other"


def socketio_delivered(event: Event, connections: int) -> None:
    """The hub emitted ``event`` live to ``connections`` of its connections."""
    if connections <= 0:
        return
    EVENTS_DELIVERED.inc(connections, transport="socketio")
    stored = event.ts if event.ts.tzinfo is not None else event.ts.replace(tzinfo=UTC)
    FANOUT_SECONDS.observe(max(0.0, (utcnow() - stored).total_seconds()))
    trace_log.debug("event delivered", extra={"transport": "socketio", "copies": connections})


def socketio_caught_up(replayed: int = 0, buffered: int = 0) -> None:
    """A connection catching up got ``replayed`` events from history and ``buffered`` live
    ones that had waited for the replay."""
    if replayed:
        EVENTS_REPLAYED.inc(replayed)
    if buffered:
        EVENTS_DELIVERED.inc(buffered, transport="socketio")


def xmpp_stanza_sent() -> None:
    """A stanza went to an XMPP session; while the bus hands out an event, that stanza is a
    delivery of the event."""
    if current_event_id() is not None:
        EVENTS_DELIVERED.inc(transport="xmpp")


def mail_finished(outcome: str) -> None:
    MAIL_MESSAGES.inc(outcome=outcome)
