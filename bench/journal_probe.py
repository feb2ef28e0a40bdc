"""What one lone message's writes cost the embedded database, command by command.

``python -m bench.journal_probe [--samples 200] [--rate 20] [--dir DIR]``

The 1:1 latency phase sends 20 messages a second, one at a time, so each message's writes
meet an idle database: no other message shares their journal flush. This probe makes the
same lone writes, with the hub's own client (``server.store.open_store`` on a fresh data
directory: the embedded database, ``journal=true``, ``retryWrites=false``, its password),
``--rate`` times a second, and times each kind:

- ``ping``: one round trip that touches nothing (the floor of any command);
- ``insert, unjournaled``: a message-sized ``insert_many`` of one document, ``j: false``;
- ``insert, journaled``: the same, ``j: true`` (WiredTiger fsyncs its log before answering);
- ``message then event``: what the hub does for one message (``server/im/writer.py`` and
  ``server/events/streams.py``): the message unjournaled, then its event journaled;
- ``fsync``: a 256-byte append to a file beside the database and ``os.fsync``, with no
  database at all: what the disk itself charges for durability.

The kinds take turns within each round, so the machine's load falls on all of them alike;
the load average is printed with the figures. Nothing is written to ``docs/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bson import ObjectId

from server.settings import Settings
from server.store import open_store
from server.store.database import Store, utcnow

TEXT = "bench b1-12345 " + "x" * 40
KINDS = ("ping", "insert, unjournaled", "insert, journaled", "message then event", "fsync")


def _message(n: int) -> dict[str, object]:
    return {
        "_id": str(ObjectId()),
        "chat_id": "probe",
        "n": n,
        "author_id": "a",
        "text": TEXT,
        "created_at": utcnow(),
    }


def _event(seq: int) -> dict[str, object]:
    return {"stream": "chat:probe", "seq": seq, "type": "im.message", "data": {"text": TEXT}}


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (
        f"p50 {statistics.median(ordered):6.2f}  p90 {pick(0.9):6.2f}  "
        f"p99 {pick(0.99):6.2f}  max {ordered[-1]:6.2f} ms"
    )


async def measure(
    store: Store, directory: Path, samples: int, rate: float
) -> dict[str, list[float]]:
    journaled = store["probe_events"]  # the client's own write concern: j: true
    relaxed = store.relaxed("probe_messages")
    ordinal = 0
    fd = os.open(directory / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def ping() -> None:
        await store.client.admin.command("ping")

    async def unjournaled() -> None:
        await relaxed.insert_many([_message(next_n())])

    async def journaled_insert() -> None:
        await journaled.insert_many([_event(next_n())])

    async def pair() -> None:
        n = next_n()
        await relaxed.insert_many([_message(n)])
        await journaled.insert_many([_event(n)])

    async def fsync() -> None:
        os.write(fd, b"x" * 256)
        os.fsync(fd)

    def next_n() -> int:
        nonlocal ordinal
        ordinal += 1
        return ordinal

    runs: dict[str, Callable[[], Awaitable[None]]] = dict(
        zip(KINDS, (ping, unjournaled, journaled_insert, pair, fsync), strict=True)
    )
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for kind, run in runs.items():  # warm: collections made, connections open
            if kind != "fsync":
                await run()
        for _ in range(samples):
            for kind, run in runs.items():
                await asyncio.sleep(1 / rate)
                started = time.perf_counter()
                await run()
                times[kind].append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
    return times


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.journal_probe", description=__doc__)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--dir", default="", help="where the data directory goes (a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="portalhub-journal-", dir=args.dir or None) as tmp:
        settings = Settings(data_dir=Path(tmp))
        before = os.getloadavg()
        async with open_store(settings, reuse_running=False) as store:
            times = await measure(store, Path(tmp), args.samples, args.rate)
        after = os.getloadavg()
    print(
        f"{args.samples} lone commands of each kind at {args.rate:g}/s; load average "
        f"{before[0]:.2f} before, {after[0]:.2f} after"
    )
    for kind in KINDS:
        print(f"{kind:22s} {_percentiles(times[kind])}")


if __name__ == "__main__":
    asyncio.run(main())
