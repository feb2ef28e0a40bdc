"""BatchLoad: reads of one kind asked for while one is under way are made together as the
next read, a caller never gets what a read started before it asked had found, and a
cancelled or failed read reaches its callers as it would have reached each alone."""

from __future__ import annotations

import asyncio
import functools

import pytest

from server.caching import BatchLoad, Cache


class Rows:
    """The data behind the loader: each read's keys, and a gate to hold a read open."""

    def __init__(self) -> None:
        self.values = {"a": 1, "b": 2, "c": 3, "d": 4}
        self.reads: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def load_many(self, keys: list[str]) -> dict[str, int]:
        self.reads.append(list(keys))
        seen = dict(self.values)  # what the query sees: the data at its start
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {k: seen[k] for k in keys if k in seen}


async def test_callers_of_the_same_moment_share_one_read() -> None:
    rows = Rows()
    loader = BatchLoad(rows.load_many)
    found = await asyncio.gather(*(loader.load(k) for k in ("a", "b", "x", "a")))
    assert found == [1, 2, None, 1]
    assert rows.reads == [["a", "b", "x"]]


async def test_callers_during_a_read_gather_into_the_next_one() -> None:
    rows = Rows()
    rows.gate = asyncio.Event()
    loader = BatchLoad(rows.load_many)
    first = asyncio.create_task(loader.load("a"))
    await asyncio.sleep(0.01)
    assert rows.reads == [["a"]]
    later = [asyncio.create_task(loader.load(k)) for k in ("b", "c")]
    many = asyncio.create_task(loader.load_many(["c", "d"]))
    await asyncio.sleep(0.01)
    assert rows.reads == [["a"]]  # one read at a time: the others wait for it to end
    rows.gate.set()
    assert await first == 1
    assert [await t for t in later] == [2, 3]
    assert await many == {"c": 3, "d": 4}
    assert rows.reads == [["a"], ["b", "c", "d"]]


async def test_a_caller_never_joins_a_read_that_started_before_it_asked() -> None:
    """A cache entry invalidated while a read of it is under way is read again by its next
    caller: that read must see the change, not share the older read."""
    rows = Rows()
    rows.gate = asyncio.Event()
    loader = BatchLoad(rows.load_many)
    before = asyncio.create_task(loader.load("a"))
    await asyncio.sleep(0.01)
    rows.values["a"] = 10  # the change, after the first read began
    after = asyncio.create_task(loader.load("a"))
    await asyncio.sleep(0.01)
    rows.gate.set()
    assert await before == 1
    assert await after == 10
    assert rows.reads == [["a"], ["a"]]


async def test_an_invalidation_during_a_shared_read_reaches_the_cache() -> None:
    """Through a Cache: the entry invalidated while the batch read it is not kept, and the
    next caller reads the changed value."""
    rows = Rows()
    rows.gate = asyncio.Event()
    loader = BatchLoad(rows.load_many)
    cache: Cache[str, int] = Cache(10, 60.0)
    reading = [
        asyncio.create_task(cache.get_or_load(k, functools.partial(loader.load, k))) for k in "ab"
    ]
    await asyncio.sleep(0.01)
    rows.values["a"] = 10
    cache.invalidate("a")  # the bus told of the change while the read was under way
    rows.gate.set()
    assert [await t for t in reading] == [1, 2]
    assert cache.get("a") is None and cache.get("b") == 2
    assert await cache.get_or_load("a", lambda: loader.load("a")) == 10


async def test_a_cancelled_reader_leaves_its_batch_to_the_others() -> None:
    rows = Rows()
    rows.gate = asyncio.Event()
    loader = BatchLoad(rows.load_many)
    busy = asyncio.create_task(loader.load("a"))
    await asyncio.sleep(0.01)
    leader = asyncio.create_task(loader.load("b"))  # opens the next batch
    await asyncio.sleep(0)
    follower = asyncio.create_task(loader.load("c"))  # joins it
    await asyncio.sleep(0.01)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    rows.gate.set()
    assert await busy == 1
    assert await follower == 3  # read again, by itself
    assert rows.reads[0] == ["a"] and rows.reads[-1] == ["c"]


async def test_a_cancelled_waiter_does_not_cancel_the_read() -> None:
    rows = Rows()
    rows.gate = asyncio.Event()
    loader = BatchLoad(rows.load_many)
    leader = asyncio.create_task(loader.load("a"))
    waiter = asyncio.create_task(loader.load("b"))  # the same moment: one batch
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    rows.gate.set()
    assert await leader == 1
    assert rows.reads == [["a", "b"]]


async def test_a_failed_read_fails_each_of_its_callers_and_the_next_read_goes_on() -> None:
    rows = Rows()
    rows.gate = asyncio.Event()
    rows.fail = RuntimeError("database away")
    loader = BatchLoad(rows.load_many)
    reading = [asyncio.create_task(loader.load(k)) for k in "ab"]
    await asyncio.sleep(0.01)
    rows.gate.set()
    for task in reading:
        with pytest.raises(RuntimeError):
            await task
    rows.fail = None
    assert await loader.load("c") == 3


async def test_a_full_batch_takes_no_more_keys() -> None:
    """The embedded database checks each document found against every value of the
    ``$in``: past ``max_keys`` the callers open the next batch, read after it."""
    rows = Rows()
    loader = BatchLoad(rows.load_many, max_keys=2)
    found = await asyncio.gather(*(loader.load(k) for k in "abcd"))
    assert found == [1, 2, 3, 4]
    assert rows.reads == [["a", "b"], ["c", "d"]]


async def test_at_once_reads_that_many_batches_side_by_side() -> None:
    """``at_once``: a connect burst's membership and chat reads (dozens of documents per
    user) need not wait each for the one before; the next batch still gathers the keys
    asked for while those are under way, and a key asked for after a read began is not
    served by it."""
    rows = Rows()
    rows.gate = asyncio.Event()
    loader = BatchLoad(rows.load_many, max_keys=1, at_once=2)
    first = [asyncio.create_task(loader.load(k)) for k in ("a", "b", "c")]
    await asyncio.sleep(0.01)
    assert rows.reads == [["a"], ["b"]]  # two under way, the third waits for one of them
    rows.values["a"] = 10
    again = asyncio.create_task(loader.load("a"))  # asked after the first read began
    rows.gate.set()
    assert [await t for t in first] == [1, 2, 3]
    assert await again == 10
    assert rows.reads == [["a"], ["b"], ["c"], ["a"]]
