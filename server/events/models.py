"""The shapes of events as they travel on the bus and over the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """A persisted event: the ``seq``-th entry of ``stream``."""

    stream: str
    seq: int
    type: str
    data: dict[str, Any]
    ts: datetime

    def envelope(self) -> dict[str, Any]:
        """The wire form, identical for live delivery and replay."""
        return {
            "stream": self.stream,
            "seq": self.seq,
            "type": self.type,
            "data": self.data,
            "ts": self.ts.isoformat().replace("+00:00", "Z"),
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Event:
        return cls(
            stream=doc["stream"], seq=doc["seq"], type=doc["type"], data=doc["data"], ts=doc["ts"]
        )


@dataclass(frozen=True, slots=True)
class EphemeralEvent:
    """A live-only event (presence, typing, counter values): never stored, never replayed.

    ``streams`` names the streams whose subscribers receive it, e.g. ``user:<id>``.
    """

    type: str
    data: dict[str, Any]
    streams: tuple[str, ...] = field(default=())
    private: dict[str, Any] = field(default_factory=dict)
    """Routing data for the server's own transports; never sent to clients."""


def changed_numbers(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The numbers of ``after`` that differ from ``before``, grouped as they are (per record
    type, for the CRM counters)."""
    found: dict[str, dict[str, Any]] = {}
    for group, numbers in after.items():
        held = before.get(group, {})
        changed = {name: value for name, value in numbers.items() if held.get(name) != value}
        if changed:
            found[group] = changed
    return found


@dataclass(frozen=True, slots=True)
class VersionedState:
    """State a client holds, pushed with a version: the CRM counters (sent as differences)
    and the unread counters (sent whole).

    Each transport remembers per connection what it sent and at which ``version``. A push
    that arrives late or twice (an older or equal version) changes nothing, so two pushes
    computed at once cannot leave the older on screen. Differences are taken from exactly
    what the connection holds, so one lost on its way is made good by the next, which
    carries the whole state. ``whole`` states are sent as they are."""

    key: str
    version: int
    values: dict[str, Any]
    whole: bool = False

    def as_private(self) -> dict[str, Any]:
        """For ``EphemeralEvent.private``: plain data, so it crosses nodes."""
        return {
            "state": {
                "key": self.key,
                "version": self.version,
                "values": self.values,
                "whole": self.whole,
            }
        }

    @classmethod
    def from_private(cls, private: dict[str, Any]) -> VersionedState | None:
        found = private.get("state")
        if not isinstance(found, dict):
            return None
        return cls(
            str(found["key"]),
            int(found["version"]),
            dict(found["values"]),
            bool(found.get("whole", False)),
        )
