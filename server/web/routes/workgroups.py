"""Workgroups (projects): members and moderators."""

from __future__ import annotations

from server.directory.models import WorkgroupIn, WorkgroupMembers, WorkgroupOut
from server.services import services
from server.web.api import Call
from server.web.problems import forbidden
from server.web.routes import api


@api.route(
    "GET",
    "/api/v1/workgroups",
    summary="Workgroups the caller may see",
    tag="workgroups",
    response=WorkgroupOut,
    many=True,
)
async def list_workgroups(call: Call) -> list[WorkgroupOut]:
    assert call.user is not None
    return await services(call.request).directory.list_workgroups(call.user)


@api.route(
    "POST",
    "/api/v1/workgroups",
    summary="Create a workgroup",
    tag="workgroups",
    body=WorkgroupIn,
    response=WorkgroupOut,
    status=201,
    errors=(403,),
)
async def create_workgroup(call: Call) -> WorkgroupOut:
    """The creator becomes its owner and first moderator. Extranet users cannot create one."""
    assert call.user is not None
    if call.user.get("is_external"):
        raise forbidden("extranet users cannot create workgroups")
    return await services(call.request).directory.create_workgroup(
        call.user_id, call.body_as(WorkgroupIn)
    )


@api.route(
    "GET",
    "/api/v1/workgroups/{group_id}",
    summary="One workgroup",
    tag="workgroups",
    response=WorkgroupOut,
    errors=(404,),
)
async def get_workgroup(call: Call) -> WorkgroupOut:
    assert call.user is not None
    return await services(call.request).directory.get_workgroup(call.user, call.path("group_id"))


@api.route(
    "POST",
    "/api/v1/workgroups/{group_id}/members",
    summary="Add members",
    tag="workgroups",
    body=WorkgroupMembers,
    response=WorkgroupOut,
    errors=(403, 404),
)
async def add_workgroup_members(call: Call) -> WorkgroupOut:
    assert call.user is not None
    body = call.body_as(WorkgroupMembers)
    return await services(call.request).directory.add_workgroup_members(
        call.user, call.path("group_id"), body.user_ids, body.moderator
    )


@api.route(
    "DELETE",
    "/api/v1/workgroups/{group_id}/members/{user_id}",
    summary="Remove a member",
    tag="workgroups",
    response=WorkgroupOut,
    errors=(403, 404, 409),
)
async def remove_workgroup_member(call: Call) -> WorkgroupOut:
    assert call.user is not None
    return await services(call.request).directory.remove_workgroup_member(
        call.user, call.path("group_id"), call.path("user_id")
    )
