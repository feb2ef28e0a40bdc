"""The unread counters of a connect: counted for the snapshot, and again once caught up on the
streams only when what they are computed from changed in between (a message stored after the
snapshot counted them, and before it read the heads, is in no replay: only the second count
brings it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tests.harness import HubHarness


async def send(hub: HubHarness, token: str, to: str, text: str) -> dict[str, Any]:
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=token, json={"to": [to], "text": text}
    )
    assert resp.status == 201, resp.body
    result: dict[str, Any] = resp.body
    return result


async def test_a_message_stored_while_the_snapshot_was_read_is_in_the_caught_up_counters(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    await send(hub, bob, alice_id, "first")
    warm = await hub.connect(alice)  # counted from the caches, not loading them meanwhile
    await warm.wait_for("counters.changed")
    streams = hub.services.streams
    real_heads_of = streams.heads_of
    sent: list[dict[str, Any]] = []

    async def heads_of(names: Sequence[str]) -> dict[str, int]:
        # The snapshot's counters are counted; its heads are not read yet.
        if not sent:
            sent.append(await send(hub, bob, alice_id, "second"))
        return await real_heads_of(names)

    monkeypatch.setattr(streams, "heads_of", heads_of)
    client = await hub.connect(alice)
    [snapshot] = await client.wait_for("snapshot")
    [caught_up] = await client.wait_for("counters.changed")
    chat_id = sent[0]["messages"][0]["chat_id"]
    assert snapshot["counters"]["im"] == {"unread": 1, "chats": {chat_id: 1}}
    # the message is under the snapshot's head: no replay brings it
    assert snapshot["streams"][f"chat:{chat_id}"] >= 2
    assert caught_up["im"] == {"unread": 2, "chats": {chat_id: 2}}


async def test_counters_that_did_not_change_are_not_counted_or_sent_again(
    hub: HubHarness,
) -> None:
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    sent = await send(hub, bob, alice_id, "hello")
    chat_id = sent["messages"][0]["chat_id"]
    warm = await hub.connect(alice)  # fills the caches the next connect counts from
    await warm.wait_for("counters.changed")
    im = hub.services.im
    counted = 0
    real_counters = im.counters

    async def counters(user_id: str) -> Any:
        nonlocal counted
        counted += 1
        return await real_counters(user_id)

    im.counters = counters  # type: ignore[method-assign]
    im._counted.clear()  # the snapshot counts (not from the first connect's count)
    try:
        client = await hub.connect(alice)
        [snapshot] = await client.wait_for("snapshot")
        [caught_up] = await client.wait_for("counters.changed")
    finally:
        del im.counters
    assert snapshot["counters"]["im"] == {"unread": 1, "chats": {chat_id: 1}}
    assert "im" not in caught_up and "tasks" in caught_up
    assert counted == 1


async def counting(hub: HubHarness) -> list[str]:
    """The users whose unread counters are counted from now on (over their chats)."""
    im = hub.services.im
    counted: list[str] = []
    real_counters = im.counters

    async def counters(user_id: str) -> Any:
        counted.append(user_id)
        return await real_counters(user_id)

    im.counters = counters  # type: ignore[method-assign]
    return counted


async def test_a_users_next_connects_take_the_counters_counted_for_the_first(
    hub: HubHarness,
) -> None:
    """Each of a user's connections (tabs, devices) counted the unread numbers over every
    chat again, although nothing they are made of had moved since the last count."""
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    chat_id = (await send(hub, bob, alice_id, "hello"))["messages"][0]["chat_id"]
    first = await hub.connect(alice)
    await first.wait_for("counters.changed")
    counted = await counting(hub)
    clients = [await hub.connect(alice) for _ in range(3)]
    for client in clients:
        [snapshot] = await client.wait_for("snapshot")
        await client.wait_for("counters.changed")
        assert snapshot["counters"]["im"] == {"unread": 1, "chats": {chat_id: 1}}
    assert counted == []


async def test_a_message_counts_again_for_the_next_connect(hub: HubHarness) -> None:
    """The kept count goes with any change of the chats or memberships it was made of: a new
    message, a read mark, a chat the user left."""
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    chat_id = (await send(hub, bob, alice_id, "hello"))["messages"][0]["chat_id"]
    first = await hub.connect(alice)
    await first.wait_for("counters.changed")
    counted = await counting(hub)
    second = await send(hub, bob, alice_id, "again")
    await first.wait_for("im.message")
    client = await hub.connect(alice)
    [snapshot] = await client.wait_for("snapshot")
    assert snapshot["counters"]["im"] == {"unread": 2, "chats": {chat_id: 2}}
    assert counted and counted[0] == alice_id

    # read up to the newest: the count after the read mark is zero
    read = await hub.request(
        "POST",
        f"/api/v1/im/chats/{chat_id}/read",
        token=alice,
        json={"up_to": second["messages"][0]["id"]},
    )
    assert read.status == 200, read.body
    later = await hub.connect(alice)
    [snapshot] = await later.wait_for("snapshot")
    assert snapshot["counters"]["im"] == {"unread": 0, "chats": {}}


async def test_a_connect_joins_the_chats_the_user_is_in_now_not_those_of_an_earlier_connect(
    hub: HubHarness,
) -> None:
    """The chat stream names are kept per user for the user's next connects (ImService.
    member_streams): a chat joined or left since must show in the next connect's streams."""
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    first = await hub.connect(alice)
    [before] = await first.wait_for("snapshot")
    assert set(before["streams"]) == {f"user:{alice_id}"}
    created = await hub.request(
        "POST", "/api/v1/im/chats", token=bob, json={"title": "t", "member_ids": [alice_id]}
    )
    assert created.status == 201, created.body
    chat_id = created.body["id"]
    joined = await hub.connect(alice)
    [after_join] = await joined.wait_for("snapshot")
    assert set(after_join["streams"]) == {f"user:{alice_id}", f"chat:{chat_id}"}
    again = await hub.connect(alice)  # the kept names, the same map
    [kept] = await again.wait_for("snapshot")
    assert set(kept["streams"]) == set(after_join["streams"])
    left = await hub.request(
        "DELETE", f"/api/v1/im/chats/{chat_id}/members/{alice_id}", token=alice
    )
    assert left.status == 204, left.body
    after = await hub.connect(alice)
    [after_leave] = await after.wait_for("snapshot")
    assert set(after_leave["streams"]) == {f"user:{alice_id}"}
