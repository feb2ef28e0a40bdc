"""Database faults, made by SecantusDB's test commands (`configureFailPoint` with
`failCommand`): writes that fail and writes that hang. The API answers 503 problem+json, a
retry with the same client_id is safe, and nothing acknowledged is lost or doubled."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pymongo import MongoClient

from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub


@contextmanager
def fail_point(mongo_url: str, **data: Any) -> Iterator[None]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_url)
    client.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": data})
    try:
        yield
    finally:
        client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        client.close()


@pytest.fixture
async def quick_store(settings: Settings) -> AsyncIterator[Store]:
    """A store whose round trips give up after 1.5 s, so a hung write fails the request."""
    assert settings.mongodb_url is not None
    store = Store(
        settings.mongodb_url.get_secret_value(), settings.mongodb_database, socket_timeout_ms=1500
    )
    await store.ensure_indexes()
    try:
        yield store
    finally:
        await store.client.drop_database(settings.mongodb_database)
        await store.close()


@pytest.fixture
async def faulty_hub(settings: Settings, quick_store: Store) -> AsyncIterator[HubHarness]:
    async with start_hub(settings, quick_store) as hub:
        yield hub


async def send(hub: HubHarness, token: str, to: str, client_id: str) -> Any:
    return await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=token,
        json={"to": [to], "text": client_id, "client_id": client_id},
    )


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"errorCode": 1, "failCommands": ["insert"]}, id="insert-fails"),
        pytest.param(
            {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": 4000},
            id="insert-hangs",
        ),
    ],
)
async def test_failing_or_hanging_writes_answer_503_and_lose_nothing_acknowledged(
    faulty_hub: HubHarness, mongo_url: str, fault: dict[str, Any]
) -> None:
    hub = faulty_hub
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    watcher = await hub.connect(bob)
    await watcher.wait_for("snapshot")
    for n in range(3):  # acknowledged before the fault
        assert (await send(hub, alice, bob_id, f"before-{n}")).status == 201

    with fail_point(mongo_url, **fault):
        refused = await send(hub, alice, bob_id, "during")
        assert refused.status == 503, refused.body
        assert refused.content_type == "application/problem+json"
        assert refused.body["type"].endswith(":unavailable")
        assert refused.headers.get("Retry-After") == "1"
        # the hub itself stays up for what does not write
        assert (await hub.request("GET", "/healthz")).status == 200

    # the client retries with the same client_id: stored once, delivered once
    for _ in range(2):
        retried = await send(hub, alice, bob_id, "during")
        assert retried.status == 201, retried.body
    await watcher.wait_until(
        lambda: (
            [e["data"]["message"]["text"] for e in watcher.of_type("im.message")][-1] == "during"
        )
    )
    texts = [e["data"]["message"]["text"] for e in watcher.of_type("im.message")]
    assert texts == ["before-0", "before-1", "before-2", "during"]
    chat_id = watcher.of_type("im.message")[0]["data"]["message"]["chat_id"]
    history = await hub.request("GET", f"/api/v1/im/chats/{chat_id}/messages", token=bob)
    assert [m["text"] for m in history.body] == ["before-0", "before-1", "before-2", "during"]
