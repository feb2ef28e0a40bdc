"""``flush_follows``: the promise that a journaled write follows belongs to one task.

Writes made under it skip their own journal flush (``Store.for_write``, ``GroupCommit``), so
it must not leak: a task started meanwhile (a shared writer, a background job) inherits the
context but makes no such promise, and the final write of the task is flushed again.
"""

from __future__ import annotations

import asyncio

from server.store.database import flush_follows, flushed_later


async def test_the_promise_holds_for_the_task_that_made_it_only() -> None:
    assert not flushed_later()
    with flush_follows():
        assert flushed_later()
        # A task started here inherits the context, not the promise.
        assert not await asyncio.create_task(_later())
        with flush_follows(False):  # the final, journaled write
            assert not flushed_later()
        assert flushed_later()
    assert not flushed_later()


async def _later() -> bool:
    return flushed_later()
