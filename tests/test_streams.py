"""Streams on the real database: gap-free seq under concurrency, pruning, replay reads."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from pymongo import monitoring

from server.events.bus import InProcessBus
from server.events.models import Event
from server.events.streams import StreamLog
from server.store.database import Store
from tests.harness import stored_at


def stream_log(store: Store, bus: InProcessBus | None = None) -> StreamLog:
    return StreamLog(store, bus or InProcessBus(), retention_seconds=3600)


async def stored_seqs(store: Store, stream: str) -> list[int]:
    cursor = store.events.find({"stream": stream}, sort=[("seq", 1)])
    return [doc["seq"] async for doc in cursor]


async def test_twenty_concurrent_producers_keep_seq_gap_free(store: Store) -> None:
    published: list[Event] = []
    bus = InProcessBus()

    async def record(event: Event) -> None:
        published.append(event)

    bus.subscribe(record)
    log = stream_log(store, bus)

    async def producer(p: int) -> list[int]:
        got = []
        for n in range(25):
            event = await log.append("test:one", "test.tick", {"producer": p, "n": n})
            got.append(event.seq)
        return got

    results = await asyncio.gather(*(producer(p) for p in range(20)))
    assert await stored_seqs(store, "test:one") == list(range(1, 501))
    for got in results:  # each producer's own events keep its order
        assert got == sorted(got)
    # published exactly once each, in seq order
    assert [e.seq for e in published] == list(range(1, 501))
    await log.close()


async def test_two_writers_on_one_stream_stay_gap_free(store: Store) -> None:
    """Two logs stand for two hub nodes: the loser of each race re-reads the head and retries."""
    first, second = stream_log(store), stream_log(store)

    async def producer(log: StreamLog, p: int) -> None:
        for n in range(30):
            await log.append("test:shared", "test.tick", {"p": p, "n": n})

    await asyncio.gather(*(producer(log, p) for p in range(5) for log in (first, second)))
    assert await stored_seqs(store, "test:shared") == list(range(1, 301))
    docs = [d async for d in store.events.find({"stream": "test:shared"})]
    for p in range(5):  # nothing lost, nothing doubled: each (producer, n) once per writer
        assert sorted(d["data"]["n"] for d in docs if d["data"]["p"] == p) == sorted(
            list(range(30)) * 2
        )


class InsertCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.inserts = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            self.inserts += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_concurrent_appends_are_batched(store: Store) -> None:
    counter = InsertCounter()
    monitored = Store(store.url, store.db.name)
    monitored.client = type(store.client)(store.url, event_listeners=[counter], tz_aware=True)
    monitored.db = monitored.client[store.db.name]
    log = stream_log(monitored)
    try:
        await asyncio.gather(*(log.append("test:batch", "test.tick", {"n": n}) for n in range(200)))
    finally:
        await monitored.client.close()
    assert await stored_seqs(store, "test:batch") == list(range(1, 201))
    assert counter.inserts < 20, counter.inserts


async def test_prune_keeps_the_head_and_marks_the_cut(store: Store) -> None:
    log = stream_log(store)
    for n in range(4):
        await log.append("test:old", "test.tick", {"n": n})
    old = datetime.now(UTC) - timedelta(hours=2)
    await stored_at(store, {"stream": "test:old"}, old)
    assert await log.prune() == 4
    assert await stored_seqs(store, "test:old") == []
    # a fresh log (a restarted node) continues after the pruned head, never from 1 again
    fresh = stream_log(store)
    assert await fresh.last_seq("test:old") == 4
    assert (await fresh.append("test:old", "test.tick", {"n": 4})).seq == 5
    assert await fresh.position_status("test:old", 2) == "resync"
    assert await fresh.position_status("test:old", 4) == "ok"
    assert await fresh.position_status("test:old", 6) == "resync"
    assert [e.seq for e in await fresh.read_since("test:old", 4) or []] == [5]


async def test_replay_beyond_the_limit_asks_for_resync(store: Store) -> None:
    log = StreamLog(store, InProcessBus(), retention_seconds=3600, replay_limit=10)
    for n in range(11):
        await log.append("test:long", "test.tick", {"n": n})
    assert await log.read_since("test:long", 0) is None
    missed = await log.read_since("test:long", 1)
    assert missed is not None and [e.seq for e in missed] == list(range(2, 12))


async def test_a_failing_subscriber_does_not_stop_delivery(store: Store) -> None:
    bus = InProcessBus()
    seen: list[int] = []

    async def broken(event: Event) -> None:
        raise RuntimeError("boom")

    async def working(event: Event) -> None:
        seen.append(event.seq)

    bus.subscribe(broken)
    bus.subscribe(working)
    log = stream_log(store, bus)
    assert (await log.append("test:bus", "test.tick", {})).seq == 1
    assert seen == [1]


async def test_a_lagging_head_is_repaired_without_a_gap(store: Store) -> None:
    """A crash between an insert and the head update leaves the head behind: the next
    writer loses a race against the stored events, recounts, and carries on gap-free."""
    log = stream_log(store)
    for n in range(5):
        await log.append("test:lag", "test.tick", {"n": n})
    await store.streams.update_one({"_id": "test:lag"}, {"$set": {"head": 2}})
    fresh = stream_log(store)  # a restarted node: no cached head
    assert (await fresh.append("test:lag", "test.tick", {"n": 5})).seq == 6
    assert await stored_seqs(store, "test:lag") == list(range(1, 7))
    assert await fresh.last_seq("test:lag") == 6


class CommandCounter(monitoring.CommandListener):
    """Counts the commands sent to the database, by name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counts[event.command_name] = self.counts.get(event.command_name, 0) + 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def monitored_store(store: Store, listener: monitoring.CommandListener) -> Store:
    monitored = Store(store.url, store.db.name)
    monitored.client = type(store.client)(store.url, event_listeners=[listener], tz_aware=True)
    monitored.db = monitored.client[store.db.name]
    return monitored


async def test_one_batch_spans_streams(store: Store) -> None:
    """Appends to many streams at once share insert_many round trips (group commit), each
    stream still numbered from 1 without a gap."""
    counter = CommandCounter()
    monitored = monitored_store(store, counter)
    log = stream_log(monitored)
    try:
        events = await asyncio.gather(
            *(log.append(f"test:s{n % 40}", "test.tick", {"n": n}) for n in range(200))
        )
        await log.settled()
    finally:
        await monitored.client.close()
    assert counter.counts["insert"] <= 3, counter.counts
    for n in range(40):
        assert await stored_seqs(store, f"test:s{n}") == [1, 2, 3, 4, 5]
    assert sorted(e.seq for e in events if e.stream == "test:s7") == [1, 2, 3, 4, 5]


async def test_exact_heads_when_head_documents_lag(store: Store) -> None:
    """A node that died before writing its heads leaves the head documents behind: the bus's
    recovery (heads) and last_seq still find the stored events."""
    log = stream_log(store)
    for n in range(3):
        await log.append("test:behind", "test.tick", {"n": n})
    await log.settled()
    await store.streams.update_one({"_id": "test:behind"}, {"$set": {"head": 1}})
    fresh = stream_log(store)
    assert await fresh.heads(["test:behind", "test:none"]) == {"test:behind": 3}
    assert await fresh.last_seq("test:behind") == 3
    assert await fresh.replay("test:behind", 3) == []
    assert [e.seq for e in await fresh.replay("test:behind", 1) or []] == [2, 3]
    assert await fresh.replay("test:behind", 4) is None


async def test_replay_at_the_known_head_reads_nothing(store: Store) -> None:
    counter = CommandCounter()
    monitored = monitored_store(store, counter)
    log = stream_log(monitored)
    try:
        for n in range(3):
            await log.append("test:quiet", "test.tick", {"n": n})
        before = counter.counts.get("find", 0)
        assert await log.replay("test:quiet", 3) == []
        assert await log.heads_of(["test:quiet"]) == {"test:quiet": 3}
        assert counter.counts.get("find", 0) == before
        await log.settled()
    finally:
        await monitored.client.close()


async def test_events_carry_no_index_that_no_query_needs_and_old_databases_lose_it(
    store: Store,
) -> None:
    """Each index entry costs the embedded database about as much as the rest of an insert, and
    every message's event is one. ``message_id`` (``data.message.id``) served only a retried
    send's look for its first attempt's event, which now reads the chat's stream on
    ``stream_seq``: a database from before has it dropped at start. ``ts`` likewise: the
    events of a time range (the bus's recovery, pruning) are a range of their ``_id``s."""
    await store.events.create_index("data.message.id", sparse=True, name="message_id")
    await store.events.create_index("ts", name="ts")
    await store.ensure_indexes()
    assert sorted(await store.events.index_information()) == ["_id_", "stream_seq"]
