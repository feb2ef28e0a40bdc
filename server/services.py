"""The wired-up domain services of one running hub, shared by every transport."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from server.auth.service import AuthService
from server.channels.hub import Hub
from server.crm.service import Crm
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.events.redis_bus import RedisBus
from server.events.streams import StreamLog
from server.im.service import ImService
from server.mailbridge.service import MailBridge
from server.presence.service import PresenceService
from server.settings import Settings
from server.store.database import Store
from server.tasks.scheduler import Scheduler
from server.tasks.service import TaskService
from server.xmpp.server import XmppServer


@dataclass
class Services:
    settings: Settings
    store: Store
    bus: EventBus
    streams: StreamLog
    directory: DirectoryService
    auth: AuthService
    presence: PresenceService
    im: ImService
    hub: Hub
    tasks: TaskService
    scheduler: Scheduler
    crm: Crm
    mail: MailBridge
    xmpp: XmppServer | None = None
    redis_bus: RedisBus | None = None  # set when PORTALHUB_REDIS_URL is: several nodes


SERVICES = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
