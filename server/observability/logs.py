"""Log output: today's text lines, or one JSON object per line (``PORTALHUB_LOG_FORMAT=json``).

A JSON line has ``ts`` (UTC, milliseconds), ``level``, ``logger``, ``msg``, ``node``, and when
known ``request_id`` and ``event_id`` (from the context variables at the time of the call),
``exc_info`` (the traceback as a string) and any ``extra`` fields given by the caller.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from server.observability.context import current_event_id, current_request_id

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
        return json.dumps(doc, default=str, ensure_ascii=False)


def handler(log_format: str) -> logging.Handler:
    """A stderr handler writing ``log_format`` (``text`` or ``json``)."""
    out = logging.StreamHandler()
    out.addFilter(ContextFilter())
    out.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return out


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's set-up for the CLI (a no-op when the root logger has handlers)."""
    logging.basicConfig(level=level, handlers=[handler(log_format)])
    # aiosmtpd logs every SMTP connection (peer, EOF, connection lost) at INFO as "mail.log",
    # which drowns a node's own lines; the mail bridge logs each message's outcome itself.
    # Still shown at DEBUG.
    quiet = logging.getLevelName(level.upper()) != logging.DEBUG
    logging.getLogger("mail.log").setLevel(logging.WARNING if quiet else logging.NOTSET)
