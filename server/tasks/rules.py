"""The rules of tasks: who sees a task, who may move it through its workflow, which fields they
may change, when it is late, and what the task counters show. Pure, no I/O.

The workflow is Bitrix24's. A task assigned to someone else starts NEW until its responsible
person accepts it; one they set themselves, or their head set them, starts accepted (PENDING).
Work is started, paused, deferred and completed by the people doing it; when the author asked
to approve the result, completing hands the work in (AWAITING_CONTROL) and the author approves
it or returns it for completion. "Overdue" and "expiring soon" are never stored: they follow
from the deadline and the clock, so a scheduler only needs ``next_deadline_change`` to know
when to recount.

Who someone is to a task is a set of ``Role``s, computed once by ``roles_of`` and then handed
to every other rule, so a person who is both author and responsible simply holds both roles and
may do what either may.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum, StrEnum

from server.directory.rules import DepartmentNode, Person, supervisors_of


class Status(IntEnum):
    """Bitrix24's status codes, so that imported and exported tasks keep their numbers."""

    NEW = 1  # assigned, not accepted yet
    PENDING = 2  # accepted, waiting to be started, or returned for completion
    IN_PROGRESS = 3
    AWAITING_CONTROL = 4  # handed in, waiting for the author's approval ("supposedly completed")
    COMPLETED = 5
    DEFERRED = 6
    DECLINED = 7


OPEN_STATUSES: frozenset[Status] = frozenset({Status.NEW, Status.PENDING, Status.IN_PROGRESS})
"""The work is still to do: these tasks can be late, and they are what the doer counts."""

FINISHED_STATUSES: frozenset[Status] = frozenset({Status.COMPLETED, Status.DECLINED})


class Role(StrEnum):
    """What someone is to a task. The first four are stored on the task; the rest are derived."""

    AUTHOR = "author"
    RESPONSIBLE = "responsible"
    PARTICIPANT = "participant"  # Bitrix's "accomplice"
    OBSERVER = "observer"  # Bitrix's "auditor"
    GROUP_MEMBER = "group_member"  # only while the workgroup lets members see its tasks
    SUPERVISOR = "supervisor"  # a head anywhere above the responsible person
    ADMIN = "admin"


class Action(StrEnum):
    ACCEPT = "accept"
    DECLINE = "decline"
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    COMPLETE = "complete"
    APPROVE = "approve"
    RETURN = "return"  # return for completion
    REOPEN = "reopen"
    DEFER = "defer"
    COPY = "copy"
    DELETE = "delete"
    EDIT = "edit"
    COMMENT = "comment"


class Field(StrEnum):
    """The fields of a task a person may change (``may_change_field``)."""

    TITLE = "title"
    DESCRIPTION = "description"
    PRIORITY = "priority"
    TAGS = "tags"
    PARTICIPANTS = "participants"
    OBSERVERS = "observers"
    RESPONSIBLE = "responsible"
    GROUP = "group"
    DEADLINE = "deadline"
    PLANNED_START = "planned_start"
    PLANNED_END = "planned_end"
    REQUIRE_APPROVAL = "require_approval"
    RESPONSIBLE_MAY_CHANGE_DEADLINE = "responsible_may_change_deadline"
    INCLUDE_IN_REPORT = "include_in_report"


class NotAllowed(Exception):
    """An action the actor may not take on the task in its current status."""

    def __init__(self, action: Action, reason: str) -> None:
        super().__init__(f"{action.value}: {reason}")
        self.action = action
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TaskFacts:
    """What the rules need to know of a task. ``deadline`` must be timezone-aware."""

    id: str
    status: Status
    author_id: str
    responsible_id: str
    participant_ids: frozenset[str] = frozenset()
    observer_ids: frozenset[str] = frozenset()
    group_id: str | None = None
    group_members_see_tasks: bool = False
    group_member_ids: frozenset[str] = frozenset()
    require_approval: bool = False
    responsible_may_change_deadline: bool = False
    deadline: datetime | None = None
    parent_id: str | None = None

    def __post_init__(self) -> None:
        # A naive deadline would only fail later, deep inside a comparison with ``now``.
        if self.deadline is not None and self.deadline.utcoffset() is None:
            raise ValueError(f"task {self.id}: the deadline must be timezone-aware")


@dataclass(frozen=True, slots=True)
class Viewer:
    """The person looking at tasks.

    ``supervised_ids`` are the people this person is a head above (``supervised_by``). It is
    computed once per request from the department tree and then serves every task of a list,
    instead of walking the tree up from each task's responsible person.
    """

    user_id: str
    is_admin: bool = False
    supervised_ids: frozenset[str] = frozenset()


def supervised_by(
    user_id: str, people: Iterable[Person], tree: Mapping[str, DepartmentNode]
) -> frozenset[str]:
    """The ids of everyone ``user_id`` is a head above, at any depth: the people whose
    ``supervisors_of`` include them. Never the user themself."""
    return frozenset(p.id for p in people if user_id in supervisors_of(p, tree))


# --- who sees a task ------------------------------------------------------------------------


def roles_of(viewer: Viewer, task: TaskFacts) -> frozenset[Role]:
    """Every role ``viewer`` holds on ``task``; empty for anyone who may not see it.

    Workgroup members count only while the group lets members see its tasks: membership alone
    opens nothing. A head above the responsible person is a supervisor of the task, as in
    Bitrix24, where heads see and control their subordinates' tasks.
    """
    user = viewer.user_id
    roles: set[Role] = set()
    if user == task.author_id:
        roles.add(Role.AUTHOR)
    if user == task.responsible_id:
        roles.add(Role.RESPONSIBLE)
    if user in task.participant_ids:
        roles.add(Role.PARTICIPANT)
    if user in task.observer_ids:
        roles.add(Role.OBSERVER)
    if task.group_id is not None and task.group_members_see_tasks and user in task.group_member_ids:
        roles.add(Role.GROUP_MEMBER)
    if task.responsible_id in viewer.supervised_ids and task.responsible_id != user:
        roles.add(Role.SUPERVISOR)
    if viewer.is_admin:
        roles.add(Role.ADMIN)
    return frozenset(roles)


def may_view(viewer: Viewer, task: TaskFacts) -> bool:
    """Anyone with a role on the task sees it; nobody else does."""
    return bool(roles_of(viewer, task))


# --- the workflow ---------------------------------------------------------------------------

ALL_STATUSES: frozenset[Status] = frozenset(Status)
ALL_ROLES: frozenset[Role] = frozenset(Role)

# Admins may do whatever the author may. Heads above the responsible person see the task and,
# as in Bitrix24, control its result like the author: they approve it or return it. They do
# not run the work (start, defer...) nor edit the task - that stays with the people on it.
_AUTHORITY: frozenset[Role] = frozenset({Role.AUTHOR, Role.ADMIN})
_CONTROLLERS: frozenset[Role] = _AUTHORITY | {Role.SUPERVISOR}
_DOERS: frozenset[Role] = frozenset({Role.RESPONSIBLE, Role.PARTICIPANT})


@dataclass(frozen=True, slots=True)
class _Rule:
    from_statuses: frozenset[Status]
    roles: frozenset[Role]
    to: Status | None  # None: the status stays as it is


_RULES: Mapping[Action, _Rule] = {
    Action.ACCEPT: _Rule(frozenset({Status.NEW}), frozenset({Role.RESPONSIBLE}), Status.PENDING),
    Action.DECLINE: _Rule(frozenset({Status.NEW}), frozenset({Role.RESPONSIBLE}), Status.DECLINED),
    Action.START: _Rule(frozenset({Status.NEW, Status.PENDING}), _DOERS, Status.IN_PROGRESS),
    Action.PAUSE: _Rule(frozenset({Status.IN_PROGRESS}), _DOERS, Status.PENDING),
    # the target of COMPLETE depends on the actor, see ``_completed_status``
    Action.COMPLETE: _Rule(OPEN_STATUSES, _DOERS | _AUTHORITY, Status.COMPLETED),
    Action.APPROVE: _Rule(frozenset({Status.AWAITING_CONTROL}), _CONTROLLERS, Status.COMPLETED),
    Action.RETURN: _Rule(frozenset({Status.AWAITING_CONTROL}), _CONTROLLERS, Status.PENDING),
    Action.DEFER: _Rule(OPEN_STATUSES, _AUTHORITY | {Role.RESPONSIBLE}, Status.DEFERRED),
    Action.RESUME: _Rule(
        frozenset({Status.DEFERRED}), _AUTHORITY | {Role.RESPONSIBLE}, Status.PENDING
    ),
    # the responsible person's own, narrower, right to reopen is in ``_may_reopen``
    Action.REOPEN: _Rule(FINISHED_STATUSES, _AUTHORITY, Status.PENDING),
    Action.COPY: _Rule(ALL_STATUSES, ALL_ROLES, None),
    Action.DELETE: _Rule(ALL_STATUSES, _AUTHORITY, None),
    Action.EDIT: _Rule(ALL_STATUSES, _AUTHORITY, None),
    Action.COMMENT: _Rule(ALL_STATUSES, ALL_ROLES, None),
}


def _completed_status(task: TaskFacts, roles: Collection[Role]) -> Status:
    """Completing hands the work in for approval when the task asks for it - unless the actor
    could approve it themself (the author, an admin, a head above the responsible person), for
    whom a second click on "approve" would control nothing."""
    if task.require_approval and _CONTROLLERS.isdisjoint(roles):
        return Status.AWAITING_CONTROL
    return Status.COMPLETED


def _may_reopen(task: TaskFacts, roles: Collection[Role]) -> bool:
    """The author reopens a completed or declined task. The responsible person may also take
    back their own completion - but not one the author approved, nor their own refusal."""
    if not _AUTHORITY.isdisjoint(roles):
        return True
    return (
        Role.RESPONSIBLE in roles and task.status is Status.COMPLETED and not task.require_approval
    )


def _refusal(action: Action, task: TaskFacts, roles: Collection[Role]) -> str | None:
    """Why ``action`` is not allowed, or None when it is."""
    if not roles:
        return "the task is not visible to you"
    rule = _RULES[action]
    if task.status not in rule.from_statuses:
        return f"not possible while the task is {task.status.name}"
    if action is Action.REOPEN:
        if _may_reopen(task, roles):
            return None
        return "only the author (or an admin) may reopen this task"
    if rule.roles.isdisjoint(roles):
        allowed = ", ".join(sorted(role.value for role in rule.roles))
        return f"only for: {allowed}"
    return None


def allowed_actions(roles: Collection[Role], task: TaskFacts) -> frozenset[Action]:
    """Every action someone with ``roles`` may take on ``task`` as it is now."""
    return frozenset(a for a in Action if _refusal(a, task, roles) is None)


def transition(action: Action, task: TaskFacts, roles: Collection[Role]) -> Status:
    """The status of ``task`` after someone with ``roles`` takes ``action``.

    Copy, delete, edit and comment leave the status as it is (a copy is a new task, created by
    the caller with ``initial_status``). Raises ``NotAllowed`` for anything ``allowed_actions``
    would not list.
    """
    reason = _refusal(action, task, roles)
    if reason is not None:
        raise NotAllowed(action, reason)
    if action is Action.COMPLETE:
        return _completed_status(task, roles)
    target = _RULES[action].to
    return task.status if target is None else target


def initial_status(
    author_id: str, responsible_id: str, author_supervises_responsible: bool
) -> Status:
    """A task starts accepted (PENDING) when nobody needs to agree to it: the author set it
    themself, or it comes from a head above the responsible person. Anything else waits for the
    responsible person to accept it (NEW)."""
    if author_id == responsible_id or author_supervises_responsible:
        return Status.PENDING
    return Status.NEW


# --- fields ---------------------------------------------------------------------------------


def may_change_field(field_name: Field, roles: Collection[Role], task: TaskFacts) -> bool:
    """The author (or an admin) changes everything; the responsible person moves the deadline
    too, when the author allowed it. This is the per-field check behind ``Action.EDIT``: a
    responsible person may be refused EDIT and still change the deadline."""
    if not _AUTHORITY.isdisjoint(roles):
        return True
    return (
        field_name is Field.DEADLINE
        and Role.RESPONSIBLE in roles
        and task.responsible_may_change_deadline
    )


# --- deadlines ------------------------------------------------------------------------------

EXPIRING_WINDOW = timedelta(hours=24)


def is_overdue(task: TaskFacts, now: datetime) -> bool:
    """An open task is late from its deadline on (``now >= deadline``). Work handed in for
    approval is not late for the one who handed it in; finished or deferred work never is."""
    return task.status in OPEN_STATUSES and task.deadline is not None and now >= task.deadline


def is_expiring_soon(task: TaskFacts, now: datetime) -> bool:
    """An open task whose deadline falls within the next 24 hours: from ``deadline - 24h``
    included to ``deadline`` excluded, where it turns overdue."""
    return (
        task.status in OPEN_STATUSES
        and task.deadline is not None
        and task.deadline - EXPIRING_WINDOW <= now < task.deadline
    )


def next_deadline_change(tasks: Iterable[TaskFacts], now: datetime) -> datetime | None:
    """The earliest moment after ``now`` when one of ``tasks`` starts expiring soon or turns
    overdue: when a scheduler should wake up to recount. None when no open task has a future
    deadline. A change of status or deadline is not predicted: the caller recounts on those."""
    moments = (
        moment
        for task in tasks
        if task.status in OPEN_STATUSES and task.deadline is not None
        for moment in (task.deadline - EXPIRING_WINDOW, task.deadline)
        if moment > now
    )
    return min(moments, default=None)


# --- counters -------------------------------------------------------------------------------


class Counter(StrEnum):
    NEW = "new"
    IN_PROGRESS = "in_progress"
    AWAITING_CONTROL = "awaiting_control"
    OVERDUE = "overdue"
    EXPIRING_SOON = "expiring_soon"
    WITHOUT_DEADLINE = "without_deadline"
    DEFERRED = "deferred"
    NEW_COMMENTS = "new_comments"


COUNTERS_BY_ROLE: Mapping[Role, frozenset[Counter]] = {
    # "I do": the open work I must do, what is late or about to be, and what has no deadline
    Role.RESPONSIBLE: frozenset(Counter) - {Counter.AWAITING_CONTROL},
    # "I help": the same, for the tasks I am an accomplice on
    Role.PARTICIPANT: frozenset(Counter) - {Counter.AWAITING_CONTROL},
    # "I follow": what I have not seen yet, what is open and what is late, and the talk
    Role.OBSERVER: frozenset(
        {Counter.NEW, Counter.IN_PROGRESS, Counter.OVERDUE, Counter.NEW_COMMENTS}
    ),
    # "Set by me": what I assigned that is open, late or deferred, and what awaits my control
    Role.AUTHOR: frozenset(
        {
            Counter.IN_PROGRESS,
            Counter.AWAITING_CONTROL,
            Counter.OVERDUE,
            Counter.DEFERRED,
            Counter.NEW_COMMENTS,
        }
    ),
}
"""Which counters mean something in which role; the others stay at zero there."""

COUNTERS_RULES = 1
"""The version of the counting rules below. Counters are stored (``server.tasks.counters``)
with the stamp it makes (``counters_stamp``): bump it with any change to what
``counters_for`` gives for the same tasks, so that numbers stored under the old rules are
counted again instead of served. ``tests/test_task_counter_stamp.py`` fails until it is bumped
(it pins what the rules give, over every status, role, deadline and view, to the stamp)."""

COUNTED_WHEN_FINISHED: frozenset[Counter] = frozenset({Counter.NEW_COMMENTS})
"""What a finished task (``FINISHED_STATUSES``) still counts for, in any role: the comments
one has not seen. A recount of stored counters reads finished tasks only when they have some
(``server.tasks.counters``): a test holds ``counters_for`` to this."""


def counters_stamp() -> str:
    """Stored with the counters: the rules and the window they were counted with."""
    return f"{COUNTERS_RULES}|{int(EXPIRING_WINDOW.total_seconds())}"


@dataclass(frozen=True, slots=True)
class TaskForUser:
    """A task with what one user has seen of it.

    ``viewed_at`` is when the user last opened the task (None: never); a view older than the
    task's ``created_at`` does not count. ``comments_after_view`` is the number of comments
    by other people posted since then, counted by the caller.
    """

    task: TaskFacts
    created_at: datetime
    viewed_at: datetime | None = None
    comments_after_view: int = 0

    @property
    def unviewed(self) -> bool:
        return self.viewed_at is None or self.viewed_at < self.created_at


@dataclass(frozen=True, slots=True)
class RoleCounters:
    """The counters of one role: numbers of tasks, except ``new_comments``, a number of
    comments."""

    new: int = 0
    in_progress: int = 0
    awaiting_control: int = 0
    overdue: int = 0
    expiring_soon: int = 0
    without_deadline: int = 0
    deferred: int = 0
    new_comments: int = 0

    def get(self, counter: Counter) -> int:
        value: int = getattr(self, counter.value)
        return value


@dataclass(frozen=True, slots=True)
class Counters:
    """A user's task counters by role. ``total`` counts each task once, whatever the number of
    the user's roles it counts in."""

    responsible: RoleCounters = field(default_factory=RoleCounters)
    participant: RoleCounters = field(default_factory=RoleCounters)
    observer: RoleCounters = field(default_factory=RoleCounters)
    author: RoleCounters = field(default_factory=RoleCounters)
    total: RoleCounters = field(default_factory=RoleCounters)

    def of(self, role: Role) -> RoleCounters:
        """The counters of one of the four counted roles (KeyError for the derived ones)."""
        by_role = {
            Role.RESPONSIBLE: self.responsible,
            Role.PARTICIPANT: self.participant,
            Role.OBSERVER: self.observer,
            Role.AUTHOR: self.author,
        }
        return by_role[role]


def counted_roles(user_id: str, task: TaskFacts) -> list[Role]:
    """The roles a task counts in for ``user_id``.

    The roles that follow the work are exclusive, the closest one winning: a task I am
    responsible for counts as mine to do even if I also follow it. "Set by me" holds the tasks
    I assigned to someone else; a task I set myself is counted as mine to do only. Heads,
    workgroup members and admins count nothing: they are not on the task.
    """
    roles: list[Role] = []
    if user_id == task.responsible_id:
        roles.append(Role.RESPONSIBLE)
    elif user_id in task.participant_ids:
        roles.append(Role.PARTICIPANT)
    elif user_id in task.observer_ids:
        roles.append(Role.OBSERVER)
    if user_id == task.author_id and user_id != task.responsible_id:
        roles.append(Role.AUTHOR)
    return roles


def _counts(user_id: str, item: TaskForUser, now: datetime) -> dict[Counter, int]:
    """What one task adds to each counter, before the role decides which ones apply."""
    task = item.task
    is_open = task.status in OPEN_STATUSES
    # The author wrote the task: it is never new to them, whatever else they are on it.
    unseen = item.unviewed and user_id != task.author_id and task.status not in FINISHED_STATUSES
    flags = {
        Counter.NEW: unseen,
        Counter.IN_PROGRESS: is_open,
        Counter.AWAITING_CONTROL: task.status is Status.AWAITING_CONTROL,
        Counter.OVERDUE: is_overdue(task, now),
        Counter.EXPIRING_SOON: is_expiring_soon(task, now),
        Counter.WITHOUT_DEADLINE: is_open and task.deadline is None,
        Counter.DEFERRED: task.status is Status.DEFERRED,
    }
    counts = {counter: 1 for counter, on in flags.items() if on}
    if item.comments_after_view > 0:
        counts[Counter.NEW_COMMENTS] = item.comments_after_view
    return counts


def counters_for(user_id: str, tasks: Iterable[TaskForUser], now: datetime) -> Counters:
    """The task counters of ``user_id`` over ``tasks`` (those they are on; others add nothing).

    By role (``COUNTERS_BY_ROLE`` says which counter applies where):

    - ``new``: tasks not finished that I am responsible for, help with or follow and have
      never opened; never for the author.
    - ``in_progress``: open tasks (NEW, PENDING or IN_PROGRESS - Bitrix's "In progress"
      list, not only the IN_PROGRESS status), in every role.
    - ``awaiting_control``: only as author - the work handed in for my approval.
    - ``overdue``: open tasks past their deadline, in every role.
    - ``expiring_soon``: open tasks due within 24 hours, for the people doing them.
    - ``without_deadline``: open tasks without a deadline, for the people doing them.
    - ``deferred``: deferred tasks, for the people doing them and their author.
    - ``new_comments``: other people's comments since my last view, in every role.
    """
    per_role: dict[Role, dict[Counter, int]] = {role: {} for role in COUNTERS_BY_ROLE}
    total: dict[Counter, int] = {}
    for item in tasks:
        counts = _counts(user_id, item, now)
        in_total: set[Counter] = set()
        for role in counted_roles(user_id, item.task):
            for counter, value in counts.items():
                if counter in COUNTERS_BY_ROLE[role]:
                    per_role[role][counter] = per_role[role].get(counter, 0) + value
                    in_total.add(counter)
        for counter in in_total:
            total[counter] = total.get(counter, 0) + counts[counter]

    def freeze(values: dict[Counter, int]) -> RoleCounters:
        return RoleCounters(**{counter.value: n for counter, n in values.items()})

    return Counters(
        responsible=freeze(per_role[Role.RESPONSIBLE]),
        participant=freeze(per_role[Role.PARTICIPANT]),
        observer=freeze(per_role[Role.OBSERVER]),
        author=freeze(per_role[Role.AUTHOR]),
        total=freeze(total),
    )
