"""Leases of the mail bridge: a stored message being processed, an IMAP mailbox being
collected, an outgoing message being sent. Each names the node that holds it.

A lease is short and renewed while its work goes on, so the work of a node that died is taken
up by another within ``LEASE``, not minutes later. A node that stops cleanly gives its leases
back, so the next start takes them at once. And a node that runs on the embedded database is
the only one there can be (the embedded database belongs to one process, ``.lock``): every
lease it finds at start-up that is not its own was left by a process that died, and is taken
at once too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from server.background import raise_if_stopping, stop

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=30)
RENEW_EVERY = LEASE / 3


def orphaned(holder: Any, node: str, sole_node: bool) -> bool:
    """Whether a lease held by ``holder`` may be taken now, before it runs out: only when this
    node is the only one (the embedded database) and the lease is another's - a process that
    died. A lease with no holder recorded is left to run out."""
    return sole_node and isinstance(holder, str) and bool(holder) and holder != node


def lapsed(until: Any, now: datetime) -> bool:
    return not isinstance(until, datetime) or until <= now


@contextlib.asynccontextmanager
async def renewing(
    renew: Callable[[], Awaitable[bool]], what: str, every: timedelta = RENEW_EVERY
) -> AsyncIterator[None]:
    """Renews a lease every ``every`` while the block runs. ``renew`` returns False when the
    lease was lost (taken by another node after this one stalled); that is logged, and the
    work goes on: everything the leases guard is idempotent, a lease only keeps two nodes
    from doing the same work twice."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(every.total_seconds())
            try:
                if not await renew():
                    log.warning("%s: lease lost to another node", what)
                    return
            except Exception:
                raise_if_stopping()
                log.warning("%s: renewing the lease failed", what, exc_info=True)

    task = asyncio.create_task(loop(), name=f"lease:{what}")
    try:
        yield
    finally:
        await stop(task)
