"""The raw ceiling of the hub's own database for what one message needs at minimum.

One "op" is a sequence allocation (``find_one_and_update`` with ``$inc`` on a counter document
that exists beforehand) followed by an ``insert_one`` of a message-sized document. The loop
runs with one worker (sequential) and with as many workers as the 1:1 senders, each on its
own counter (as the senders each write to their own dialog), in a database of its own on the
hub's database process.

**The same client as the hub's.** The loop does not build a client of its own: it opens the
store the way the hub's own command line does (``server.store.open_store`` with the hub's
settings, read from the environment the hub was started with, ``reuse_running=True``). So the
client has whatever the hub's has: the embedded database's URL (``journal=true``,
``retryWrites=false``, see ``server/store/embedded.py``), its password, the timeouts, and
PyMongo's asyncio client. If the hub's options change, the ceiling changes with them.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo import MongoClient, ReturnDocument

from server.settings import Settings
from server.store import open_store

DATABASE = "portalhub_bench_ceiling"
TEXT = "bench b1-12345 " + "x" * 40


@dataclass
class CeilingResult:
    workers: int
    seconds: float
    ops: int
    timeline: list[int]  # ops completed in each second
    client: dict[str, Any]  # the client's options that bear on the cost of a write

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds


async def _worker(db: Any, counter: str, deadline: float, done: list[float]) -> int:
    n = 0
    while time.monotonic() < deadline and n < 10_000_000:
        doc = await db.counters.find_one_and_update(
            {"_id": counter}, {"$inc": {"seq": 1}}, return_document=ReturnDocument.AFTER
        )
        assert doc is not None
        await db.messages.insert_one(
            {
                "_id": str(ObjectId()),
                "chat_id": counter,
                "seq": doc["seq"],
                "author_id": "a" * 24,
                "text": TEXT,
                "created_at": datetime.now(UTC),
                "edited_at": None,
                "deleted": False,
                "system": False,
                "client_id": f"b-{n}",
                "dedup_key": f"{'a' * 24}|{counter}|b-{n}",
            }
        )
        n += 1
        done.append(time.monotonic())
    return n


def _client_options(client: Any, settings: Settings) -> dict[str, Any]:
    """What the client does with a write, read back from the client itself."""
    return {
        "write_concern": dict(client.write_concern.document),
        "retry_writes": bool(client.options.retry_writes),
        "max_pool_size": client.options.pool_options.max_pool_size,
        "embedded": settings.mongodb_url is None,
    }


async def measure(settings: Settings, workers: int, seconds: float) -> CeilingResult:
    """``workers`` concurrent loops for ``seconds`` through a client built as the hub's."""
    async with open_store(settings, reuse_running=True) as store:
        client = store.client
        db = client[DATABASE]
        await db.drop_collection("messages")
        counters = [f"counter-{workers}-{i}" for i in range(workers)]
        for name in counters:
            await db.counters.replace_one({"_id": name}, {"_id": name, "seq": 0}, upsert=True)
        # a short warm-up: connections of the pool opened, collections created
        await _worker(db, counters[0], time.monotonic() + 0.5, [])
        done: list[float] = []
        started = time.monotonic()
        deadline = started + seconds
        counts = await asyncio.wait_for(
            asyncio.gather(*(_worker(db, name, deadline, done) for name in counters)),
            seconds + 60,
        )
        elapsed = time.monotonic() - started
        timeline = [0] * max(1, math.ceil(elapsed))
        for at in done:
            timeline[min(len(timeline) - 1, int(at - started))] += 1
        options = _client_options(client, settings)
        await client.drop_database(DATABASE)
    return CeilingResult(workers, elapsed, sum(counts), timeline, options)


def stored(db_url: str, database: str = "portalhub") -> dict[str, int]:
    """How many messages and events the hub has stored (its history size)."""
    client: MongoClient[dict[str, object]] = MongoClient(db_url)
    try:
        db = client[database]
        return {name: db[name].estimated_document_count() for name in ("messages", "events")}
    finally:
        client.close()
