"""Log output: today's text lines, or one JSON object per line (``PORTALHUB_LOG_FORMAT=json``).

A JSON line has ``ts`` (UTC, milliseconds), ``level``, ``logger``, ``msg``, ``node``, and when
known ``request_id`` and ``event_id`` (from the context variables at the time of the call),
``exc_info`` (the traceback as a string) and any ``extra`` fields given by the caller.

No secret and no message body is logged, at any level. ``PORTALHUB_LOG_LEVEL=DEBUG`` is for
the hub's own loggers (``server.*``, ``portalhub``): the third-party ones stay at INFO and
above, because several of them echo what passes through them at DEBUG or INFO (see
``THIRD_PARTY``). Every line is also passed through ``redact`` before it is written.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from server.observability.context import current_event_id, current_request_id
from server.observability.redact import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

_node: str | None = None

# Attributes every LogRecord has: what is left over came from ``extra``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_OURS = {"node", "request_id", "event_id"}


def set_node(node: str | None) -> None:
    """The node id written into every JSON line (one hub per process)."""
    global _node
    _node = node


class ContextFilter(logging.Filter):
    """Stamps each record with the node and the current request and event ids (on the thread
    that logs, where the context variables are the caller's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        if getattr(record, "event_id", None) is None:
            record.event_id = current_event_id()
        if getattr(record, "node", None) is None:
            record.node = _node
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "node": getattr(record, "node", None) or _node,
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id is not None:
            doc["request_id"] = request_id
        event = getattr(record, "event_id", None) or current_event_id()
        if event is not None:
            doc["event_id"] = event
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _OURS and not key.startswith("_"):
                doc.setdefault(key, value)
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(_redacted(doc), default=str, ensure_ascii=False)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    return value


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` lines, the traceback included, passed through ``redact``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def handler(log_format: str) -> logging.Handler:
    """A stderr handler writing ``log_format`` (``text`` or ``json``)."""
    out = logging.StreamHandler()
    out.addFilter(ContextFilter())
    out.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return out


# The hub's own loggers: these follow PORTALHUB_LOG_LEVEL all the way down to DEBUG.
OWN = ("server", "portalhub")
# Third-party loggers held above the levels where they write what passes through them,
# whatever PORTALHUB_LOG_LEVEL says (every other one stays at INFO or above):
# - python-engineio and python-socketio log every packet, message text included, at INFO;
# - PyMongo's command log writes every command and reply with its documents (password
#   hashes, SCRAM keys, token hashes, message bodies) at DEBUG;
# - aioimaplib writes lines of the IMAP server's answers it did not expect (mail data among
#   them) at INFO;
# - aiosmtpd ("mail.log") writes every line of a mail and of an AUTH exchange at DEBUG. Its
#   INFO lines (peers, commands with AUTH masked, connection lost) are kept for DEBUG runs:
#   at INFO they would drown a node's own lines, and the bridge logs each mail's outcome.
THIRD_PARTY = {
    "engineio": logging.WARNING,
    "socketio": logging.WARNING,
    "pymongo": logging.INFO,
    "aioimaplib": logging.WARNING,
    "mail.log": logging.INFO,
}


def configure_logging(level: str, log_format: str) -> None:
    """The CLI's logging: a stderr handler on the root logger (unless it has handlers
    already), the hub's loggers at ``level``, everyone else's at INFO or above."""
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(level=max(number, logging.INFO), handlers=[handler(log_format)])
    for name in OWN:
        logging.getLogger(name).setLevel(number)
    for name, floor in THIRD_PARTY.items():
        logging.getLogger(name).setLevel(max(floor, number))
    if number > logging.DEBUG:
        logging.getLogger("mail.log").setLevel(max(logging.WARNING, number))
