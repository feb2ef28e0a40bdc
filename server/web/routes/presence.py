"""Presence routes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from server.presence.rules import ManualStatus
from server.services import services
from server.web.api import Call
from server.web.problems import Problem
from server.web.routes import api

TAG = "presence"
MAX_IDS = 500


class PresenceQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: Annotated[str, StringConstraints(min_length=1, max_length=MAX_IDS * 40)] = Field(
        description="Comma-separated user ids (at most 500)"
    )

    @field_validator("ids")
    @classmethod
    def _count(cls, value: str) -> str:
        if len([i for i in value.split(",") if i]) > MAX_IDS:
            raise ValueError(f"at most {MAX_IDS} ids")
        return value


class PresenceOut(BaseModel):
    user_id: str
    status: Literal["online", "away", "dnd", "offline"]
    last_seen: datetime | None = None
    until: datetime | None = Field(default=None, description="End of do-not-disturb, if set")
    manual: ManualStatus | None = Field(default=None, description="Own view only")
    invisible: bool | None = Field(default=None, description="Own view only")


class PresenceList(BaseModel):
    presence: list[PresenceOut]


class SetPresence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: ManualStatus | None = Field(
        description="away or dnd set by hand; null returns to automatic"
    )
    until: datetime | None = Field(default=None, description="For dnd: when it ends")
    invisible: bool = False


@api.route(
    "GET",
    "/api/v1/presence",
    summary="Presence of several users",
    tag=TAG,
    query=PresenceQuery,
    response=PresenceList,
)
async def get_presence(call: Call) -> PresenceList:
    """Users the caller may not see are left out."""
    assert call.user is not None
    svc = services(call.request)
    wanted = list(dict.fromkeys(i for i in call.query_as(PresenceQuery).ids.split(",") if i))
    visible = set(await svc.directory.visible_user_ids(call.user))
    views = [
        PresenceOut.model_validate(await svc.presence.view(call.user_id, uid))
        for uid in wanted
        if uid in visible or uid == call.user_id
    ]
    return PresenceList(presence=views)


@api.route(
    "PUT",
    "/api/v1/presence/me",
    summary="Set or clear one's manual status",
    tag=TAG,
    body=SetPresence,
    response=PresenceOut,
    errors=(422,),
)
async def set_presence(call: Call) -> PresenceOut:
    """A manual status wins over the automatic one until cleared (or until `until`), also
    across reconnects."""
    body = call.body_as(SetPresence)
    if body.until is not None and body.until.tzinfo is None:
        raise Problem(
            422,
            "validation-error",
            "Invalid request",
            "until needs a time zone, e.g. 2026-11-23T18:00:00Z",
            errors=[],
        )
    view = await services(call.request).presence.set_manual(
        call.user_id, body.status, body.until, body.invisible
    )
    return PresenceOut.model_validate(view)
