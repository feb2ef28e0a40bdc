"""The gap after a group-committed batch: where the node's other database work waits.

The embedded database serves one command at a time, so a poller's read or a bookkeeping
write sent while a batch of messages or events is on its way delays that batch's answer.
The messenger's writer and the stream log each tell their waiters when a batch has been
answered; a waiter that comes while the writer is idle goes at once if a batch was answered
a moment ago (it is then in that gap), else it waits for the next batch, at most ``at_most``
seconds (a quiet node has no batch to wait for).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How recently a batch must have been answered for an idle writer's gap to count as now.
JUST_ANSWERED = 0.005


class BatchGaps:
    """The waiters of one writer for the gap after its next batch."""

    def __init__(self, busy: Callable[[], bool]) -> None:
        self._busy = busy  # whether the writer has a batch on its way or queued
        self._waiters: list[asyncio.Future[None]] = []
        self._answered_at = -1.0  # loop time the last batch was answered

    async def after_batch(self, at_most: float) -> None:
        """Return once the batch being written is answered (or the next one, when none is),
        or after ``at_most`` seconds, whichever comes first.
        Right after a batch (this turn of the loop, or a moment ago) it returns at once."""
        loop = asyncio.get_running_loop()
        if not self._busy() and loop.time() - self._answered_at < JUST_ANSWERED:
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), at_most)
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def answered(self) -> None:
        """A batch was answered: its waiters go now."""
        self._answered_at = asyncio.get_running_loop().time()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
