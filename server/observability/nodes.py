"""The node registry: each running hub's heartbeat document, and ``portalhub status``.

Every hub upserts ``nodes/<node id>`` every ``node_heartbeat_seconds`` (default 5) with its
ports and its load, deletes it when it stops cleanly, and deletes the documents of nodes
silent for ``FORGET_AFTER``. A node whose document is older than ``LOST_AFTER_BEATS``
heartbeats is shown as ``lost``: it crashed, was killed, or cannot reach the database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from server.store.database import Document, Store, utcnow

COLLECTION = "nodes"
LOST_AFTER_BEATS = 3
FORGET_AFTER = timedelta(hours=1)


def _aware(moment: Any) -> datetime | None:
    if not isinstance(moment, datetime):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def node_state(doc: Document, now: datetime) -> str:
    """What the node last said (``up``, or ``draining`` after SIGTERM), or ``lost`` once it
    missed ``LOST_AFTER_BEATS`` heartbeats."""
    seen = _aware(doc.get("last_seen"))
    interval = float(doc.get("interval_seconds") or 5.0)
    if seen is None or (now - seen).total_seconds() > LOST_AFTER_BEATS * interval:
        return "lost"
    return str(doc.get("state") or "up")


async def read_nodes(store: Store, now: datetime | None = None) -> list[Document]:
    """Every registered node, oldest first, with its ``state`` and ``seen_seconds_ago``."""
    now = now or utcnow()
    nodes = []
    async for doc in store[COLLECTION].find({}, sort=[("started_at", 1), ("_id", 1)]):
        seen = _aware(doc.get("last_seen"))
        doc["state"] = node_state(doc, now)
        doc["seen_seconds_ago"] = round((now - seen).total_seconds(), 1) if seen else None
        nodes.append(doc)
    return nodes


async def forget_lost(store: Store, now: datetime | None = None) -> int:
    cutoff = (now or utcnow()) - FORGET_AFTER
    result = await store[COLLECTION].delete_many({"last_seen": {"$lt": cutoff}})
    return int(result.deleted_count)


# printing --------------------------------------------------------------------------------------


def _mib(value: Any) -> str:
    return f"{value / 2**20:.0f} MiB" if isinstance(value, int | float) else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _port(value: Any) -> str:
    return str(value) if value else "-"


def table(nodes: Sequence[Document], now: datetime | None = None) -> str:
    """The nodes as a table, with a summary line."""
    now = now or utcnow()
    header = (
        "NODE",
        "STATE",
        "HTTP",
        "XMPP",
        "SMTP",
        "SOCKET.IO",
        "XMPP CONN",
        "SESSIONS",
        "EVENTS/S",
        "DELIV/S",
        "RSS",
        "UP",
        "SEEN",
    )
    rows = [header]
    for doc in nodes:
        ports = doc.get("ports") or {}
        connections = doc.get("connections") or {}
        started = _aware(doc.get("started_at"))
        xmpp = (
            f"{ports['xmpp_starttls']}/{ports.get('xmpp_tls', '-')}"
            if ports.get("xmpp_starttls")
            else "-"
        )
        rows.append(
            (
                str(doc["_id"]),
                str(doc.get("state", "?")),
                _port(ports.get("http")),
                xmpp,
                _port(ports.get("smtp")),
                str(connections.get("socketio", 0)),
                str(connections.get("xmpp", 0)),
                str(doc.get("xmpp_sessions", 0)),
                f"{float(doc.get('events_per_second') or 0):.1f}",
                f"{float(doc.get('deliveries_per_second') or 0):.1f}",
                _mib(doc.get("rss_bytes")),
                _duration((now - started).total_seconds() if started else None),
                f"{_duration(doc.get('seen_seconds_ago'))} ago",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    states = [str(doc.get("state")) for doc in nodes]
    alive = [doc for doc in nodes if doc.get("state") != "lost"]
    total = sum(sum((doc.get("connections") or {}).values()) for doc in alive)
    draining = f"{states.count('draining')} draining, " if "draining" in states else ""
    lines.append(
        f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {states.count('up')} up, "
        f"{draining}{states.count('lost')} lost; {total} open connections on the nodes "
        "that are not lost"
    )
    return "\n".join(lines)


def as_json(nodes: Sequence[Document]) -> list[dict[str, Any]]:
    """The node documents as plain JSON data (timestamps in ISO 8601, UTC)."""
    shown = []
    for doc in nodes:
        item: dict[str, Any] = {"id": doc["_id"]}
        for key, value in doc.items():
            if key == "_id":
                continue
            moment = _aware(value)
            item[key] = moment.isoformat().replace("+00:00", "Z") if moment else value
        shown.append(item)
    return shown


async def status_report(store: Store, as_json_output: bool) -> str:
    """What ``portalhub status`` prints."""
    found = await read_nodes(store)
    if as_json_output:
        return json.dumps(as_json(found), indent=2, default=str)
    if not found:
        return "no node is registered: no hub runs on this database"
    return table(found)
