"""The in-process caches are corrected on every node: two hub nodes on one database and a real
redis-server. Each node has served the request once (so it holds the token, the user, the
chat and the memberships in memory) before the change is made on the other node; the change
must take effect there within a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from server.events.models import EphemeralEvent
from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub
from tests.redis_server import RedisServer

WITHIN = 1.0


async def within(deadline: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``check`` holds, failing after ``deadline``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > deadline:
            raise AssertionError(f"not within {deadline} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@dataclass
class TeamChat:
    """Alice's chat with Bob, Bob having posted, read it and his counters through node two: the
    chat and his memberships are cached there."""

    alice_id: str
    alice: str
    bob_id: str
    bob: str
    chat_id: str

    @property
    def history(self) -> str:
        return f"/api/v1/im/chats/{self.chat_id}/messages"


async def team_chat_read_on_two(one: HubHarness, two: HubHarness) -> TeamChat:
    alice_id, alice = await one.create_user("alice")
    bob_id, bob = await one.create_user("bob")
    created = await one.request(
        "POST", "/api/v1/im/chats", token=alice, json={"title": "Team", "member_ids": [bob_id]}
    )
    team = TeamChat(alice_id, alice, bob_id, bob, created.body["id"])
    sent = await two.request(
        "POST", "/api/v1/im/messages", token=bob, json={"chat_id": team.chat_id, "text": "hi"}
    )
    assert sent.status == 201, sent.body
    assert (await two.request("GET", team.history, token=bob)).status == 200
    assert (await two.request("GET", "/api/v1/im/counters", token=bob)).status == 200
    return team


async def test_a_token_revoked_on_one_node_stops_working_on_the_other(
    two_caching_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_caching_nodes
    await one.create_user("alice")
    token = await one.login("alice")
    other_device = await one.login("alice")
    for device in (token, other_device):  # both tokens and the user cached on node two
        assert (await two.request("GET", "/api/v1/users/me", token=device)).status == 200
    assert (await one.request("POST", "/api/v1/auth/logout", token=token)).status == 204

    async def refused() -> bool:
        return (await two.request("GET", "/api/v1/users/me", token=token)).status == 401

    await within(WITHIN, refused)
    # the user's other token is not touched
    assert (await two.request("GET", "/api/v1/users/me", token=other_device)).status == 200


async def test_a_deactivated_user_is_refused_on_the_other_node(
    two_caching_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_caching_nodes
    _, root = await one.create_user("root", admin=True)
    alice_id, alice = await one.create_user("alice")
    assert (await two.request("GET", "/api/v1/users/me", token=alice)).status == 200
    resp = await one.request(
        "PATCH", f"/api/v1/users/{alice_id}", token=root, json={"is_active": False}
    )
    assert resp.status == 200, resp.body

    async def refused() -> bool:
        return (await two.request("GET", "/api/v1/users/me", token=alice)).status == 401

    await within(WITHIN, refused)


async def test_a_removed_chat_member_cannot_post_or_read_on_the_other_node(
    two_caching_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_caching_nodes
    team = await team_chat_read_on_two(one, two)
    alice_id, alice, bob_id, bob = team.alice_id, team.alice, team.bob_id, team.bob
    chat_id, history = team.chat_id, team.history
    removed = await one.request(
        "DELETE", f"/api/v1/im/chats/{chat_id}/members/{bob_id}", token=alice
    )
    assert removed.status == 204

    async def shut_out() -> bool:
        post = await two.request(
            "POST", "/api/v1/im/messages", token=bob, json={"chat_id": chat_id, "text": "x"}
        )
        read = await two.request("GET", history, token=bob)
        return post.status == 404 and read.status == 404

    await within(WITHIN, shut_out)
    assert (await two.request("GET", "/api/v1/im/counters", token=bob)).body["chats"] == {}
    # alice, still a member, is not refused by what node two learnt
    resp = await two.request(
        "POST", "/api/v1/im/messages", token=alice, json={"chat_id": chat_id, "text": "ok"}
    )
    assert resp.status == 201 and alice_id


async def test_crm_numbers_changed_on_one_node_are_where_a_connect_starts_on_the_other(
    two_caching_nodes: tuple[HubHarness, HubHarness],
) -> None:
    """A connect starts from the stored CRM numbers, which each node keeps a copy of: a
    change written on one node must not leave the other starting connections from the old
    numbers (its pushes are differences from exactly those)."""
    one, two = two_caching_nodes
    mary_id, mary = await one.create_user("mary")
    first = await two.connect(mary)  # never counted: node two counts her, then keeps them
    await first.wait_for("counters.changed")
    await two.services.crm.counters.settled()
    await first.close()
    again = await two.connect(mary)
    await again.wait_for("snapshot")
    assert again.crm_counters().get("deal", {}).get("idle", 0) == 0
    await again.close()
    assert mary_id in two.services.crm.counters._docs  # what the next connect starts from

    resp = await one.request("POST", "/api/v1/crm/deals", token=mary, json={"title": "Big"})
    assert resp.status == 201, resp.body
    await one.services.crm.counters.settled()

    async def starts_from_the_new_numbers() -> bool:
        client = await two.connect(mary)
        try:
            snapshot = (await client.wait_for("snapshot"))[0]
        finally:
            await client.close()
        deal = snapshot["counters"]["crm"].get("deal", {})
        return bool(deal.get("idle") == 1)

    await within(WITHIN, starts_from_the_new_numbers)


async def counters_at_connect(node: HubHarness, token: str, kind: str) -> dict[str, Any]:
    """The ``kind`` counters in the snapshot a connect to ``node`` gets (the connection is
    closed once its caught-up counters have come too)."""
    client = await node.connect(token)
    try:
        found: dict[str, Any] = (await client.wait_for("snapshot"))[0]["counters"][kind]
        await client.wait_for("counters.changed")
    finally:
        await client.close()
    return found


async def test_unread_numbers_changed_on_one_node_are_where_a_connect_starts_on_the_other(
    two_caching_nodes: tuple[HubHarness, HubHarness],
) -> None:
    """Node two keeps a user's unread numbers as counted for a connect, for the user's next
    connects. A message sent and a read mark made on node one reach it only through the
    bus: its next connect must start from the new numbers, not the kept ones."""
    one, two = two_caching_nodes
    alice_id, alice = await one.create_user("alice")
    _, bob = await one.create_user("bob")
    sent = await one.request(
        "POST", "/api/v1/im/messages", token=bob, json={"to": [alice_id], "text": "one"}
    )
    assert sent.status == 201, sent.body
    chat_id = sent.body["messages"][0]["chat_id"]

    assert await counters_at_connect(two, alice, "im") == {"unread": 1, "chats": {chat_id: 1}}
    assert alice_id in two.services.im._counted  # what node two's next connect starts from
    again = await one.request(
        "POST", "/api/v1/im/messages", token=bob, json={"to": [alice_id], "text": "two"}
    )
    assert again.status == 201, again.body

    async def two_unread() -> bool:
        return await counters_at_connect(two, alice, "im") == {"unread": 2, "chats": {chat_id: 2}}

    await within(WITHIN, two_unread)
    read = await one.request(
        "POST",
        f"/api/v1/im/chats/{chat_id}/read",
        token=alice,
        json={"up_to": again.body["messages"][0]["id"]},
    )
    assert read.status == 200, read.body

    async def none_unread() -> bool:
        return await counters_at_connect(two, alice, "im") == {"unread": 0, "chats": {}}

    await within(WITHIN, none_unread)


async def test_task_counters_changed_on_one_node_are_where_a_connect_starts_on_the_other(
    two_caching_nodes: tuple[HubHarness, HubHarness],
) -> None:
    """Node two keeps a user's task counters as read for a connect (stored) or pushed. A task
    change made on node one stores them there and pushes them through the bus: node two's
    next connect starts from the new numbers, and an older push arriving late changes
    nothing there."""
    one, two = two_caching_nodes
    _, alice = await one.create_user("alice")
    bob_id, bob = await one.create_user("bob")

    # kept on node two now
    assert (await counters_at_connect(two, bob, "tasks"))["responsible"]["new"] == 0
    created = await one.request(
        "POST", "/api/v1/tasks", token=alice, json={"title": "T", "responsible_ids": [bob_id]}
    )
    assert created.status == 201, created.body

    async def one_new() -> bool:
        return bool((await counters_at_connect(two, bob, "tasks"))["responsible"]["new"] == 1)

    await within(WITHIN, one_new)
    # a push of an older version (late, from another node) leaves node two's copy as it is
    kept = two.services.tasks.stored_counters._held.get(bob_id)
    assert kept is not None and kept.counters["responsible"]["new"] == 1
    older = {role: dict(values) for role, values in kept.counters.items()}
    older["responsible"]["new"] = 0
    await two.services.bus.publish_ephemeral(
        EphemeralEvent(
            "counters.changed",
            {"tasks": older},
            (f"user:{bob_id}",),
            private={"tasks": {"version": kept.version - 1, "next_at": None}},
        )
    )
    await asyncio.sleep(0.1)
    assert await two.services.tasks.counters(bob_id) == kept.counters


# Entries past their time to live are still served while a background read refreshes them
# (cache_stale_seconds). An invalidation must reach those too: after the change and the bus's
# second, the very first request on the other node is refused, with no stale answer first.
STALE_TTL = 0.1


@pytest.fixture
async def two_stale_nodes(
    settings: Settings, store: Store, redis_server: RedisServer
) -> AsyncIterator[tuple[HubHarness, HubHarness]]:
    shared = settings.model_copy(
        update={
            "redis_url": SecretStr(redis_server.url),
            "cache_ttl_seconds": STALE_TTL,
            "cache_stale_seconds": 600.0,
        }
    )
    async with start_hub(shared, store) as one, start_hub(shared, store) as two:
        yield one, two


async def test_a_revoked_token_held_stale_is_refused_at_once_on_the_other_node(
    two_stale_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_stale_nodes
    await one.create_user("alice")
    token = await one.login("alice")
    assert (await two.request("GET", "/api/v1/users/me", token=token)).status == 200
    await asyncio.sleep(3 * STALE_TTL)  # node two's token and user entries are stale now
    assert (await two.request("GET", "/api/v1/users/me", token=token)).status == 200
    await asyncio.sleep(3 * STALE_TTL)  # and again, after their refresh
    assert (await one.request("POST", "/api/v1/auth/logout", token=token)).status == 204
    await asyncio.sleep(WITHIN)
    assert (await two.request("GET", "/api/v1/users/me", token=token)).status == 401


async def test_a_deactivated_user_held_stale_is_refused_at_once_on_the_other_node(
    two_stale_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_stale_nodes
    _, root = await one.create_user("root", admin=True)
    alice_id, alice = await one.create_user("alice")
    assert (await two.request("GET", "/api/v1/users/me", token=alice)).status == 200
    await asyncio.sleep(3 * STALE_TTL)
    resp = await one.request(
        "PATCH", f"/api/v1/users/{alice_id}", token=root, json={"is_active": False}
    )
    assert resp.status == 200, resp.body
    await asyncio.sleep(WITHIN)
    assert (await two.request("GET", "/api/v1/users/me", token=alice)).status == 401


async def test_a_removed_chat_member_held_stale_is_shut_out_at_once_on_the_other_node(
    two_stale_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_stale_nodes
    team = await team_chat_read_on_two(one, two)
    alice_id, alice, bob_id, bob = team.alice_id, team.alice, team.bob_id, team.bob
    chat_id, history = team.chat_id, team.history
    await asyncio.sleep(3 * STALE_TTL)  # bob's memberships and the chat are stale there now
    removed = await one.request(
        "DELETE", f"/api/v1/im/chats/{chat_id}/members/{bob_id}", token=alice
    )
    assert removed.status == 204
    await asyncio.sleep(WITHIN)
    counters = await two.request("GET", "/api/v1/im/counters", token=bob)
    assert counters.body["chats"] == {}
    post = await two.request(
        "POST", "/api/v1/im/messages", token=bob, json={"chat_id": chat_id, "text": "x"}
    )
    assert post.status == 404, post.body
    assert (await two.request("GET", history, token=bob)).status == 404
    assert alice_id
