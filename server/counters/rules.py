"""The rules of the CRM activity counters: what kind each activity is for a viewer, whose
counter it lands in, the badges of a user and the activity-column indicator of one record.
Pure, no I/O.

The counters follow Bitrix24's CRM. An open activity is INCOMING (a call, e-mail or message
that came in and still waits for an answer) whatever its deadline; otherwise its deadline makes
it OVERDUE, DUE or FUTURE. Only the first three are counted: a FUTURE activity is planned work,
shown as a dot, never as a number.

The boundaries are half-open and each holds its start, so ``next_change`` can announce the exact
moment a kind changes:

- OVERDUE from the deadline itself on: ``deadline <= now`` (a deadline equal to now has passed).
- DUE with the whole-day window (``DueWindow()``): from the local midnight that starts the
  deadline's day in the viewer's time zone until the deadline. The same activity can therefore
  be DUE for a viewer in Tokyo and still FUTURE for one in Los Angeles.
- DUE with a minutes window (``DueWindow(N)``): the last N minutes before the deadline, from
  ``deadline - N`` included, whatever the day.

Whose counter an activity lands in depends on the portal's ``CounterMode``: the responsible
person of its CRM record (ITEM, the default) or of the activity itself (ACTIVITY).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

RECORD_TYPES: tuple[str, ...] = ("deal", "lead", "contact", "company")
INCOMING_TYPES: frozenset[str] = frozenset({"call", "email", "message"})
DIRECTIONS: frozenset[str] = frozenset({"incoming", "outgoing"})

# datetime's resolution: the smallest step that moves a moment past a boundary.
_TICK = timedelta(microseconds=1)


class CounterMode(StrEnum):
    ITEM = "item"  # the CRM record's responsible person counts its activities (default)
    ACTIVITY = "activity"  # each activity's own responsible person counts it


class Kind(StrEnum):
    INCOMING = "incoming"
    OVERDUE = "overdue"
    DUE = "due"
    FUTURE = "future"


COUNTED_KINDS: frozenset[Kind] = frozenset({Kind.INCOMING, Kind.OVERDUE, Kind.DUE})


class Colour(StrEnum):
    NONE = "none"
    GREEN = "green"  # incoming only
    RED = "red"  # due or overdue only
    RED_GREEN = "red-green"  # both
    GRAY = "gray"  # someone else's counted activities, or planned ones


class Dot(StrEnum):
    BLUE = "blue"  # the viewer has planned work on the record
    GRAY = "gray"  # only someone else has


@dataclass(frozen=True, slots=True)
class DueWindow:
    """When a deadline becomes DUE. ``minutes_before`` None: on the deadline's day in the
    viewer's time zone; N: in the last N minutes before it."""

    minutes_before: int | None = None

    def __post_init__(self) -> None:
        if self.minutes_before is not None and self.minutes_before < 0:
            raise ValueError(f"minutes_before must not be negative: {self.minutes_before}")


def _require_aware(moment: datetime, what: str) -> None:
    # A naive datetime would be read in the server's own time zone, silently.
    if moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")


@dataclass(frozen=True, slots=True)
class ActivityFacts:
    """What the rules need to know of an activity. ``deadline`` must be timezone-aware."""

    id: str
    owner_type: str  # one of RECORD_TYPES
    owner_id: str
    record_responsible_id: str
    responsible_id: str
    type: str  # call, meeting, email, task, message
    direction: str  # "incoming" | "outgoing"
    deadline: datetime | None
    completed: bool = False

    def __post_init__(self) -> None:
        if self.owner_type not in RECORD_TYPES:
            raise ValueError(f"activity {self.id}: unknown record type {self.owner_type!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"activity {self.id}: unknown direction {self.direction!r}")
        if self.deadline is not None:
            _require_aware(self.deadline, f"activity {self.id}: the deadline")

    @property
    def is_incoming(self) -> bool:
        """Something came in and waits for an answer; meetings and tasks never do."""
        return waits_for_answer(self.type, self.direction, self.completed)


def waits_for_answer(type_: str, direction: str, completed: bool) -> bool:
    """An open incoming call, e-mail or message: ``ActivityFacts.is_incoming``."""
    return not completed and direction == "incoming" and type_ in INCOMING_TYPES


@dataclass(frozen=True, slots=True)
class RecordFacts:
    """A CRM record. ``open``: a lead not converted nor junk, a deal not closed; contacts and
    companies are always open."""

    type: str
    id: str
    responsible_id: str
    open: bool = True

    def __post_init__(self) -> None:
        if self.type not in RECORD_TYPES:
            raise ValueError(f"record {self.id}: unknown record type {self.type!r}")


# --- the kind of an activity ----------------------------------------------------------------


def _start_of_day(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of ``day`` in ``tz``, in UTC. With fold=0 a midnight skipped by a DST
    change (America/Santiago) maps onto the transition itself, which is that first instant."""
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


def due_threshold(now: datetime, tz: ZoneInfo, window: DueWindow) -> datetime:
    """Deadlines strictly before this moment (UTC) are DUE or OVERDUE for an open activity that
    is not incoming: the start of tomorrow in ``tz`` with the whole-day window, else just past
    ``now + minutes_before`` - the extra microsecond keeps a deadline exactly N minutes away
    inside the window, so the window holds its start as the whole-day one holds its midnight.
    """
    _require_aware(now, "now")
    if window.minutes_before is None:
        tomorrow = now.astimezone(tz).date() + timedelta(days=1)
        return _start_of_day(tomorrow, tz)
    return (now + timedelta(minutes=window.minutes_before) + _TICK).astimezone(UTC)


def classify(
    activity: ActivityFacts, now: datetime, tz: ZoneInfo, window: DueWindow
) -> Kind | None:
    """The kind of ``activity`` at ``now`` for a viewer in ``tz``; None once it is completed.

    Incoming wins over any deadline. Otherwise: no deadline is FUTURE (planned, never counted);
    ``deadline <= now`` is OVERDUE - a deadline equal to now has passed; a deadline before
    ``due_threshold`` is DUE; any later one is FUTURE.
    """
    if activity.completed:
        return None
    if activity.is_incoming:
        return Kind.INCOMING
    deadline = activity.deadline
    if deadline is None:
        return Kind.FUTURE
    if deadline <= now:
        return Kind.OVERDUE
    return kind_of(False, False, deadline, now, due_threshold(now, tz, window))


def kind_of(
    completed: bool, incoming: bool, deadline: datetime | None, now: datetime, threshold: datetime
) -> Kind | None:
    """``classify`` with the viewer's ``due_threshold`` at ``now`` worked out beforehand: what
    a pass over every activity uses, with one threshold per viewer. ``incoming`` is
    ``ActivityFacts.is_incoming``."""
    if completed:
        return None
    if incoming:
        return Kind.INCOMING
    if deadline is None:
        return Kind.FUTURE
    if deadline <= now:
        return Kind.OVERDUE
    if deadline < threshold:
        return Kind.DUE
    return Kind.FUTURE


def counted_user(activity: ActivityFacts, mode: CounterMode) -> str:
    """Whose counters ``activity`` lands in under ``mode``."""
    if mode is CounterMode.ITEM:
        return activity.record_responsible_id
    return activity.responsible_id


def colour_of(incoming: int, red: int) -> Colour:
    """The colour of a number made of ``incoming`` activities and ``red`` due or overdue ones."""
    if incoming and red:
        return Colour.RED_GREEN
    if incoming:
        return Colour.GREEN
    if red:
        return Colour.RED
    return Colour.NONE


def _colour_of_kinds(kinds: Iterable[Kind]) -> Colour:
    counts = Counter(kinds)
    return colour_of(counts[Kind.INCOMING], counts[Kind.DUE] + counts[Kind.OVERDUE])


# --- the badges of a user -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Badge:
    """A user's counters for one record type. The numbers count activities, not records;
    ``idle`` is the exception: the user's open records with no open activity at all, shown
    apart and left out of ``total`` and the colour."""

    incoming: int = 0
    due: int = 0
    overdue: int = 0
    idle: int = 0

    @property
    def total(self) -> int:
        return self.incoming + self.due + self.overdue

    @property
    def colour(self) -> Colour:
        return colour_of(self.incoming, self.due + self.overdue)

    def as_dict(self) -> dict[str, int | str]:
        return {
            "incoming": self.incoming,
            "due": self.due,
            "overdue": self.overdue,
            "total": self.total,
            "idle": self.idle,
            "colour": self.colour.value,
        }


def _counted_kinds(
    user_id: str,
    activities: Iterable[ActivityFacts],
    mode: CounterMode,
    now: datetime,
    tz: ZoneInfo,
    window: DueWindow,
) -> dict[str, Counter[Kind]]:
    """For each record type, how many of ``user_id``'s counted activities are of each kind."""
    kinds: dict[str, Counter[Kind]] = {record_type: Counter() for record_type in RECORD_TYPES}
    for activity in activities:
        if counted_user(activity, mode) != user_id:
            continue
        kind = classify(activity, now, tz, window)
        if kind in COUNTED_KINDS:
            kinds[activity.owner_type][kind] += 1
    return kinds


def _idle_records(
    user_id: str, activities: Iterable[ActivityFacts], records: Iterable[RecordFacts]
) -> Counter[str]:
    """For each record type, how many of ``user_id``'s open records have no open activity.
    Anyone's activity keeps a record busy: someone is working on it."""
    busy = {(a.owner_type, a.owner_id) for a in activities if not a.completed}
    return Counter(
        record.type
        for record in records
        if record.responsible_id == user_id and record.open and (record.type, record.id) not in busy
    )


def badges_for(
    user_id: str,
    activities: Iterable[ActivityFacts],
    records: Iterable[RecordFacts],
    mode: CounterMode,
    now: datetime,
    tz: ZoneInfo,
    window: DueWindow,
) -> dict[str, Badge]:
    """The badges of ``user_id``, one per type of ``RECORD_TYPES`` (always all four), counted
    from scratch: the reference the live engine is checked against.

    An open activity counts once for ``counted_user`` when its kind is counted, so three deals
    with two counted activities each make six. ``idle`` counts the user's open records that
    have no open activity, whoever that activity would be assigned to.
    """
    activities = tuple(activities)  # read twice: once to count, once to find the busy records
    kinds = _counted_kinds(user_id, activities, mode, now, tz, window)
    idle = _idle_records(user_id, activities, records)
    return {
        record_type: Badge(
            incoming=kinds[record_type][Kind.INCOMING],
            due=kinds[record_type][Kind.DUE],
            overdue=kinds[record_type][Kind.OVERDUE],
            idle=idle[record_type],
        )
        for record_type in RECORD_TYPES
    }


# --- the indicator of one record ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Indicator:
    """What the activity column of a record list shows for one record."""

    number: int
    colour: Colour
    dot: Dot | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "number": self.number,
            "colour": self.colour.value,
            "dot": None if self.dot is None else self.dot.value,
        }


def indicator(
    viewer_id: str,
    record: RecordFacts,
    activities: Iterable[ActivityFacts],
    mode: CounterMode,
    now: datetime,
    tz: ZoneInfo,
    window: DueWindow,
    viewer_sees_others: bool,
) -> Indicator:
    """The activity-column indicator of ``record`` for ``viewer_id``, the first that applies of:

    1. The viewer's counted activities: their number, green / red / red-green by kind.
    2. Someone else's counted activities, when the viewer may see them: their number, gray.
    3. Planned (FUTURE) activities: 0, gray, with a blue dot when one of them is the viewer's
       under ``mode`` (ITEM: the viewer is responsible for the record; ACTIVITY: for that
       activity), else a gray dot.
    4. Nothing: 0, no colour, no dot.

    ``activities`` are the record's; completed ones and those of other records are ignored.
    """
    own = (a for a in activities if a.owner_type == record.type and a.owner_id == record.id)
    classified = ((counted_user(a, mode), classify(a, now, tz, window)) for a in own)
    kinds = [(user, kind) for user, kind in classified if kind is not None]
    counted = [(user, kind) for user, kind in kinds if kind in COUNTED_KINDS]
    mine = [kind for user, kind in counted if user == viewer_id]
    if mine:
        return Indicator(len(mine), _colour_of_kinds(mine))
    if counted and viewer_sees_others:
        return Indicator(len(counted), Colour.GRAY)
    planners = {user for user, kind in kinds if kind is Kind.FUTURE}
    if planners:
        return Indicator(0, Colour.GRAY, Dot.BLUE if viewer_id in planners else Dot.GRAY)
    return Indicator(0, Colour.NONE)


# --- when to recount ------------------------------------------------------------------------


def _due_from(deadline: datetime, tz: ZoneInfo, window: DueWindow) -> datetime:
    """The moment an activity with ``deadline`` turns from FUTURE to DUE for a viewer in ``tz``:
    the midnight starting the deadline's local day, or ``minutes_before`` ahead of it."""
    if window.minutes_before is None:
        return _start_of_day(deadline.astimezone(tz).date(), tz)
    return deadline - timedelta(minutes=window.minutes_before)


def next_change(
    now: datetime, tz: ZoneInfo, window: DueWindow, deadlines: Iterable[datetime]
) -> datetime | None:
    """The earliest moment after ``now`` (UTC) when an open, not incoming activity with one of
    ``deadlines`` changes kind for a viewer in ``tz``: it turns DUE (``_due_from``) or OVERDUE
    (the deadline itself). None when nothing will change. Exact rather than waking at every
    midnight: with the whole-day window a deadline three days away announces the midnight
    three days away. A new, moved or completed activity is not predicted: the caller recounts.
    """
    moments = (
        moment
        for deadline in deadlines
        for moment in (_due_from(deadline, tz, window), deadline)
        if moment > now
    )
    earliest = min(moments, default=None)
    return None if earliest is None else earliest.astimezone(UTC)
