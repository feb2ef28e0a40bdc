"""Users: directory search, own profile, admin CRUD."""

from __future__ import annotations

from server.directory.models import ProfileUpdate, UserCreate, UserOut, UserQuery, UserUpdate
from server.services import services
from server.web.api import Call
from server.web.problems import Problem
from server.web.routes import api


@api.route(
    "GET",
    "/api/v1/users",
    summary="Search the directory",
    tag="users",
    query=UserQuery,
    response=UserOut,
    many=True,
)
async def list_users(call: Call) -> list[UserOut]:
    """Filters combine: name part, department, email part, phone digits, online status."""
    assert call.user is not None
    svc = services(call.request)
    query = call.query_as(UserQuery)
    online = None
    if query.online is not None:
        online = set(svc.presence.published())  # as colleagues see it, flaps hidden
    return await svc.directory.list_users(call.user, query, online)


@api.route("GET", "/api/v1/users/me", summary="The current user", tag="users", response=UserOut)
async def get_me(call: Call) -> UserOut:
    assert call.user is not None
    return UserOut.from_document(call.user)


@api.route(
    "PATCH",
    "/api/v1/users/me",
    summary="Change one's own profile",
    tag="users",
    body=ProfileUpdate,
    response=UserOut,
)
async def update_me(call: Call) -> UserOut:
    """Publishes `user.updated` on the user's own stream, so every device sees the change."""
    return await services(call.request).directory.update_user(
        call.user_id, call.body_as(ProfileUpdate), call.user_id
    )


@api.route(
    "GET",
    "/api/v1/users/{user_id}",
    summary="One user",
    tag="users",
    response=UserOut,
    errors=(404,),
)
async def get_user(call: Call) -> UserOut:
    assert call.user is not None
    return await services(call.request).directory.get_user(call.user, call.path("user_id"))


@api.route(
    "POST",
    "/api/v1/users",
    summary="Create a user (admin)",
    tag="users",
    auth="admin",
    body=UserCreate,
    response=UserOut,
    status=201,
    errors=(409,),
)
async def create_user(call: Call) -> UserOut:
    return await services(call.request).directory.create_user(call.body_as(UserCreate))


@api.route(
    "PATCH",
    "/api/v1/users/{user_id}",
    summary="Change a user (admin)",
    tag="users",
    auth="admin",
    body=UserUpdate,
    response=UserOut,
    errors=(404, 409),
)
async def update_user(call: Call) -> UserOut:
    """Deactivating a user (`is_active: false`) revokes their tokens; a new password too."""
    user_id = call.path("user_id")
    body = call.body_as(UserUpdate)
    if user_id == call.user_id and (body.is_admin is False or body.is_active is False):
        raise Problem(
            409, "conflict", "Conflict", "administrators cannot demote or deactivate themselves"
        )
    return await services(call.request).directory.update_user(user_id, body, call.user_id)


@api.route(
    "DELETE",
    "/api/v1/users/{user_id}",
    summary="Deactivate a user (admin)",
    tag="users",
    auth="admin",
    status=204,
    errors=(404, 409),
)
async def deactivate_user(call: Call) -> None:
    """Users are deactivated, not erased: their messages, tasks and CRM history stay."""
    user_id = call.path("user_id")
    if user_id == call.user_id:
        raise Problem(409, "conflict", "Conflict", "administrators cannot deactivate themselves")
    await services(call.request).directory.update_user(
        user_id, UserUpdate(is_active=False), call.user_id
    )
