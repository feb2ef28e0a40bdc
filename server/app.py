"""Wiring: one aiohttp application with the REST API, the Socket.IO hub and the web client."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from server.auth.service import AuthService
from server.background import raise_if_stopping, stop
from server.channels.emit import HubRedisManager
from server.channels.hub import Hub, typing_handler
from server.counters.crm import CHECK_JOB
from server.crm.service import Crm
from server.directory.pep import PepService
from server.directory.private_storage import PrivateStorage
from server.directory.service import DirectoryService
from server.events.bus import EventBus, InProcessBus
from server.events.redis_bus import RedisBus
from server.events.streams import user_stream
from server.im.blocking import BlockingService
from server.im.migration import number_messages
from server.im.service import ImService
from server.mailbridge.service import MailBridge
from server.observability.http import request_middleware
from server.observability.runtime import OBSERVABILITY, Observability
from server.observability.tracing import ObservedBus, TracedStreamLog
from server.presence.redis_store import RedisPresenceStore
from server.presence.service import PresenceService
from server.presence.store import InMemoryPresenceStore, PresenceStore
from server.services import SERVICES, Services
from server.settings import Settings
from server.store.database import Document, Store, utcnow
from server.tasks.scheduler import Scheduler
from server.tasks.service import TaskService
from server.web import headers as security_headers
from server.web.limits import body_deadline
from server.web.problems import problem_middleware
from server.web.routes.all import api
from server.xmpp.features import install_all
from server.xmpp.server import XmppServer
from server.xmpp.session import C2SSession

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_SECONDS = 600.0
MAIL_DRAIN_SECONDS = 10.0  # for an SMTP transaction under way to finish
PLACEHOLDER_DIR = Path(__file__).resolve().parent.parent / "web-client"
# The first segment of the web client's screens (web-client/src/router.ts): served the page.
CLIENT_PAGES = ("messenger", "employees", "tasks", "crm", "settings")


def node_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def build_services(settings: Settings, store: Store, node: str | None = None) -> Services:
    bus: EventBus
    redis_bus = client_manager = None
    if settings.redis_url is not None:
        url = settings.redis_url.get_secret_value()
        bus = redis_bus = RedisBus(url, node or node_id())
        client_manager = HubRedisManager(url)
    else:
        bus = InProcessBus()
    # Counted and traced (request and event ids in the logs): server/observability/tracing.py
    bus = observed = ObservedBus(bus)
    streams = TracedStreamLog(
        store,
        observed,
        retention_seconds=settings.event_retention_seconds,
        hint_ttl_seconds=settings.cache_ttl_seconds,
    )
    if redis_bus is not None:
        redis_bus.attach(streams)
    directory = DirectoryService(
        store,
        streams,
        bus,
        cache_ttl_seconds=settings.cache_ttl_seconds,
        cache_stale_seconds=settings.cache_stale_seconds,
        cache_entries=settings.cache_max_entries,
    )
    auth_service = AuthService(store, directory, bus, settings)

    async def viewers_of(user_id: str) -> list[str]:
        doc = await directory.cached_user(user_id)
        return await directory.visible_user_ids(doc) if doc else []

    presence_store: PresenceStore
    if settings.redis_url is not None:
        presence_store = RedisPresenceStore(
            settings.redis_url.get_secret_value(),
            ttl_seconds=settings.presence_heartbeat_timeout_seconds,
        )
    else:
        presence_store = InMemoryPresenceStore()
    presence = PresenceService(
        store,
        presence_store,
        bus,
        viewers_of,
        grace_seconds=settings.presence_grace_seconds,
        heartbeat_timeout_seconds=settings.presence_heartbeat_timeout_seconds,
    )
    im = ImService(store, streams, directory, bus, settings)
    directory.workgroup_hooks.append(im)
    tasks = TaskService(store, streams, directory, im, bus, settings)
    directory.workgroup_hooks.append(tasks)
    scheduler = Scheduler(store)
    # The pollers' queries go in the gaps between the batches of events (background.Gap).
    scheduler.gap = auth_service.sessions.gap = streams.after_batch
    scheduler.handle("task-deadline", tasks.deadline_reached)
    tasks.on_schedule_changed.append(scheduler.wake)
    crm = Crm.build(settings, store, streams, bus, directory, im)
    scheduler.handle("crm-counters", crm.counters.time_reached)
    scheduler.handle(CHECK_JOB, crm.counters.check_some)
    mail = MailBridge(settings, store, crm, im, node, bus)
    mail.pipeline.gap = streams.after_batch
    crm.counters.on_schedule_changed.append(scheduler.wake)
    hub = Hub(
        settings,
        auth_service,
        streams,
        bus,
        presence,
        member_streams=im.member_streams,
        client_manager=client_manager,
    )
    hub.on_client_event("im.typing", typing_handler(im.typing))

    async def presence_snapshot(user: Document) -> dict[str, Any]:
        me = str(user["_id"])
        published = presence.published()  # the same view live events give: flaps hidden
        seen: dict[str, Any] = {}
        for uid in await directory.visible_user_ids(user):
            seen[uid] = published.get(uid, "offline")
        # Connecting right now: online, unless set otherwise by hand.
        seen[me] = (await presence.manual(me)).current(utcnow()) or "online"
        return seen

    async def counters_snapshot(user: Document) -> dict[str, Any]:
        user_id = str(user["_id"])
        return {
            "im": await im.counters_state(user_id),
            "tasks": await tasks.counters_state(user_id),
            "crm": await crm.counters.baseline(user_id),
        }

    async def counters_caught_up(user: Document, before: Any) -> dict[str, Any]:
        """Sent again once the connection caught up on its streams: the numbers that stream
        events move. The CRM's are left out (one read per connect less): they are versioned
        pushes, and one that came while the snapshot was read is taken into it
        (``HeldStates.reset``). The tasks' are versioned too: read again (kept here, no
        query), they go whole unless a newer push went first. The unread ones only when what
        they are computed from changed since the snapshot's (``before``) were counted."""
        user_id = str(user["_id"])
        caught_up: dict[str, Any] = {"tasks": await tasks.counters_state(user_id)}
        counted = before.get("im") if isinstance(before, dict) else None
        if (unread := await im.counters_state_since(user_id, counted)) is not None:
            caught_up["im"] = unread
        return caught_up

    async def settings_snapshot(user: Document) -> dict[str, Any]:
        return {"im": (await im.get_settings(str(user["_id"]))).model_dump()}

    xmpp = None
    if settings.xmpp_enabled:
        xmpp = XmppServer(settings, store, auth_service, directory, presence, im, bus)
        xmpp.blocking = BlockingService(store, bus)
        xmpp.private_storage = PrivateStorage(store)
        xmpp.pep = PepService(store, bus)
        install_all(xmpp)

    if xmpp is not None and redis_bus is not None:
        follower = redis_bus

        async def follow_streams(session: C2SSession) -> None:
            """Several nodes: this node now serves the user's streams over XMPP, so it must
            follow them (and recover them after a Redis outage) from their current heads."""
            if session.user is None:
                return
            user_streams = [user_stream(str(session.user["_id"]))]
            user_streams += await im.member_streams(session.user)
            for stream in user_streams:
                await follower.caught_up(stream, await streams.last_seq(stream))

        xmpp.on_bound(follow_streams)

    if redis_bus is not None:
        # Back after a Redis outage: the invalidations lost meanwhile are made good by reading
        # everything again.
        redis_bus.on_resubscribed += [
            directory.forget_all,
            auth_service.forget_all,
            im.forget_all,
            tasks.forget_all,
            crm.counters.forget_all,
            streams.forget_hints,
        ]

    hub.add_snapshot_part("counters", counters_snapshot, caught_up=counters_caught_up)
    hub.add_snapshot_part("presence", presence_snapshot)
    hub.add_snapshot_part("settings", settings_snapshot)

    async def mail_snapshot(user: Document) -> dict[str, Any]:
        return await mail.unmatched_snapshot(str(user["_id"]))

    hub.add_snapshot_part("mail", mail_snapshot)
    return Services(
        settings,
        store,
        bus,
        streams,
        directory,
        auth_service,
        presence,
        im,
        hub,
        tasks,
        scheduler,
        crm,
        mail,
        xmpp,
        redis_bus,
    )


def web_client_dir(settings: Settings) -> Path:
    if settings.web_client_dir is not None:
        return settings.web_client_dir
    built = PLACEHOLDER_DIR / "dist"
    return built if built.is_dir() else PLACEHOLDER_DIR / "public"


async def _maintenance(svc: Services) -> None:
    """Prunes expired history, tokens, upload slots and uploads never sent; a failed round is
    logged and retried next time."""
    while True:
        try:
            removed = await svc.streams.prune()
            tokens = await svc.auth.prune_expired_tokens()
            files = await svc.im.files.prune()
            if removed or tokens or files:
                log.info(
                    "maintenance: pruned %s events, %s tokens, %s unsent files",
                    removed,
                    tokens,
                    files,
                )
        except Exception:
            raise_if_stopping()
            log.exception("maintenance round failed")
        await asyncio.sleep(MAINTENANCE_INTERVAL_SECONDS)


async def drain(app: web.Application, mail_seconds: float = MAIL_DRAIN_SECONDS) -> None:
    """The node is going away: clients are told to reconnect elsewhere and no new ones are
    taken (closing the HTTP listener is the caller's). Socket.IO clients get `server.draining`
    and are disconnected; Jabber sessions end with `system-shutdown`; the mail listener stops
    accepting and lets a session in the middle of a transaction finish it. In-flight HTTP
    requests and the background work end afterwards, in the runner's cleanup."""
    svc = app[SERVICES]
    jobs = [svc.hub.drain()]
    if svc.xmpp is not None:
        jobs.append(svc.xmpp.drain())
    if svc.mail.ingress is not None:
        jobs.append(svc.mail.ingress.drain(mail_seconds))
    for failed in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(failed, BaseException):
            log.error("drain step failed", exc_info=failed)


def create_app(settings: Settings, store: Store) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            request_middleware,
            body_deadline(settings.http_body_timeout_seconds),
            problem_middleware,
        ],
    )
    security_headers.install(app)
    node = node_id()
    svc = build_services(settings, store, node)
    app[SERVICES] = svc
    observability = app[OBSERVABILITY] = Observability(svc, node)

    async def authenticate(request: web.Request) -> Document | None:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            return None
        return await svc.auth.authenticate(header[7:].strip())

    api.install(app, authenticate, store.space.refusal)
    svc.hub.sio.attach(app)
    client_dir = web_client_dir(settings)
    if client_dir.is_dir():
        index = client_dir / "index.html"

        async def index_page(request: web.Request) -> web.FileResponse:
            # The policy is the page's also on a 304: a browser revalidating the page on a
            # reload takes the 304's headers, and the hook cannot tell it is the page there.
            return web.FileResponse(
                index, headers={"Content-Security-Policy": security_headers.PAGE_POLICY}
            )

        app.router.add_get("/", index_page)
        # The client's own addresses (history API routing): a reload or a shared link of
        # /tasks/<id> gets the page, which then shows that screen. Only these prefixes, so
        # that /api/, /socket.io/, /static/, /metrics, /healthz and /readyz keep their own
        # answers, and an unknown API path stays a 404 problem rather than a page.
        for name in CLIENT_PAGES:
            app.router.add_get(f"/{name}", index_page)
            app.router.add_get(f"/{name}/{{tail:.*}}", index_page)
        app.router.add_static("/static/", client_dir, follow_symlinks=False)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Before anything is served: messages stored by an older version get their numbers.
        await number_messages(store, node)
        if svc.redis_bus is not None:
            await svc.redis_bus.start()
        task = asyncio.create_task(_maintenance(svc), name="maintenance")
        svc.auth.sessions.start()  # revocations written elsewhere (another node, the CLI)
        svc.presence.start()
        await svc.presence.ready()  # the published statuses of every node, for snapshots
        await svc.crm.counters.start_checking(
            timedelta(minutes=svc.settings.crm_counters_check_minutes)
        )
        svc.scheduler.start()
        await svc.im.files.start()  # the link secret, before Jabber clients get links
        if svc.xmpp is not None:
            await svc.xmpp.start()
        await svc.mail.start()
        await observability.start()
        yield
        await observability.stop()
        await svc.mail.stop()
        if svc.xmpp is not None:
            await svc.xmpp.stop()
        await stop(task)
        await svc.auth.sessions.close()
        await svc.presence.close()
        await svc.scheduler.close()
        await svc.crm.counters.close()
        await svc.crm.records.core.close()
        await svc.hub.close()
        await svc.im.close()
        await svc.tasks.close()
        await svc.auth.close()
        await svc.directory.close()
        await svc.streams.close()
        if svc.redis_bus is not None:
            await svc.redis_bus.close()

    app.cleanup_ctx.append(lifecycle)
    return app
