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
