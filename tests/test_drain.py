"""Draining a node: on SIGTERM `portalhub serve` fails readiness at once (so a load balancer
sends new clients elsewhere) but keeps serving for PORTALHUB_DRAIN_SECONDS; then it stops
accepting, tells its clients to reconnect elsewhere (Socket.IO `server.draining`, XMPP
`system-shutdown`, SMTP 421 for idle sessions), lets work under way finish (an HTTP request
still uploading its body, an SMTP transaction in DATA) and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import socketio
from pymongo import MongoClient

from server.app import drain
from tests.harness import HubHarness, Refused, SocketClient
from tests.test_process import Hub, wait_for
from tests.xmpp_client import XmppClient

GRACE = 3.0
PASSWORD = "drain-pass-1"
LONG_GRACE = 60.0  # for the cases that must not wait it out


# --- a real `portalhub serve`, driven from async code ---------------------------------------


class Node(Hub):
    """The hub process on the tests' database server, with one user (john), its output read
    as it comes (a full pipe would block it)."""

    def __init__(self, data_dir: Path, grace: float, mongo_url: str) -> None:
        super().__init__(data_dir)
        self.database = f"t_{uuid.uuid4().hex[:12]}"
        self.env.update(
            PORTALHUB_DRAIN_SECONDS=str(grace),
            PORTALHUB_MONGODB_URL=mongo_url,
            PORTALHUB_MONGODB_DATABASE=self.database,
        )
        self.lines: list[str] = []

    def start(self) -> None:
        add = ["user", "add", "john", "--email", "john@example.test", "--password-stdin"]
        added = self.cli(*add, stdin=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        wait_for(self.ready, 90, "the hub to be ready")

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"hub exited with {self.process.returncode}:\n{self.output}")
        try:
            with urllib.request.urlopen(self.url("/readyz"), timeout=2) as resp:
                return bool(json.load(resp)["status"] == "ready")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)


@asynccontextmanager
async def running(data_dir: Path, grace: float, mongo_url: str) -> AsyncIterator[Node]:
    hub = Node(data_dir, grace, mongo_url)
    try:
        await asyncio.to_thread(hub.start)
        yield hub
    finally:
        hub.kill_all()
        client: MongoClient[dict[str, Any]] = MongoClient(mongo_url)
        client.drop_database(hub.database)
        client.close()


@pytest.fixture
async def node(tmp_path: Path, mongo_url: str) -> AsyncIterator[Node]:
    async with running(tmp_path / "var", GRACE, mongo_url) as hub:
        yield hub


@pytest.fixture
async def patient_node(tmp_path: Path, mongo_url: str) -> AsyncIterator[Node]:
    async with running(tmp_path / "var", LONG_GRACE, mongo_url) as hub:
        yield hub


def port(hub: Node, name: str) -> int:
    return int(hub.env[f"PORTALHUB_{name}_PORT"])


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def login(http: aiohttp.ClientSession, hub: Node) -> str:
    body = {"login": "john", "password": PASSWORD}
    async with http.post(hub.url("/api/v1/auth/login"), json=body) as resp:
        assert resp.status == 200, await resp.text()
        token: str = (await resp.json())["token"]
        return token


async def socket_client(base_url: str, token: str, transport: str) -> SocketClient:
    sio = socketio.AsyncClient(reconnection=False)
    client = SocketClient(sio)

    async def catch_all(event: str, data: Any = None) -> None:
        client.record(event, data)

    async def disconnected(reason: Any = None) -> None:
        client.record("disconnect", reason)

    sio.on("*", catch_all)
    sio.on("disconnect", disconnected)
    await sio.connect(base_url, auth={"token": token}, transports=[transport], wait_timeout=10)
    await client.wait_for("snapshot")
    return client


async def smtp_line(reader: asyncio.StreamReader) -> str:
    """One SMTP reply (the last line of a multi-line one)."""
    while True:
        line = (await asyncio.wait_for(reader.readline(), 15)).decode()
        if len(line) < 4 or line[3] != "-":
            return line


async def smtp_session(hub: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port(hub, "SMTP"))
    assert (await smtp_line(reader)).startswith("220")
    writer.write(b"EHLO drain.test\r\n")
    assert (await smtp_line(reader)).startswith("250")
    return reader, writer


async def xmpp_session(hub: Node) -> XmppClient:
    client = XmppClient("john@localhost/drain", PASSWORD)
    client.enable_direct_tls = True
    client.enable_starttls = False
    client.enable_plaintext = False
    client.connect("127.0.0.1", port(hub, "XMPP_TLS"))
    await asyncio.wait_for(client.session_ready.wait(), 20)
    return client


async def refused(port_number: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port_number)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def exit_code(hub: Node, timeout: float) -> int:
    assert hub.process is not None
    deadline = time.monotonic() + timeout
    while hub.process.poll() is None:
        assert time.monotonic() < deadline, f"the hub did not exit:\n{hub.output[-3000:]}"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)  # the rest of its output
    return hub.process.returncode


# --- the process ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_drains_then_exits_cleanly(node: Node) -> None:
    hub = node
    assert hub.process is not None
    async with aiohttp.ClientSession() as http:
        token = await login(http, hub)
        base = hub.url("")
        over_websocket = await socket_client(base, token, "websocket")
        over_polling = await socket_client(base, token, "polling")
        jabber = await xmpp_session(hub)
        idle_reader, _idle_writer = await smtp_session(hub)
        mail_reader, mail_writer = await smtp_session(hub)
        for command in (b"MAIL FROM:<client@example.test>", b"RCPT TO:<crm@localhost>", b"DATA"):
            mail_writer.write(command + b"\r\n")
            assert (await smtp_line(mail_reader))[:3] in ("250", "354")
        mail_writer.write(b"From: client@example.test\r\nSubject: drain\r\n\r\nfirst half\r\n")

        # an upload under way: headers and half the body now, the rest after the listener closed
        body = json.dumps({"login": "john", "password": PASSWORD}).encode()
        body += b" " * (120_000 - len(body))
        upload_reader, upload_writer = await asyncio.open_connection("127.0.0.1", hub.port)
        upload_writer.write(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:60_000]
        )
        await upload_writer.drain()

        started = time.monotonic()
        hub.process.send_signal(signal.SIGTERM)

        # at once: not ready, and says why; the node itself still serves
        deadline = time.monotonic() + 2
        while (await get_json(http, hub.url("/readyz")))[0] != 503:
            assert time.monotonic() < deadline, "readiness did not fail"
            await asyncio.sleep(0.05)
        status, ready = await get_json(http, hub.url("/readyz"))
        assert status == 503
        assert ready["status"] == "draining" and ready["database"] == "ok"
        assert (await get_json(http, hub.url("/healthz")))[0] == 200
        await login(http, hub)
        assert over_websocket.sio.connected and over_polling.sio.connected
        assert not over_websocket.of_type("server.draining")

        # after the grace: clients are told to reconnect elsewhere and let go
        for client in (over_websocket, over_polling):
            (told,) = await client.wait_for("server.draining", timeout=GRACE + 10)
            assert 0 <= told["reconnect_after_ms"] <= 3000
            await client.wait_for("disconnect")
            assert not client.sio.connected
        assert time.monotonic() - started >= GRACE - 0.5
        await asyncio.wait_for(jabber.gone.wait(), 10)
        assert [e["condition"] for e in jabber.stream_errors] == ["system-shutdown"]
        assert (await smtp_line(idle_reader)).startswith("421")
        assert await refused(hub.port)
        assert await refused(port(hub, "SMTP"))
        assert await refused(port(hub, "XMPP_TLS"))

        # work under way finishes: the SMTP transaction in DATA, and the upload
        mail_writer.write(b"second half\r\n.\r\n")
        assert (await smtp_line(mail_reader)).startswith("250")
        assert (await smtp_line(mail_reader)).startswith("421")  # then the session ends
        await asyncio.sleep(0.5)  # the HTTP server is shutting down by now, waiting for it
        upload_writer.write(body[60_000:])
        await upload_writer.drain()
        head = (await asyncio.wait_for(upload_reader.readuntil(b"\r\n\r\n"), 15)).decode()
        assert head.startswith("HTTP/1.1 200"), head
        upload_writer.close()

    assert await exit_code(hub, 30) == 0
    out = hub.output
    assert f"draining: /readyz answers 503 for {GRACE:g} s" in out
    assert "stopping..." in out


@pytest.mark.slow
async def test_a_second_signal_cuts_the_grace_short(patient_node: Node) -> None:
    hub = patient_node
    assert hub.process is not None
    async with aiohttp.ClientSession() as http:
        client = await socket_client(hub.url(""), await login(http, hub), "websocket")
        hub.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert client.sio.connected
        started = time.monotonic()
        hub.process.send_signal(signal.SIGINT)
        await client.wait_for("server.draining")
        assert await exit_code(hub, 20) == 0
        assert time.monotonic() - started < 15


@pytest.mark.slow
async def test_ctrl_c_does_not_wait_but_still_tells_clients(patient_node: Node) -> None:
    hub = patient_node
    assert hub.process is not None
    async with aiohttp.ClientSession() as http:
        client = await socket_client(hub.url(""), await login(http, hub), "websocket")
        started = time.monotonic()
        hub.process.send_signal(signal.SIGINT)
        await client.wait_for("server.draining")
        assert await exit_code(hub, 20) == 0
        assert time.monotonic() - started < 15


# --- in process -----------------------------------------------------------------------------


async def test_drained_hub_refuses_new_connections(hub: HubHarness) -> None:
    _user_id, token = await hub.create_user("dora")
    client = await hub.connect(token)
    await client.wait_for("snapshot")
    await drain(hub.app)
    (told,) = await client.wait_for("server.draining")
    assert set(told) == {"reconnect_after_ms"}
    await client.wait_until(lambda: not client.sio.connected)
    ready = await hub.request("GET", "/readyz")
    assert ready.status == 503 and ready.body["status"] == "draining"
    with pytest.raises(Refused) as refusal:
        await hub.connect(token)
    assert refusal.value.reasons[0]["data"] == {"code": "draining"}
