"""How the presence of a user follows from their connections and manual state. Pure, no I/O.

A user is as present as their most present connection: any active connection makes them
online, connections that are all idle make them away, none makes them offline. A state the
user set by hand (away, do-not-disturb) is kept apart from that and wins while they are
connected, until they clear it or its time runs out. Invisible users look offline to others.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

Status = Literal["online", "away", "dnd", "offline"]
ManualStatus = Literal["away", "dnd"]


Show = Literal["", "chat", "away", "xa", "dnd"]
SHOWS: tuple[Show, ...] = ("", "chat", "away", "xa", "dnd")
MAX_STATUS_TEXT = 512  # characters of a resource's status message kept (and shown to others)


@dataclass(frozen=True, slots=True)
class Shown:
    """What one resource of a user shows colleagues (RFC 6121 4.7): its availability, status
    message and priority. ``caps`` is the client's own capabilities announcement (XEP-0115),
    opaque here, relayed as it came."""

    show: Show = ""
    status: str = ""
    priority: int = 0
    caps: str = ""


@dataclass(frozen=True, slots=True)
class Source:
    """One connection of one transport (a browser tab, an XMPP session).

    ``resource`` names a Jabber session's own resource, which colleagues see as a resource of
    its own with what it ``shown``; sources without one (browser tabs) are together the web
    messenger, shown as one more resource."""

    id: str
    transport: str
    active: bool
    last_heartbeat: float
    dnd: bool = False  # a Jabber client's own "do not disturb"
    resource: str = ""
    shown: Shown = Shown()


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


_PRIORITY = re.compile(r"[+-]?[0-9]{1,3}")
WEB = ""  # the key of the web messenger's resource in ``resources_seen``


def resources_seen(sources: Iterable[Source], manual: Manual, now: datetime) -> dict[str, Shown]:
    """What colleagues see of each of a user's resources: every Jabber resource as it shows
    itself, and the web messenger (all tabs together, key ``WEB``) while a tab is open, with
    the tabs' merged status. A manual away or dnd (set on the web) is the person's own word
    about themselves, so it is the show of every resource while it holds (status message and
    priority stay each client's). Nothing of an invisible user. The merged status
    (``own_status``) is unaffected: it is the web's view."""
    if manual.invisible:
        return {}
    listed = list(sources)
    seen: dict[str, Shown] = {}
    said = manual.current(now)
    tabs = [s for s in listed if not s.resource]
    if tabs:
        status = own_status(tabs, manual, now)  # online, away or dnd: there is a tab
        seen[WEB] = Shown(show="away" if status == "away" else "dnd" if status == "dnd" else "")
    for source in listed:
        if source.resource:
            shown = source.shown
            seen[source.resource] = replace(shown, show=said) if said else shown
    return seen


def shown_from(show: str | None, status: str | None, priority: str | None, caps: str = "") -> Shown:
    """A client's presence as shown to others: an unknown <show/> counts as available, a
    priority outside -128..127 or not a number as 0 (RFC 6121 4.7.2.3), a long status cut."""
    kept: Show = next((s for s in SHOWS if s == (show or "").strip()), "")
    text = (priority or "").strip()
    number = int(text) if _PRIORITY.fullmatch(text) else 0  # (int() takes any script's digits)
    if not -128 <= number <= 127:
        number = 0
    return Shown(kept, (status or "")[:MAX_STATUS_TEXT], number, caps)


def stale(sources: Iterable[Source], deadline: float) -> list[str]:
    """Sources whose last heartbeat is older than ``deadline`` (a monotonic time)."""
    return [s.id for s in sources if s.last_heartbeat < deadline]
