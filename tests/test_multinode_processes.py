"""Several `portalhub serve` processes on one database and one real redis-server, as behind a
load balancer. A node killed with SIGKILL under traffic: its clients move to the others and
resume with `since`, and the accounting shows every message delivered exactly once to every
recipient, in order. A task deadline fires once, not once per node."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from pymongo import MongoClient

from tests.ports import listener_port
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

PASSWORD = "cluster-pass-1"


class Node:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = listener_port()
        self.env = {
            **env,
            "PORTALHUB_HTTP_PORT": str(self.port),
            "PORTALHUB_XMPP_PORT": str(listener_port()),
            "PORTALHUB_XMPP_TLS_PORT": str(listener_port()),
            "PORTALHUB_SMTP_PORT": str(listener_port()),
            "PORTALHUB_DATA_DIR": str(log_dir / name),
        }
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Cluster:
    nodes: list[Node]
    http: aiohttp.ClientSession
    database: Any
    admin_token: str = ""

    async def ready(self, node: Node, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert node.process is not None
            if node.process.poll() is not None:
                raise AssertionError(f"{node.name} exited:\n{node.log_path.read_text()[-3000:]}")
            try:
                async with self.http.get(node.url + "/readyz") as resp:
                    body = await resp.json()
                    if resp.status == 200 and body.get("redis") == "ok":
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"{node.name} not ready:\n{node.log_path.read_text()[-3000:]}")

    async def call(self, node: Node, method: str, path: str, token: str, **kw: Any) -> Any:
        async with self.http.request(
            method, node.url + path, headers={"Authorization": f"Bearer {token}"}, **kw
        ) as resp:
            body = await resp.json(content_type=None)
            assert resp.status < 300, (resp.status, body)
            return body

    async def login(self, node: Node, login: str) -> str:
        async with self.http.post(
            node.url + "/api/v1/auth/login", json={"login": login, "password": PASSWORD}
        ) as resp:
            assert resp.status == 200, await resp.text()
            token: str = (await resp.json())["token"]
            return token

    async def add_user(self, login: str) -> tuple[str, str]:
        user = await self.call(
            self.nodes[0],
            "POST",
            "/api/v1/users",
            self.admin_token,
            json={"login": login, "email": f"{login}@example.test", "password": PASSWORD},
        )
        return user["id"], await self.login(self.nodes[0], login)


@pytest.fixture
async def cluster(
    mongo_url: str, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Cluster]:
    database = f"t_{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTALHUB_")}
    env.update(
        PORTALHUB_MONGODB_URL=mongo_url,
        PORTALHUB_MONGODB_DATABASE=database,
        PORTALHUB_REDIS_URL=redis_server.url,
        PORTALHUB_PRESENCE_GRACE_SECONDS="0.5",
        PORTALHUB_LOG_LEVEL="WARNING",
        PORTALHUB_DRAIN_SECONDS="0",  # stopping at teardown; draining has its own tests
    )
    nodes = [Node(f"node{i}", env, tmp_path) for i in range(3)]
    add_root = [
        "user",
        "add",
        "root",
        "--email",
        "root@example.test",
        "--admin",
        "--password-stdin",
    ]
    admin = subprocess.run(  # noqa: ASYNC221 - before any node runs, nothing else waits
        [sys.executable, "-m", "server", *add_root],
        env={**nodes[0].env},
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert admin.returncode == 0, admin.stderr
    for node in nodes:
        node.start()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_url)
    try:
        async with aiohttp.ClientSession() as http:
            found = Cluster(nodes, http, client[database])
            for node in nodes:
                await found.ready(node)
            found.admin_token = await found.login(nodes[0], "root")
            yield found
    finally:
        for node in nodes:
            node.stop()
        client.drop_database(database)
        client.close()


@dataclass
class Listener:
    """A user's client: follows its node, and on losing it resumes on another with `since`."""

    token: str
    node: Node
    positions: dict[str, int] = field(default_factory=dict)
    received: list[tuple[str, int, str]] = field(default_factory=list)  # stream, seq, msg id
    sio: socketio.AsyncClient | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reconnects: int = 0

    async def connect(self, node: Node) -> None:
        self.node = node
        sio = socketio.AsyncClient(reconnection=False)
        snapshot = asyncio.Event()

        async def on_any(event: str, data: Any = None) -> None:
            if event == "snapshot":
                snapshot.set()
            if isinstance(data, dict) and "stream" in data and "seq" in data:
                stream, seq = data["stream"], int(data["seq"])
                if event == "im.message":
                    self.received.append((stream, seq, data["data"]["message"]["id"]))
                if event == "im.chat.joined":
                    # as the web client does: the chat is followed from there, and a
                    # reconnect before its first message still asks for everything after
                    joined = data["data"]
                    self.positions.setdefault(joined["join_stream"], int(joined["from_seq"]))
                self.positions[stream] = max(seq, self.positions.get(stream, 0))

        async def on_disconnect(reason: Any = None) -> None:
            self.lost.set()

        sio.on("*", on_any)
        sio.on("disconnect", on_disconnect)
        self.lost.clear()
        auth: dict[str, Any] = {"token": self.token}
        if self.positions:
            auth["since"] = dict(self.positions)
        await sio.connect(node.url, auth=auth, transports=["websocket"], wait_timeout=10)
        self.sio = sio
        await asyncio.wait_for(snapshot.wait(), 10)

    def ids(self) -> list[str]:
        return [message_id for _, _, message_id in self.received]


async def test_a_node_killed_under_traffic_loses_and_doubles_nothing(cluster: Cluster) -> None:
    nodes = cluster.nodes
    people = [await cluster.add_user(f"u{i}") for i in range(6)]
    listeners = [Listener(token, nodes[i % 3]) for i, (_, token) in enumerate(people)]
    for listener in listeners:
        await listener.connect(listener.node)
    alive = [nodes[1], nodes[2]]

    async def follow(listener: Listener) -> None:
        """Move to a surviving node whenever the current one goes away."""
        while True:
            await listener.lost.wait()
            for attempt in range(50):
                try:
                    await listener.connect(alive[(listener.reconnects + attempt) % 2])
                    listener.reconnects += 1
                    break
                except Exception:
                    await asyncio.sleep(0.1)

    followers = [asyncio.create_task(follow(listener)) for listener in listeners]
    sent: dict[str, set[str]] = {}  # message id -> who must receive it (author's devices too)

    async def talk(author: int, rounds: int) -> None:
        _, token = people[author]
        for n in range(rounds):
            to = (author + 1 + n % 5) % 6
            client_id = f"m{author}-{n}"
            for attempt in range(40):  # a request to the dead node is retried elsewhere
                node = nodes[(author + n + attempt) % 3]
                try:
                    body = await cluster.call(
                        node,
                        "POST",
                        "/api/v1/im/messages",
                        token,
                        json={"to": [people[to][0]], "text": client_id, "client_id": client_id},
                    )
                    break
                except (aiohttp.ClientError, AssertionError):
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{client_id} could not be sent")
            (message,) = body["messages"]
            sent[message["id"]] = {str(author), str(to)}
            await asyncio.sleep(0.01)

    traffic = asyncio.gather(*(talk(a, 30) for a in range(6)))
    await asyncio.sleep(1.0)
    nodes[0].kill()  # mid-traffic, no goodbye
    killed_at = datetime.now(UTC)
    await traffic
    assert len(sent) == 180

    def complete() -> bool:
        return all(
            {m for m, who in sent.items() if str(i) in who} <= set(listener.ids())
            for i, listener in enumerate(listeners)
        )

    deadline = time.monotonic() + 30
    while not complete() and time.monotonic() < deadline:  # noqa: ASYNC110 - polling clients
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # a duplicate would land by now
    for follower in followers:
        follower.cancel()
    for i, listener in enumerate(listeners):
        expected = {m for m, who in sent.items() if str(i) in who}
        got = listener.ids()
        assert set(got) == expected, missing_report(cluster, listener, expected, killed_at)
        assert len(got) == len(set(got)), f"user {i}: duplicates"
        for stream in {s for s, _, _ in listener.received}:
            seqs = [seq for s, seq, _ in listener.received if s == stream]
            assert seqs == sorted(seqs), f"user {i}: {stream} out of order"
        if listener.sio is not None:
            await listener.sio.disconnect()
    # those that started on node0 moved
    assert all(listener.reconnects >= 1 for listener in listeners[0::3])


async def test_a_task_deadline_fires_once_across_nodes(cluster: Cluster) -> None:
    owner_id, owner = await cluster.add_user("owner")
    deadline = datetime.now(UTC) + timedelta(seconds=2)
    created = await cluster.call(
        cluster.nodes[1],
        "POST",
        "/api/v1/tasks",
        owner,
        json={
            "title": "Soon due",
            "responsible_ids": [owner_id],
            "deadline": deadline.isoformat(),
        },
    )
    (task,) = created["tasks"]
    events = cluster.database["events"]
    query = {
        "stream": f"user:{owner_id}",
        "data.task.id": task["id"],
        "data.changed": ["deadline_state"],
    }
    stop = time.monotonic() + 20
    while events.count_documents(query) == 0 and time.monotonic() < stop:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    await asyncio.sleep(3)  # every node's scheduler had its chance to fire it again
    assert events.count_documents(query) == 1
    history = cluster.database["task_history"]
    assert history.count_documents({"task_id": task["id"], "kind": "overdue"}) == 1


def missing_report(
    cluster: Cluster, listener: Listener, expected: set[str], killed_at: datetime
) -> str:
    """Which messages a listener lacks, where they were stored and what it got around them."""
    lines = [f"{len(expected - set(listener.ids()))} missing; node0 killed at {killed_at:%T.%f}"]
    lines.append(f"listener on {listener.node.name}, reconnected {listener.reconnects} times")
    for message_id in sorted(expected - set(listener.ids())):
        event = cluster.database["events"].find_one(
            {"type": "im.message", "data.message.id": message_id}
        )
        if event is None:
            lines.append(f"{message_id}: no event stored")
            continue
        seqs = sorted(seq for s, seq, _ in listener.received if s == event["stream"])
        lines.append(
            f"{message_id}: {event['stream']} seq {event['seq']} stored {event['ts']:%T.%f}; "
            f"the listener got seqs {seqs}, position {listener.positions.get(event['stream'])}"
        )
    return "\n".join(lines)
