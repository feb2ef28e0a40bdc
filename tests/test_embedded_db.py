"""The embedded database as the hub runs it: a password nobody else has, files nobody else can
read, and a child process the hub restarts by itself, losing nothing it acknowledged."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure

from server.settings import Settings
from server.store import Store, open_store
from server.store.credentials import read_credentials
from server.store.embedded import (
    EmbeddedDatabase,
    EmbeddedDatabaseError,
    find_executable,
    free_loopback_port,
    mongodb_url,
)
from server.xmpp.certs import ensure_self_signed
from tests.harness import HubHarness, start_hub

UNAUTHORIZED = 13


def modes(root: Path) -> dict[str, int]:
    """Every entry under ``root`` (itself included) with its permission bits."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(root: Path) -> None:
    for name, mode in modes(root).items():
        wanted = 0o700 if (root / name).is_dir() else 0o600
        assert mode == wanted, f"{name} has mode {mode:o}, not {wanted:o}"


async def assert_refused_without_password(url: str) -> None:
    anonymous: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        url, serverSelectionTimeoutMS=3000
    )
    try:
        with pytest.raises(OperationFailure) as read:
            await anonymous.portalhub.messages.find_one({})
        assert read.value.code == UNAUTHORIZED
        with pytest.raises(OperationFailure) as write:
            await anonymous.admin.command("createUser", "intruder", pwd="x" * 12, roles=["root"])
        assert write.value.code == UNAUTHORIZED
    finally:
        await anonymous.close()


async def test_the_database_wants_a_password_and_its_files_are_private(tmp_path: Path) -> None:
    db_dir = tmp_path / "var" / "db"
    database = EmbeddedDatabase(db_dir)
    url = await database.start()
    try:
        await assert_refused_without_password(url)
        credentials = read_credentials(db_dir)
        assert credentials is not None and credentials == database.credentials
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, **credentials.client_options()
        )
        try:
            await client.portalhub.messages.insert_one({"text": "private words"})
        finally:
            await client.close()
        endpoint = (db_dir / "endpoint.json").read_text()
        assert credentials.password not in endpoint
        assert json.loads(endpoint)["pid"] == database.pid
        assert (db_dir / "secantusd.log").exists()
        assert any((db_dir / "data").glob("WiredTiger*"))
        assert not (db_dir / "provisioning").exists()  # the one-run TLS key is gone
        assert_private(db_dir)
        assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700  # made by the hub
    finally:
        await database.stop()


class HangingProvisioning(EmbeddedDatabase):
    """Its password-setting run cannot act on SIGTERM (stopped, as a run whose shutdown hangs
    in a lock): only a kill ends it."""

    provisioning = False
    frozen = 0

    async def _provision(self, credentials: Any, timeout: float) -> None:
        self.provisioning = True
        try:
            await super()._provision(credentials, timeout)
        finally:
            self.provisioning = False

    async def _end_child(self, timeout: float) -> None:
        process = self._process
        if self.provisioning and process is not None and process.returncode is None:
            os.kill(process.pid, signal.SIGSTOP)
            self.frozen += 1
        await super()._end_child(timeout)


async def test_a_password_run_that_does_not_stop_is_killed_and_the_start_goes_on(
    tmp_path: Path,
) -> None:
    database = HangingProvisioning(tmp_path / "db")
    url = await database.start(timeout=30.0)
    try:
        assert database.frozen == 1
        await assert_refused_without_password(url)
        assert database.credentials is not None
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, **database.credentials.client_options()
        )
        try:
            await client.portalhub.messages.insert_one({"text": "after the kill"})
        finally:
            await client.close()
    finally:
        await database.stop()


def write_as_an_older_version(db_dir: Path) -> None:
    """A database run as earlier versions ran it (no --auth, umask 022), with one message."""
    db_dir.mkdir(mode=0o755)
    port = free_loopback_port()
    old = subprocess.Popen(
        [find_executable(), "--host", "127.0.0.1", "--port", str(port)]  # noqa: RUF005
        + ["--storage-path", str(db_dir / "data"), "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        umask=0o022,
    )
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(
            mongodb_url("127.0.0.1", port), serverSelectionTimeoutMS=30_000, journal=True
        )
        client.portalhub.messages.insert_one({"_id": "kept", "text": "from before"})
        client.close()
    finally:
        old.terminate()
        old.wait(30)


async def test_an_open_data_directory_of_an_older_version_is_closed_in_place(
    tmp_path: Path,
) -> None:
    """What earlier versions left: no password, files 0644 in 0755 directories."""
    db_dir = tmp_path / "db"
    await asyncio.to_thread(write_as_an_older_version, db_dir)
    (db_dir / "secantusd.log").write_text("old log\n")
    (db_dir / "secantusd.log").chmod(0o644)
    assert stat.S_IMODE((db_dir / "data" / "WiredTiger.turtle").stat().st_mode) == 0o644

    database = EmbeddedDatabase(db_dir)
    url = await database.start()
    try:
        assert_private(db_dir)
        await assert_refused_without_password(url)
        assert database.credentials is not None
        store = Store(url, "portalhub", credentials=database.credentials)
        try:
            assert await store["messages"].find_one({"_id": "kept"}) is not None
        finally:
            await store.close()
    finally:
        await database.stop()

    # a password file lost or from elsewhere: the hub sets it again (it owns the files)
    (db_dir / "credentials.json").write_text('{"username": "portalhub", "password": "stale"}')
    again = EmbeddedDatabase(db_dir)
    url = await again.start()
    try:
        assert again.credentials is not None and again.credentials.password == "stale"
        store = Store(url, "portalhub", credentials=again.credentials)
        try:
            assert await store["messages"].count_documents({}) == 1
        finally:
            await store.close()
        assert_private(db_dir)
    finally:
        await again.stop()


async def test_a_database_that_cannot_start_says_why(tmp_path: Path) -> None:
    database = EmbeddedDatabase(tmp_path / "db", extra_args=("--cache-size", "lots"))
    with pytest.raises(EmbeddedDatabaseError) as failed:
        await database.start()
    message = str(failed.value)
    assert "exited with" in message
    assert "cache_size" in message, message  # its own words, not just an exit code
    assert database.state == "stopped"


def test_the_generated_tls_key_is_private(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir(mode=0o755)
    cert, key = ensure_self_signed(tls, "portal.test")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    key.chmod(0o644)  # as an older version may have left it
    tls.chmod(0o755)
    assert ensure_self_signed(tls, "portal.test") == (cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700


# supervision -------------------------------------------------------------------------------


@pytest.fixture
def embedded_settings(tmp_path: Path) -> Settings:
    """The hub on an embedded database of its own (no PORTALHUB_MONGODB_URL)."""
    return Settings(
        mongodb_database=f"t_{uuid.uuid4().hex[:12]}",
        http_port=0,
        data_dir=tmp_path / "var",
        xmpp_enabled=False,
        smtp_enabled=False,
        im_messages_per_second=1000,
        im_message_burst=1000,
        node_heartbeat_seconds=0.5,
    )


@pytest.fixture
async def embedded_hub(embedded_settings: Settings) -> AsyncIterator[HubHarness]:
    async with (
        open_store(embedded_settings, reuse_running=False) as store,
        start_hub(embedded_settings, store) as hub,
    ):
        yield hub


class Trickle:
    """Messages sent one after another over REST; which of them were acknowledged."""

    def __init__(self, hub: HubHarness, token: str, to: str) -> None:
        self.hub, self.token, self.to = hub, token, to
        self.acknowledged: list[str] = []
        self.failed: list[int] = []
        self._progress = asyncio.Event()
        self._running = True
        self._task = asyncio.create_task(self._send())

    async def _send(self) -> None:
        n = 0
        while self._running:
            text = f"trickle-{n}"
            n += 1
            try:
                resp = await self.hub.request(
                    "POST",
                    "/api/v1/im/messages",
                    token=self.token,
                    json={"to": [self.to], "text": text, "client_id": text},
                )
            except OSError:
                self.failed.append(0)
                continue
            if resp.status == 201:
                self.acknowledged.append(text)
                self._progress.set()
            else:
                assert resp.status == 503, resp.body  # the database is down: retry later
                assert resp.content_type == "application/problem+json"
                self.failed.append(resp.status)
            await asyncio.sleep(0.02)

    async def acknowledged_at_least(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count:
            self._progress.clear()
            await asyncio.wait_for(self._progress.wait(), deadline - time.monotonic())

    async def stop(self) -> None:
        self._running = False
        await asyncio.wait_for(self._task, 60)


async def wait_json(hub: HubHarness, path: str, ok: Any, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        resp = await hub.request("GET", path)
        if ok(resp):
            return resp
        assert time.monotonic() < deadline, f"{path} still answers {resp.status} {resp.body}"
        await asyncio.sleep(0.05)


async def test_a_killed_database_is_restarted_and_loses_nothing_acknowledged(
    embedded_hub: HubHarness,
) -> None:
    hub = embedded_hub
    store = hub.services.store
    endpoint = hub.services.settings.embedded_db_dir / "endpoint.json"
    first_pid = json.loads(endpoint.read_text())["pid"]
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    trickle = Trickle(hub, alice, bob_id)
    try:
        await trickle.acknowledged_at_least(20)
        os.kill(first_pid, signal.SIGKILL)
        # the hub notices, says so, and is not ready while it restarts the database
        await wait_json(hub, "/readyz", lambda r: r.status == 503, timeout=10)
        alive = await hub.request("GET", "/healthz")
        assert alive.status == 200  # the hub recovers by itself: no reason to restart it
        await wait_json(hub, "/readyz", lambda r: r.status == 200)
        await trickle.acknowledged_at_least(len(trickle.acknowledged) + 20)
    finally:
        await trickle.stop()
    embedded = store.embedded
    assert embedded is not None and embedded.pid not in (None, first_pid)
    health = await hub.request("GET", "/healthz")
    assert health.status == 200 and health.body["database_restarts"] == 1
    assert health.body["database_process"] == "running"
    assert "was killed by signal 9" in (embedded.last_failure or "")
    assert json.loads((embedded.db_dir / "endpoint.json").read_text())["pid"] == embedded.pid
    # the next request is served, and every acknowledged message is stored
    last = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"to": [bob_id], "text": "after", "client_id": "after"},
    )
    assert last.status == 201, last.body
    texts = {doc["text"] async for doc in store["messages"].find({}, {"text": 1})}
    missing = [t for t in trickle.acknowledged if t not in texts]
    assert not missing, f"{len(missing)} acknowledged messages lost: {missing[:5]}"
