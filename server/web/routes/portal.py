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
    "GET", "/healthz", summary="The process is up", tag="health", auth="none", response=Health
)
async def healthz(call: Call) -> Health:
    return Health(status="ok")


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
    svc = services(call.request)
    database = "ok" if await svc.store.ping() else "unreachable"
    redis = None
    if svc.redis_bus is not None:
        redis = "ok" if svc.redis_bus.connected and await svc.redis_bus.ping() else "unreachable"
    if svc.hub.draining:  # shutting down: load balancers send new clients elsewhere
        status = "draining"
    elif database == "ok" and redis in (None, "ok"):
        return Health(status="ready", database=database, redis=redis)
    else:
        status = "unavailable"
    body = Health(status=status, database=database, redis=redis)
    return web.json_response(body.model_dump(), status=503)


@api.route("GET", "/api/v1/openapi.json", summary="This document", tag="meta", auth="none")
async def openapi(call: Call) -> web.Response:
    return web.json_response(api.openapi())
