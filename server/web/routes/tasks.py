"""Task routes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from server.services import services
from server.tasks.models import (
    CommentIn,
    CommentOut,
    HistoryEntry,
    TaskCreate,
    TaskList,
    TaskOut,
    TaskQuery,
    TaskUpdate,
)
from server.tasks.rules import Action
from server.web.api import Call
from server.web.problems import Problem
from server.web.routes import api

TAG = "tasks"


class HistoryList(BaseModel):
    history: list[HistoryEntry]


class CommentList(BaseModel):
    comments: list[CommentOut]


@api.route(
    "POST",
    "/api/v1/tasks",
    summary="Create a task",
    tag=TAG,
    body=TaskCreate,
    response=TaskList,
    status=201,
    errors=(403, 404, 422, 429),
)
async def create_task(call: Call) -> TaskList:
    """With several `responsible_ids`, a master task and one copy (subtask) per person;
    the master comes first in the answer."""
    assert call.user is not None
    return TaskList(
        tasks=await services(call.request).tasks.create(call.user, call.body_as(TaskCreate))
    )


@api.route(
    "GET",
    "/api/v1/tasks",
    summary="Tasks the caller may see",
    tag=TAG,
    query=TaskQuery,
    response=TaskList,
)
async def list_tasks(call: Call) -> TaskList:
    """Filter by the caller's role, by status (including `overdue` and `open`), workgroup,
    tag, or the tasks of one's subordinates (heads)."""
    assert call.user is not None
    return TaskList(
        tasks=await services(call.request).tasks.find(call.user, call.query_as(TaskQuery))
    )


@api.route(
    "GET",
    "/api/v1/tasks/{task_id}",
    summary="One task (marks it seen)",
    tag=TAG,
    response=TaskOut,
    errors=(404,),
)
async def get_task(call: Call) -> TaskOut:
    assert call.user is not None
    return await services(call.request).tasks.get(call.user, call.path("task_id"))


@api.route(
    "PATCH",
    "/api/v1/tasks/{task_id}",
    summary="Change fields",
    tag=TAG,
    body=TaskUpdate,
    response=TaskOut,
    errors=(403, 404, 422),
)
async def update_task(call: Call) -> TaskOut:
    """Each field needs its permission: the deadline the author (or the responsible person
    when allowed), everything else the author."""
    assert call.user is not None
    return await services(call.request).tasks.update(
        call.user, call.path("task_id"), call.body_as(TaskUpdate)
    )


@api.route(
    "POST",
    "/api/v1/tasks/{task_id}/actions/{action}",
    summary="Act on a task",
    tag=TAG,
    response=TaskOut,
    errors=(403, 404, 409, 422),
    extra_responses={"204": {"description": "Deleted"}},
)
async def task_action(call: Call) -> TaskOut | None:
    """Actions: accept, decline, start, pause, resume, complete, approve, return, reopen,
    defer, copy (answers the new subtask), delete (answers 204)."""
    assert call.user is not None
    name = call.path("action")
    try:
        action = Action(name)
    except ValueError:
        raise Problem(404, "not-found", "Not found", f"no action {name!r}") from None
    return await services(call.request).tasks.act(call.user, call.path("task_id"), action)


@api.route(
    "DELETE",
    "/api/v1/tasks/{task_id}",
    summary="Delete a task (author)",
    tag=TAG,
    status=204,
    errors=(403, 404, 409),
)
async def delete_task(call: Call) -> None:
    assert call.user is not None
    await services(call.request).tasks.act(call.user, call.path("task_id"), Action.DELETE)


@api.route(
    "GET",
    "/api/v1/tasks/{task_id}/comments",
    summary="Comments",
    tag=TAG,
    response=CommentList,
    errors=(404,),
)
async def task_comments(call: Call) -> CommentList:
    assert call.user is not None
    return CommentList(
        comments=await services(call.request).tasks.comments(call.user, call.path("task_id"))
    )


@api.route(
    "POST",
    "/api/v1/tasks/{task_id}/comments",
    summary="Comment",
    tag=TAG,
    body=CommentIn,
    response=CommentOut,
    status=201,
    errors=(404,),
)
async def comment_task(call: Call) -> CommentOut:
    assert call.user is not None
    return await services(call.request).tasks.add_comment(
        call.user, call.path("task_id"), call.body_as(CommentIn).text
    )


@api.route(
    "GET",
    "/api/v1/tasks/{task_id}/history",
    summary="History of changes",
    tag=TAG,
    response=HistoryList,
    errors=(404,),
)
async def task_history(call: Call) -> HistoryList:
    assert call.user is not None
    return HistoryList(
        history=await services(call.request).tasks.history(call.user, call.path("task_id"))
    )


class AllCounters(BaseModel):
    im: dict[str, Any]
    tasks: dict[str, Any]
    crm: dict[str, dict[str, Any]] = Field(
        description="By record type (deal, lead, contact, company): incoming, due, overdue, "
        "total, idle and colour (none, green, red, red-green)"
    )


@api.route(
    "GET",
    "/api/v1/counters",
    summary="All of the caller's counters",
    tag="counters",
    response=AllCounters,
)
async def all_counters(call: Call) -> AllCounters:
    svc = services(call.request)
    return AllCounters(
        im=(await svc.im.counters(call.user_id)).model_dump(),
        tasks=await svc.tasks.counters(call.user_id),
        crm=await svc.crm.counters.current(call.user_id),
    )
