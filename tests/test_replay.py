"""The replay protocol: reconnect with `since`, get exactly what was missed, in order, then live."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.harness import HubHarness, SocketClient, stored_at


async def change_profile(hub: HubHarness, token: str, position: str) -> None:
    resp = await hub.request("PATCH", "/api/v1/users/me", token=token, json={"position": position})
    assert resp.status == 200, resp.body


def seqs(client: SocketClient, stream: str) -> list[int]:
    return [event["seq"] for event in client.stream_events(stream)]


async def test_reconnect_with_since_gets_missed_events_in_order_then_live(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    stream = f"user:{alice_id}"
    await change_profile(hub, alice, "before")
    first = await hub.connect(alice)
    [snapshot] = await first.wait_for("snapshot")
    position = snapshot["streams"][stream]
    assert position == 1
    await first.close()

    for n in range(50):
        await change_profile(hub, alice, f"position {n}")

    again = await hub.connect(alice, since={stream: position})
    await again.wait_until(lambda: len(again.stream_events(stream)) >= 50)
    missed = again.stream_events(stream)
    assert [e["seq"] for e in missed] == list(range(2, 52))
    assert [e["data"]["user"]["position"] for e in missed] == [f"position {n}" for n in range(50)]
    assert all(e["type"] == "user.updated" and e["stream"] == stream for e in missed)
    assert set(missed[0]) == {"stream", "seq", "type", "data", "ts"}
    # the snapshot comes first, before any replayed event
    assert again.events[0][0] == "snapshot"

    await change_profile(hub, alice, "live")
    await again.wait_until(lambda: len(again.stream_events(stream)) >= 51)
    await asyncio.sleep(0.2)  # a duplicate, if any were sent, would arrive by now
    assert seqs(again, stream) == list(range(2, 53))
    assert again.stream_events(stream)[-1]["data"]["user"]["position"] == "live"


async def test_events_produced_during_reconnect_are_neither_lost_nor_doubled(
    hub: HubHarness,
) -> None:
    alice_id, alice = await hub.create_user("alice")
    stream = f"user:{alice_id}"
    streams = hub.services.streams
    for n in range(20):
        await streams.append(stream, "test.tick", {"n": n})

    producing = True

    async def producer() -> None:
        n = 100
        while producing:
            await streams.append(stream, "test.tick", {"n": n})
            n += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(producer())
    clients = []
    for since in (0, 5, 19):
        await asyncio.sleep(0.02)
        clients.append((since, await hub.connect(alice, since={stream: since})))
    await asyncio.sleep(0.1)
    producing = False
    await task
    head = await streams.last_seq(stream)
    for since, client in clients:

        def caught_up(c: SocketClient = client) -> bool:
            got = seqs(c, stream)
            return bool(got) and got[-1] >= head

        await client.wait_until(caught_up)
        assert seqs(client, stream) == list(range(since + 1, head + 1)), since


async def test_position_older_than_retention_yields_resync(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    stream = f"user:{alice_id}"
    streams = hub.services.streams
    for n in range(5):
        await streams.append(stream, "test.tick", {"n": n})
    old = datetime.now(UTC) - streams.retention - timedelta(minutes=1)
    await stored_at(hub.services.store, {"stream": stream, "seq": {"$lte": 3}}, old)
    assert await streams.prune() == 3

    stale = await hub.connect(alice, since={stream: 1})
    [resync] = await stale.wait_for("resync")
    assert resync == {"stream": stream, "seq": 5}
    await streams.append(stream, "test.tick", {"n": 5})
    await stale.wait_until(lambda: seqs(stale, stream) == [6])

    fresh = await hub.connect(alice, since={stream: 3})
    await fresh.wait_until(lambda: seqs(fresh, stream) == [4, 5, 6])
    assert fresh.of_type("resync") == []

    from_the_future = await hub.connect(alice, since={stream: 99})
    [resync] = await from_the_future.wait_for("resync")
    assert resync["stream"] == stream


async def test_a_user_never_receives_another_users_events(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_stream = f"user:{bob_id}"
    await change_profile(hub, bob, "secret 1")

    # asking to replay bob's stream at connect is refused, and nothing of it is sent
    spy = await hub.connect(alice, since={bob_stream: 0})
    [refusal] = await spy.wait_for("subscribe_error")
    assert refusal == {"stream": bob_stream, "code": "forbidden"}
    # joining bob's room later is refused too, as is any stream kind with no rule
    assert await spy.call("subscribe", {"stream": bob_stream, "since": 0}) == {
        "ok": False,
        "error": "forbidden",
    }
    assert (await spy.call("subscribe", {"stream": "chat:anything"}))["error"] == "forbidden"
    assert (await spy.call("subscribe", {"stream": 42}))["error"] == "bad_request"

    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    await change_profile(hub, bob, "secret 2")
    await change_profile(hub, alice, "public")
    await bob_client.wait_until(lambda: len(bob_client.stream_events(bob_stream)) == 1)
    await spy.wait_until(lambda: len(spy.stream_events(f"user:{alice_id}")) == 1)
    await asyncio.sleep(0.2)
    assert spy.stream_events(bob_stream) == []
    assert not any("secret" in repr(data) for _name, data in spy.events)
    # own stream subscription is allowed (already joined: a no-op that reports the head)
    assert await spy.call("subscribe", {"stream": f"user:{alice_id}"}) == {"ok": True, "seq": 1}
