"""Task shapes at the API boundary."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from server.directory.models import Patch
from server.text import NAME_TEXT, XML_TEXT

Title = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=250), NAME_TEXT
]
Description = Annotated[str, StringConstraints(max_length=20_000), XML_TEXT]
Tag = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50), NAME_TEXT
]
Priority = Literal["low", "medium", "high"]
Ids = list[str]


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.utcoffset() is None:
        raise ValueError("needs a time zone, e.g. 2026-11-23T18:00:00Z")
    # stored to the millisecond (BSON): answer with what a later read will show
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class TaskFields(Patch):
    """The editable fields; on update, left-out fields stay as they are."""

    nullable: ClassVar[frozenset[str]] = frozenset(
        {"group_id", "deadline", "planned_start", "planned_end", "rating"}
    )

    title: Title | None = None
    description: Description | None = None
    priority: Priority | None = None
    tags: list[Tag] | None = Field(default=None, max_length=20)
    participant_ids: Ids | None = Field(default=None, max_length=100)
    observer_ids: Ids | None = Field(default=None, max_length=100)
    group_id: str | None = None
    deadline: datetime | None = None
    planned_start: datetime | None = None
    planned_end: datetime | None = None
    require_approval: bool | None = None
    responsible_may_change_deadline: bool | None = None
    include_in_report: bool | None = None

    _deadline = field_validator("deadline", "planned_start", "planned_end")(_aware)


class TaskCreate(TaskFields):
    """Several responsible people make a master task and one copy (a subtask) each."""

    nullable: ClassVar[frozenset[str]] = TaskFields.nullable | {"parent_id", "author_id"}

    title: Title
    responsible_ids: Ids = Field(min_length=1, max_length=50)
    author_id: str | None = Field(
        default=None, description="Create on behalf of another user (administrators only)"
    )
    parent_id: str | None = None
    predecessor_ids: Ids = Field(default_factory=list, max_length=50)


class TaskUpdate(TaskFields):
    responsible_id: str | None = None
    rating: Literal["positive", "negative"] | None = Field(
        default=None, description="The author's rating of the result"
    )


class TaskOut(BaseModel):
    id: str
    title: str
    description: str
    status: int = Field(
        description="1 new, 2 pending, 3 in progress, 4 awaiting control, "
        "5 completed, 6 deferred, 7 declined"
    )
    status_name: str
    overdue: bool
    author_id: str
    responsible_id: str
    participant_ids: list[str]
    observer_ids: list[str]
    group_id: str | None
    parent_id: str | None
    master_id: str | None = Field(
        description="For a copy made for one of several responsible people: the master task"
    )
    predecessor_ids: list[str]
    tags: list[str]
    priority: Priority
    deadline: datetime | None
    planned_start: datetime | None
    planned_end: datetime | None
    require_approval: bool
    responsible_may_change_deadline: bool
    include_in_report: bool
    rating: Literal["positive", "negative"] | None
    time_spent_seconds: int
    timer_started_at: datetime | None
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None
    comment_count: int
    my_roles: list[str] = Field(description="The caller's roles on the task")
    allowed_actions: list[str] = Field(description="What the caller may do now")
    editable_fields: list[str] = Field(
        default_factory=list,
        description="The fields of PATCH the caller may change now (field by field: a "
        "responsible person may be allowed the deadline only)",
    )
    unseen_updates: int = Field(description="Changes by others since the caller last opened it")
    unseen_comments: int = Field(description="Comments by others since the caller last opened it")


class TaskList(BaseModel):
    tasks: list[TaskOut]


class TaskQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["responsible", "participant", "author", "observer", "all"] = "all"
    status: (
        Literal[
            "new",
            "pending",
            "in_progress",
            "awaiting_control",
            "completed",
            "deferred",
            "declined",
            "overdue",
            "open",
        ]
        | None
    ) = None
    group_id: str | None = None
    tag: str | None = None
    subordinates: bool = Field(
        default=False, description="Tasks whose responsible person I am a head above"
    )
    limit: int = Field(default=100, ge=1, le=500)
    offset: int = Field(default=0, ge=0)


class CommentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=10_000), XML_TEXT
    ]


class CommentOut(BaseModel):
    id: str
    task_id: str
    author_id: str
    text: str
    created_at: datetime


class HistoryEntry(BaseModel):
    id: str
    task_id: str
    user_id: str | None
    kind: str = Field(description="created, action, field, comment, overdue")
    action: str | None = None
    field: str | None = None
    before: Any = None
    after: Any = None
    at: datetime
