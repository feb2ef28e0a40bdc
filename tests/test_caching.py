"""Cache: an entry past its time to live is served while one background read refreshes it
(``stale_seconds``), and an invalidation still acts at once, even on a stale entry or while
its refresh is under way."""

from __future__ import annotations

import asyncio

from server.caching import Cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """The data behind the cache: counts reads, and can hold one until released."""

    def __init__(self, value: str | None = "v1") -> None:
        self.value = value
        self.reads = 0
        self.gate: asyncio.Event | None = None

    async def load(self) -> str | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.value

    async def load_many(self, keys: list[str]) -> dict[str, str]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return {} if self.value is None else {key: f"{self.value}:{key}" for key in keys}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_stale_entry_is_served_at_once_and_refreshed_once_in_the_background() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    assert await cache.get_or_load("k", source.load) == "v1"
    source.value = "v2"
    clock.now += 12  # past the time to live, within the grace
    source.gate = asyncio.Event()
    # served without waiting for the database, however many ask; one read under way
    assert await cache.get_or_load("k", source.load) == "v1"
    assert await cache.get_or_load("k", source.load) == "v1"
    await settle()
    assert source.reads == 2 and cache.stale_hits == 2
    source.gate.set()
    await settle()
    assert await cache.get_or_load("k", source.load) == "v2"
    assert source.reads == 2  # the refreshed entry has a new time to live
    await cache.close()


async def test_past_the_grace_the_caller_reads_in_series() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=5.0, clock=clock)
    await cache.get_or_load("k", source.load)
    source.value = "v2"
    clock.now += 16
    assert await cache.get_or_load("k", source.load) == "v2"
    assert cache.stale_hits == 0


async def test_without_grace_an_expired_entry_is_read_again_in_series() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, clock=clock)
    await cache.get_or_load("k", source.load)
    source.value = "v2"
    clock.now += 11
    assert await cache.get_or_load("k", source.load) == "v2"


async def test_an_invalidated_stale_entry_is_not_served() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    await cache.get_or_load("k", source.load)
    clock.now += 12
    source.value = "v2"
    cache.invalidate("k")
    assert await cache.get_or_load("k", source.load) == "v2"


async def test_a_stale_entry_told_of_a_change_it_did_not_get_is_not_served() -> None:
    """A change applied in place to fresh entries only (``get``, then ``changed``): the stale
    entry missed it, and is read again rather than served."""
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    await cache.get_or_load("k", source.load)
    clock.now += 12
    source.value = "v2"
    assert cache.get("k") is None  # nothing fresh to update in place
    cache.changed("k")
    assert await cache.get_or_load("k", source.load) == "v2"


async def test_an_invalidation_during_the_refresh_is_not_undone_by_it() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    await cache.get_or_load("k", source.load)
    clock.now += 12
    source.gate = asyncio.Event()
    assert await cache.get_or_load("k", source.load) == "v1"  # the refresh reads "v1"...
    await settle()
    source.value = "v2"
    cache.invalidate("k")  # ...and the data changes before it ends
    source.gate.set()
    await settle()
    assert await cache.get_or_load("k", source.load) == "v2"


async def test_a_stale_entry_whose_data_is_gone_is_dropped_by_its_refresh() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    await cache.get_or_load("k", source.load)
    clock.now += 12
    source.value = None
    assert await cache.get_or_load("k", source.load) == "v1"
    await settle()
    assert await cache.get_or_load("k", source.load) is None
    assert len(cache) == 0


async def test_values_include_stale_entries_so_an_invalidation_by_value_reaches_them() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    await cache.get_or_load("k", source.load)
    clock.now += 12
    assert cache.values() == [("k", "v1")]
    clock.now += 10
    assert cache.values() == []


async def test_many_keys_stale_ones_served_and_refreshed_in_one_read() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    assert await cache.get_or_load_many(["a", "b"], source.load_many) == {
        "a": "v1:a",
        "b": "v1:b",
    }
    clock.now += 12
    source.value = "v2"
    source.gate = asyncio.Event()
    # "c" is unknown: read in series (and "a", "b" served stale beside it)
    task = asyncio.create_task(cache.get_or_load_many(["a", "b", "c"], source.load_many))
    await settle()
    source.gate.set()
    assert await task == {"a": "v1:a", "b": "v1:b", "c": "v2:c"}
    await settle()
    assert source.reads == 3  # the first load, the refresh of a and b, the read of c
    assert await cache.get_or_load_many(["a", "b", "c"], source.load_many) == {
        "a": "v2:a",
        "b": "v2:b",
        "c": "v2:c",
    }
    assert source.reads == 3


async def test_close_stops_a_refresh_under_way() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    await cache.get_or_load("k", source.load)
    clock.now += 12
    source.gate = asyncio.Event()
    source.value = "v2"
    await cache.get_or_load("k", source.load)
    await settle()
    await asyncio.wait_for(cache.close(), 5.0)
    source.gate.set()
    await settle()
    assert cache.values() == [("k", "v1")]  # the refresh ended without keeping "v2"


async def test_a_refresh_that_read_the_same_value_leaves_the_version() -> None:
    """What was computed from the cache at one version (the unread numbers kept per user)
    holds while the version does not move: a refresh that read nothing new must not move
    it, one that read a change must."""
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    first = await cache.get_or_load("k", source.load)
    version = cache.version
    clock.now += 12
    assert await cache.get_or_load("k", source.load) == "v1"  # stale: refreshed behind
    await settle()
    assert source.reads == 2 and cache.version == version
    assert cache.get("k") is first  # the same value, with a new time to live
    source.value = "v2"
    clock.now += 12
    assert await cache.get_or_load("k", source.load) == "v1"
    await settle()
    assert cache.version > version
    assert cache.get("k") == "v2"
    await cache.close()


async def test_a_refresh_of_many_moves_the_version_only_for_a_change() -> None:
    clock, source = Clock(), Source()
    cache: Cache[str, str] = Cache(10, 10.0, stale_seconds=10.0, clock=clock)
    await cache.get_or_load_many(["a", "b"], source.load_many)
    version = cache.version
    clock.now += 12
    await cache.get_or_load_many(["a", "b"], source.load_many)
    await settle()
    assert source.reads == 2 and cache.version == version
    source.value = "v2"
    clock.now += 12
    await cache.get_or_load_many(["a", "b"], source.load_many)
    await settle()
    assert cache.version > version
    assert cache.get("a") == "v2:a"
    await cache.close()


async def test_callers_missing_the_same_key_share_one_load() -> None:
    """A connect burst found the colleagues list missing: each connect read every user."""
    source = Source()
    source.gate = asyncio.Event()
    cache: Cache[str, str] = Cache(10, 10.0)
    callers = [asyncio.create_task(cache.get_or_load("k", source.load)) for _ in range(5)]
    await asyncio.sleep(0.01)
    source.gate.set()
    assert [await c for c in callers] == ["v1"] * 5
    assert source.reads == 1
    assert cache.get("k") == "v1"


async def test_a_caller_after_an_invalidation_does_not_share_the_load_under_way() -> None:
    source = Source()
    source.gate = asyncio.Event()
    cache: Cache[str, str] = Cache(10, 10.0)
    before = asyncio.create_task(cache.get_or_load("k", source.load))
    await asyncio.sleep(0.01)
    source.value = "v2"
    cache.invalidate("k")  # the change came while the first load was under way
    source.gate.set()
    after = asyncio.create_task(cache.get_or_load("k", source.load))
    await before
    assert await after == "v2"
    assert source.reads == 2  # its own load, begun after the invalidation
    assert cache.get("k") == "v2"


async def test_a_waiter_loads_itself_when_the_caller_it_waited_for_is_cancelled() -> None:
    source = Source()
    source.gate = asyncio.Event()
    cache: Cache[str, str] = Cache(10, 10.0)
    first = asyncio.create_task(cache.get_or_load("k", source.load))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(cache.get_or_load("k", source.load))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    source.gate.set()
    assert await waiter == "v1"
    assert first.cancelled()
    assert source.reads == 2


class Rows:
    """Many keys' data behind the cache: each read's keys, a gate to hold reads open."""

    def __init__(self) -> None:
        self.version = "v1"
        self.reads: list[list[str]] = []
        self.gate = asyncio.Event()

    async def load_many(self, keys: list[str]) -> dict[str, str]:
        self.reads.append(sorted(keys))
        seen = self.version  # what the query sees: the data at its start
        await self.gate.wait()
        return {key: f"{seen}:{key}" for key in keys}


async def test_callers_missing_the_same_keys_of_many_share_their_load() -> None:
    """Two first connects of one burst share their dialog: with history a first step read
    1,734 chat documents for at most 1,000 chats."""
    rows = Rows()
    cache: Cache[str, str] = Cache(10, 10.0)
    first = asyncio.create_task(cache.get_or_load_many(["a", "b"], rows.load_many))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(cache.get_or_load_many(["b", "c"], rows.load_many))
    await asyncio.sleep(0.01)
    rows.gate.set()
    assert await first == {"a": "v1:a", "b": "v1:b"}
    assert await second == {"b": "v1:b", "c": "v1:c"}
    assert rows.reads == [["a", "b"], ["c"]]  # "b" read once
    assert cache.get("b") == "v1:b"


async def test_a_caller_of_many_after_an_invalidation_does_not_share_the_load_under_way() -> None:
    rows = Rows()
    cache: Cache[str, str] = Cache(10, 10.0)
    before = asyncio.create_task(cache.get_or_load_many(["a", "b"], rows.load_many))
    await asyncio.sleep(0.01)
    rows.version = "v2"
    cache.invalidate("b")  # a change of "b" while the first load was under way
    after = asyncio.create_task(cache.get_or_load_many(["a", "b"], rows.load_many))
    await asyncio.sleep(0.01)
    rows.gate.set()
    assert await before == {"a": "v1:a", "b": "v1:b"}
    assert await after == {"a": "v1:a", "b": "v2:b"}  # "a" shared, "b" read after its change
    assert rows.reads == [["a", "b"], ["b"]]
    assert cache.get("b") == "v2:b"


async def test_a_waiter_of_many_loads_itself_when_the_caller_it_waited_for_is_cancelled() -> None:
    rows = Rows()
    cache: Cache[str, str] = Cache(10, 10.0)
    first = asyncio.create_task(cache.get_or_load_many(["a"], rows.load_many))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(cache.get_or_load_many(["a", "b"], rows.load_many))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    rows.gate.set()
    assert await waiter == {"a": "v1:a", "b": "v1:b"}
    assert first.cancelled()
    assert rows.reads == [["a"], ["b"], ["a"]]
    assert cache.get("a") == "v1:a"
