"""The pure task rules: visibility, the status workflow, field rights, deadlines, counters."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.directory.rules import DepartmentNode, Person, supervisors_of
from server.tasks.rules import (
    COUNTED_WHEN_FINISHED,
    COUNTERS_BY_ROLE,
    EXPIRING_WINDOW,
    FINISHED_STATUSES,
    Action,
    Counter,
    Counters,
    Field,
    NotAllowed,
    Role,
    RoleCounters,
    Status,
    TaskFacts,
    TaskForUser,
    Viewer,
    allowed_actions,
    counted_roles,
    counters_for,
    initial_status,
    is_expiring_soon,
    is_overdue,
    may_change_field,
    may_view,
    next_deadline_change,
    roles_of,
    supervised_by,
    transition,
)

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)


def make_task(status: Status = Status.PENDING, **changes: Any) -> TaskFacts:
    """The task of the table: everyone of ``PERSONAS`` has their place on it."""
    task = TaskFacts(
        id="t1",
        status=status,
        author_id="author",
        responsible_id="resp",
        participant_ids=frozenset({"part"}),
        observer_ids=frozenset({"obs"}),
        group_id="g1",
        group_members_see_tasks=True,
        group_member_ids=frozenset({"member"}),
    )
    return dataclasses.replace(task, **changes)


# --- the role x status x action table -------------------------------------------------------

# Each persona is one person holding one relation to the task of ``make_task``. The two
# workgroup members are the same user, in a group that does or does not show members its tasks.
PERSONAS: dict[str, tuple[Viewer, bool]] = {
    "author": (Viewer("author"), True),
    "resp": (Viewer("resp"), True),
    "part": (Viewer("part"), True),
    "obs": (Viewer("obs"), True),
    "boss": (Viewer("boss", supervised_ids=frozenset({"resp", "someone-else"})), True),
    "grp+": (Viewer("member"), True),
    "grp-": (Viewer("member"), False),
    "admin": (Viewer("root", is_admin=True), True),
    "nobody": (Viewer("nobody", supervised_ids=frozenset({"part", "obs"})), True),
}

# One line per action, status and "require approval to close" (off, on, or * for both).
# A cell is the status after the action (N P I A C D X for NEW, PENDING, IN_PROGRESS,
# AWAITING_CONTROL, COMPLETED, DEFERRED, DECLINED), or "-" when the persona is refused.
TABLE = """
action   status            approval author resp part obs boss grp+ grp- admin nobody
accept   NEW               *        -      P    -    -   -    -    -    -     -
accept   PENDING           *        -      -    -    -   -    -    -    -     -
accept   IN_PROGRESS       *        -      -    -    -   -    -    -    -     -
accept   AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
accept   COMPLETED         *        -      -    -    -   -    -    -    -     -
accept   DEFERRED          *        -      -    -    -   -    -    -    -     -
accept   DECLINED          *        -      -    -    -   -    -    -    -     -
decline  NEW               *        -      X    -    -   -    -    -    -     -
decline  PENDING           *        -      -    -    -   -    -    -    -     -
decline  IN_PROGRESS       *        -      -    -    -   -    -    -    -     -
decline  AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
decline  COMPLETED         *        -      -    -    -   -    -    -    -     -
decline  DEFERRED          *        -      -    -    -   -    -    -    -     -
decline  DECLINED          *        -      -    -    -   -    -    -    -     -
start    NEW               *        -      I    I    -   -    -    -    -     -
start    PENDING           *        -      I    I    -   -    -    -    -     -
start    IN_PROGRESS       *        -      -    -    -   -    -    -    -     -
start    AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
start    COMPLETED         *        -      -    -    -   -    -    -    -     -
start    DEFERRED          *        -      -    -    -   -    -    -    -     -
start    DECLINED          *        -      -    -    -   -    -    -    -     -
pause    NEW               *        -      -    -    -   -    -    -    -     -
pause    PENDING           *        -      -    -    -   -    -    -    -     -
pause    IN_PROGRESS       *        -      P    P    -   -    -    -    -     -
pause    AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
pause    COMPLETED         *        -      -    -    -   -    -    -    -     -
pause    DEFERRED          *        -      -    -    -   -    -    -    -     -
pause    DECLINED          *        -      -    -    -   -    -    -    -     -
resume   NEW               *        -      -    -    -   -    -    -    -     -
resume   PENDING           *        -      -    -    -   -    -    -    -     -
resume   IN_PROGRESS       *        -      -    -    -   -    -    -    -     -
resume   AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
resume   COMPLETED         *        -      -    -    -   -    -    -    -     -
resume   DEFERRED          *        P      P    -    -   -    -    -    P     -
resume   DECLINED          *        -      -    -    -   -    -    -    -     -
complete NEW               off      C      C    C    -   -    -    -    C     -
complete NEW               on       C      A    A    -   -    -    -    C     -
complete PENDING           off      C      C    C    -   -    -    -    C     -
complete PENDING           on       C      A    A    -   -    -    -    C     -
complete IN_PROGRESS       off      C      C    C    -   -    -    -    C     -
complete IN_PROGRESS       on       C      A    A    -   -    -    -    C     -
complete AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
complete COMPLETED         *        -      -    -    -   -    -    -    -     -
complete DEFERRED          *        -      -    -    -   -    -    -    -     -
complete DECLINED          *        -      -    -    -   -    -    -    -     -
approve  NEW               *        -      -    -    -   -    -    -    -     -
approve  PENDING           *        -      -    -    -   -    -    -    -     -
approve  IN_PROGRESS       *        -      -    -    -   -    -    -    -     -
approve  AWAITING_CONTROL  *        C      -    -    -   C    -    -    C     -
approve  COMPLETED         *        -      -    -    -   -    -    -    -     -
approve  DEFERRED          *        -      -    -    -   -    -    -    -     -
approve  DECLINED          *        -      -    -    -   -    -    -    -     -
return   NEW               *        -      -    -    -   -    -    -    -     -
return   PENDING           *        -      -    -    -   -    -    -    -     -
return   IN_PROGRESS       *        -      -    -    -   -    -    -    -     -
return   AWAITING_CONTROL  *        P      -    -    -   P    -    -    P     -
return   COMPLETED         *        -      -    -    -   -    -    -    -     -
return   DEFERRED          *        -      -    -    -   -    -    -    -     -
return   DECLINED          *        -      -    -    -   -    -    -    -     -
reopen   NEW               *        -      -    -    -   -    -    -    -     -
reopen   PENDING           *        -      -    -    -   -    -    -    -     -
reopen   IN_PROGRESS       *        -      -    -    -   -    -    -    -     -
reopen   AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
reopen   COMPLETED         off      P      P    -    -   -    -    -    P     -
reopen   COMPLETED         on       P      -    -    -   -    -    -    P     -
reopen   DEFERRED          *        -      -    -    -   -    -    -    -     -
reopen   DECLINED          *        P      -    -    -   -    -    -    P     -
defer    NEW               *        D      D    -    -   -    -    -    D     -
defer    PENDING           *        D      D    -    -   -    -    -    D     -
defer    IN_PROGRESS       *        D      D    -    -   -    -    -    D     -
defer    AWAITING_CONTROL  *        -      -    -    -   -    -    -    -     -
defer    COMPLETED         *        -      -    -    -   -    -    -    -     -
defer    DEFERRED          *        -      -    -    -   -    -    -    -     -
defer    DECLINED          *        -      -    -    -   -    -    -    -     -
copy     NEW               *        N      N    N    N   N    N    -    N     -
copy     PENDING           *        P      P    P    P   P    P    -    P     -
copy     IN_PROGRESS       *        I      I    I    I   I    I    -    I     -
copy     AWAITING_CONTROL  *        A      A    A    A   A    A    -    A     -
copy     COMPLETED         *        C      C    C    C   C    C    -    C     -
copy     DEFERRED          *        D      D    D    D   D    D    -    D     -
copy     DECLINED          *        X      X    X    X   X    X    -    X     -
delete   NEW               *        N      -    -    -   -    -    -    N     -
delete   PENDING           *        P      -    -    -   -    -    -    P     -
delete   IN_PROGRESS       *        I      -    -    -   -    -    -    I     -
delete   AWAITING_CONTROL  *        A      -    -    -   -    -    -    A     -
delete   COMPLETED         *        C      -    -    -   -    -    -    C     -
delete   DEFERRED          *        D      -    -    -   -    -    -    D     -
delete   DECLINED          *        X      -    -    -   -    -    -    X     -
edit     NEW               *        N      -    -    -   -    -    -    N     -
edit     PENDING           *        P      -    -    -   -    -    -    P     -
edit     IN_PROGRESS       *        I      -    -    -   -    -    -    I     -
edit     AWAITING_CONTROL  *        A      -    -    -   -    -    -    A     -
edit     COMPLETED         *        C      -    -    -   -    -    -    C     -
edit     DEFERRED          *        D      -    -    -   -    -    -    D     -
edit     DECLINED          *        X      -    -    -   -    -    -    X     -
comment  NEW               *        N      N    N    N   N    N    -    N     -
comment  PENDING           *        P      P    P    P   P    P    -    P     -
comment  IN_PROGRESS       *        I      I    I    I   I    I    -    I     -
comment  AWAITING_CONTROL  *        A      A    A    A   A    A    -    A     -
comment  COMPLETED         *        C      C    C    C   C    C    -    C     -
comment  DEFERRED          *        D      D    D    D   D    D    -    D     -
comment  DECLINED          *        X      X    X    X   X    X    -    X     -
"""

LETTERS = {
    "N": Status.NEW,
    "P": Status.PENDING,
    "I": Status.IN_PROGRESS,
    "A": Status.AWAITING_CONTROL,
    "C": Status.COMPLETED,
    "D": Status.DEFERRED,
    "X": Status.DECLINED,
}

Key = tuple[Action, Status, bool, str]


def parse_table(text: str) -> list[tuple[Key, Status | None]]:
    lines = [line.split() for line in text.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header[3:] == list(PERSONAS)
    parsed: list[tuple[Key, Status | None]] = []
    for action, status, approval, *cells in rows:
        assert len(cells) == len(PERSONAS), (action, status)
        approvals = {"off": [False], "on": [True], "*": [False, True]}[approval]
        for require_approval in approvals:
            for persona, cell in zip(PERSONAS, cells, strict=True):
                key = (Action(action), Status[status], require_approval, persona)
                parsed.append((key, None if cell == "-" else LETTERS[cell]))
    return parsed


CASES = parse_table(TABLE)
EXPECTED = dict(CASES)


def test_the_table_covers_every_combination_once() -> None:
    assert len(CASES) == len(EXPECTED)
    assert set(EXPECTED) == {
        (action, status, require_approval, persona)
        for action in Action
        for status in Status
        for require_approval in (False, True)
        for persona in PERSONAS
    }


@pytest.mark.parametrize(
    ("key", "expected"),
    CASES,
    ids=[f"{a.value}-{s.name}-{'approval' if ra else 'free'}-{p}" for (a, s, ra, p), _ in CASES],
)
def test_role_status_action_table(key: Key, expected: Status | None) -> None:
    action, status, require_approval, persona = key
    viewer, group_shows_tasks = PERSONAS[persona]
    task = make_task(
        status, require_approval=require_approval, group_members_see_tasks=group_shows_tasks
    )
    roles = roles_of(viewer, task)
    if expected is None:
        assert action not in allowed_actions(roles, task)
        with pytest.raises(NotAllowed) as refused:
            transition(action, task, roles)
        assert refused.value.action is action
        assert refused.value.reason
    else:
        assert action in allowed_actions(roles, task)
        assert transition(action, task, roles) is expected


# --- roles and visibility -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("persona", "roles"),
    [
        ("author", {Role.AUTHOR}),
        ("resp", {Role.RESPONSIBLE}),
        ("part", {Role.PARTICIPANT}),
        ("obs", {Role.OBSERVER}),
        ("boss", {Role.SUPERVISOR}),
        ("grp+", {Role.GROUP_MEMBER}),
        ("grp-", set()),
        ("admin", {Role.ADMIN}),
        ("nobody", set()),
    ],
)
def test_each_persona_holds_its_role(persona: str, roles: set[Role]) -> None:
    viewer, group_shows_tasks = PERSONAS[persona]
    task = make_task(group_members_see_tasks=group_shows_tasks)
    assert roles_of(viewer, task) == roles
    assert may_view(viewer, task) is bool(roles)


def test_one_person_holds_every_role_they_have() -> None:
    task = make_task(
        author_id="ann",
        responsible_id="ann",
        participant_ids=frozenset({"ann"}),
        observer_ids=frozenset({"ann"}),
        group_member_ids=frozenset({"ann"}),
    )
    viewer = Viewer("ann", is_admin=True, supervised_ids=frozenset({"ann"}))
    # nobody supervises themself, even if the caller's set says so
    assert roles_of(viewer, task) == frozenset(Role) - {Role.SUPERVISOR}


def test_a_task_outside_any_group_gives_group_members_nothing() -> None:
    task = make_task(group_id=None, group_members_see_tasks=True)
    assert not may_view(Viewer("member"), task)


def test_a_head_supervises_the_responsible_not_the_others_on_the_task() -> None:
    task = make_task()
    assert not may_view(Viewer("lead", supervised_ids=frozenset({"author", "part", "obs"})), task)
    assert roles_of(Viewer("lead", supervised_ids=frozenset({"resp"})), task) == {Role.SUPERVISOR}


# company                  head: ceo
# +-- sales                head: sam
# |   +-- sales-north      head: nora
# |   |   +-- north-field  head: None
# +-- it                   head: None
#     +-- it-ops           head: olga
TREE = {
    node.id: node
    for node in (
        DepartmentNode("company", None, "ceo"),
        DepartmentNode("sales", "company", "sam"),
        DepartmentNode("sales-north", "sales", "nora"),
        DepartmentNode("north-field", "sales-north", None),
        DepartmentNode("it", "company", None),
        DepartmentNode("it-ops", "it", "olga"),
    )
}
PEOPLE = {
    person.id: person
    for person in (
        Person("ceo", "company"),
        Person("sam", "sales"),
        Person("nora", "sales-north"),
        Person("finn", "north-field"),
        Person("fay", "north-field"),
        Person("olga", "it-ops"),
        Person("otto", "it-ops"),
        Person("loner", None),
    )
}


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("ceo", {"sam", "nora", "finn", "fay", "olga", "otto"}),
        ("sam", {"nora", "finn", "fay"}),
        ("nora", {"finn", "fay"}),
        ("olga", {"otto"}),
        ("finn", set()),
        ("stranger", set()),
    ],
)
def test_supervised_by_follows_the_department_tree(head: str, expected: set[str]) -> None:
    assert supervised_by(head, PEOPLE.values(), TREE) == expected


def test_a_head_two_levels_up_sees_the_task_of_a_subordinate() -> None:
    task = make_task(author_id="fay", responsible_id="finn")
    sam = Viewer("sam", supervised_ids=supervised_by("sam", PEOPLE.values(), TREE))
    olga = Viewer("olga", supervised_ids=supervised_by("olga", PEOPLE.values(), TREE))
    assert roles_of(sam, task) == {Role.SUPERVISOR}
    assert Action.APPROVE in allowed_actions(
        roles_of(sam, task), dataclasses.replace(task, status=Status.AWAITING_CONTROL)
    )
    assert not may_view(olga, task)


# --- the workflow beyond the table ----------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ({Role.RESPONSIBLE}, Status.AWAITING_CONTROL),
        ({Role.PARTICIPANT, Role.OBSERVER}, Status.AWAITING_CONTROL),
        ({Role.RESPONSIBLE, Role.AUTHOR}, Status.COMPLETED),  # set themself a task
        ({Role.PARTICIPANT, Role.SUPERVISOR}, Status.COMPLETED),  # could approve it anyway
        ({Role.RESPONSIBLE, Role.ADMIN}, Status.COMPLETED),
        ({Role.AUTHOR}, Status.COMPLETED),
    ],
)
def test_completing_skips_the_approval_its_actor_would_give(
    roles: set[Role], expected: Status
) -> None:
    task = make_task(Status.IN_PROGRESS, require_approval=True)
    assert transition(Action.COMPLETE, task, frozenset(roles)) is expected


def test_a_supervisor_alone_cannot_complete() -> None:
    task = make_task(Status.IN_PROGRESS)
    with pytest.raises(NotAllowed, match="complete"):
        transition(Action.COMPLETE, task, {Role.SUPERVISOR})


def test_the_whole_approval_round_trip() -> None:
    task = make_task(Status.NEW, require_approval=True)
    for roles, action, expected in [
        ({Role.RESPONSIBLE}, Action.ACCEPT, Status.PENDING),
        ({Role.PARTICIPANT}, Action.START, Status.IN_PROGRESS),
        ({Role.RESPONSIBLE}, Action.COMPLETE, Status.AWAITING_CONTROL),
        ({Role.AUTHOR}, Action.RETURN, Status.PENDING),
        ({Role.RESPONSIBLE}, Action.START, Status.IN_PROGRESS),
        ({Role.RESPONSIBLE}, Action.COMPLETE, Status.AWAITING_CONTROL),
        ({Role.AUTHOR}, Action.APPROVE, Status.COMPLETED),
        ({Role.AUTHOR}, Action.REOPEN, Status.PENDING),
    ]:
        status = transition(action, task, frozenset(roles))
        assert status is expected, action
        task = dataclasses.replace(task, status=status)


def test_refusals_say_why() -> None:
    with pytest.raises(NotAllowed, match="not visible"):
        transition(Action.COMMENT, make_task(), frozenset())
    with pytest.raises(NotAllowed, match="COMPLETED"):
        transition(Action.START, make_task(Status.COMPLETED), {Role.RESPONSIBLE})
    with pytest.raises(NotAllowed, match="only for: admin, author"):
        transition(Action.EDIT, make_task(), {Role.RESPONSIBLE})
    with pytest.raises(NotAllowed, match="reopen"):
        transition(Action.REOPEN, make_task(Status.DECLINED), {Role.RESPONSIBLE})


def test_nobody_without_a_role_may_do_anything() -> None:
    for status in Status:
        assert allowed_actions(frozenset(), make_task(status)) == frozenset()


# --- fields ---------------------------------------------------------------------------------

FIELD_ROLES = [Role.AUTHOR, Role.ADMIN, Role.RESPONSIBLE, Role.PARTICIPANT, Role.OBSERVER]


@pytest.mark.parametrize("field", list(Field))
@pytest.mark.parametrize("role", [*FIELD_ROLES, Role.SUPERVISOR, Role.GROUP_MEMBER])
@pytest.mark.parametrize("responsible_may_move", [False, True])
def test_field_permissions(field: Field, role: Role, responsible_may_move: bool) -> None:
    task = make_task(responsible_may_change_deadline=responsible_may_move)
    expected = role in (Role.AUTHOR, Role.ADMIN) or (
        role is Role.RESPONSIBLE and field is Field.DEADLINE and responsible_may_move
    )
    assert may_change_field(field, {role}, task) is expected


def test_nobody_changes_a_field_without_a_role() -> None:
    task = make_task(responsible_may_change_deadline=True)
    assert not any(may_change_field(field, frozenset(), task) for field in Field)


def test_the_responsible_moves_the_deadline_without_the_right_to_edit() -> None:
    task = make_task(responsible_may_change_deadline=True)
    roles = {Role.RESPONSIBLE}
    assert Action.EDIT not in allowed_actions(roles, task)
    assert may_change_field(Field.DEADLINE, roles, task)
    assert not may_change_field(Field.TITLE, roles, task)


# --- initial status -------------------------------------------------------------------------


def author_heads(author_id: str, responsible_id: str) -> bool:
    return author_id in supervisors_of(PEOPLE[responsible_id], TREE)


@pytest.mark.parametrize(
    ("author_id", "responsible_id", "expected"),
    [
        ("finn", "finn", Status.PENDING),  # a task for oneself
        ("nora", "finn", Status.PENDING),  # the head of their own department
        ("ceo", "finn", Status.PENDING),  # a head three levels up
        ("sam", "finn", Status.PENDING),  # two levels up
        ("fay", "finn", Status.NEW),  # a peer
        ("finn", "nora", Status.NEW),  # a subordinate assigning to their head
        ("olga", "finn", Status.NEW),  # a head of another branch
    ],
)
def test_initial_status(author_id: str, responsible_id: str, expected: Status) -> None:
    supervises = author_heads(author_id, responsible_id)
    assert initial_status(author_id, responsible_id, supervises) is expected


# --- deadlines ------------------------------------------------------------------------------

OPEN = [Status.NEW, Status.PENDING, Status.IN_PROGRESS]
NOT_OPEN = [Status.AWAITING_CONTROL, Status.COMPLETED, Status.DEFERRED, Status.DECLINED]


@pytest.mark.parametrize(
    ("offset", "overdue", "expiring"),
    [
        (-timedelta(days=3), True, False),
        (-TICK, True, False),
        (timedelta(0), True, False),  # at the deadline the task is late
        (TICK, False, True),
        (timedelta(hours=5), False, True),
        (EXPIRING_WINDOW, False, True),  # exactly 24 h ahead: expiring
        (EXPIRING_WINDOW + TICK, False, False),
        (timedelta(days=10), False, False),
    ],
    ids=lambda value: str(value),
)
@pytest.mark.parametrize("status", OPEN)
def test_deadline_boundaries_of_open_tasks(
    status: Status, offset: timedelta, overdue: bool, expiring: bool
) -> None:
    """``offset`` is how far the deadline lies ahead of now."""
    task = make_task(status, deadline=NOW + offset)
    assert is_overdue(task, NOW) is overdue
    assert is_expiring_soon(task, NOW) is expiring


@pytest.mark.parametrize("offset", [-timedelta(days=3), timedelta(0), timedelta(hours=5)])
@pytest.mark.parametrize("status", NOT_OPEN)
def test_tasks_not_open_are_never_late(status: Status, offset: timedelta) -> None:
    task = make_task(status, deadline=NOW + offset)
    assert not is_overdue(task, NOW)
    assert not is_expiring_soon(task, NOW)


@pytest.mark.parametrize("status", list(Status))
def test_a_task_without_deadline_is_never_late(status: Status) -> None:
    task = make_task(status)
    assert not is_overdue(task, NOW)
    assert not is_expiring_soon(task, NOW)


def test_deadlines_in_other_time_zones_compare_by_instant() -> None:
    moscow = timezone(timedelta(hours=3))
    task = make_task(deadline=datetime(2024, 5, 10, 15, 0, tzinfo=moscow))  # = NOW
    assert is_overdue(task, NOW)
    assert not is_overdue(task, NOW - TICK)


def test_a_naive_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_task(deadline=datetime(2024, 5, 10, 12, 0))


def test_next_deadline_change_without_deadlines() -> None:
    assert next_deadline_change([], NOW) is None
    assert next_deadline_change([make_task()], NOW) is None


def test_next_deadline_change_of_one_task() -> None:
    deadline = NOW + timedelta(days=3)
    task = make_task(deadline=deadline)
    # far ahead: it starts expiring a day before the deadline
    assert next_deadline_change([task], NOW) == deadline - EXPIRING_WINDOW
    # exactly when it starts expiring, the next change is the deadline itself
    assert next_deadline_change([task], deadline - EXPIRING_WINDOW) == deadline
    assert next_deadline_change([task], deadline - TICK) == deadline
    # once late, nothing more changes
    assert next_deadline_change([task], deadline) is None


def test_next_deadline_change_is_the_earliest_of_open_tasks() -> None:
    tasks = [
        make_task(deadline=NOW + timedelta(days=5)),  # expiring from NOW + 4 days
        make_task(deadline=NOW + timedelta(hours=30)),  # expiring from NOW + 6 h
        make_task(deadline=NOW + timedelta(hours=20)),  # overdue at NOW + 20 h
        make_task(deadline=NOW - timedelta(hours=1)),  # already late
        make_task(Status.COMPLETED, deadline=NOW + timedelta(minutes=1)),
        make_task(Status.AWAITING_CONTROL, deadline=NOW + timedelta(minutes=2)),
        make_task(Status.DEFERRED, deadline=NOW + timedelta(minutes=3)),
    ]
    assert next_deadline_change(tasks, NOW) == NOW + timedelta(hours=6)
    assert next_deadline_change(tasks[:1] + tasks[2:], NOW) == NOW + timedelta(hours=20)


# --- counters -------------------------------------------------------------------------------

ME = "me"
CREATED = NOW - timedelta(days=2)
SEEN = NOW - timedelta(days=1)


def mine(
    status: Status,
    *,
    deadline: datetime | None = None,
    viewed: bool = True,
    comments: int = 0,
    **changes: Any,
) -> TaskForUser:
    """A task of someone else's that I am responsible for, unless ``changes`` say otherwise."""
    fields: dict[str, Any] = {"author_id": "boss", "responsible_id": ME, "deadline": deadline}
    fields.update(changes)
    return TaskForUser(
        task=make_task(status, **fields),
        created_at=CREATED,
        viewed_at=SEEN if viewed else None,
        comments_after_view=comments,
    )


def test_counters_of_the_responsible() -> None:
    tasks = [
        mine(Status.NEW, deadline=NOW - timedelta(hours=1), viewed=False, comments=2),
        mine(Status.IN_PROGRESS, deadline=NOW + timedelta(hours=3)),
        mine(Status.PENDING),
        mine(Status.DEFERRED, deadline=NOW - timedelta(days=1)),
        mine(Status.AWAITING_CONTROL, deadline=NOW - timedelta(days=1), comments=1),
        mine(Status.COMPLETED, viewed=False),  # finished: not new any more
        mine(Status.PENDING, viewed=False, author_id=ME),  # I set it myself: not new
    ]
    expected = RoleCounters(
        new=1,
        in_progress=4,
        overdue=1,
        expiring_soon=1,
        without_deadline=2,
        deferred=1,
        new_comments=3,
    )
    counters = counters_for(ME, tasks, NOW)
    assert counters == Counters(responsible=expected, total=expected)


def test_counters_of_the_participant() -> None:
    helping: dict[str, Any] = {"responsible_id": "resp", "participant_ids": frozenset({ME})}
    tasks = [
        mine(Status.PENDING, viewed=False, **helping),
        mine(Status.IN_PROGRESS, deadline=NOW - TICK, comments=4, **helping),
        mine(Status.NEW, deadline=NOW + EXPIRING_WINDOW, **helping),
        mine(Status.DEFERRED, **helping),
        mine(Status.AWAITING_CONTROL, **helping),
    ]
    expected = RoleCounters(
        new=1,
        in_progress=3,
        overdue=1,
        expiring_soon=1,
        without_deadline=1,
        deferred=1,
        new_comments=4,
    )
    assert counters_for(ME, tasks, NOW) == Counters(participant=expected, total=expected)


def test_counters_of_the_observer() -> None:
    following: dict[str, Any] = {"responsible_id": "resp", "observer_ids": frozenset({ME})}
    tasks = [
        mine(Status.NEW, viewed=False, comments=1, **following),
        mine(Status.IN_PROGRESS, deadline=NOW - timedelta(hours=2), **following),
        # expiring soon, deferred and "without deadline" are the doers' business
        mine(Status.PENDING, deadline=NOW + timedelta(hours=2), **following),
        mine(Status.DEFERRED, **following),
        mine(Status.AWAITING_CONTROL, **following),
        mine(Status.DECLINED, viewed=False, **following),
    ]
    expected = RoleCounters(new=1, in_progress=3, overdue=1, new_comments=1)
    assert counters_for(ME, tasks, NOW) == Counters(observer=expected, total=expected)


def test_counters_of_the_author() -> None:
    set_by_me: dict[str, Any] = {"author_id": ME, "responsible_id": "resp"}
    tasks = [
        mine(Status.NEW, viewed=False, **set_by_me),  # never new to its author
        mine(Status.IN_PROGRESS, deadline=NOW - timedelta(hours=2), comments=2, **set_by_me),
        mine(Status.PENDING, deadline=NOW + timedelta(hours=2), **set_by_me),
        mine(Status.AWAITING_CONTROL, deadline=NOW - timedelta(hours=2), **set_by_me),
        mine(Status.AWAITING_CONTROL, **set_by_me),
        mine(Status.DEFERRED, **set_by_me),
        mine(Status.COMPLETED, comments=1, **set_by_me),
    ]
    expected = RoleCounters(
        in_progress=3, awaiting_control=2, overdue=1, deferred=1, new_comments=3
    )
    assert counters_for(ME, tasks, NOW) == Counters(author=expected, total=expected)


def test_a_task_counts_once_in_the_total_whatever_my_roles_on_it() -> None:
    # I set it for someone else and help with it: it counts as "set by me" and as "I help"
    task = mine(
        Status.IN_PROGRESS,
        deadline=NOW - timedelta(hours=1),
        comments=5,
        author_id=ME,
        responsible_id="resp",
        participant_ids=frozenset({ME}),
        observer_ids=frozenset({ME}),  # the closer role wins: not counted as followed too
    )
    counters = counters_for(ME, [task], NOW)
    assert counted_roles(ME, task.task) == [Role.PARTICIPANT, Role.AUTHOR]
    assert counters.participant == RoleCounters(in_progress=1, overdue=1, new_comments=5)
    assert counters.author == RoleCounters(in_progress=1, overdue=1, new_comments=5)
    assert counters.observer == RoleCounters()
    assert counters.total == RoleCounters(in_progress=1, overdue=1, new_comments=5)


def test_the_total_joins_counters_of_different_roles() -> None:
    tasks = [
        mine(Status.NEW, viewed=False),  # responsible: new, in progress, without deadline
        mine(Status.AWAITING_CONTROL, author_id=ME, responsible_id="resp"),  # author
        mine(Status.PENDING, responsible_id="resp", observer_ids=frozenset({ME})),
    ]
    counters = counters_for(ME, tasks, NOW)
    assert counters.total == RoleCounters(
        new=1, in_progress=2, awaiting_control=1, without_deadline=1
    )


@pytest.mark.parametrize(
    ("viewed_at", "new"),
    [(None, True), (CREATED - TICK, True), (CREATED, False), (NOW, False)],
)
def test_a_view_older_than_the_task_does_not_count(viewed_at: datetime | None, new: bool) -> None:
    item = TaskForUser(make_task(responsible_id=ME), created_at=CREATED, viewed_at=viewed_at)
    assert counters_for(ME, [item], NOW).responsible.new == int(new)


def test_heads_members_and_admins_count_nothing() -> None:
    task = mine(Status.NEW, deadline=NOW - timedelta(hours=1), viewed=False, comments=3)
    for user in ("boss-of-me", "member", "root"):
        assert counted_roles(user, task.task) == []
        assert counters_for(user, [task], NOW) == Counters()


def test_counters_by_role_are_what_the_docstring_says() -> None:
    assert {role: set(counters) for role, counters in COUNTERS_BY_ROLE.items()} == {
        Role.RESPONSIBLE: set(Counter) - {Counter.AWAITING_CONTROL},
        Role.PARTICIPANT: set(Counter) - {Counter.AWAITING_CONTROL},
        Role.OBSERVER: {Counter.NEW, Counter.IN_PROGRESS, Counter.OVERDUE, Counter.NEW_COMMENTS},
        Role.AUTHOR: {
            Counter.IN_PROGRESS,
            Counter.AWAITING_CONTROL,
            Counter.OVERDUE,
            Counter.DEFERRED,
            Counter.NEW_COMMENTS,
        },
    }


def test_counters_read_by_name_and_role() -> None:
    counters = counters_for(ME, [mine(Status.NEW, viewed=False, comments=2)], NOW)
    assert counters.of(Role.RESPONSIBLE).get(Counter.NEW_COMMENTS) == 2
    assert counters.of(Role.AUTHOR).get(Counter.NEW) == 0
    with pytest.raises(KeyError):
        counters.of(Role.ADMIN)


# --- properties -----------------------------------------------------------------------------

STATUS_KEEPING = {Action.COPY, Action.DELETE, Action.EDIT, Action.COMMENT}

steps = st.lists(
    st.tuples(
        st.frozensets(st.sampled_from(list(Role)), max_size=3),
        st.sampled_from(list(Action)),
        st.booleans(),  # the author flips "require approval" before this step
    ),
    max_size=40,
)


@settings(max_examples=400, database=None)
@given(start=st.sampled_from(list(Status)), require_approval=st.booleans(), steps=steps)
def test_random_walks_keep_the_workflow_legal(
    start: Status,
    require_approval: bool,
    steps: list[tuple[frozenset[Role], Action, bool]],
) -> None:
    task = make_task(start, require_approval=require_approval)
    for roles, action, flip in steps:
        if flip:
            task = dataclasses.replace(task, require_approval=not task.require_approval)
        allowed = allowed_actions(roles, task)
        # allowed_actions and transition agree on every action, not only the one taken
        for candidate in Action:
            if candidate in allowed:
                transition(candidate, task, roles)
            else:
                with pytest.raises(NotAllowed):
                    transition(candidate, task, roles)
        if action not in allowed:
            continue
        before, after = task.status, transition(action, task, roles)
        assert after in Status
        if action in STATUS_KEEPING:
            assert after is before
        if after is Status.COMPLETED and before is not Status.COMPLETED:
            assert action in (Action.COMPLETE, Action.APPROVE)
        if after is Status.DECLINED and before is not Status.DECLINED:
            assert (before, action) == (Status.NEW, Action.DECLINE)
        if after is Status.AWAITING_CONTROL and before is not Status.AWAITING_CONTROL:
            assert action is Action.COMPLETE and task.require_approval
        task = dataclasses.replace(task, status=after)


@settings(max_examples=200, database=None)
@given(
    user=st.sampled_from(["author", "resp", "part", "obs", "member", "boss", "x"]),
    is_admin=st.booleans(),
    supervised=st.frozensets(st.sampled_from(["resp", "part", "x"])),
    see=st.booleans(),
    status=st.sampled_from(list(Status)),
)
def test_who_cannot_view_can_do_nothing(
    user: str, is_admin: bool, supervised: frozenset[str], see: bool, status: Status
) -> None:
    task = make_task(status, group_members_see_tasks=see)
    roles = roles_of(Viewer(user, is_admin, supervised), task)
    actions = allowed_actions(roles, task)
    if not may_view(Viewer(user, is_admin, supervised), task):
        assert actions == frozenset()
    else:
        assert {Action.COPY, Action.COMMENT} <= actions


@given(
    status=st.sampled_from(sorted(FINISHED_STATUSES)),
    who=st.sampled_from(["author", "resp", "part", "obs"]),
    deadline=st.sampled_from([None, NOW - timedelta(days=1), NOW + timedelta(hours=2)]),
    viewed=st.booleans(),
    comments=st.integers(min_value=0, max_value=3),
)
def test_a_finished_task_counts_only_for_comments_not_seen(
    status: Status, who: str, deadline: datetime | None, viewed: bool, comments: int
) -> None:
    """What lets a recount of stored counters skip finished tasks without unseen comments
    (server/tasks/counters.py): they add nothing, in any role, whatever their deadline."""
    item = TaskForUser(
        task=make_task(status, deadline=deadline),
        created_at=NOW - timedelta(days=3),
        viewed_at=NOW - timedelta(days=1) if viewed else None,
        comments_after_view=comments,
    )
    counted = counters_for(who, [item], NOW)
    for role in (counted.responsible, counted.participant, counted.observer, counted.author):
        for counter in Counter:
            if counter not in COUNTED_WHEN_FINISHED or comments == 0:
                assert role.get(counter) == 0, (counter, role)
    assert counted.total.new_comments == comments
