"""Shared fixtures. The database is real: a SecantusDB server spoken to over the wire."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pymongo import MongoClient

from server.settings import Settings
from server.store.database import Store
from server.store.embedded import find_executable, free_loopback_port, mongodb_url
from tests.hang_guard import pytest_configure, pytest_runtest_protocol  # noqa: F401 - hooks
from tests.harness import HubHarness, start_hub
from tests.redis_server import RedisServer

REQUIRE_SERVICES = os.environ.get("PORTALHUB_REQUIRE_SERVICES") == "1"


def require_service(name: str, available: bool, how_to_get: str) -> None:
    """Skip a test whose system service is missing - or fail it where CI promised it."""
    if available:
        return
    message = f"{name} is not available here ({how_to_get})"
    if REQUIRE_SERVICES:
        pytest.fail(f"PORTALHUB_REQUIRE_SERVICES=1 but {message}")
    pytest.skip(message)


def require_binary(binary: str, package: str) -> str:
    path = shutil.which(binary)
    require_service(binary, path is not None, f"apt-get install {package}")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database server for the whole run: PORTALHUB_TEST_MONGODB_URL, or our own SecantusDB."""
    configured = os.environ.get("PORTALHUB_TEST_MONGODB_URL")
    if configured:
        yield configured
        return
    port = free_loopback_port()
    log_path = tmp_path_factory.mktemp("secantus") / "secantusd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                find_executable(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--storage-path",
                ":memory:",
                "--log-level",
                "WARNING",
                "--enable-test-commands",
                "--standalone",  # as the hub runs it (server/store/embedded.py)
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        url = mongodb_url("127.0.0.1", port)
        client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=500)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.admin.command("ping")
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"secantusd-py did not start: {log_path.read_text()}"
                    ) from None
                time.sleep(0.1)
        client.close()
        try:
            yield url
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own (skipped, or failed under CI, when missing)."""
    server = RedisServer(require_binary("redis-server", "redis-server"), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(mongo_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own database on the shared server, no ports fixed."""
    return Settings(
        mongodb_url=mongo_url,
        mongodb_database=f"t_{uuid.uuid4().hex[:12]}",
        http_port=0,
        data_dir=tmp_path / "var",
        presence_grace_seconds=0.3,
        xmpp_port=0,
        xmpp_tls_port=0,
        smtp_port=0,
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    assert settings.mongodb_url is not None
    store = Store(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    await store.ensure_indexes()
    try:
        yield store
    finally:
        await store.client.drop_database(settings.mongodb_database)
        await store.close()


@pytest.fixture
async def hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    async with start_hub(settings, store) as harness:
        yield harness


@pytest.fixture
async def two_nodes(
    settings: Settings, store: Store, redis_server: RedisServer
) -> AsyncIterator[tuple[HubHarness, HubHarness]]:
    """Two hubs on one database, joined by a real redis-server (several nodes behind a load
    balancer)."""
    shared = settings.model_copy(update={"redis_url": SecretStr(redis_server.url)})
    async with start_hub(shared, store) as one, start_hub(shared, store) as two:
        yield one, two


@pytest.fixture
async def two_caching_nodes(
    settings: Settings, store: Store, redis_server: RedisServer
) -> AsyncIterator[tuple[HubHarness, HubHarness]]:
    """``two_nodes`` whose caches outlive the test (a time to live of ten minutes): only the
    bus, or a revocation, can correct them."""
    shared = settings.model_copy(
        update={"redis_url": SecretStr(redis_server.url), "cache_ttl_seconds": 600.0}
    )
    async with start_hub(shared, store) as one, start_hub(shared, store) as two:
        yield one, two
