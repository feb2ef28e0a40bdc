"""How the presence of a user follows from their connections and manual state. Pure, no I/O.

A user is as present as their most present connection: any active connection makes them
online, connections that are all idle make them away, none makes them offline. A state the
user set by hand (away, do-not-disturb) is kept apart from that and wins while they are
connected, until they clear it or its time runs out. Invisible users look offline to others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Status = Literal["online", "away", "dnd", "offline"]
ManualStatus = Literal["away", "dnd"]


@dataclass(frozen=True, slots=True)
class Source:
    """One connection of one transport (a browser tab, later an XMPP session)."""

    id: str
    transport: str
    active: bool
    last_heartbeat: float
    dnd: bool = False  # a Jabber client's own "do not disturb"


@dataclass(frozen=True, slots=True)
class Manual:
    status: ManualStatus | None = None
    until: datetime | None = None
    invisible: bool = False

    def current(self, now: datetime) -> ManualStatus | None:
        if self.status is None or (self.until is not None and self.until <= now):
            return None
        return self.status


def automatic_status(sources: Iterable[Source]) -> Status:
    listed = list(sources)
    if not listed:
        return "offline"
    if any(s.dnd for s in listed):
        return "dnd"
    return "online" if any(s.active for s in listed) else "away"


def own_status(sources: Iterable[Source], manual: Manual, now: datetime) -> Status:
    """The status the user sees for themselves."""
    automatic = automatic_status(sources)
    if automatic == "offline":
        return "offline"
    return manual.current(now) or automatic


def status_seen_by_others(own: Status, manual: Manual) -> Status:
    return "offline" if manual.invisible else own


def stale(sources: Iterable[Source], deadline: float) -> list[str]:
    """Sources whose last heartbeat is older than ``deadline`` (a monotonic time)."""
    return [s.id for s in sources if s.last_heartbeat < deadline]
