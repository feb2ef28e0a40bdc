"""Two hub nodes in one test process, sharing the database and a real redis-server, as they
would behind a load balancer: users on different nodes get each other's events, once and in
order, also across a Redis restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from slixmpp import JID

from tests.harness import HubHarness, SocketClient
from tests.redis_server import RedisServer
from tests.xmpp_client import xmpp_login


def texts(client: SocketClient) -> list[str]:
    return [e["data"]["message"]["text"] for e in client.of_type("im.message")]


async def send(hub: HubHarness, token: str, to: str, text: str) -> dict[str, Any]:
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=token, json={"to": [to], "text": text}
    )
    assert resp.status == 201, resp.body
    result: dict[str, Any] = resp.body
    return result


async def test_users_on_different_nodes_chat_and_see_counters(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    assert (await one.request("GET", "/readyz")).body["redis"] == "ok"
    alice_id, alice = await one.create_user("alice")
    bob_id, bob = await one.create_user("bob")
    alice_on_one = await one.connect(alice)
    bob_on_two = await two.connect(bob)
    bob_on_one = await one.connect(bob)
    for client in (alice_on_one, bob_on_two, bob_on_one):
        await client.wait_for("snapshot")

    # both write at once, through both nodes: one order, the same on every connection
    sent = [f"a{i}" for i in range(15)] + [f"b{i}" for i in range(15)]
    await asyncio.gather(
        *(send(one, alice, bob_id, f"a{i}") for i in range(15)),
        *(send(two, bob, alice_id, f"b{i}") for i in range(15)),
    )
    for client in (alice_on_one, bob_on_two, bob_on_one):
        await client.wait_until(lambda c=client: len(texts(c)) >= 30)  # type: ignore[misc]
    await asyncio.sleep(0.3)  # a duplicate would arrive by now
    orders = [texts(c) for c in (alice_on_one, bob_on_two, bob_on_one)]
    assert sorted(orders[0]) == sorted(sent)
    assert orders[0] == orders[1] == orders[2]
    seqs = [e["seq"] for e in bob_on_two.of_type("im.message")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # unread counters, pushed as live-only events by whichever node counted them, reach
    # bob's connections on both nodes alike: one more from alice, bob reads it through
    # node one, and the push that follows reaches his connection on node two too
    def im_pushes(client: SocketClient) -> list[Any]:
        return [c["im"] for c in client.of_type("counters.changed") if "im" in c]

    last = await send(one, alice, bob_id, "one more")
    before = {id(c): len(im_pushes(c)) for c in (bob_on_two, bob_on_one)}
    chat_id, message_id = last["messages"][0]["chat_id"], last["messages"][0]["id"]
    read = await one.request(
        "POST", f"/api/v1/im/chats/{chat_id}/read", token=bob, json={"up_to": message_id}
    )
    assert read.status == 200 and read.body["unread"] == 0, read.body

    def told_of_the_read(client: SocketClient) -> bool:
        pushes = im_pushes(client)  # a new push, not an earlier one with the same numbers
        return len(pushes) > before[id(client)] and pushes[-1] == read.body

    for client in (bob_on_two, bob_on_one):
        await client.wait_until(lambda c=client: told_of_the_read(c))  # type: ignore[misc]


async def test_two_connections_joining_a_new_chat_on_one_node_both_get_its_first_message(
    two_nodes: tuple[HubHarness, HubHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections of one node join a new chat whose first message another node stored.
    The one whose catch-up ends first tells the bus it read the message from the database,
    and the bus starts this node's live delivery after it (the live copy is a late copy). The
    other read the database before the message was stored: it must get the message all the
    same. (Found by the chat test above, in about 1 run in 10 under load; this test fixes the
    interleaving.)"""
    one, two = two_nodes
    alice_id, alice = await one.create_user("alice")
    _, bob = await two.create_user("bob")
    first, second = await one.connect(alice), await one.connect(alice)
    for client in (first, second):
        await client.wait_for("snapshot")
    hub, bus = one.services.hub, one.services.redis_bus
    assert bus is not None
    stored, second_caught_up = asyncio.Event(), asyncio.Event()
    real_replay, real_caught_up, real_accept = hub._streams.replay, bus.caught_up, bus._accept
    reads = 0

    async def replay(stream: str, after_seq: int) -> Any:
        nonlocal reads
        if not stream.startswith("chat:"):
            return await real_replay(stream, after_seq)
        reads += 1
        if reads == 1:
            # what a read made before the message was stored finds; it ends after the other's
            await second_caught_up.wait()
            return []
        await stored.wait()
        return await real_replay(stream, after_seq)

    async def caught_up(stream: str, seq: int) -> int:
        position = await real_caught_up(stream, seq)
        if stream.startswith("chat:") and seq > 0:
            second_caught_up.set()
        return position

    async def accept(event: Any) -> None:
        if event.stream.startswith("chat:"):
            await second_caught_up.wait()  # the live copy comes late
        await real_accept(event)

    monkeypatch.setattr(hub._streams, "replay", replay)
    monkeypatch.setattr(bus, "caught_up", caught_up)
    monkeypatch.setattr(bus, "_accept", accept)

    await send(two, bob, alice_id, "hello")
    stored.set()
    for client in (first, second):
        await client.wait_until(lambda c=client: texts(c) == ["hello"])  # type: ignore[misc]
    await asyncio.sleep(0.3)  # a duplicate would arrive by now
    assert texts(first) == texts(second) == ["hello"]


async def test_a_client_reconnecting_to_the_other_node_resumes_where_it_was(
    two_nodes: tuple[HubHarness, HubHarness], redis_server: RedisServer
) -> None:
    one, two = two_nodes
    alice_id, alice = await one.create_user("alice")
    bob_id, bob = await one.create_user("bob")
    bob_on_one = await one.connect(bob)
    await bob_on_one.wait_for("snapshot")
    await send(one, alice, bob_id, "first")
    await bob_on_one.wait_until(lambda: texts(bob_on_one) == ["first"])
    position = {e["stream"]: e["seq"] for e in bob_on_one.of_type("im.message")}
    await bob_on_one.close()  # node one "dies" for bob; he comes back on node two

    await send(one, alice, bob_id, "while away")
    bob_on_two = await two.connect(bob, since=position)
    await bob_on_two.wait_until(lambda: texts(bob_on_two) == ["while away"])

    # Redis goes away and comes back under traffic: nothing accepted is lost or doubled
    redis_server.stop()
    for i in range(5):
        await send(one, alice, bob_id, f"outage {i}")
    redis_server.start()
    expected = ["while away", *(f"outage {i}" for i in range(5))]
    await bob_on_two.wait_until(lambda: texts(bob_on_two) == expected, timeout=20)
    await send(one, alice, bob_id, "after")
    await bob_on_two.wait_until(lambda: texts(bob_on_two) == [*expected, "after"])
    assert alice_id


def statuses(observer: SocketClient, user_id: str) -> list[str]:
    return [c["status"] for c in observer.of_type("presence.changed") if c["user_id"] == user_id]


async def test_presence_spans_nodes_one_announcement_per_change(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    alice_id, alice = await one.create_user("alice")
    _, bob = await one.create_user("bob")
    watcher_on_one, watcher_on_two = await one.connect(bob), await two.connect(bob)
    for watcher in (watcher_on_one, watcher_on_two):
        watcher.keep_alive()
        await watcher.wait_for("snapshot")
    tab_on_one, tab_on_two = await one.connect(alice), await two.connect(alice)
    tab_on_one.keep_alive()
    tab_on_two.keep_alive()
    for watcher in (watcher_on_one, watcher_on_two):
        await watcher.wait_until(lambda w=watcher: statuses(w, alice_id) == ["online"])  # type: ignore[misc]
    # a snapshot made on node two knows alice is online through either node
    late = await two.connect(bob)
    (snapshot,) = await late.wait_for("snapshot")
    assert snapshot["presence"][alice_id] == "online"

    await tab_on_one.close()  # her tab on node two still counts
    await asyncio.sleep(1.0)  # longer than the grace period
    await tab_on_two.close()
    for watcher in (watcher_on_one, watcher_on_two):
        await watcher.wait_until(
            lambda w=watcher: statuses(w, alice_id) == ["online", "offline"]  # type: ignore[misc]
        )
    await asyncio.sleep(1.0)  # a second announcement, from the other node, would come by now
    assert statuses(watcher_on_one, alice_id) == ["online", "offline"]
    assert statuses(watcher_on_two, alice_id) == ["online", "offline"]
    assert alice


async def test_jabber_users_on_different_nodes_chat_and_see_presence(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    await one.create_user("alice")
    await one.create_user("bob")
    alice = await xmpp_login(one, "alice")  # Pidgin on node one
    bob = await xmpp_login(two, "bob")  # Gajim on node two
    domain = one.services.xmpp.domain  # type: ignore[union-attr]
    await bob.wait_for_condition(
        lambda: any(
            str(p["from"].bare) == f"alice@{domain}" and p["type"] != "unavailable"
            for p in bob.presences
        )
    )
    alice.send_message(mto=JID(f"bob@{domain}"), mbody="across nodes", mtype="chat")
    await bob.wait_for_condition(lambda: bob.bodies() == ["across nodes"])
    bob.send_message(mto=JID(f"alice@{domain}"), mbody="and back", mtype="chat")
    await alice.wait_for_condition(lambda: alice.bodies() == ["and back"])
    await asyncio.sleep(0.3)
    assert bob.bodies() == ["across nodes"] and alice.bodies() == ["and back"]
