"""SharedLoad: callers asking at once share one load; an invalidation is not crossed."""

from __future__ import annotations

import asyncio

import pytest

from server.caching import SharedLoad


async def test_callers_at_once_share_one_load_and_later_ones_load_again() -> None:
    shared: SharedLoad[int] = SharedLoad()
    loads = 0
    gate = asyncio.Event()

    async def load() -> int:
        nonlocal loads
        loads += 1
        await gate.wait()
        return loads

    callers = [asyncio.create_task(shared.run(0, load)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*callers) == [1] * 50
    assert loads == 1
    assert await shared.run(0, load) == 2  # nothing under way: a new load


async def test_a_caller_after_an_invalidation_does_not_get_the_load_begun_before() -> None:
    shared: SharedLoad[str] = SharedLoad()
    gate = asyncio.Event()

    async def old() -> str:
        await gate.wait()
        return "before"

    async def new() -> str:
        return "after"

    first = asyncio.create_task(shared.run(1, old))
    await asyncio.sleep(0)
    assert await shared.run(2, new) == "after"  # generation 2: its own read
    gate.set()
    assert await first == "before"


async def test_a_failed_load_fails_its_waiters_and_the_next_caller_loads_again() -> None:
    shared: SharedLoad[int] = SharedLoad()
    gate = asyncio.Event()

    async def failing() -> int:
        await gate.wait()
        raise ConnectionError("database away")

    callers = [asyncio.create_task(shared.run(0, failing)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    for outcome in await asyncio.gather(*callers, return_exceptions=True):
        assert isinstance(outcome, ConnectionError)

    async def fine() -> int:
        return 7

    assert await shared.run(0, fine) == 7


async def test_the_loader_cancelled_leaves_a_waiter_to_load_and_a_cancelled_waiter_alone() -> None:
    shared: SharedLoad[int] = SharedLoad()
    gate = asyncio.Event()

    async def slow() -> int:
        await gate.wait()
        return 1

    loader = asyncio.create_task(shared.run(0, slow))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(shared.run(0, slow))
    quitter = asyncio.create_task(shared.run(0, slow))
    await asyncio.sleep(0)
    quitter.cancel()
    loader.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await waiter == 1  # it loaded itself
    with pytest.raises(asyncio.CancelledError):
        await loader
    with pytest.raises(asyncio.CancelledError):
        await quitter
