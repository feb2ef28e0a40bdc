"""The CRM counters kept by differences (``server/counters/deltas.py``): each change's
difference, time alone, and the property that what they add up to always equals a recount
from scratch (``rules.badges_for``), with changes, time passing over deadlines and local
midnights, and the counting rules switched on the way."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from server.counters.deltas import (
    HORIZON,
    ActivityChange,
    Change,
    Numbers,
    RecordChange,
    RecordCount,
    added,
    boundaries_of,
    change_delta,
    delta_of,
    next_wake,
    numbers_of,
    reading_range,
    time_delta,
    users_of,
    zero_numbers,
)
from server.counters.rules import (
    ActivityFacts,
    CounterMode,
    DueWindow,
    RecordFacts,
    badges_for,
)

BERLIN = ZoneInfo("Europe/Berlin")
TOKYO = ZoneInfo("Asia/Tokyo")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
NOW = datetime(2026, 5, 10, 8, 0, tzinfo=UTC)  # 10:00 in Berlin, 17:00 in Tokyo
ITEM, ACTIVITY = CounterMode.ITEM, CounterMode.ACTIVITY
WHOLE_DAY = DueWindow()


def act(
    id_: str = "a1",
    *,
    owner: str = "d1",
    owner_type: str = "deal",
    record_responsible: str = "ann",
    responsible: str = "ann",
    type_: str = "call",
    direction: str = "outgoing",
    deadline: datetime | None = None,
    completed: bool = False,
) -> ActivityFacts:
    return ActivityFacts(
        id=id_,
        owner_type=owner_type,
        owner_id=owner,
        record_responsible_id=record_responsible,
        responsible_id=responsible,
        type=type_,
        direction=direction,
        deadline=deadline,
        completed=completed,
    )


def berlin(_user: str) -> ZoneInfo:
    return BERLIN


# each change on its own ----------------------------------------------------------------------


def test_an_incoming_call_adds_one_incoming_for_the_records_responsible_person() -> None:
    call = act(direction="incoming", record_responsible="ann", responsible="bob")
    assert change_delta(ActivityChange(None, call), ITEM, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"incoming": 1}}
    }
    assert change_delta(ActivityChange(None, call), ACTIVITY, berlin, WHOLE_DAY, NOW) == {
        "bob": {"deal": {"incoming": 1}}
    }


def test_completing_takes_the_activity_out() -> None:
    due = act(deadline=NOW + timedelta(hours=2))
    done = replace(due, completed=True)
    assert change_delta(ActivityChange(due, done), ITEM, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"due": -1}}
    }


def test_moving_a_deadline_moves_the_activity_between_numbers() -> None:
    overdue = act(deadline=NOW - timedelta(hours=1))
    moved = replace(overdue, deadline=NOW + timedelta(hours=1))
    assert change_delta(ActivityChange(overdue, moved), ITEM, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"overdue": -1, "due": 1}}
    }


def test_planned_work_counts_for_nothing_either_way() -> None:
    future = act(deadline=NOW + timedelta(days=3))
    later = replace(future, deadline=NOW + timedelta(days=5))
    assert change_delta(ActivityChange(future, later), ITEM, berlin, WHOLE_DAY, NOW) == {}
    assert change_delta(ActivityChange(None, act()), ITEM, berlin, WHOLE_DAY, NOW) == {}


def test_a_new_responsible_person_of_the_record_takes_its_activities_along_in_item_mode() -> None:
    due = act(deadline=NOW + timedelta(hours=2), record_responsible="ann", responsible="cat")
    moved = replace(due, record_responsible_id="bob")
    change = ActivityChange(due, moved)
    assert change_delta(change, ITEM, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"due": -1}},
        "bob": {"deal": {"due": 1}},
    }
    assert change_delta(change, ACTIVITY, berlin, WHOLE_DAY, NOW) == {}


def test_each_user_counts_in_their_own_time_zone() -> None:
    # 23:30 in Berlin today is tomorrow in Tokyo: due for ann (Berlin), planned for bob
    deadline = datetime(2026, 5, 10, 23, 30, tzinfo=BERLIN)
    zones = {"ann": BERLIN, "bob": TOKYO}.__getitem__
    one = act("a1", deadline=deadline, record_responsible="ann")
    two = act("a2", deadline=deadline, record_responsible="bob")
    changes: list[Change] = [ActivityChange(None, one), ActivityChange(None, two)]
    assert delta_of(changes, ITEM, zones, WHOLE_DAY, NOW) == {"ann": {"deal": {"due": 1}}}
    # and bob's next change is his own midnight, which comes first
    assert boundaries_of(changes, ITEM, zones, WHOLE_DAY, NOW) == {
        "ann": deadline.astimezone(UTC),
        "bob": datetime(2026, 5, 11, 0, 0, tzinfo=TOKYO).astimezone(UTC),
    }


def test_a_record_is_idle_while_open_without_open_activities() -> None:
    idle = RecordCount("deal", "d1", "ann", True, 0)
    busy = replace(idle, open_activities=1)
    closed = replace(idle, open=False)
    assert change_delta(RecordChange(None, idle), ITEM, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"idle": 1}}
    }
    assert change_delta(RecordChange(idle, busy), ITEM, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"idle": -1}}
    }
    assert change_delta(RecordChange(idle, closed), ITEM, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"idle": -1}}
    }
    assert change_delta(RecordChange(busy, closed), ITEM, berlin, WHOLE_DAY, NOW) == {}
    moved = replace(idle, responsible_id="bob")
    assert change_delta(RecordChange(idle, moved), ACTIVITY, berlin, WHOLE_DAY, NOW) == {
        "ann": {"deal": {"idle": -1}},
        "bob": {"deal": {"idle": 1}},
    }


def test_differences_of_one_batch_add_up_and_cancel_out() -> None:
    call = act(direction="incoming")
    done = replace(call, completed=True)
    assert (
        delta_of(
            [ActivityChange(None, call), ActivityChange(call, done)], ITEM, berlin, WHOLE_DAY, NOW
        )
        == {}
    )


def test_users_of_a_change() -> None:
    change = ActivityChange(
        act(record_responsible="ann", responsible="bob"),
        act(record_responsible="cat", responsible="bob"),
    )
    assert users_of([change], ITEM) == {"ann", "cat"}
    assert users_of([change], ACTIVITY) == {"bob"}


# time alone ----------------------------------------------------------------------------------


def test_time_moves_due_to_overdue_and_future_to_due() -> None:
    passing = act("a1", deadline=NOW + timedelta(hours=1))  # due, then overdue
    tomorrow = act("a2", deadline=datetime(2026, 5, 11, 15, 0, tzinfo=BERLIN))  # future, due
    later = datetime(2026, 5, 11, 0, 30, tzinfo=BERLIN)  # just past Berlin's midnight
    lo, hi = reading_range(NOW, later, BERLIN, WHOLE_DAY)
    assert lo == NOW
    assert all(lo < a.deadline < hi for a in (passing, tomorrow) if a.deadline)
    # one due turned overdue, one planned turned due: due stays, overdue grows
    assert time_delta("ann", [passing, tomorrow], ITEM, BERLIN, WHOLE_DAY, NOW, later) == {
        "deal": {"overdue": 1}
    }
    assert time_delta("ann", [tomorrow], ITEM, BERLIN, WHOLE_DAY, NOW, later) == {
        "deal": {"due": 1}
    }
    # counted for someone else: nothing for ann
    assert time_delta("bob", [passing, tomorrow], ITEM, BERLIN, WHOLE_DAY, NOW, later) == {}


def test_the_next_wake_is_the_next_change_within_the_horizon() -> None:
    deadline = NOW + timedelta(hours=2)
    assert next_wake(NOW, BERLIN, WHOLE_DAY, [deadline]) == deadline
    # a deadline three days away changes at a midnight beyond the horizon: wake at its end
    assert next_wake(NOW, BERLIN, WHOLE_DAY, [NOW + timedelta(days=3)]) == NOW + HORIZON
    assert next_wake(NOW, BERLIN, WHOLE_DAY, []) == NOW + HORIZON
    # with a minutes window, the window's start
    assert next_wake(NOW, BERLIN, DueWindow(60), [NOW + timedelta(hours=2)]) == NOW + timedelta(
        hours=1
    )


def test_the_reading_range_covers_every_deadline_that_changes_before_the_horizon() -> None:
    for window in (WHOLE_DAY, DueWindow(0), DueWindow(90), DueWindow(24 * 60)):
        lo, hi = reading_range(None, NOW, LOS_ANGELES, window)
        assert lo == NOW
        step = timedelta(minutes=7)
        deadline = NOW + step
        while deadline < NOW + HORIZON + timedelta(days=2):
            moment = next_wake(NOW, LOS_ANGELES, window, [deadline])
            if moment < NOW + HORIZON:  # changes kind before the horizon: read
                assert deadline < hi, (window, deadline)
            deadline += step


# the property: differences add up to a recount ------------------------------------------------

USERS = ("ann", "bob", "cat")
ZONES = {"ann": BERLIN, "bob": TOKYO, "cat": LOS_ANGELES}
OFFSETS = st.sampled_from([None, -3000, -600, -61, -1, 0, 1, 59, 61, 300, 900, 1500, 2900, 4400])
NEW_ACTIVITY = st.tuples(
    st.just("activity"),
    st.integers(0, 9),  # record
    st.sampled_from(USERS),  # responsible
    st.sampled_from([("call", "incoming"), ("email", "incoming"), ("task", "outgoing")]),
    OFFSETS,  # deadline, minutes from now
)
TIME = st.tuples(st.just("time"), st.sampled_from([1, 17, 59, 180, 660, 1440, 2 * 1440 + 7]))
OPS = st.one_of(
    st.tuples(st.just("record"), st.sampled_from(USERS), st.sampled_from(["deal", "lead"])),
    NEW_ACTIVITY,
    TIME,
    TIME,
    st.tuples(st.just("complete"), st.integers(0, 29)),
    st.tuples(st.just("reopen"), st.integers(0, 29)),
    st.tuples(st.just("redate"), st.integers(0, 29), OFFSETS),
    st.tuples(st.just("reassign_activity"), st.integers(0, 29), st.sampled_from(USERS)),
    st.tuples(st.just("delete_activity"), st.integers(0, 29)),
    st.tuples(st.just("reassign_record"), st.integers(0, 9), st.sampled_from(USERS)),
    st.tuples(st.just("close_record"), st.integers(0, 9)),
    st.tuples(st.just("mode"), st.sampled_from([ITEM, ACTIVITY])),
    st.tuples(st.just("window"), st.sampled_from([None, 0, 60, 24 * 60])),
)


@dataclass
class Stored:
    """One user's stored numbers, as ``crm_counters`` keeps them."""

    values: Numbers
    as_of: datetime
    next_at: datetime


@dataclass
class Portal:
    """The records and activities, and the engine of ``crm.py`` over them, without I/O."""

    now: datetime
    mode: CounterMode = ITEM
    window: DueWindow = WHOLE_DAY
    records: dict[str, RecordCount] = field(default_factory=dict)
    activities: dict[str, ActivityFacts] = field(default_factory=dict)
    stored: dict[str, Stored] = field(default_factory=dict)
    record_order: list[str] = field(default_factory=list)
    activity_order: list[str] = field(default_factory=list)

    def zone(self, user: str) -> ZoneInfo:
        return ZONES[user]

    # the engine ------------------------------------------------------------------------------

    def recount(self, user: str) -> None:
        badges = badges_for(
            user,
            self.activities.values(),
            [RecordFacts(r.type, r.id, r.responsible_id, r.open) for r in self.records.values()],
            self.mode,
            self.now,
            self.zone(user),
            self.window,
        )
        self.stored[user] = Stored(
            numbers_of(badges),
            self.now,
            next_wake(
                self.now,
                self.zone(user),
                self.window,
                [a.deadline for a in self._read(user, None) if a.deadline is not None],
            ),
        )

    def _read(self, user: str, since: datetime | None) -> list[ActivityFacts]:
        """What ``CrmCounters._deadlines`` reads: the index ranges of ``reading_range``."""
        lo, hi = reading_range(since, self.now, self.zone(user), self.window)
        who = "record_responsible_id" if self.mode is ITEM else "responsible_id"
        return [
            a
            for a in self.activities.values()
            if getattr(a, who) == user
            and not a.completed
            and not a.is_incoming
            and a.deadline is not None
            and lo < a.deadline < hi
        ]

    def advance(self, user: str) -> None:
        held = self.stored[user]
        found = self._read(user, held.as_of)
        delta = time_delta(
            user, found, self.mode, self.zone(user), self.window, held.as_of, self.now
        )
        held.values = added(held.values, delta)
        held.next_at = next_wake(
            self.now, self.zone(user), self.window, [a.deadline for a in found if a.deadline]
        )
        held.as_of = self.now

    def apply(self, changes: list[Change]) -> None:
        for user in users_of(changes, self.mode):
            held = self.stored[user]
            # the one-write path at now; else the careful one: at the stored moment, then
            # time
            moment = self.now if held.as_of <= self.now < held.next_at else held.as_of
            zone = self.zone
            delta = delta_of(changes, self.mode, zone, self.window, moment).get(user, {})
            held.values = added(held.values, delta)
            held.as_of = moment  # CrmCounters._fast sets as_of to now, with the difference
            bound = boundaries_of(changes, self.mode, zone, self.window, moment).get(user)
            if bound is not None and bound < held.next_at:
                held.next_at = bound
            if held.next_at <= self.now:
                self.advance(user)

    def pass_time(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)
        for user in USERS:
            if self.stored[user].next_at <= self.now:  # the scheduler's wake-up
                self.advance(user)

    # the services' writes --------------------------------------------------------------------

    def _count_open(self, record_id: str, delta: int) -> Change:
        before = self.records[record_id]
        after = replace(before, open_activities=before.open_activities + delta)
        self.records[record_id] = after
        return RecordChange(before, after)

    def op(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "record":
            rid = f"r{len(self.record_order)}"
            record = RecordCount(op[2], rid, op[1], True, 0)
            self.records[rid] = record
            self.record_order.append(rid)
            self.apply([RecordChange(None, record)])
        elif kind == "time":
            self.pass_time(op[1])
        elif kind == "mode":
            self.mode = op[1]
            for user in USERS:
                self.recount(user)
        elif kind == "window":
            self.window = DueWindow(op[1])
            for user in USERS:
                self.recount(user)
        elif kind in ("activity", "reassign_record", "close_record"):
            if not self.record_order:
                return
            record = self.records[self.record_order[op[1] % len(self.record_order)]]
            if kind == "activity":
                _, _, responsible, (type_, direction), offset = op
                aid = f"a{len(self.activity_order)}"
                deadline = None if offset is None else self.now + timedelta(minutes=offset)
                new = act(
                    aid,
                    owner=record.id,
                    owner_type=record.type,
                    record_responsible=record.responsible_id,
                    responsible=responsible,
                    type_=type_,
                    direction=direction,
                    deadline=deadline,
                )
                self.activities[aid] = new
                self.activity_order.append(aid)
                self.apply([ActivityChange(None, new), self._count_open(record.id, +1)])
            elif kind == "reassign_record":
                after = replace(record, responsible_id=op[2])
                self.records[record.id] = after
                changes: list[Change] = [RecordChange(record, after)]
                for aid, a in list(self.activities.items()):
                    if a.owner_id == record.id:
                        moved = replace(a, record_responsible_id=op[2])
                        self.activities[aid] = moved
                        if not a.completed:
                            changes.append(ActivityChange(a, moved))
                self.apply(changes)
            else:
                closed = replace(record, open=False)
                self.records[record.id] = closed
                self.apply([RecordChange(record, closed)])
        else:
            live = [a for a in self.activity_order if a in self.activities]
            if not live:
                return
            before = self.activities[live[op[1] % len(live)]]
            if kind == "delete_activity":
                del self.activities[before.id]
                changes = [ActivityChange(before, None)]
                if not before.completed:
                    changes.append(self._count_open(before.owner_id, -1))
                self.apply(changes)
                return
            if kind == "complete":
                changed = replace(before, completed=True)
            elif kind == "reopen":
                changed = replace(before, completed=False)
            elif kind == "redate":
                offset = op[2]
                deadline = None if offset is None else self.now + timedelta(minutes=offset)
                changed = replace(before, deadline=deadline)
            else:
                changed = replace(before, responsible_id=op[2])
            self.activities[before.id] = changed
            changes = [ActivityChange(before, changed)]
            if before.completed != changed.completed:
                changes.append(self._count_open(before.owner_id, -1 if changed.completed else 1))
            self.apply(changes)

    def assert_recounted(self) -> None:
        facts = [RecordFacts(r.type, r.id, r.responsible_id, r.open) for r in self.records.values()]
        for user in USERS:
            held = self.stored[user]
            assert held.as_of <= self.now < held.next_at, (user, held, self.now)
            expected = badges_for(
                user,
                self.activities.values(),
                facts,
                self.mode,
                self.now,
                self.zone(user),
                self.window,
            )
            assert added(held.values, {}) == numbers_of(expected), (user, self.now)


@settings(max_examples=400, deadline=None)
@given(
    start=st.sampled_from(
        [
            NOW,
            datetime(2026, 3, 28, 22, 45, tzinfo=UTC),  # Berlin's spring-forward night
            datetime(2026, 11, 1, 6, 30, tzinfo=UTC),  # Los Angeles falls back soon
            datetime(2026, 5, 10, 14, 59, 59, tzinfo=UTC),  # a second before Tokyo's midnight
        ]
    ),
    first=st.lists(NEW_ACTIVITY, min_size=3, max_size=10),
    ops=st.lists(OPS, min_size=5, max_size=40),
)
def test_the_differences_always_add_up_to_a_recount(
    start: datetime, first: list[tuple[Any, ...]], ops: list[tuple[Any, ...]]
) -> None:
    """After every change, every passage of time and every switch of the counting rules,
    each user's numbers kept by differences equal a recount from scratch, and are held as
    of a moment before their next change by time."""
    portal = Portal(now=start)
    for user in USERS:
        portal.stored[user] = Stored(zero_numbers(), start, start + HORIZON)
    # a populated CRM to start from: a deal and a lead each, some activities
    setup: list[tuple[Any, ...]] = [("record", u, t) for u in USERS for t in ("deal", "lead")]
    for op in [*setup, *first, *ops]:
        portal.op(op)
        portal.assert_recounted()
