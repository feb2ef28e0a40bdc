"""deploy/haproxy.cfg for real: HAProxy in front of two `portalhub serve` processes on
loopback (one database, one redis-server), with the addresses the config reads from the
environment. A Socket.IO client stays on one node through long-polling and the WebSocket
upgrade, XMPP (STARTTLS and direct TLS) and SMTP pass through to a node, and a node that
drains is taken out by its readiness check while its clients move to the other node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import socketio
from pymongo import MongoClient
from yarl import URL

from tests.conftest import require_binary
from tests.harness import SocketClient
from tests.ports import listener_port
from tests.redis_server import RedisServer
from tests.test_compose import HAPROXY_CFG
from tests.xmpp_client import XmppClient

pytestmark = pytest.mark.slow

PASSWORD = "balanced-pass-1"
COOKIE = "PORTALHUB_NODE"
DRAIN_SECONDS = 6.0  # the balancer checks every 2 s and needs 2 failures


def read_lines(stream: IO[str], into: list[str]) -> None:
    for line in stream:
        into.append(line)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Node:
    """One `portalhub serve` with ports of its own, its output read as it comes."""

    def __init__(self, name: str, env: dict[str, str], data_dir: Path) -> None:
        self.name = name
        self.ports = {kind: listener_port() for kind in ("HTTP", "XMPP", "XMPPS", "SMTP")}
        self.env = {
            **env,
            "PORTALHUB_DATA_DIR": str(data_dir),
            "PORTALHUB_HTTP_PORT": str(self.ports["HTTP"]),
            "PORTALHUB_XMPP_PORT": str(self.ports["XMPP"]),
            "PORTALHUB_XMPP_TLS_PORT": str(self.ports["XMPPS"]),
            "PORTALHUB_SMTP_PORT": str(self.ports["SMTP"]),
        }
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self) -> None:
        self.lines = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        threading.Thread(
            target=read_lines, args=(self.process.stdout, self.lines), daemon=True
        ).start()
        wait_for(self.ready, 90, f"{self.name} to be ready")

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited:\n{''.join(self.lines)}")
        url = f"http://127.0.0.1:{self.ports['HTTP']}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    @property
    def fingerprint(self) -> str:
        """The SHA-256 fingerprint of its XMPP certificate, as it printed it."""
        for line in self.lines:
            if "certificate SHA-256 fingerprint" in line:
                return line.rsplit(" ", 1)[1].strip()
        raise AssertionError(f"{self.name} printed no fingerprint")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@dataclass
class Balanced:
    nodes: dict[str, Node]
    lb_ports: dict[str, int]
    lb_lines: list[str]

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.lb_ports['HTTP']}{path}"


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory, mongo_url: str) -> Iterator[Balanced]:
    haproxy = require_binary("haproxy", "haproxy")
    work = tmp_path_factory.mktemp("balanced")
    redis = RedisServer(require_binary("redis-server", "redis-server"), work / "redis")
    redis.start()
    database = f"t_{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTALHUB_")}
    env.update(
        PORTALHUB_MONGODB_URL=mongo_url,
        PORTALHUB_MONGODB_DATABASE=database,
        PORTALHUB_REDIS_URL=redis.url,
        PORTALHUB_DRAIN_SECONDS=str(DRAIN_SECONDS),
    )
    nodes = {name: Node(name, env, work / name) for name in ("hub1", "hub2")}
    lb_ports = {kind: listener_port() for kind in ("HTTP", "XMPP", "XMPPS", "SMTP")}
    lb_env = dict(os.environ)
    for number, node in enumerate(nodes.values(), start=1):
        lb_env[f"HUB{number}_HOST"] = "127.0.0.1"
        for kind, port in node.ports.items():
            lb_env[f"HUB{number}_{kind}_PORT"] = str(port)
    for kind, port in lb_ports.items():
        lb_env[f"LB_{kind}_BIND"] = f"127.0.0.1:{port}"
    lb: subprocess.Popen[str] | None = None
    lb_lines: list[str] = []
    try:
        add = ["user", "add", "john", "--email", "john@example.test", "--password-stdin"]
        added = subprocess.run(
            [sys.executable, "-m", "server", *add],
            env=nodes["hub1"].env,
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert added.returncode == 0, added.stderr
        for node in nodes.values():
            node.start()
        lb = subprocess.Popen(
            [haproxy, "-db", "-f", str(HAPROXY_CFG)],
            env=lb_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert lb.stdout is not None
        threading.Thread(target=read_lines, args=(lb.stdout, lb_lines), daemon=True).start()
        found = Balanced(nodes, lb_ports, lb_lines)

        def lb_up() -> bool:
            assert lb is not None
            assert lb.poll() is None, "".join(lb_lines)
            try:
                with urllib.request.urlopen(found.url("/lb-health"), timeout=2) as resp:
                    return bool(resp.status == 200)
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(lb_up, 20, "HAProxy to listen")
        yield found
    finally:
        if lb is not None:
            lb.terminate()
            try:
                lb.wait(10)
            except subprocess.TimeoutExpired:
                lb.kill()
        for node in nodes.values():
            node.stop()
        redis.stop()
        client: MongoClient[dict[str, Any]] = MongoClient(mongo_url)
        client.drop_database(database)
        client.close()


# --- clients --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that keeps cookies like a browser (also for 127.0.0.1)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield http


def node_of(http: aiohttp.ClientSession, balanced: Balanced) -> str:
    cookie = http.cookie_jar.filter_cookies(URL(balanced.url("/"))).get(COOKIE)
    assert cookie is not None, "the balancer set no node cookie"
    return cookie.value


async def login(http: aiohttp.ClientSession, balanced: Balanced) -> str:
    body = {"login": "john", "password": PASSWORD}
    async with http.post(balanced.url("/api/v1/auth/login"), json=body) as resp:
        assert resp.status == 200, await resp.text()
        token: str = (await resp.json())["token"]
        return token


async def connect(
    http: aiohttp.ClientSession, balanced: Balanced, token: str, transports: list[str]
) -> SocketClient:
    sio = socketio.AsyncClient(reconnection=False, http_session=http)
    client = SocketClient(sio)

    async def catch_all(event: str, data: Any = None) -> None:
        client.record(event, data)

    async def disconnected(reason: Any = None) -> None:
        client.record("disconnect", reason)

    sio.on("*", catch_all)
    sio.on("disconnect", disconnected)
    await sio.connect(balanced.url(), auth={"token": token}, transports=transports)
    await client.wait_for("snapshot")
    return client


# --- the tests ------------------------------------------------------------------------------


async def test_socketio_stays_on_one_node_through_polling_and_upgrade(
    balanced: Balanced,
) -> None:
    async with browser() as first_http, browser() as second_http:
        token = await login(first_http, balanced)
        # the default: long-polling first, then the upgrade to WebSocket, all on one node
        upgraded = await connect(first_http, balanced, token, ["polling", "websocket"])
        assert upgraded.sio.transport() == "websocket", "the WebSocket upgrade failed"
        first = node_of(first_http, balanced)
        # long-polling only: every request must reach the node that holds the session,
        # or the session is unknown there and the connection fails
        polling = await connect(second_http, balanced, token, ["polling"])
        second = node_of(second_http, balanced)
        for n in range(10):
            assert await polling.call("ping", {"n": n}) == {"ok": True}
        assert polling.sio.connected and polling.sio.transport() == "polling"
        assert node_of(second_http, balanced) == second
        # the first client's WebSocket counts on its node: the next new client went to the
        # other one (leastconn)
        assert {first, second} == set(balanced.nodes)
        await upgraded.close()
        # (a polling client that leaves politely waits for its last long-poll: not this one)
        await polling.sio.eio.disconnect(abort=True)


async def test_xmpp_and_smtp_pass_through_to_a_node(balanced: Balanced) -> None:
    # direct TLS ends on a node, not on the balancer: the certificate is a node's own
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", balanced.lb_ports["XMPPS"], ssl=context
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    digest = hashlib.sha256(der).hexdigest().upper()
    seen = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    assert seen in {node.fingerprint for node in balanced.nodes.values()}
    writer.write(
        b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' "
        b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
    received = b""
    while b"</stream:features>" not in received:  # the node's stream features: SASL, as TLS is on
        received += await asyncio.wait_for(reader.read(4096), 10)
    assert b"urn:ietf:params:xml:ns:xmpp-sasl" in received
    writer.close()

    # a whole XMPP login with STARTTLS, through the balancer
    jabber = XmppClient("john@localhost/lb", PASSWORD)
    jabber.enable_direct_tls = False
    jabber.enable_starttls = True
    jabber.enable_plaintext = False
    jabber.connect("127.0.0.1", balanced.lb_ports["XMPP"])
    try:
        await asyncio.wait_for(jabber.session_ready.wait(), 20)
    finally:
        jabber.disconnect()

    # SMTP: the node's own greeting, and it takes mail for the CRM inbox only
    reader, writer = await asyncio.open_connection("127.0.0.1", balanced.lb_ports["SMTP"])
    greeting = (await asyncio.wait_for(reader.readline(), 10)).decode()
    assert greeting.startswith("220") and "Portal Hub CRM mail" in greeting
    writer.write(b"EHLO lb.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<someone@else.test>\r\n")
    replies: list[str] = []
    while len(replies) < 3:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
        if line[3:4] != "-":
            replies.append(line[:3])
    assert replies == ["250", "250", "550"]
    writer.write(b"QUIT\r\n")
    writer.close()


async def test_a_draining_node_hands_its_clients_to_the_other(balanced: Balanced) -> None:
    async with browser() as http:
        token = await login(http, balanced)
        client = await connect(http, balanced, token, ["polling", "websocket"])
        name = node_of(http, balanced)
        draining = balanced.nodes[name]
        (other,) = set(balanced.nodes) - {name}
        assert draining.process is not None
        started = time.monotonic()
        draining.process.send_signal(signal.SIGTERM)

        # the balancer notices the failing readiness check and sends the same browser to the
        # other node - while the draining node still serves its connected clients
        while node_of(http, balanced) != other:
            assert time.monotonic() - started < DRAIN_SECONDS, "the node was not taken out"
            async with http.get(balanced.url("/healthz")) as resp:
                assert resp.status == 200
            await asyncio.sleep(0.2)
        assert client.sio.connected and draining.alive()

        # then the node tells its clients to reconnect; through the balancer they land on
        # the other node
        (told,) = await client.wait_for("server.draining", timeout=DRAIN_SECONDS + 10)
        await client.wait_for("disconnect")
        await asyncio.sleep(told["reconnect_after_ms"] / 1000)
        again = await connect(http, balanced, token, ["polling", "websocket"])
        assert node_of(http, balanced) == other
        assert again.sio.transport() == "websocket"
        await again.close()

    assert draining.process.wait(30) == 0

    # a rolling restart: the node comes back, and once its checks pass the balancer keeps a
    # client whose cookie names it there again (instead of moving it to the other node)
    await asyncio.to_thread(draining.start)
    async with browser() as http:
        deadline = time.monotonic() + 15
        while True:
            http.cookie_jar.update_cookies({COOKIE: name}, URL(balanced.url("/")))
            async with http.get(balanced.url("/healthz")) as resp:
                assert resp.status == 200
            if node_of(http, balanced) == name:
                break
            assert time.monotonic() < deadline, "the restarted node was not taken back"
            await asyncio.sleep(0.5)
