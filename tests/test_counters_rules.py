"""The pure CRM activity-counter rules: kinds, whose counter, badges, indicators, time zones."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.counters.rules import (
    COUNTED_KINDS,
    RECORD_TYPES,
    ActivityFacts,
    Badge,
    Colour,
    CounterMode,
    Dot,
    DueWindow,
    Indicator,
    Kind,
    RecordFacts,
    badges_for,
    classify,
    colour_of,
    counted_user,
    due_threshold,
    indicator,
    next_change,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
SANTIAGO = ZoneInfo("America/Santiago")

TZ = BERLIN
NOW = datetime(2026, 5, 10, 10, 0, tzinfo=TZ)  # 08:00Z
WHOLE_DAY = DueWindow()
TICK = timedelta(microseconds=1)

ME = "viewer"
THEM = "other"

# One activity per state, as seen at NOW in Berlin with the whole-day window.
STATES: dict[str, dict[str, Any]] = {
    "incoming": {"type": "email", "direction": "incoming", "deadline": None},
    "due": {
        "type": "call",
        "direction": "outgoing",
        "deadline": datetime(2026, 5, 10, 18, 0, tzinfo=TZ),
    },
    "overdue": {
        "type": "task",
        "direction": "outgoing",
        "deadline": datetime(2026, 5, 10, 8, 0, tzinfo=TZ),
    },
    "future": {
        "type": "meeting",
        "direction": "outgoing",
        "deadline": datetime(2026, 5, 13, 9, 0, tzinfo=TZ),
    },
}


def make_activity(
    state: str = "due",
    *,
    id: str = "a1",
    record_responsible: str = ME,
    responsible: str = ME,
    owner_type: str = "deal",
    owner_id: str = "d1",
    completed: bool = False,
) -> ActivityFacts:
    return ActivityFacts(
        id=id,
        owner_type=owner_type,
        owner_id=owner_id,
        record_responsible_id=record_responsible,
        responsible_id=responsible,
        completed=completed,
        **STATES[state],
    )


def outgoing(deadline: datetime | None) -> ActivityFacts:
    return ActivityFacts(
        id="a1",
        owner_type="deal",
        owner_id="d1",
        record_responsible_id=ME,
        responsible_id=ME,
        type="call",
        direction="outgoing",
        deadline=deadline,
    )


Shown = tuple[int, str, str | None]  # an indicator: number, colour, dot
Counts = tuple[int, int, int, int, str]  # a badge: incoming, due, overdue, total, colour


def show(ind: Indicator) -> Shown:
    return (ind.number, ind.colour.value, None if ind.dot is None else ind.dot.value)


def counts(badge: Badge) -> Counts:
    return (badge.incoming, badge.due, badge.overdue, badge.total, badge.colour.value)


def test_the_states_are_what_the_tables_say() -> None:
    assert {state: classify(make_activity(state), NOW, TZ, WHOLE_DAY) for state in STATES} == {
        "incoming": Kind.INCOMING,
        "due": Kind.DUE,
        "overdue": Kind.OVERDUE,
        "future": Kind.FUTURE,
    }


# --- the table: mode x record's responsible x activity's responsible x state ------------------

# The viewer's view of one deal with one open activity, viewer_sees_others=True.
# mode, record's responsible, activity's responsible, state,
#   indicator (number, colour, dot), viewer's deal badge (incoming, due, overdue, total, colour)
TABLE: list[tuple[str, str, str, str, Shown, Counts]] = [
    # item mode: the record's responsible person counts
    ("item", ME, ME, "incoming", (1, "green", None), (1, 0, 0, 1, "green")),
    ("item", ME, ME, "due", (1, "red", None), (0, 1, 0, 1, "red")),
    ("item", ME, ME, "overdue", (1, "red", None), (0, 0, 1, 1, "red")),
    ("item", ME, ME, "future", (0, "gray", "blue"), (0, 0, 0, 0, "none")),
    ("item", ME, THEM, "incoming", (1, "green", None), (1, 0, 0, 1, "green")),
    ("item", ME, THEM, "due", (1, "red", None), (0, 1, 0, 1, "red")),
    ("item", ME, THEM, "overdue", (1, "red", None), (0, 0, 1, 1, "red")),
    ("item", ME, THEM, "future", (0, "gray", "blue"), (0, 0, 0, 0, "none")),
    ("item", THEM, ME, "incoming", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("item", THEM, ME, "due", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("item", THEM, ME, "overdue", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("item", THEM, ME, "future", (0, "gray", "gray"), (0, 0, 0, 0, "none")),
    ("item", THEM, THEM, "incoming", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("item", THEM, THEM, "due", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("item", THEM, THEM, "overdue", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("item", THEM, THEM, "future", (0, "gray", "gray"), (0, 0, 0, 0, "none")),
    # activity mode: the activity's responsible person counts
    ("activity", ME, ME, "incoming", (1, "green", None), (1, 0, 0, 1, "green")),
    ("activity", ME, ME, "due", (1, "red", None), (0, 1, 0, 1, "red")),
    ("activity", ME, ME, "overdue", (1, "red", None), (0, 0, 1, 1, "red")),
    ("activity", ME, ME, "future", (0, "gray", "blue"), (0, 0, 0, 0, "none")),
    ("activity", ME, THEM, "incoming", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("activity", ME, THEM, "due", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("activity", ME, THEM, "overdue", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("activity", ME, THEM, "future", (0, "gray", "gray"), (0, 0, 0, 0, "none")),
    ("activity", THEM, ME, "incoming", (1, "green", None), (1, 0, 0, 1, "green")),
    ("activity", THEM, ME, "due", (1, "red", None), (0, 1, 0, 1, "red")),
    ("activity", THEM, ME, "overdue", (1, "red", None), (0, 0, 1, 1, "red")),
    ("activity", THEM, ME, "future", (0, "gray", "blue"), (0, 0, 0, 0, "none")),
    ("activity", THEM, THEM, "incoming", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("activity", THEM, THEM, "due", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("activity", THEM, THEM, "overdue", (1, "gray", None), (0, 0, 0, 0, "none")),
    ("activity", THEM, THEM, "future", (0, "gray", "gray"), (0, 0, 0, 0, "none")),
]


@pytest.mark.parametrize(
    ("mode", "record_responsible", "responsible", "state", "expected_indicator", "expected_badge"),
    [
        pytest.param(*row, id=f"{row[0]}-record_{row[1]}-activity_{row[2]}-{row[3]}")
        for row in TABLE
    ],
)
def test_one_activity_of_one_deal(
    mode: str,
    record_responsible: str,
    responsible: str,
    state: str,
    expected_indicator: Shown,
    expected_badge: Counts,
) -> None:
    record = RecordFacts("deal", "d1", record_responsible)
    activity = make_activity(state, record_responsible=record_responsible, responsible=responsible)
    counter_mode = CounterMode(mode)

    shown = indicator(ME, record, [activity], counter_mode, NOW, TZ, WHOLE_DAY, True)
    badges = badges_for(ME, [activity], [record], counter_mode, NOW, TZ, WHOLE_DAY)

    assert show(shown) == expected_indicator
    assert counts(badges["deal"]) == expected_badge
    assert badges["deal"].idle == 0  # the activity is open, whoever it belongs to
    assert all(badges[t] == Badge() for t in RECORD_TYPES if t != "deal")


def test_the_table_is_complete() -> None:
    combinations = {row[:4] for row in TABLE}
    assert len(combinations) == len(TABLE) == 2 * 2 * 2 * 4


# The viewer may not see other people's counted activities: the gray number goes, and what is
# left decides (rule 3 with planned work, else nothing). The viewer's own numbers stay.
# mode, record's responsible, activities (state, activity's responsible), indicator
HIDDEN: list[tuple[str, str, str, list[tuple[str, str]], Shown]] = [
    ("others-incoming-item", "item", THEM, [("incoming", ME)], (0, "none", None)),
    ("others-due-item", "item", THEM, [("due", THEM)], (0, "none", None)),
    ("others-overdue-activity", "activity", ME, [("overdue", THEM)], (0, "none", None)),
    (
        "others-due-and-others-future",
        "item",
        THEM,
        [("due", THEM), ("future", THEM)],
        (0, "gray", "gray"),
    ),
    (
        "others-due-and-viewers-future",
        "activity",
        THEM,
        [("due", THEM), ("future", ME)],
        (0, "gray", "blue"),
    ),
    ("viewers-own-stay", "item", ME, [("due", THEM)], (1, "red", None)),
    (
        "viewers-own-hide-others",
        "activity",
        THEM,
        [("due", ME), ("overdue", THEM)],
        (1, "red", None),
    ),
]


@pytest.mark.parametrize(
    ("mode", "record_responsible", "activities", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in HIDDEN],
)
def test_others_counted_activities_hidden(
    mode: str,
    record_responsible: str,
    activities: list[tuple[str, str]],
    expected: Shown,
) -> None:
    record = RecordFacts("deal", "d1", record_responsible)
    facts = [
        make_activity(state, id=f"a{i}", record_responsible=record_responsible, responsible=who)
        for i, (state, who) in enumerate(activities)
    ]
    shown = indicator(ME, record, facts, CounterMode(mode), NOW, TZ, WHOLE_DAY, False)
    assert show(shown) == expected


def test_only_the_viewers_activities_make_the_number_when_some_are_others() -> None:
    record = RecordFacts("deal", "d1", THEM)
    facts = [
        make_activity("incoming", id="a1", record_responsible=THEM, responsible=ME),
        make_activity("due", id="a2", record_responsible=THEM, responsible=THEM),
        make_activity("overdue", id="a3", record_responsible=THEM, responsible=THEM),
    ]
    shown = indicator(ME, record, facts, CounterMode.ACTIVITY, NOW, TZ, WHOLE_DAY, True)
    assert show(shown) == (1, "green", None)
    for_other = indicator(THEM, record, facts, CounterMode.ACTIVITY, NOW, TZ, WHOLE_DAY, True)
    assert show(for_other) == (2, "red", None)


# --- colours --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("incoming", "red", "expected"),
    [(0, 0, "none"), (2, 0, "green"), (0, 3, "red"), (1, 1, "red-green")],
)
def test_colour_of(incoming: int, red: int, expected: str) -> None:
    assert colour_of(incoming, red) == expected


# states of the viewer's activities on one deal -> indicator, deal badge
COLOURS: list[tuple[str, list[str], Shown, Counts]] = [
    ("incoming+due", ["incoming", "due"], (2, "red-green", None), (1, 1, 0, 2, "red-green")),
    ("incoming", ["incoming"], (1, "green", None), (1, 0, 0, 1, "green")),
    ("overdue", ["overdue"], (1, "red", None), (0, 0, 1, 1, "red")),
    ("due+overdue", ["due", "overdue"], (2, "red", None), (0, 1, 1, 2, "red")),
    ("incoming+future", ["incoming", "future"], (1, "green", None), (1, 0, 0, 1, "green")),
    ("overdue+future", ["overdue", "future"], (1, "red", None), (0, 0, 1, 1, "red")),
    (
        "all-four",
        ["incoming", "overdue", "due", "future"],
        (3, "red-green", None),
        (1, 1, 1, 3, "red-green"),
    ),
    ("future-only", ["future", "future"], (0, "gray", "blue"), (0, 0, 0, 0, "none")),
    ("nothing", [], (0, "none", None), (0, 0, 0, 0, "none")),
]


@pytest.mark.parametrize(
    ("states", "expected_indicator", "expected_badge"),
    [pytest.param(*row[1:], id=row[0]) for row in COLOURS],
)
@pytest.mark.parametrize("mode", list(CounterMode))
def test_colours_per_record_and_per_badge(
    mode: CounterMode,
    states: list[str],
    expected_indicator: Shown,
    expected_badge: Counts,
) -> None:
    record = RecordFacts("deal", "d1", ME)
    facts = [make_activity(state, id=f"a{i}") for i, state in enumerate(states)]
    assert show(indicator(ME, record, facts, mode, NOW, TZ, WHOLE_DAY, True)) == expected_indicator
    assert counts(badges_for(ME, facts, [record], mode, NOW, TZ, WHOLE_DAY)["deal"]) == (
        expected_badge
    )


# --- counting activities, not records -------------------------------------------------------


def test_badges_count_activities_not_records() -> None:
    deals = [RecordFacts("deal", f"d{n}", ME) for n in range(3)]
    facts = [
        make_activity(state, id=f"{deal.id}-{state}", owner_id=deal.id)
        for deal in deals
        for state in ("incoming", "overdue", "future")
    ]
    facts.append(make_activity("due", id="l1-due", owner_type="lead", owner_id="l1"))

    badges = badges_for(ME, facts, deals, CounterMode.ITEM, NOW, TZ, WHOLE_DAY)

    assert list(badges) == ["deal", "lead", "contact", "company"]
    assert counts(badges["deal"]) == (3, 0, 3, 6, "red-green")
    assert counts(badges["lead"]) == (0, 1, 0, 1, "red")
    assert badges["contact"] == badges["company"] == Badge()
    for deal in deals:
        shown = indicator(ME, deal, facts, CounterMode.ITEM, NOW, TZ, WHOLE_DAY, True)
        assert show(shown) == (2, "red-green", None)


def test_badges_are_per_user() -> None:
    facts = [
        make_activity("due", id="a1", record_responsible=ME),
        make_activity("due", id="a2", record_responsible=THEM, owner_id="d2"),
        make_activity("incoming", id="a3", record_responsible=THEM, owner_id="d2"),
    ]
    badges = badges_for(THEM, facts, [], CounterMode.ITEM, NOW, TZ, WHOLE_DAY)
    assert counts(badges["deal"]) == (1, 1, 0, 2, "red-green")
    assert badges_for("nobody", facts, [], CounterMode.ITEM, NOW, TZ, WHOLE_DAY)["deal"] == Badge()


def test_activities_may_be_a_one_shot_iterator() -> None:
    record = RecordFacts("deal", "d1", ME)
    facts = [make_activity("due"), make_activity("future", id="a2", owner_id="d2")]
    badges = badges_for(ME, iter(facts), [record], CounterMode.ITEM, NOW, TZ, WHOLE_DAY)
    assert counts(badges["deal"]) == (0, 1, 0, 1, "red")
    assert badges["deal"].idle == 0


# --- idle records ---------------------------------------------------------------------------


def test_idle_counts_the_users_open_records_without_an_open_activity() -> None:
    records = [
        RecordFacts("deal", "no-activity", ME),
        RecordFacts("deal", "only-completed", ME),
        RecordFacts("deal", "only-future", ME),
        RecordFacts("deal", "someone-elses-activity", ME),
        RecordFacts("deal", "closed", ME, open=False),
        RecordFacts("deal", "others-record", THEM),
        RecordFacts("lead", "lead-no-activity", ME),
        RecordFacts("company", "company-counted", ME),
    ]
    facts = [
        make_activity("overdue", id="a1", owner_id="only-completed", completed=True),
        make_activity("future", id="a2", owner_id="only-future"),
        make_activity("future", id="a3", owner_id="someone-elses-activity", responsible=THEM),
        make_activity("incoming", id="a4", owner_type="company", owner_id="company-counted"),
    ]

    badges = badges_for(ME, facts, records, CounterMode.ACTIVITY, NOW, TZ, WHOLE_DAY)

    assert {t: badges[t].idle for t in RECORD_TYPES} == {
        "deal": 2,  # no-activity, only-completed
        "lead": 1,
        "contact": 0,
        "company": 0,
    }
    assert (
        badges_for(THEM, facts, records, CounterMode.ACTIVITY, NOW, TZ, WHOLE_DAY)["deal"].idle == 1
    )


def test_idle_stays_out_of_the_total_and_the_colour() -> None:
    badges = badges_for(
        ME, [], [RecordFacts("contact", "c1", ME)], CounterMode.ITEM, NOW, TZ, WHOLE_DAY
    )
    assert badges["contact"] == Badge(idle=1)
    assert badges["contact"].as_dict() == {
        "incoming": 0,
        "due": 0,
        "overdue": 0,
        "total": 0,
        "idle": 1,
        "colour": "none",
    }


# --- completed activities -------------------------------------------------------------------


def test_completed_activities_are_ignored() -> None:
    record = RecordFacts("deal", "d1", ME)
    facts = [make_activity(state, id=f"a{i}", completed=True) for i, state in enumerate(STATES)]
    assert [classify(a, NOW, TZ, WHOLE_DAY) for a in facts] == [None] * 4
    assert not any(a.is_incoming for a in facts)
    assert show(indicator(ME, record, facts, CounterMode.ITEM, NOW, TZ, WHOLE_DAY, True)) == (
        0,
        "none",
        None,
    )
    assert badges_for(ME, facts, [record], CounterMode.ITEM, NOW, TZ, WHOLE_DAY)["deal"] == Badge(
        idle=1
    )


def test_an_indicator_ignores_activities_of_other_records() -> None:
    record = RecordFacts("deal", "d1", ME)
    facts = [
        make_activity("due", id="a1", owner_id="d2"),
        make_activity("incoming", id="a2", owner_type="lead", owner_id="d1"),
    ]
    shown = indicator(ME, record, facts, CounterMode.ITEM, NOW, TZ, WHOLE_DAY, True)
    assert shown == Indicator(0, Colour.NONE)


# --- the kind of an activity ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "direction", "completed", "expected"),
    [
        ("call", "incoming", False, True),
        ("email", "incoming", False, True),
        ("message", "incoming", False, True),
        ("meeting", "incoming", False, False),
        ("task", "incoming", False, False),
        ("call", "outgoing", False, False),
        ("email", "incoming", True, False),
    ],
)
def test_is_incoming(type_: str, direction: str, completed: bool, expected: bool) -> None:
    activity = ActivityFacts("a1", "lead", "l1", ME, ME, type_, direction, None, completed)
    assert activity.is_incoming is expected


def test_incoming_wins_over_the_deadline() -> None:
    past = NOW - timedelta(days=2)
    call = ActivityFacts("a1", "deal", "d1", ME, ME, "call", "incoming", past)
    meeting = ActivityFacts("a2", "deal", "d1", ME, ME, "meeting", "incoming", past)
    assert classify(call, NOW, TZ, WHOLE_DAY) is Kind.INCOMING
    assert classify(meeting, NOW, TZ, WHOLE_DAY) is Kind.OVERDUE


def test_without_a_deadline_an_activity_is_planned() -> None:
    assert classify(outgoing(None), NOW, TZ, WHOLE_DAY) is Kind.FUTURE
    assert classify(outgoing(None), NOW, TZ, DueWindow(60)) is Kind.FUTURE
    assert Kind.FUTURE not in COUNTED_KINDS


@pytest.mark.parametrize("window", [WHOLE_DAY, DueWindow(30)], ids=["whole-day", "30-minutes"])
def test_a_deadline_equal_to_now_has_passed(window: DueWindow) -> None:
    assert classify(outgoing(NOW), NOW, TZ, window) is Kind.OVERDUE
    assert classify(outgoing(NOW - TICK), NOW, TZ, window) is Kind.OVERDUE
    assert classify(outgoing(NOW + TICK), NOW, TZ, window) is Kind.DUE


def test_counted_user() -> None:
    activity = make_activity(record_responsible="owner", responsible="doer")
    assert counted_user(activity, CounterMode.ITEM) == "owner"
    assert counted_user(activity, CounterMode.ACTIVITY) == "doer"


# --- the whole-day window, time zones and DST ----------------------------------------------


def test_due_threshold_is_the_start_of_tomorrow_in_utc() -> None:
    threshold = due_threshold(NOW, TZ, WHOLE_DAY)
    assert threshold == datetime(2026, 5, 10, 22, 0, tzinfo=UTC)
    assert threshold.tzinfo is UTC


@pytest.mark.parametrize(
    ("local_now", "expected"),
    [
        # Berlin springs forward on 2026-03-29 at 02:00, falls back on 2026-10-25 at 03:00
        (datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN), datetime(2026, 3, 28, 23, 0, tzinfo=UTC)),
        (datetime(2026, 3, 29, 1, 30, tzinfo=BERLIN), datetime(2026, 3, 29, 22, 0, tzinfo=UTC)),
        (datetime(2026, 3, 29, 12, 0, tzinfo=BERLIN), datetime(2026, 3, 29, 22, 0, tzinfo=UTC)),
        (datetime(2026, 10, 24, 23, 0, tzinfo=BERLIN), datetime(2026, 10, 24, 22, 0, tzinfo=UTC)),
        (datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN), datetime(2026, 10, 25, 23, 0, tzinfo=UTC)),
        (
            datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN),
            datetime(2026, 10, 25, 23, 0, tzinfo=UTC),
        ),
        # New York springs forward on 2026-03-08, falls back on 2026-11-01
        (datetime(2026, 3, 7, 23, 30, tzinfo=NEW_YORK), datetime(2026, 3, 8, 5, 0, tzinfo=UTC)),
        (datetime(2026, 3, 8, 12, 0, tzinfo=NEW_YORK), datetime(2026, 3, 9, 4, 0, tzinfo=UTC)),
        (datetime(2026, 10, 31, 22, 0, tzinfo=NEW_YORK), datetime(2026, 11, 1, 4, 0, tzinfo=UTC)),
        (datetime(2026, 11, 1, 12, 0, tzinfo=NEW_YORK), datetime(2026, 11, 2, 5, 0, tzinfo=UTC)),
        # Santiago skips its midnight: 2024-09-08 starts at 01:00 local, 04:00Z
        (datetime(2024, 9, 7, 20, 0, tzinfo=SANTIAGO), datetime(2024, 9, 8, 4, 0, tzinfo=UTC)),
    ],
    ids=lambda value: value.isoformat() if isinstance(value, datetime) else None,
)
def test_due_threshold_across_dst(local_now: datetime, expected: datetime) -> None:
    tz = local_now.tzinfo
    assert isinstance(tz, ZoneInfo)
    assert due_threshold(local_now, tz, WHOLE_DAY) == expected


def test_due_threshold_reads_now_in_the_viewers_zone() -> None:
    # 23:30Z on 10 May is already 11 May in Berlin: the due day is the 11th there.
    late = datetime(2026, 5, 10, 23, 30, tzinfo=UTC)
    assert due_threshold(late, BERLIN, WHOLE_DAY) == datetime(2026, 5, 11, 22, 0, tzinfo=UTC)
    assert due_threshold(late, NEW_YORK, WHOLE_DAY) == datetime(2026, 5, 11, 4, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("day", "hours"),
    [(date(2026, 3, 29), 23), (date(2026, 10, 25), 25), (date(2026, 5, 10), 24)],
    ids=str,
)
def test_dst_days_are_due_for_their_true_length(day: date, hours: int) -> None:
    start = due_threshold(
        datetime.combine(day, time(12), BERLIN) - timedelta(days=1), BERLIN, WHOLE_DAY
    )
    end = due_threshold(datetime.combine(day, time(12), BERLIN), BERLIN, WHOLE_DAY)
    assert end - start == timedelta(hours=hours)


@pytest.mark.parametrize(
    ("tz", "day"),
    [
        (BERLIN, date(2026, 5, 10)),
        (BERLIN, date(2026, 3, 28)),
        (BERLIN, date(2026, 3, 29)),
        (BERLIN, date(2026, 10, 24)),
        (BERLIN, date(2026, 10, 25)),
        (NEW_YORK, date(2026, 3, 7)),
        (NEW_YORK, date(2026, 3, 8)),
        (NEW_YORK, date(2026, 10, 31)),
        (NEW_YORK, date(2026, 11, 1)),
    ],
    ids=lambda value: str(value),
)
def test_today_ends_at_local_midnight(tz: ZoneInfo, day: date) -> None:
    now = datetime.combine(day, time(12), tz)
    tomorrow = day + timedelta(days=1)
    kind_at = {
        "23:59": classify(outgoing(datetime.combine(day, time(23, 59), tz)), now, tz, WHOLE_DAY),
        "last instant": classify(
            outgoing(datetime.combine(tomorrow, time(), tz) - TICK), now, tz, WHOLE_DAY
        ),
        "00:00 tomorrow": classify(
            outgoing(datetime.combine(tomorrow, time(), tz)), now, tz, WHOLE_DAY
        ),
        "00:01 tomorrow": classify(
            outgoing(datetime.combine(tomorrow, time(0, 1), tz)), now, tz, WHOLE_DAY
        ),
    }
    assert kind_at == {
        "23:59": Kind.DUE,
        "last instant": Kind.DUE,
        "00:00 tomorrow": Kind.FUTURE,
        "00:01 tomorrow": Kind.FUTURE,
    }


def test_the_same_activity_is_due_in_tokyo_and_future_in_los_angeles() -> None:
    now = datetime(
        2026, 5, 10, 3, 0, tzinfo=UTC
    )  # 12:00 on the 10th in Tokyo, 20:00 on the 9th in LA
    activity = outgoing(datetime(2026, 5, 10, 10, 0, tzinfo=UTC))  # 19:00 / 03:00 on the 10th
    assert classify(activity, now, TOKYO, WHOLE_DAY) is Kind.DUE
    assert classify(activity, now, LOS_ANGELES, WHOLE_DAY) is Kind.FUTURE

    facts = [activity]
    record = RecordFacts("deal", "d1", ME)
    assert counts(
        badges_for(ME, facts, [record], CounterMode.ITEM, now, TOKYO, WHOLE_DAY)["deal"]
    ) == (
        0,
        1,
        0,
        1,
        "red",
    )
    in_la = indicator(ME, record, facts, CounterMode.ITEM, now, LOS_ANGELES, WHOLE_DAY, True)
    assert in_la == Indicator(0, Colour.GRAY, Dot.BLUE)


# --- the minutes window ---------------------------------------------------------------------


def test_due_threshold_with_minutes_holds_the_windows_start() -> None:
    threshold = due_threshold(NOW, TZ, DueWindow(30))
    assert threshold == datetime(2026, 5, 10, 8, 30, 0, 1, tzinfo=UTC)
    assert threshold.tzinfo is UTC


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        (NOW + timedelta(minutes=29), Kind.DUE),
        (NOW + timedelta(minutes=30), Kind.DUE),  # exactly the last 30 minutes
        (NOW + timedelta(minutes=30) + TICK, Kind.FUTURE),
        (NOW + timedelta(hours=3), Kind.FUTURE),  # later today: due for the whole-day window
        (NOW, Kind.OVERDUE),
    ],
    ids=["29min", "30min", "30min+1us", "3h", "now"],
)
def test_the_last_minutes_before_the_deadline_are_due(deadline: datetime, expected: Kind) -> None:
    assert classify(outgoing(deadline), NOW, TZ, DueWindow(30)) is expected


def test_the_minutes_window_crosses_midnight() -> None:
    now = datetime(2026, 5, 10, 23, 50, tzinfo=TZ)
    after_midnight = outgoing(datetime(2026, 5, 11, 0, 10, tzinfo=TZ))
    assert classify(after_midnight, now, TZ, DueWindow(30)) is Kind.DUE
    assert classify(after_midnight, now, TZ, WHOLE_DAY) is Kind.FUTURE


def test_a_zero_minutes_window_has_nothing_due() -> None:
    assert classify(outgoing(NOW + TICK), NOW, TZ, DueWindow(0)) is Kind.FUTURE
    assert classify(outgoing(NOW), NOW, TZ, DueWindow(0)) is Kind.OVERDUE


# --- next_change ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deadlines", "expected"),
    [
        # due now, turns overdue at its deadline (18:00 Berlin)
        ([datetime(2026, 5, 10, 18, 0, tzinfo=TZ)], datetime(2026, 5, 10, 16, 0, tzinfo=UTC)),
        # tomorrow afternoon: turns due at the next local midnight
        ([datetime(2026, 5, 11, 15, 0, tzinfo=TZ)], datetime(2026, 5, 10, 22, 0, tzinfo=UTC)),
        # in three days: turns due at that day's midnight, not before
        ([datetime(2026, 5, 13, 9, 0, tzinfo=TZ)], datetime(2026, 5, 12, 22, 0, tzinfo=UTC)),
        # the earliest of several; a passed deadline changes nothing any more
        (
            [
                datetime(2026, 5, 9, 9, 0, tzinfo=TZ),
                datetime(2026, 5, 11, 15, 0, tzinfo=TZ),
                datetime(2026, 5, 10, 18, 0, tzinfo=TZ),
            ],
            datetime(2026, 5, 10, 16, 0, tzinfo=UTC),
        ),
        ([datetime(2026, 5, 10, 9, 0, tzinfo=TZ), NOW], None),
        ([], None),
    ],
    ids=["today", "tomorrow", "in-three-days", "earliest", "all-passed", "none"],
)
def test_next_change_whole_day(deadlines: list[datetime], expected: datetime | None) -> None:
    assert next_change(NOW, TZ, WHOLE_DAY, deadlines) == expected


def test_next_change_midnight_across_dst() -> None:
    now = datetime(2026, 3, 29, 10, 0, tzinfo=BERLIN)
    deadline = datetime(2026, 3, 30, 9, 0, tzinfo=BERLIN)
    assert next_change(now, BERLIN, WHOLE_DAY, [deadline]) == datetime(
        2026, 3, 29, 22, 0, tzinfo=UTC
    )
    now = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NEW_YORK)  # the second 01:30, EST
    deadline = datetime(2026, 11, 2, 9, 0, tzinfo=NEW_YORK)
    assert next_change(now, NEW_YORK, WHOLE_DAY, [deadline]) == datetime(
        2026, 11, 2, 5, 0, tzinfo=UTC
    )


def test_next_change_midnight_in_the_viewers_zone() -> None:
    now = datetime(2026, 5, 10, 3, 0, tzinfo=UTC)
    deadline = datetime(2026, 5, 10, 10, 0, tzinfo=UTC)
    # Already due in Tokyo: the next change is the deadline. In LA it first turns due at midnight.
    assert next_change(now, TOKYO, WHOLE_DAY, [deadline]) == deadline
    assert next_change(now, LOS_ANGELES, WHOLE_DAY, [deadline]) == datetime(
        2026, 5, 10, 7, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        (NOW + timedelta(hours=2), NOW + timedelta(hours=1, minutes=30)),  # turns due
        (NOW + timedelta(minutes=30), NOW + timedelta(minutes=30)),  # due already: turns overdue
        (NOW + timedelta(minutes=10), NOW + timedelta(minutes=10)),
        (NOW, None),
    ],
    ids=["turns-due", "window-start-is-now", "turns-overdue", "passed"],
)
def test_next_change_minutes_window(deadline: datetime, expected: datetime | None) -> None:
    moment = next_change(NOW, TZ, DueWindow(30), [deadline])
    assert moment == expected
    assert moment is None or moment.tzinfo is UTC


ZONES = [BERLIN, NEW_YORK, TOKYO, LOS_ANGELES, SANTIAGO]
# Around Berlin's and Santiago's spring changes; minute steps land on midnights and windows.
BASE = datetime(2026, 3, 29, 0, 0, tzinfo=UTC)
minutes_around = st.integers(min_value=-4 * 24 * 60, max_value=4 * 24 * 60)


@settings(max_examples=400, deadline=None)
@given(
    now_minutes=minutes_around,
    deadline_minutes=minutes_around,
    tz=st.sampled_from(ZONES),
    minutes_before=st.sampled_from([None, 0, 1, 30, 24 * 60]),
)
def test_next_change_is_exactly_when_the_kind_changes(
    now_minutes: int, deadline_minutes: int, tz: ZoneInfo, minutes_before: int | None
) -> None:
    now = BASE + timedelta(minutes=now_minutes)
    window = DueWindow(minutes_before)
    activity = outgoing(BASE + timedelta(minutes=deadline_minutes))
    assert activity.deadline is not None
    kind_now = classify(activity, now, tz, window)
    moment = next_change(now, tz, window, [activity.deadline])
    if moment is None:
        assert kind_now is Kind.OVERDUE
        return
    assert moment > now
    # The kinds only move forward (FUTURE, DUE, OVERDUE): the same kind just before the
    # moment means the same kind all the way from now.
    assert classify(activity, moment - TICK, tz, window) is kind_now
    assert classify(activity, moment, tz, window) is not kind_now


# --- consistency and validation -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(list(STATES)),
            st.sampled_from(["d1", "d2", "d3"]),
            st.sampled_from([ME, THEM]),
            st.sampled_from([ME, THEM]),
            st.booleans(),
        ),
        max_size=12,
    ),
    mode=st.sampled_from(list(CounterMode)),
)
def test_the_indicators_add_up_to_the_badge(
    rows: list[tuple[str, str, str, str, bool]], mode: CounterMode
) -> None:
    # A record has one responsible person: the first row of each deal decides it.
    owners: dict[str, str] = {}
    for _, deal, record_responsible, _, _ in rows:
        owners.setdefault(deal, record_responsible)
    facts = [
        make_activity(
            state,
            id=f"a{i}",
            owner_id=deal,
            record_responsible=owners[deal],
            responsible=who,
            completed=completed,
        )
        for i, (state, deal, _, who, completed) in enumerate(rows)
    ]
    records = [RecordFacts("deal", deal, owner) for deal, owner in owners.items()]
    badge = badges_for(ME, facts, records, mode, NOW, TZ, WHOLE_DAY)["deal"]
    # With others hidden, a number is always the viewer's own.
    hidden = [indicator(ME, r, facts, mode, NOW, TZ, WHOLE_DAY, False) for r in records]
    assert sum(i.number for i in hidden) == badge.total
    # With others shown, only a record without any open activity shows nothing at all.
    shown = [indicator(ME, r, facts, mode, NOW, TZ, WHOLE_DAY, True) for r in records]
    blank = [r for r, i in zip(records, shown, strict=True) if i == Indicator(0, Colour.NONE)]
    assert badge.idle == sum(1 for r in blank if r.responsible_id == ME)


def test_as_dict() -> None:
    assert Badge(incoming=1, due=2, overdue=3, idle=4).as_dict() == {
        "incoming": 1,
        "due": 2,
        "overdue": 3,
        "total": 6,
        "idle": 4,
        "colour": "red-green",
    }
    assert Indicator(0, Colour.GRAY, Dot.BLUE).as_dict() == {
        "number": 0,
        "colour": "gray",
        "dot": "blue",
    }
    assert Indicator(2, Colour.RED).as_dict() == {"number": 2, "colour": "red", "dot": None}


def test_a_naive_deadline_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        outgoing(datetime(2026, 5, 10, 18, 0))


def test_a_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        due_threshold(datetime(2026, 5, 10, 10, 0), TZ, WHOLE_DAY)


@pytest.mark.parametrize(
    "changes",
    [{"owner_type": "invoice"}, {"direction": "sideways"}],
    ids=["record-type", "direction"],
)
def test_unknown_values_are_rejected(changes: dict[str, str]) -> None:
    fields: dict[str, Any] = {
        "id": "a1",
        "owner_type": "deal",
        "owner_id": "d1",
        "record_responsible_id": ME,
        "responsible_id": ME,
        "type": "call",
        "direction": "outgoing",
        "deadline": None,
    }
    with pytest.raises(ValueError, match="unknown"):
        ActivityFacts(**(fields | changes))


def test_an_unknown_record_type_or_a_negative_window_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown record type"):
        RecordFacts("invoice", "i1", ME)
    with pytest.raises(ValueError, match="negative"):
        DueWindow(-1)
