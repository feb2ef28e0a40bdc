"""Presence across nodes on a real redis-server: several PresenceServices (nodes) share one
RedisPresenceStore's state and talk over RedisBus; one database. A user's sources on different
nodes count together, every transition is announced once whichever nodes see it, the grace
period holds across nodes, and a node killed with SIGKILL leaves its users to go offline by
TTL, announced once by the survivors."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.events.models import EphemeralEvent
from server.events.redis_bus import RedisBus
from server.events.streams import user_stream
from server.presence.redis_store import RedisPresenceStore
from server.presence.rules import Manual, Source
from server.presence.service import PresenceService
from server.settings import Settings
from server.store.database import Store
from tests.redis_server import RedisServer

USERS = ("alice", "bob", "carol")
GRACE = 0.5


async def viewers_of(user_id: str) -> list[str]:
    return [u for u in USERS if u != user_id]


@dataclass
class Node:
    name: str
    bus: RedisBus
    presence: PresenceService
    events: list[EphemeralEvent] = field(default_factory=list)
    beating: list[asyncio.Task[None]] = field(default_factory=list)

    async def on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type == "presence.changed":
            self.events.append(event)

    def seen_by(self, viewer: str, user_id: str) -> list[str]:
        """What ``viewer`` was told of ``user_id``, through this node's bus."""
        return [
            e.data["status"]
            for e in self.events
            if e.data["user_id"] == user_id and user_stream(viewer) in e.streams
        ]

    def keep_alive(self, user_id: str, source_id: str) -> None:
        async def beat() -> None:
            while True:
                await asyncio.sleep(0.1)
                await self.presence.heartbeat(user_id, source_id, True)

        self.beating.append(asyncio.create_task(beat()))


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(store: Store, redis_server: RedisServer) -> AsyncIterator[MakeNode]:
    await store.users.insert_many([{"_id": u, "login": u} for u in USERS])
    made: list[Node] = []

    async def make(name: str, *, heartbeat_timeout: float = 30.0, sweeping: bool = False) -> Node:
        bus = RedisBus(redis_server.url, name)
        presence = PresenceService(
            store,
            RedisPresenceStore(redis_server.url, ttl_seconds=heartbeat_timeout),
            bus,
            viewers_of,
            grace_seconds=GRACE,
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
        node = Node(name, bus, presence)
        bus.subscribe_ephemeral(node.on_ephemeral)
        await bus.start()
        presence.start()
        await presence.ready()
        if not sweeping:  # sweeps run by hand, to see what each one does
            assert presence._sweeper is not None
            presence._sweeper.cancel()
        made.append(node)
        return node

    yield make
    for node in made:
        for task in node.beating:
            task.cancel()
        await asyncio.gather(*node.beating, return_exceptions=True)
        await node.presence.close()
        await node.bus.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def test_the_store_aggregates_sources_and_forgets_expired_ones(
    redis_server: RedisServer,
) -> None:
    a = RedisPresenceStore(redis_server.url, ttl_seconds=1.0)
    b = RedisPresenceStore(redis_server.url, ttl_seconds=1.0)
    a.start()
    b.start()
    await a.ready()
    await b.ready()
    try:
        now = time.monotonic()
        await a.put("alice", Source("tab", "socketio", True, now))
        await b.put("alice", Source("jabber", "xmpp", False, now - 5, dnd=True))
        got = {s.id: s for s in await a.sources("alice")}
        assert set(got) == {"tab", "jabber"}
        assert got["jabber"].transport == "xmpp" and got["jabber"].dnd and not got["jabber"].active
        assert abs(got["jabber"].last_heartbeat - (now - 5)) < 0.1  # as a local monotonic time
        assert await b.users() == ["alice"]

        assert await b.remove("alice", "jabber") is True
        assert await a.remove("alice", "jabber") is False
        await b.put("alice", Source("jabber", "xmpp", True, time.monotonic()))
        await asyncio.sleep(0.6)
        await a.put("alice", Source("tab", "socketio", True, time.monotonic()))  # refreshed
        await asyncio.sleep(0.6)  # "jabber" has run out, "tab" has not
        assert [s.id for s in await b.sources("alice")] == ["tab"]
        assert await b.remove("alice", "jabber") is False
        await asyncio.sleep(0.6)
        assert await a.sources("alice") == [] and await a.users() == []

        # what colleagues were told: one compare-and-set wins, every copy follows
        assert await a.swap_published("alice", "offline", "online") is True
        assert await b.swap_published("alice", "offline", "online") is False
        await until(lambda: b.published() == {"alice": "online"})
        await b.put("alice", Source("tab", "socketio", True, time.monotonic()))
        assert await a.swap_published("alice", "online", "offline", only_if_gone=True) is False
        assert await b.remove("alice", "tab") is True
        assert await a.swap_published("alice", "online", "offline", only_if_gone=True) is True
        await until(lambda: b.published() == {} and a.published() == {})

        # the manual state: one cached value, replaced only from what it was
        dnd = Manual("dnd", datetime.now(UTC) + timedelta(hours=1))
        assert await a.keep_manual("alice", dnd, if_missing=True) == dnd
        assert await b.keep_manual("alice", Manual(), if_missing=True) == dnd
        assert await b.replace_manual("alice", Manual(), Manual("away")) is False
        assert await b.replace_manual("alice", dnd, Manual()) is True
        assert await a.manual("alice") == Manual()

        # the offline mark: the first to see the last source go says when
        t0 = datetime.now(UTC)
        assert await a.mark_offline("alice", t0) == (t0, True)
        assert await b.mark_offline("alice", t0 + timedelta(seconds=1)) == (t0, False)
        assert await b.offline_since("alice") == t0
        await a.clear_offline("alice")
        assert await b.offline_since("alice") is None
    finally:
        await a.close()
        await b.close()


async def test_sources_on_two_nodes_count_as_one_user(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.presence.connected("bob", "bob-tab", "socketio")
    await asyncio.gather(
        a.presence.connected("alice", "alice-a", "socketio"),
        b.presence.connected("alice", "alice-b", "socketio"),
    )
    await until(lambda: a.seen_by("bob", "alice") == ["online"] == b.seen_by("bob", "alice"))
    assert {s.id for s in await a.presence.sources_of("alice")} == {"alice-a", "alice-b"}

    # carol is online only through b: a snapshot made on a shows her
    await b.presence.connected("carol", "carol-b", "xmpp", active=False)
    await until(lambda: a.presence.published().get("carol") == "away")
    assert a.presence.published() == b.presence.published()
    assert (await a.presence.view("bob", "carol"))["status"] == "away"
    assert await a.presence.online_user_ids() == {"alice", "bob", "carol"}

    # the sweeps of both nodes find nothing to change
    await asyncio.gather(a.presence.sweep(), b.presence.sweep())
    await asyncio.sleep(0.3)  # a second announcement, if any, would have landed
    assert a.seen_by("bob", "alice") == ["online"] == b.seen_by("bob", "alice")
    assert a.seen_by("bob", "carol") == ["away"] == b.seen_by("bob", "carol")


async def test_the_last_source_closing_on_another_node_goes_offline_once_after_grace(
    make_node: MakeNode, store: Store
) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.presence.connected("bob", "bob-tab", "socketio")
    await a.presence.connected("alice", "alice-a", "socketio")
    await b.presence.connected("alice", "alice-b", "socketio")
    await until(lambda: b.seen_by("bob", "alice") == ["online"])

    await a.presence.disconnected("alice", "alice-a")
    await asyncio.sleep(GRACE + 0.3)
    assert a.seen_by("bob", "alice") == ["online"]  # still on b

    await b.presence.disconnected("alice", "alice-b")
    gone = time.monotonic()
    await asyncio.sleep(0.1)
    # meanwhile node a's sweep notices alice has no source left, and waits for the grace too
    await asyncio.gather(a.presence.sweep(), b.presence.sweep())
    assert a.seen_by("bob", "alice") == ["online"]  # within the grace period
    assert "alice" in a.presence.published()
    await until(lambda: a.seen_by("bob", "alice") == ["online", "offline"])
    assert GRACE - 0.05 <= time.monotonic() - gone < GRACE + 0.5
    await asyncio.sleep(GRACE + 0.3)  # both grace tasks are over
    await asyncio.gather(a.presence.sweep(), b.presence.sweep())
    assert a.seen_by("bob", "alice") == ["online", "offline"] == b.seen_by("bob", "alice")
    assert "alice" not in a.presence.published() and "alice" not in b.presence.published()

    view_a, view_b = await a.presence.view("bob", "alice"), await b.presence.view("bob", "alice")
    assert view_a == view_b and view_a["status"] == "offline" and view_a["last_seen"]
    stored = await store.users.find_one({"_id": "alice"})
    assert stored is not None and stored["last_seen"] is not None


async def test_a_reconnect_on_another_node_within_grace_is_no_flap(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.presence.connected("bob", "bob-tab", "socketio")
    await b.presence.connected("alice", "alice-b", "socketio")
    await until(lambda: a.seen_by("bob", "alice") == ["online"])

    await b.presence.disconnected("alice", "alice-b")  # b's grace task starts
    await asyncio.sleep(0.2)
    await a.presence.connected("alice", "alice-a", "socketio")  # back, through a
    await asyncio.sleep(0.2)
    await a.presence.disconnected("alice", "alice-a")  # and gone again: a fresh grace
    gone = time.monotonic()
    await until(lambda: a.seen_by("bob", "alice") == ["online", "offline"])
    # b's older grace task did not cut the second one short
    assert time.monotonic() - gone >= GRACE - 0.05
    await asyncio.sleep(GRACE)
    assert a.seen_by("bob", "alice") == ["online", "offline"] == b.seen_by("bob", "alice")

    await b.presence.connected("alice", "alice-b2", "socketio")
    await asyncio.sleep(0.1)
    await b.presence.disconnected("alice", "alice-b2")
    await asyncio.sleep(0.1)
    await a.presence.connected("alice", "alice-a2", "socketio")
    await asyncio.sleep(GRACE + 0.3)
    assert a.seen_by("bob", "alice") == ["online", "offline", "online"]


async def test_manual_status_set_through_one_node_holds_on_the_other(
    make_node: MakeNode, store: Store
) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.presence.connected("bob", "bob-tab", "socketio")
    await b.presence.connected("alice", "alice-b", "socketio")
    await until(lambda: a.seen_by("bob", "alice") == ["online"])

    until_later = datetime.now(UTC) + timedelta(hours=1)
    await a.presence.set_manual("alice", "dnd", until_later, False)
    await until(lambda: b.seen_by("bob", "alice") == ["online", "dnd"])
    own = await b.presence.own_view("alice")
    assert own["status"] == "dnd" and own["manual"] == "dnd"
    await until(lambda: b.presence.published().get("alice") == "dnd")

    # b decides with the manual state set through a: going idle and back changes nothing
    await b.presence.heartbeat("alice", "alice-b", False)
    await b.presence.heartbeat("alice", "alice-b", True)
    assert (await b.presence.view("bob", "alice"))["status"] == "dnd"

    # it lapses once, though both nodes sweep
    await a.presence.set_manual("alice", "dnd", datetime.now(UTC) + timedelta(seconds=0.3), False)
    await asyncio.sleep(0.4)
    before = len(a.events)
    await asyncio.gather(a.presence.sweep(), b.presence.sweep())
    await asyncio.sleep(0.3)
    lapsed = [(e.streams, e.data["status"], e.data.get("manual")) for e in a.events[before:]]
    assert lapsed == [
        ((user_stream("bob"),), "online", None),
        ((user_stream("alice"),), "online", None),
    ]
    assert a.seen_by("bob", "alice") == ["online", "dnd", "online"] == b.seen_by("bob", "alice")
    stored = await store.users.find_one({"_id": "alice"})
    assert stored is not None and stored["presence"]["status"] is None

    # invisible, set through b: a's view of alice is offline at once
    await b.presence.set_manual("alice", None, None, True)
    await until(lambda: a.seen_by("bob", "alice")[-1] == "offline")
    assert (await a.presence.view("bob", "alice"))["status"] == "offline"
    assert "alice" not in a.presence.published()


KILLED_NODE = """
import asyncio, sys
from server.events.redis_bus import RedisBus
from server.presence.redis_store import RedisPresenceStore
from server.presence.service import PresenceService
from server.store.database import Store

async def main(mongo_url, database, redis_url, timeout, grace):
    bus = RedisBus(redis_url, "doomed")
    await bus.start()
    async def viewers_of(user_id):
        return ["bob", "carol"]
    presence = PresenceService(
        Store(mongo_url, database), RedisPresenceStore(redis_url, ttl_seconds=float(timeout)),
        bus, viewers_of, grace_seconds=float(grace), heartbeat_timeout_seconds=float(timeout),
    )
    presence.start()
    await presence.connected("alice", "alice-doomed", "socketio")
    print("ready", flush=True)
    while True:  # alive and well until killed
        await asyncio.sleep(0.1)
        await presence.heartbeat("alice", "alice-doomed", True)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_killed_node_s_users_go_offline_once_through_the_survivors(
    make_node: MakeNode, redis_server: RedisServer, settings: Settings, tmp_path: Path
) -> None:
    timeout = 1.0
    a = await make_node("a", heartbeat_timeout=timeout, sweeping=True)
    c = await make_node("c", heartbeat_timeout=timeout, sweeping=True)
    await a.presence.connected("bob", "bob-tab", "socketio")
    a.keep_alive("bob", "bob-tab")
    assert settings.mongodb_url is not None
    with open(tmp_path / "doomed.log", "wb") as log:
        doomed = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            KILLED_NODE,
            settings.mongodb_url.get_secret_value(),
            settings.mongodb_database,
            redis_server.url,
            str(timeout),
            str(GRACE),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    try:
        assert doomed.stdout is not None
        line = await asyncio.wait_for(doomed.stdout.readline(), 30)
        assert line.strip() == b"ready", (tmp_path / "doomed.log").read_text()
        await until(lambda: a.seen_by("bob", "alice") == ["online"] == c.seen_by("bob", "alice"))
        assert a.presence.published().get("alice") == "online"
    finally:
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
    killed = time.monotonic()

    await asyncio.sleep(timeout / 2)
    assert a.seen_by("bob", "alice") == ["online"]  # its source has not run out yet
    await until(lambda: a.seen_by("bob", "alice") == ["online", "offline"], timeout=10)
    assert time.monotonic() - killed >= timeout + GRACE - 0.1
    await asyncio.sleep(GRACE + 2 * timeout)  # every survivor has swept and waited by now
    assert a.seen_by("bob", "alice") == ["online", "offline"] == c.seen_by("bob", "alice")
    assert "alice" not in a.presence.published() and "alice" not in c.presence.published()
    assert await a.presence.online_user_ids() == {"bob"}
    # bob, kept alive on a, never flapped
    assert [e.data["status"] for e in a.events if e.data["user_id"] == "bob"] == ["online"]


async def test_after_redis_loses_everything_heartbeats_and_a_sweep_restore_presence(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    a, b = await make_node("a"), await make_node("b")
    await a.presence.connected("bob", "bob-tab", "socketio")
    await a.presence.connected("alice", "alice-a", "xmpp", active=False)
    await until(lambda: b.presence.published() == {"alice": "away", "bob": "online"})

    redis_server.stop()
    redis_server.start()  # the same port, nothing kept
    await until(lambda: b.presence.published() == {})  # b re-read after reconnecting

    # each connection's next heartbeat brings its source back, the next sweep the statuses
    await a.presence.heartbeat("bob", "bob-tab", True)
    await a.presence.heartbeat("alice", "alice-a", False)
    assert await b.presence.online_user_ids() == {"alice", "bob"}
    await a.presence.sweep()
    await until(lambda: b.presence.published() == {"alice": "away", "bob": "online"})
