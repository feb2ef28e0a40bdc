"""What the measurements need on the hub, made through its REST API: users, dialogs, a chat."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from bench.procs import BenchError

ADMIN_LOGIN = "admin"
ADMIN_PASSWORD = "demo-pass"  # the demo company's (``serve --demo``)
BENCH_PASSWORD = "bench-password"

T = TypeVar("T")


@dataclass(frozen=True)
class User:
    login: str
    id: str
    token: str


@dataclass(frozen=True)
class Dialog:
    sender: User
    receiver: User
    chat_id: str


@dataclass(frozen=True)
class Fixtures:
    users: list[User]
    dialogs: list[Dialog]
    group_owner: User
    group_chat_id: str
    seconds: float


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self._base = base.rstrip("/") + "/api/v1"

    async def call(
        self, method: str, path: str, body: dict[str, Any], token: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self._session.request(
            method, self._base + path, json=body, headers=headers
        ) as response:
            data = await response.json(content_type=None)
            if response.status >= 300:
                raise BenchError(f"{method} {path}: {response.status} {data}")
            assert isinstance(data, dict)
            return data

    async def get(self, path: str, token: str) -> dict[str, Any]:
        """A GET (with its query in ``path``): no body."""
        async with self._session.get(
            self._base + path, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            data = await response.json(content_type=None)
            if response.status >= 300:
                raise BenchError(f"GET {path}: {response.status} {data}")
            assert isinstance(data, dict)
            return data

    async def login(self, login: str, password: str) -> User:
        data = await self.call("POST", "/auth/login", {"login": login, "password": password})
        return User(login, str(data["user"]["id"]), str(data["token"]))


async def _bounded(limit: int, jobs: list[Callable[[], Awaitable[T]]]) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(run(job) for job in jobs)))


async def make_fixtures(base_url: str, users: int, dialogs: int, parallel: int = 4) -> Fixtures:
    """``users`` users (``bench000``...), ``dialogs`` disjoint 1:1 dialogs among the first
    ones, and one group chat of all of them owned by the first."""
    if users < max(2, 2 * dialogs):
        raise BenchError(f"{users} users are too few for {dialogs} dialogs")
    loop = asyncio.get_running_loop()
    started = loop.time()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = Api(session, base_url)
        admin = await api.login(ADMIN_LOGIN, ADMIN_PASSWORD)
        logins = [f"bench{i:03d}" for i in range(users)]

        def create(login: str) -> Callable[[], Awaitable[dict[str, Any]]]:
            body = {"login": login, "email": f"{login}@bench.test", "password": BENCH_PASSWORD}
            return lambda: api.call("POST", "/users", body, admin.token)

        def log_in(login: str) -> Callable[[], Awaitable[User]]:
            return lambda: api.login(login, BENCH_PASSWORD)

        # Each costs an argon2 hash (create) or check (login) in the hub's thread pool.
        await _bounded(parallel, [create(login) for login in logins])
        people = await _bounded(parallel, [log_in(login) for login in logins])
        pairs: list[Dialog] = []
        for k in range(dialogs):
            sender, receiver = people[2 * k], people[2 * k + 1]
            chat = await api.call("POST", "/im/dialogs", {"user_id": receiver.id}, sender.token)
            pairs.append(Dialog(sender, receiver, str(chat["id"])))
        owner = people[0]
        group = await api.call(
            "POST",
            "/im/chats",
            {"title": "bench fan-out", "member_ids": [p.id for p in people[1:]]},
            owner.token,
        )
    return Fixtures(people, pairs, owner, str(group["id"]), loop.time() - started)
