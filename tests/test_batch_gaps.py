"""BatchGaps: the node's other database work waits for the gap after a writer's batch."""

from __future__ import annotations

import asyncio

from server.events.gaps import JUST_ANSWERED, BatchGaps


async def test_an_idle_writer_just_answered_lets_the_waiter_go_at_once() -> None:
    gaps = BatchGaps(lambda: False)
    gaps.answered()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await gaps.after_batch(5.0)
    assert loop.time() - started < 1.0


async def test_a_waiter_goes_when_the_next_batch_is_answered() -> None:
    busy = True
    gaps = BatchGaps(lambda: busy)
    gaps.answered()  # a batch a moment ago, but another is on its way: wait for that one
    waiter = asyncio.create_task(gaps.after_batch(5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    busy = False
    gaps.answered()
    await asyncio.wait_for(waiter, 1.0)


async def test_an_idle_writer_long_after_its_last_batch_waits_for_the_next() -> None:
    gaps = BatchGaps(lambda: False)
    gaps.answered()
    await asyncio.sleep(JUST_ANSWERED * 4)
    waiter = asyncio.create_task(gaps.after_batch(5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    gaps.answered()
    await asyncio.wait_for(waiter, 1.0)


async def test_with_no_batch_the_waiter_goes_after_at_most() -> None:
    gaps = BatchGaps(lambda: True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await gaps.after_batch(0.1)
    assert 0.09 <= loop.time() - started < 2.0
    assert gaps._waiters == []  # a waiter that timed out is not left behind
