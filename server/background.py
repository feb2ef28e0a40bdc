"""Owned background tasks: stopped for sure on shutdown, their failures logged, not lost.

A loop that retries on errors must not outlive its cancellation. A library may turn the
``CancelledError`` thrown into it into an error of its own (redis-py's connection clean-up was
caught doing so: a node's peer watcher then kept sleeping and retrying, and whoever awaited it
after ``cancel()`` waited for ever). So loops check ``stopping()`` when they catch an error, and
``stop()`` cancels again a task that is still running, and gives up on one that will not end
rather than hold a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

STOP_ATTEMPTS = 3
STOP_WAIT_SECONDS = 2.0

# A wait for a quiet moment of the database (``StreamLog.after_batch``): returns right after
# the batch of events being written is published (or the next one), or after at most the
# seconds given. The embedded database serves one command at a time, so a poller's query that
# lands beside a message's inserts delays that message; sent in the gap after a batch, it
# delays nobody at a light rate.
Gap = Callable[[float], Awaitable[None]]
# How long a periodic poller waits for such a gap before it goes anyway: added to its period
# at most, never more (a poller's bound, such as revocation within a second, keeps this
# margin). 0.2 s: at the fan-out's light rate (5 messages a second) a gap comes within it;
# with 0.1 s about half the polls went without one (probe of 22:16, trace of each command).
POLLER_GAP_WAIT = 0.2


async def no_gap(_at_most: float) -> None:
    """The ``Gap`` of a process without a writer (the CLI, unit tests): go at once."""


def stopping() -> bool:
    """Whether the running task has been asked to stop (even if the request was swallowed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_stopping() -> None:
    """For the error handler of a retrying loop: a cancellation disguised as an error ends it."""
    if stopping():
        raise asyncio.CancelledError


async def stop(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait for them to end; report any that failed or will not end."""
    owned = [task for task in tasks if task is not None]
    running = {task for task in owned if not task.done()}
    for attempt in range(STOP_ATTEMPTS):
        if not running:
            break
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=STOP_WAIT_SECONDS)
        for task in running:
            log.warning(
                "%s still running %.0f s after being cancelled (attempt %d of %d)",
                task.get_name(),
                STOP_WAIT_SECONDS,
                attempt + 1,
                STOP_ATTEMPTS,
            )
    for task in running:
        log.error("%s would not stop; left behind", task.get_name())
    for task in owned:
        if task.done() and not task.cancelled() and (failure := task.exception()) is not None:
            log.error("%s had failed", task.get_name(), exc_info=failure)


class SideTasks:
    """Tasks an owner starts beside its own work (a publication, a re-check, an answer to a
    duplicate): held until they end (the event loop keeps only a weak reference), a failure
    logged as ``what`` on the owner's logger, and all of them stopped by ``stop()``."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._what = what
        self._log = logger
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Awaitable[Any], name: str | None = None) -> asyncio.Task[None]:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("%s failed", self._what)

        task = asyncio.create_task(run(), name=name or self._what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __iter__(self) -> Iterator[asyncio.Task[None]]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float | None = None) -> None:
        """Let the running ones finish (up to ``timeout``), without cancelling them."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def stop(self) -> None:
        await stop(*self._tasks)
