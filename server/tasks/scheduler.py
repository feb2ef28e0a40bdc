"""A persisted scheduler for time-driven changes (deadlines passing).

Jobs are documents in ``schedule`` with a ``due_at``. A due job is claimed with a lease
(``claimed_until``, set atomically): one node wins it, runs it and then deletes it. A node
that dies or fails mid-job leaves the lease to expire, and the job runs again: a deadline is
never lost, and handlers are written to be safe to repeat. A restart loses nothing.

An idle round (nothing due) costs one indexed read, the first job by ``due_at`` among those
due before the next round (``MAX_SLEEP``), sent in the gap after a batch of events when one
comes within ``POLLER_GAP_WAIT`` (``background.Gap``): the embedded database serves one command
at a time, and this poll, once a second, used to land beside messages' inserts as two commands
in series. Bounded by the round, the read costs the same whatever the number of jobs: the
embedded database fetches every document of a sorted read before it applies the limit (the
first of all jobs: 0.5 / 1.6 / 14.7 ms with 10 / 100 / 1,000 jobs scheduled; the first of
those due within a second: 0.44 / 0.44 / 0.53 ms, 2026-12-07), a cost that grew with the
company's open deadlines and delayed any message whose inserts came behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReturnDocument

from server.background import POLLER_GAP_WAIT, Gap, no_gap, raise_if_stopping, stop
from server.store.database import Store, utcnow

log = logging.getLogger(__name__)

MAX_SLEEP = timedelta(seconds=1)  # also catches jobs written by other nodes or a CLI
LEASE = timedelta(seconds=30)


class Scheduler:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._handlers: dict[str, Callable[[str], Awaitable[None]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Set by the node that writes events (``StreamLog.after_batch``); at once otherwise.
        self.gap: Gap = no_gap

    def handle(self, kind: str, handler: Callable[[str], Awaitable[None]]) -> None:
        self._handlers[kind] = handler

    def wake(self, due: datetime | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        await stop(self._task)

    async def run_due(self) -> int:
        """Fire every job that is due; returns how many fired here."""
        fired = 0
        schedule = self._store["schedule"]
        while True:
            now = utcnow()
            lease = now + LEASE
            job = await schedule.find_one_and_update(
                {
                    "due_at": {"$lte": now},
                    "$or": [{"claimed_until": None}, {"claimed_until": {"$lt": now}}],
                },
                {"$set": {"claimed_until": lease}},
                sort=[("due_at", 1)],
                return_document=ReturnDocument.AFTER,
            )
            if job is None:
                return fired
            handler = self._handlers.get(job.get("kind", ""))
            if handler is None:
                log.warning("no handler for scheduled job %s", job["_id"])
                await schedule.delete_one({"_id": job["_id"], "claimed_until": lease})
                continue
            try:
                await handler(job["task_id"])
            except Exception:
                log.exception("scheduled job %s failed; it runs again after its lease", job["_id"])
                continue
            # Only our own claim: a job rescheduled meanwhile (new due_at) stays.
            await schedule.delete_one(
                {"_id": job["_id"], "claimed_until": lease, "due_at": job["due_at"]}
            )
            fired += 1

    async def _first(self) -> dict[str, Any] | None:
        """The job due first (claimed or not), if it is due before the next round: one read
        along the ``due_at`` index. A later job is the next round's to find (it is not slept
        past: a round sleeps ``MAX_SLEEP`` at most), and leaving it out keeps the read from
        fetching every job scheduled (see the module's doc)."""
        return await self._store["schedule"].find_one(
            {"due_at": {"$lte": utcnow() + MAX_SLEEP}},
            {"due_at": True, "claimed_until": True},
            sort=[("due_at", 1)],
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.gap(POLLER_GAP_WAIT)
                first = await self._first()
                if first is not None and _ready_at(first) <= utcnow():
                    await self.run_due()
                    first = await self._first()
                delay = MAX_SLEEP
                if first is not None:
                    delay = min(MAX_SLEEP, max(timedelta(0), _ready_at(first) - utcnow()))
            except Exception:
                raise_if_stopping()
                log.exception("scheduler round failed")
                delay = MAX_SLEEP
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay.total_seconds())


def _ready_at(job: dict[str, Any]) -> datetime:
    """When ``job`` can be claimed: at its due time, or once a lease on it runs out (a job
    another node is running, or one whose handler failed, is not tried again before)."""
    due: datetime = job["due_at"]
    claimed: datetime | None = job.get("claimed_until")
    return due if claimed is None or claimed < due else claimed
