"""A hub served on a loopback port, with real HTTP and Socket.IO clients to talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import socketio
from aiohttp import web
from bson import ObjectId
from pymongo import monitoring

from server.app import create_app
from server.directory.models import UserCreate
from server.services import SERVICES, Services
from server.settings import Settings
from server.store.database import Document, Store
from server.web.limits import LimitedSite, http_runner

DEFAULT_PASSWORD = "correct horse battery"


class Refused(Exception):
    """The server refused the Socket.IO connection; ``reasons`` are its connect_error data."""

    def __init__(self, reasons: list[Any]) -> None:
        super().__init__(f"connection refused: {reasons}")
        self.reasons = reasons


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]
    content_type: str


@dataclass
class SocketClient:
    """A real Socket.IO client that records every event it receives, in arrival order."""

    sio: socketio.AsyncClient
    events: list[tuple[str, Any]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _beating: asyncio.Task[None] | None = None

    def record(self, event: str, data: Any) -> None:
        self.events.append((event, data))
        self._arrived.set()

    def of_type(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    def stream_events(self, stream: str) -> list[dict[str, Any]]:
        return [
            data
            for _name, data in self.events
            if isinstance(data, dict) and data.get("stream") == stream and "type" in data
        ]

    def crm_counters(self) -> dict[str, dict[str, Any]]:
        """The CRM counters as a client sees them: the snapshot's, then every push merged
        number by number (a push carries only the numbers that changed), as the web client
        does."""
        state: dict[str, dict[str, Any]] = {}
        for name, data in self.events:
            if name == "snapshot":  # whole, as the client starts from it
                state = {t: dict(n) for t, n in data.get("counters", {}).get("crm", {}).items()}
            elif name == "counters.changed":
                for record_type, numbers in (data.get("crm") or {}).items():
                    state.setdefault(record_type, {}).update(numbers)
        return state

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met; events so far: {self.events[-10:]}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))

    async def wait_for(self, event: str, count: int = 1, timeout: float = 10.0) -> list[Any]:
        await self.wait_until(lambda: len(self.of_type(event)) >= count, timeout)
        return self.of_type(event)

    async def call(self, event: str, data: Any, timeout: float = 10.0) -> Any:
        return await self.sio.call(event, data, timeout=timeout)

    def keep_alive(self, interval: float = 0.3) -> None:
        """Send presence heartbeats in the background, as the web client does every minute."""

        async def beat() -> None:
            while self.sio.connected:
                with contextlib.suppress(Exception):
                    await self.sio.emit("presence.heartbeat", {"active": True})
                await asyncio.sleep(interval)

        self._beating = asyncio.create_task(beat())

    async def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        if self.sio.connected:
            await self.sio.disconnect()


@dataclass
class HubHarness:
    base_url: str
    app: web.Application
    http: aiohttp.ClientSession
    clients: list[SocketClient] = field(default_factory=list)
    closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.base_url + path, json=json, data=data, headers=all_headers
        ) as resp:
            raw = await resp.read()
            body: Any = None
            if raw and "json" in resp.content_type:
                body = await resp.json(content_type=None)
            elif raw:
                body = raw.decode(errors="replace")
            return Response(resp.status, body, dict(resp.headers), resp.content_type)

    async def login(self, login: str, password: str = DEFAULT_PASSWORD) -> str:
        resp = await self.request(
            "POST", "/api/v1/auth/login", json={"login": login, "password": password}
        )
        assert resp.status == 200, resp.body
        token: str = resp.body["token"]
        return token

    async def create_user(
        self,
        login: str,
        *,
        admin: bool = False,
        external: bool = False,
        department_id: str | None = None,
        **fields: Any,
    ) -> tuple[str, str]:
        """Create a user straight through the domain service; returns (id, token)."""
        user = await self.services.directory.create_user(
            UserCreate(
                login=login,
                email=f"{login}@example.test",
                password=DEFAULT_PASSWORD,
                is_admin=admin,
                is_external=external,
                department_id=department_id,
                **fields,
            )
        )
        token = await self.services.auth.issue_token(user.id)
        return user.id, token

    async def connect(
        self, token: str | None, since: dict[str, int] | None = None, *, auth: Any = None
    ) -> SocketClient:
        """Connect over a real websocket. Raises socketio.exceptions.ConnectionError if refused."""
        sio = socketio.AsyncClient(reconnection=False)
        client = SocketClient(sio)

        async def catch_all(event: str, data: Any = None) -> None:
            client.record(event, data)

        async def connect_error(data: Any = None) -> None:
            client.record("connect_error", data)

        sio.on("*", catch_all)
        sio.on("connect_error", connect_error)
        if auth is None:
            auth = {"token": token}
            if since is not None:
                auth["since"] = since
        try:
            await sio.connect(self.base_url, auth=auth, transports=["websocket"], wait_timeout=10)
        except socketio.exceptions.ConnectionError as exc:
            raise Refused(client.of_type("connect_error")) from exc
        self.clients.append(client)
        return client


class FindsOn(monitoring.CommandListener):
    """The finds sent on one collection: filter, sort and limit (0: none), as sent."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self.seen: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command["find"] == self.collection:
            self.seen.append(
                {
                    "filter": event.command.get("filter", {}),
                    "sort": event.command.get("sort"),
                    "limit": event.command.get("limit", 0),
                }
            )

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    async def examined(self, store: Store, find: dict[str, Any]) -> int:
        """What the database examines for ``find`` run again, by its plan."""
        sort = [(k, v) for k, v in (find["sort"] or {}).items()] or None
        cursor = store[self.collection].find(find["filter"], sort=sort, limit=find["limit"])
        explained = await cursor.explain()
        return int(explained["executionStats"]["totalDocsExamined"])


@asynccontextmanager
async def watched_store(
    store: Store, listener: Any, *, journal: bool = False
) -> AsyncIterator[Store]:
    """The same database through a client of its own whose commands ``listener`` (a PyMongo
    ``CommandListener``) sees; with ``journal`` every write asks for the journal, as the
    embedded database's URL does."""
    watched = Store(store.url, store.db.name)
    options: dict[str, Any] = {"journal": True} if journal else {}
    watched.client = type(store.client)(
        store.url, event_listeners=[listener], tz_aware=True, **options
    )
    watched.db = watched.client[store.db.name]
    try:
        yield watched
    finally:
        await watched.client.close()


@asynccontextmanager
async def start_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    app = create_app(settings, store)
    # The limits of `portalhub serve` (server/web/limits.py): header and body deadlines and
    # the cap on connections per address.
    runner = http_runner(app, settings)
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", 0, settings.http_max_connections_per_address)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as http:
        harness = HubHarness(f"http://{host}:{port}", app, http)
        try:
            yield harness
        finally:
            for client in harness.clients:
                await client.close()
            for close in harness.closers:
                with contextlib.suppress(Exception):
                    result = close()
                    if asyncio.isfuture(result) or asyncio.iscoroutine(result):
                        await asyncio.wait_for(result, 5)
            await runner.cleanup()


async def stored_at(store: Store, query: Document, moment: datetime) -> None:
    """Make the events ``query`` matches look stored at ``moment``: their ``ts`` and the time
    in their ``_id`` (what pruning and the bus's recovery go by), the rest of each id kept."""
    docs = [doc async for doc in store.events.find(query)]
    await store.events.delete_many({"_id": {"$in": [doc["_id"] for doc in docs]}})
    stamp = ObjectId.from_datetime(moment).binary[:4]
    await store.events.insert_many(
        [{**doc, "_id": ObjectId(stamp + doc["_id"].binary[4:]), "ts": moment} for doc in docs]
    )
