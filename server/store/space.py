"""Free disk space under the embedded database: new writes are refused before the disk is full.

WiredTiger cannot live on a full disk: a log write that fails with ENOSPC makes it panic,
every command then fails, and starting it again needs room for recovery. So the hub keeps a
reserve: when the filesystem holding the database has less free space than the reserve, the
entry points refuse new content (REST 507, SMTP 452 4.3.1, an XMPP ``resource-constraint``)
and ``/readyz`` says why, while the hub's own small writes (sessions, the node registry)
still fit in the reserve. Writes are taken again, with no operator step, once the free space
is back above the reserve plus a margin (so that a disk hovering at the limit does not flip
the node on every check).

``space_is_low`` is the rule; ``DiskSpace`` measures (``statvfs``, about once a second, in a
thread: a hung network filesystem must not hang the event loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.background import raise_if_stopping, stop

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
MIB = 1024 * 1024
# Writes resume at reserve + this share of it (at least 1 MiB): a disk hovering at the
# limit must not flip the node between refusing and taking writes at every check.
RESUME_MARGIN = 0.1


@dataclass(frozen=True)
class Usage:
    path: str
    free: int  # bytes an unprivileged writer may still use (f_bavail)
    total: int


def reserve_of(total: int, reserve_bytes: int, reserve_percent: float) -> int:
    """The free space to keep: the larger of the absolute and the relative reserve."""
    return max(reserve_bytes, int(total * reserve_percent / 100))


def space_is_low(
    free: int, total: int, reserve_bytes: int, reserve_percent: float, was_low: bool
) -> bool:
    """Whether writes are refused: below the reserve; once refusing, until the free space is
    above the reserve plus a margin."""
    reserve = reserve_of(total, reserve_bytes, reserve_percent)
    if not was_low:
        return free < reserve
    return free < reserve + max(MIB, int(reserve * RESUME_MARGIN))


def measure(path: str) -> Usage:
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # not created yet: the filesystem it will be on
    st = os.statvfs(existing)
    return Usage(path, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n < 10 * 1024 * MIB else f"{n / (1024 * MIB):.1f} GiB"


class DiskSpace:
    """Watches the filesystems of ``paths``. With no paths (an external MongoDB, whose disk is
    its own business) it never refuses anything."""

    def __init__(
        self,
        paths: Sequence[Path] = (),
        *,
        reserve_bytes: int = 0,
        reserve_percent: float = 0.0,
        interval: float = CHECK_SECONDS,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.reserve_bytes = reserve_bytes
        self.reserve_percent = reserve_percent
        self.interval = interval
        self.low = False
        self.usage: Usage | None = None  # of the fullest filesystem, at the last check
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def watched(self) -> bool:
        return bool(self.paths)

    def check(self) -> bool:
        """Measure now; returns whether writes are refused."""
        return self._apply(self._measure())

    def _measure(self) -> list[Usage]:
        return [measure(p) for p in self.paths]

    def _apply(self, usages: list[Usage]) -> bool:
        if not usages:
            return False
        fullest = min(
            usages,
            key=lambda u: u.free - reserve_of(u.total, self.reserve_bytes, self.reserve_percent),
        )
        low = space_is_low(
            fullest.free, fullest.total, self.reserve_bytes, self.reserve_percent, self.low
        )
        self.usage = fullest
        if low != self.low:
            self.low = low
            if low:
                self._room.clear()
                log.error("disk space low: %s", self.refusal())
            else:
                self._room.set()
                log.warning(
                    "disk space back: %s free on the filesystem of %s; writes are taken again",
                    _mib(fullest.free),
                    fullest.path,
                )
        return low

    def refusal(self) -> str | None:
        """Why new writes are refused right now, in words for the client; None when they are
        not."""
        if not self.low or self.usage is None:
            return None
        reserve = reserve_of(self.usage.total, self.reserve_bytes, self.reserve_percent)
        return (
            f"the server's disk is nearly full ({_mib(self.usage.free)} free, "
            f"{_mib(reserve)} kept in reserve): new writes are refused until space is freed; "
            "reading works"
        )

    async def refresh(self) -> bool:
        """Measure now (in a thread); returns whether writes are refused."""
        return self._apply(await asyncio.to_thread(self._measure))

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def start(self) -> None:
        if self.paths and self._task is None:
            self.check()
            self._task = asyncio.create_task(self._watch(), name="disk-space")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop(task)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._apply(await asyncio.to_thread(self._measure))
            except Exception:
                raise_if_stopping()
                log.exception("could not measure the free disk space")
