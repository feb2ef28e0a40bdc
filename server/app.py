"""Wiring: one aiohttp application with the REST API, the Socket.IO hub and the web client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from server.auth.service import AuthService
from server.channels.hub import Hub
from server.directory.service import DirectoryService
from server.events.bus import InProcessBus
from server.events.streams import StreamLog
from server.presence.tracker import PresenceTracker
from server.services import SERVICES, Services
from server.settings import Settings
from server.store.database import Document, Store
from server.web.problems import problem_middleware
from server.web.routes import api, auth, departments, portal, users, workgroups

log = logging.getLogger(__name__)

_ROUTE_MODULES = (auth, users, departments, workgroups, portal)  # imported for their routes
MAINTENANCE_INTERVAL_SECONDS = 600.0
PLACEHOLDER_DIR = Path(__file__).resolve().parent.parent / "web-client"


def build_services(settings: Settings, store: Store) -> Services:
    bus = InProcessBus()
    streams = StreamLog(store, bus, retention_seconds=settings.event_retention_seconds)
    directory = DirectoryService(store, streams)
    auth_service = AuthService(store, directory, settings)

    async def viewers_of(user_id: str) -> list[str]:
        doc = await store.users.find_one({"_id": user_id})
        return await directory.visible_user_ids(doc) if doc else []

    presence = PresenceTracker(bus, viewers_of)
    hub = Hub(settings, auth_service, streams, bus, presence)

    async def presence_snapshot(user: Document) -> dict[str, Any]:
        visible = await directory.visible_user_ids(user)
        me = str(user["_id"])  # connecting right now, so online whatever the tracker says yet
        return {uid: "online" if uid == me else presence.status(uid) for uid in visible}

    async def counters_snapshot(user: Document) -> dict[str, Any]:
        # Counter providers (messenger, tasks, CRM) register here as those domains arrive.
        return {}

    hub.add_snapshot_part("counters", counters_snapshot)
    hub.add_snapshot_part("presence", presence_snapshot)
    return Services(settings, store, bus, streams, directory, auth_service, presence, hub)


def web_client_dir(settings: Settings) -> Path:
    if settings.web_client_dir is not None:
        return settings.web_client_dir
    built = PLACEHOLDER_DIR / "dist"
    return built if built.is_dir() else PLACEHOLDER_DIR / "public"


async def _maintenance(svc: Services) -> None:
    """Prunes expired history and tokens; a failed round is logged and retried next time."""
    while True:
        try:
            removed = await svc.streams.prune()
            tokens = await svc.auth.prune_expired_tokens()
            if removed or tokens:
                log.info("maintenance: pruned %s events, %s tokens", removed, tokens)
        except Exception:
            log.exception("maintenance round failed")
        await asyncio.sleep(MAINTENANCE_INTERVAL_SECONDS)


def create_app(settings: Settings, store: Store) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[problem_middleware])
    svc = build_services(settings, store)
    app[SERVICES] = svc

    async def authenticate(request: web.Request) -> Document | None:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            return None
        return await svc.auth.authenticate(header[7:].strip())

    api.install(app, authenticate)
    svc.hub.sio.attach(app)
    client_dir = web_client_dir(settings)
    if client_dir.is_dir():
        index = client_dir / "index.html"

        async def index_page(request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.router.add_get("/", index_page)
        app.router.add_static("/static/", client_dir, follow_symlinks=False)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_maintenance(svc), name="maintenance")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await svc.hub.close()
        await svc.streams.close()

    app.cleanup_ctx.append(lifecycle)
    return app
