"""A persisted scheduler for time-driven changes (deadlines passing).

Jobs are documents in ``schedule`` with a ``due_at``. A due job is claimed by deleting it
(``find_one_and_delete``): exactly one node wins it, so each deadline fires once however many
nodes run the loop, and a restart loses nothing (the job is still in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from server.store.database import Store, utcnow

log = logging.getLogger(__name__)

MAX_SLEEP = timedelta(seconds=1)  # also catches jobs written by other nodes or a CLI


class Scheduler:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._handlers: dict[str, Callable[[str], Awaitable[None]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def handle(self, kind: str, handler: Callable[[str], Awaitable[None]]) -> None:
        self._handlers[kind] = handler

    def wake(self, due: datetime | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run_due(self) -> int:
        """Fire every job that is due; returns how many fired here."""
        fired = 0
        schedule = self._store["schedule"]
        while True:
            job = await schedule.find_one_and_delete(
                {"due_at": {"$lte": utcnow()}}, sort=[("due_at", 1)]
            )
            if job is None:
                return fired
            handler = self._handlers.get(job.get("kind", ""))
            if handler is None:
                log.warning("no handler for scheduled job %s", job["_id"])
                continue
            try:
                await handler(job["task_id"])
                fired += 1
            except Exception:
                log.exception("scheduled job %s failed", job["_id"])

    async def _run(self) -> None:
        while True:
            try:
                await self.run_due()
                upcoming = await self._store["schedule"].find_one({}, sort=[("due_at", 1)])
                delay = MAX_SLEEP
                if upcoming is not None:
                    delay = min(MAX_SLEEP, max(timedelta(0), upcoming["due_at"] - utcnow()))
            except Exception:
                log.exception("scheduler round failed")
                delay = MAX_SLEEP
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay.total_seconds())
