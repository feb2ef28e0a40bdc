"""The CRM counters kept incrementally: what one change, or time alone, does to the numbers.
Pure, no I/O; ``crm.py`` applies the results with ``$inc``.

A user's stored numbers are the counts of ``rules.badges_for`` at one moment, their ``as_of``.
They stay right until the earliest moment an activity counted for them changes kind by time
alone (``rules.next_change``), kept beside them as ``next_at``. Between the two, a change is
applied by its difference: the kind of the activity (or the idle state of the record) before
it, taken out, and after it, put in, both at the same moment (``change_delta``). Past
``next_at`` the numbers are first moved forward in time, from the activities whose deadline
lies where a kind changes (``reading_range``, ``time_delta``), and ``next_at`` is planned
again (``next_wake``).

The sum of the differences equals a recount from scratch as long as each difference is taken
at a moment where the stored numbers are right; ``tests/test_counters_rules.py`` checks that
property with random changes, time passing and settings switches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from server.counters.rules import (
    COUNTED_KINDS,
    RECORD_TYPES,
    ActivityFacts,
    Badge,
    CounterMode,
    DueWindow,
    classify,
    counted_user,
    due_threshold,
    next_change,
)

NUMBERS: tuple[str, ...] = ("incoming", "due", "overdue", "idle")
# How far ahead the next time-driven change is looked for. Past it, a user is woken up anyway
# and looks again: the look-up reads a bounded range of deadlines (the embedded database
# fetches and sorts a whole range to find its first entry), and a user with no deadline at
# all costs one cheap wake-up per horizon.
HORIZON = timedelta(hours=6)

Numbers = dict[str, dict[str, int]]  # record type -> number -> value, for one user
Delta = dict[str, Numbers]  # user -> record type -> number -> difference
ZoneOf = Callable[[str], ZoneInfo]


@dataclass(frozen=True, slots=True)
class RecordCount:
    """What the idle number needs of a record: an open record of ``responsible_id`` without
    any open activity is idle."""

    type: str
    id: str
    responsible_id: str
    open: bool
    open_activities: int

    def __post_init__(self) -> None:
        if self.type not in RECORD_TYPES:
            raise ValueError(f"record {self.id}: unknown record type {self.type!r}")

    @property
    def idle(self) -> bool:
        return self.open and self.open_activities <= 0


@dataclass(frozen=True, slots=True)
class ActivityChange:
    """An activity as it was before a write and as the write left it (None: not there)."""

    before: ActivityFacts | None
    after: ActivityFacts | None


@dataclass(frozen=True, slots=True)
class RecordChange:
    before: RecordCount | None
    after: RecordCount | None


Change = ActivityChange | RecordChange


def zero_numbers() -> Numbers:
    return {t: dict.fromkeys(NUMBERS, 0) for t in RECORD_TYPES}


def _add(delta: Delta, user: str, record_type: str, number: str, amount: int) -> None:
    if not user or not amount:
        return
    per_type = delta.setdefault(user, {}).setdefault(record_type, {})
    per_type[number] = per_type.get(number, 0) + amount


def _pruned(delta: Delta) -> Delta:
    """Without the zeros: an empty result means nothing changed."""
    out: Delta = {}
    for user, per_type in delta.items():
        kept = {
            t: {n: v for n, v in numbers.items() if v}
            for t, numbers in per_type.items()
            if any(numbers.values())
        }
        if kept:
            out[user] = kept
    return out


def _activity_part(
    delta: Delta,
    activity: ActivityFacts,
    sign: int,
    mode: CounterMode,
    zone_of: ZoneOf,
    window: DueWindow,
    moment: datetime,
) -> None:
    user = counted_user(activity, mode)
    if not user:
        return
    kind = classify(activity, moment, zone_of(user), window)
    if kind in COUNTED_KINDS:
        assert kind is not None
        _add(delta, user, activity.owner_type, kind.value, sign)


def change_delta(
    change: Change,
    mode: CounterMode,
    zone_of: ZoneOf,
    window: DueWindow,
    now: datetime,
    since: datetime | None = None,
) -> Delta:
    """How ``change`` moves the counters: its ``before`` taken out as it counted at ``since``
    (default ``now``), its ``after`` put in as it counts at ``now``. An activity counts for
    ``counted_user`` under ``mode`` in that user's time zone; a record's idle state counts for
    its responsible person. With ``before`` and ``after`` the same activity and ``since``
    earlier than ``now``, this is what time alone did to it."""
    delta: Delta = {}
    then = since or now
    if isinstance(change, ActivityChange):
        if change.before is not None:
            _activity_part(delta, change.before, -1, mode, zone_of, window, then)
        if change.after is not None:
            _activity_part(delta, change.after, +1, mode, zone_of, window, now)
    else:
        if change.before is not None and change.before.idle:
            _add(delta, change.before.responsible_id, change.before.type, "idle", -1)
        if change.after is not None and change.after.idle:
            _add(delta, change.after.responsible_id, change.after.type, "idle", +1)
    return _pruned(delta)


def delta_of(
    changes: Iterable[Change],
    mode: CounterMode,
    zone_of: ZoneOf,
    window: DueWindow,
    now: datetime,
) -> Delta:
    """The sum of the changes' differences, all taken at ``now``."""
    total: Delta = {}
    for change in changes:
        merge(total, change_delta(change, mode, zone_of, window, now))
    return _pruned(total)


def merge(into: Delta, other: Mapping[str, Numbers]) -> Delta:
    for user, per_type in other.items():
        for record_type, numbers in per_type.items():
            for number, amount in numbers.items():
                _add(into, user, record_type, number, amount)
    return into


def users_of(changes: Iterable[Change], mode: CounterMode) -> set[str]:
    """Everyone whose numbers or next time-driven change the changes may move."""
    users: set[str] = set()
    for change in changes:
        if isinstance(change, ActivityChange):
            for side in (change.before, change.after):
                if side is not None:
                    users.add(counted_user(side, mode))
        else:
            for record in (change.before, change.after):
                if record is not None:
                    users.add(record.responsible_id)
    users.discard("")
    return users


def boundaries_of(
    changes: Iterable[Change],
    mode: CounterMode,
    zone_of: ZoneOf,
    window: DueWindow,
    now: datetime,
) -> dict[str, datetime]:
    """Per user, the earliest moment after ``now`` when an activity as the changes left it
    changes kind by time alone: the stored ``next_at`` must not be later."""
    found: dict[str, datetime] = {}
    for change in changes:
        if not isinstance(change, ActivityChange) or change.after is None:
            continue
        after = change.after
        if after.completed or after.is_incoming or after.deadline is None:
            continue
        user = counted_user(after, mode)
        moment = next_change(now, zone_of(user), window, [after.deadline])
        if user and moment is not None and (user not in found or moment < found[user]):
            found[user] = moment
    return found


def reading_range(
    since: datetime | None, now: datetime, tz: ZoneInfo, window: DueWindow
) -> tuple[datetime, datetime]:
    """The deadlines (``lo < deadline < hi``) of a user's open, not incoming activities to
    read, to move their numbers from ``since`` to ``now`` and to plan their next change up to
    ``now + HORIZON``.

    A kind changes between ``since`` and ``now`` for a deadline that passed (``since <
    deadline <= now``) or that entered the due window (``due_threshold(since) <= deadline <
    due_threshold(now)``); both lie in ``(since, due_threshold(now))``. A kind changes within
    the horizon for a deadline before ``due_threshold(now + HORIZON)``: it turns due, or is
    due and passes. Without ``since`` (a recount) only the planning part is read.
    """
    hi = due_threshold(now + HORIZON, tz, window)
    return (since if since is not None and since < now else now), hi


def time_delta(
    user: str,
    activities: Iterable[ActivityFacts],
    mode: CounterMode,
    tz: ZoneInfo,
    window: DueWindow,
    since: datetime,
    now: datetime,
) -> Numbers:
    """What time alone did to ``user``'s numbers from ``since`` to ``now``: each of the
    activities counted for them, as it counted at ``since`` taken out and as at ``now`` put
    in. ``activities`` are those of ``reading_range``; others did not change kind."""
    delta: Delta = {}
    for activity in activities:
        if counted_user(activity, mode) != user:
            continue
        part = change_delta(
            ActivityChange(activity, activity), mode, lambda _u: tz, window, now, since
        )
        merge(delta, part)
    return _pruned(delta).get(user, {})


def next_wake(
    now: datetime, tz: ZoneInfo, window: DueWindow, deadlines: Iterable[datetime]
) -> datetime:
    """When to look at a user's numbers again: their next time-driven change (from the
    deadlines of ``reading_range``), or the end of the horizon if none comes before it."""
    limit = now + HORIZON
    moment = next_change(now, tz, window, deadlines)
    return limit if moment is None or moment > limit else moment


def added(
    values: Mapping[str, Mapping[str, int]], delta: Mapping[str, Mapping[str, int]]
) -> Numbers:
    """``values`` moved by one user's ``delta``."""
    out = zero_numbers()
    for record_type, numbers in values.items():
        if record_type in out:
            for number in NUMBERS:
                out[record_type][number] = int(numbers.get(number, 0))
    for record_type, numbers in delta.items():
        for number, amount in numbers.items():
            out[record_type][number] += amount
    return out


def badge_of(numbers: Mapping[str, int]) -> Badge:
    return Badge(
        incoming=int(numbers.get("incoming", 0)),
        due=int(numbers.get("due", 0)),
        overdue=int(numbers.get("overdue", 0)),
        idle=int(numbers.get("idle", 0)),
    )


def numbers_of(badges: Mapping[str, Badge]) -> Numbers:
    return {
        t: {"incoming": b.incoming, "due": b.due, "overdue": b.overdue, "idle": b.idle}
        for t, b in badges.items()
    }
