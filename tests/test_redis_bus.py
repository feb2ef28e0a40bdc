"""The event bus across nodes, on a real redis-server: two nodes (two buses, two stream logs)
share one database; every event reaches every node's subscribers once and in order, also
when Redis loses messages or restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from server.events.models import EphemeralEvent, Event
from server.events.redis_bus import RedisBus
from server.events.streams import StreamLog
from server.store.database import Store
from tests.redis_server import RedisServer


@dataclass
class Node:
    bus: RedisBus
    streams: StreamLog
    seen: dict[str, list[int]] = field(default_factory=dict)
    ephemeral: list[str] = field(default_factory=list)

    async def on_event(self, event: Event) -> None:
        self.seen.setdefault(event.stream, []).append(event.seq)

    async def on_ephemeral(self, event: EphemeralEvent) -> None:
        self.ephemeral.append(event.type)


async def make_node(store: Store, url: str, name: str, alive_seconds: float = 3.0) -> Node:
    bus = RedisBus(url, name, alive_seconds=alive_seconds)
    node = Node(bus, StreamLog(store, bus, retention_seconds=3600))
    bus.attach(node.streams)
    bus.subscribe(node.on_event)
    bus.subscribe_ephemeral(node.on_ephemeral)
    await bus.start()
    return node


@pytest.fixture
async def nodes(store: Store, redis_server: RedisServer) -> AsyncIterator[tuple[Node, Node]]:
    a = await make_node(store, redis_server.url, "a")
    b = await make_node(store, redis_server.url, "b")
    try:
        yield a, b
    finally:
        for node in (a, b):
            await node.streams.close()
            await node.bus.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def test_events_from_both_nodes_reach_both_once_and_in_order(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    # both nodes append to one stream at once: seqs are decided by the database, races
    # included, and live copies cross in Redis in any order
    await asyncio.gather(
        *(a.streams.append("chat:1", "m", {"n": i}) for i in range(60)),
        *(b.streams.append("chat:1", "m", {"n": i}) for i in range(60)),
        *(a.streams.append("user:x", "m", {"n": i}) for i in range(20)),
    )
    expected = list(range(1, 121))
    await until(lambda: a.seen.get("chat:1") == expected and b.seen.get("chat:1") == expected)
    await until(lambda: b.seen.get("user:x") == list(range(1, 21)))
    await asyncio.sleep(0.2)  # late copies, if any, would land now
    assert a.seen["chat:1"] == expected and b.seen["chat:1"] == expected
    assert a.seen["user:x"] == b.seen["user:x"] == list(range(1, 21))

    await a.bus.publish_ephemeral(EphemeralEvent("presence.changed", {}, ("user:x",)))
    await until(lambda: b.ephemeral == ["presence.changed"])
    assert a.ephemeral == ["presence.changed"]  # its own, once, not echoed back


async def test_a_lost_message_is_pulled_from_the_database(
    nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = nodes
    await a.streams.append("s", "m", {})
    await until(lambda: b.seen.get("s") == [1])
    original = a.bus._send
    dropped = 0

    async def lossy(channel: str, payload: bytes) -> None:
        nonlocal dropped
        if dropped < 2:
            dropped += 1  # as if Redis lost them on the way
            return
        await original(channel, payload)

    monkeypatch.setattr(a.bus, "_send", lossy)
    await a.streams.append("s", "m", {})  # 2 and 3 never travel
    await a.streams.append("s", "m", {})
    await asyncio.sleep(0.2)
    assert b.seen["s"] == [1]
    # a reader (the hub catching a client up) read through 3: node b pulls 2 and 3 now
    await b.bus.caught_up("s", 3)
    assert b.seen["s"] == [1, 2, 3]
    # the next live event after a gap brings the gap along
    monkeypatch.setattr(a.bus, "_send", lossy)
    dropped = 0
    for _ in range(3):
        await a.streams.append("s", "m", {})  # 4 and 5 lost, 6 travels
    await until(lambda: b.seen["s"] == [1, 2, 3, 4, 5, 6])


async def test_a_reader_behind_the_live_position_learns_where_live_delivery_starts(
    nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = nodes
    monkeypatch.setattr(a.bus, "_send", _never_sent)  # b hears of "n" only from its readers
    for _ in range(3):
        await a.streams.append("n", "m", {})
    # a first reader on b read "n" through 3: b starts there, without passing 1..3 on
    assert await b.bus.caught_up("n", 3) == 3
    assert "n" not in b.seen
    # a second reader had read only through 1: it is told live delivery starts after 3
    assert await b.bus.caught_up("n", 1) == 3
    # a reader ahead of what b passed on makes b pull the difference, and starts there
    await a.streams.append("n", "m", {})
    assert await b.bus.caught_up("n", 4) == 4
    assert b.seen["n"] == [4]


async def _never_sent(channel: str, payload: bytes) -> None:
    return None


async def test_redis_restarting_under_traffic_loses_nothing(
    nodes: tuple[Node, Node], redis_server: RedisServer
) -> None:
    a, b = nodes
    for _ in range(5):
        await a.streams.append("s", "m", {})
    await until(lambda: b.seen.get("s") == [1, 2, 3, 4, 5])
    await a.bus.caught_up("t", 0)  # a follows "t" (a client of its subscribed from the start)

    redis_server.stop()
    await until(lambda: not a.bus.connected and not b.bus.connected)
    for _ in range(5):  # accepted while Redis is down: stored, kept for publishing
        await a.streams.append("s", "m", {})
        await b.streams.append("t", "m", {})
    assert a.seen["s"] == list(range(1, 11))  # a node's own subscribers never wait for Redis
    redis_server.start()

    await until(lambda: b.seen["s"] == list(range(1, 11)), timeout=20)
    await until(lambda: a.seen.get("t") == list(range(1, 6)), timeout=20)
    await a.streams.append("s", "m", {})
    await until(lambda: b.seen["s"] == list(range(1, 12)))
    await asyncio.sleep(0.2)
    assert b.seen["s"] == list(range(1, 12)) and a.seen["t"] == list(range(1, 6))


async def test_what_a_dead_node_stored_but_never_published_reaches_the_others(
    store: Store, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node killed between storing an event and publishing it: on a quiet stream no later
    event reveals the gap, so the survivors notice the node gone and read what it stored."""
    survivor = await make_node(store, redis_server.url, "survivor", alive_seconds=0.6)
    doomed = await make_node(store, redis_server.url, "doomed", alive_seconds=0.6)
    try:
        await doomed.streams.append("quiet", "m", {})
        await until(lambda: survivor.seen.get("quiet") == [1])

        async def killed_before_publishing(channel: str, payload: bytes) -> None:
            return

        monkeypatch.setattr(doomed.bus, "_send", killed_before_publishing)
        await doomed.streams.append("quiet", "m", {})  # stored; the process dies right here
        for task in (doomed.bus._subscription._task, doomed.bus._watcher):  # no goodbye
            assert task is not None
            task.cancel()
        await asyncio.sleep(0.3)
        assert survivor.seen["quiet"] == [1]  # nothing told it yet
        await until(lambda: survivor.seen["quiet"] == [1, 2], timeout=5)
        await asyncio.sleep(0.8)
        assert survivor.seen["quiet"] == [1, 2]
    finally:
        await doomed.streams.close()
        await doomed.bus._redis.aclose()  # its tasks are gone already
        await survivor.streams.close()
        await survivor.bus.close()
