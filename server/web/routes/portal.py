"""Portal-wide settings, health, readiness and the API's own description."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from server.services import services
from server.web.api import Call
from server.web.routes import api


class PortalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    self_registration: bool


class Health(BaseModel):
    status: str
    database: str | None = None
    redis: str | None = Field(default=None, description="With several nodes: ok or unreachable")
    database_process: str | None = Field(
        default=None,
        description="The embedded database's process, supervised by the hub: starting, "
        "running, restarting, waiting-for-disk-space or stopped",
    )
    database_restarts: int | None = Field(
        default=None, description="How often the hub has restarted its embedded database"
    )
    disk: str | None = Field(
        default=None,
        description="The embedded database's disk: ok, or low (new writes are refused)",
    )
    reason: str | None = Field(default=None, description="Why not ready (or not healthy)")


@api.route(
    "GET",
    "/api/v1/portal/settings",
    summary="Portal settings",
    tag="portal",
    response=PortalSettings,
)
async def get_portal_settings(call: Call) -> PortalSettings:
    enabled = await services(call.request).auth.self_registration_enabled()
    return PortalSettings(self_registration=enabled)


@api.route(
    "PUT",
    "/api/v1/portal/settings",
    summary="Change portal settings (admin)",
    tag="portal",
    auth="admin",
    body=PortalSettings,
    response=PortalSettings,
)
async def put_portal_settings(call: Call) -> PortalSettings:
    body = call.body_as(PortalSettings)
    await services(call.request).auth.set_self_registration(body.self_registration)
    return body


@api.route(
    "GET",
    "/healthz",
    summary="The process is up and can recover by itself",
    tag="health",
    auth="none",
    response=Health,
    extra_responses={
        "503": {
            "description": "The hub cannot recover by itself: restart it",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
        }
    },
)
async def healthz(call: Call) -> Health | web.Response:
    """Liveness. A database process that died or is being restarted does not fail it: the
    hub restarts it by itself (``database_process`` says where that stands), and restarting
    the hub would not help, e.g. on a full disk. It fails (503) only if the supervisor of the
    embedded database is gone, which the hub cannot recover from."""
    embedded = services(call.request).store.embedded
    if embedded is None:
        return Health(status="ok")
    body = Health(status="ok", database_process=embedded.state, database_restarts=embedded.restarts)
    if embedded.state != "stopped" and not embedded.supervised:
        body.status = "failing"
        body.reason = "the embedded database is no longer supervised (see the hub's log)"
        return web.json_response(body.model_dump(), status=503)
    return body


@api.route(
    "GET",
    "/readyz",
    summary="The hub can serve: its database (and Redis) answer, and it is not draining",
    tag="health",
    auth="none",
    response=Health,
    extra_responses={
        "503": {
            "description": "Not ready, or draining (shutting down)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
        }
    },
)
async def readyz(call: Call) -> Health | web.Response:
    """Not ready while the embedded database's process is not running (the hub is restarting
    it), while its disk is nearly full (writes are refused; ``reason`` says how full), while
    the database or Redis does not answer, and while draining."""
    svc = services(call.request)
    embedded = svc.store.embedded
    process = embedded.state if embedded is not None else None
    restarts = embedded.restarts if embedded is not None else None
    # No ping to a process being restarted: it would only wait for its timeout.
    up = process in (None, "running") and await svc.store.ping()
    database = "ok" if up else "unreachable"
    redis = None
    if svc.redis_bus is not None:
        redis = "ok" if svc.redis_bus.connected and await svc.redis_bus.ping() else "unreachable"
    space = svc.store.space
    disk = ("low" if space.low else "ok") if space.watched else None
    reason = None
    if svc.hub.draining:  # shutting down: load balancers send new clients elsewhere
        status = "draining"
    elif database == "ok" and redis in (None, "ok") and disk != "low":
        return Health(
            status="ready",
            database=database,
            redis=redis,
            database_process=process,
            database_restarts=restarts,
            disk=disk,
        )
    else:
        status = "unavailable"
        if disk == "low":
            reason = space.refusal()
        elif process not in (None, "running"):
            reason = f"the database process is {process} (the hub restarts it by itself)"
        elif database != "ok":
            reason = "the database does not answer"
        else:
            reason = "Redis does not answer"
    body = Health(
        status=status,
        database=database,
        redis=redis,
        database_process=process,
        database_restarts=restarts,
        disk=disk,
        reason=reason,
    )
    return web.json_response(body.model_dump(), status=503)


@api.route("GET", "/api/v1/openapi.json", summary="This document", tag="meta", auth="none")
async def openapi(call: Call) -> web.Response:
    return web.json_response(api.openapi())
