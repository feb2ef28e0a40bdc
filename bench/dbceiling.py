"""The raw ceiling of the hub's own embedded database for what one message needs at minimum.

One "op" is a sequence allocation (``find_one_and_update`` with ``$inc`` on a counter document
that exists beforehand) followed by an ``insert_one`` of a message-sized document. The loop
runs against the hub's embedded database (address from ``endpoint.json``, password from
``credentials.json``) in a database of
its own, with one worker (sequential) and with as many workers as the 1:1 senders, each on
its own counter (as the senders each write to their own dialog).

``retry_writes`` is the client's ``retryWrites``: pymongo's default (on) is what the hub uses.
SecantusDB keeps a record of every retryable write for 30 minutes (at most 10,000) and walks
all of them on every write, so with it on the cost of a write grows with the recent writes.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from bson import ObjectId
from pymongo import MongoClient, ReturnDocument

DATABASE = "portalhub_bench_ceiling"
TEXT = "bench b1-12345 " + "x" * 40


@dataclass
class CeilingResult:
    workers: int
    retry_writes: bool
    seconds: float
    ops: int
    timeline: list[int]  # ops completed in each second

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds


def _worker(
    client: MongoClient[dict[str, object]],
    counter: str,
    deadline: float,
    counts: list[int],
    done: list[float],
) -> None:
    db = client[DATABASE]
    n = 0
    while time.monotonic() < deadline and n < 10_000_000:
        doc = db.counters.find_one_and_update(
            {"_id": counter}, {"$inc": {"seq": 1}}, return_document=ReturnDocument.AFTER
        )
        assert doc is not None
        now = time.time()
        db.messages.insert_one(
            {
                "_id": str(ObjectId()),
                "chat_id": counter,
                "seq": doc["seq"],
                "author_id": "a" * 24,
                "text": TEXT,
                "created_at": now,
                "edited_at": None,
                "deleted": False,
                "system": False,
                "client_id": f"b-{n}",
                "dedup_key": f"{'a' * 24}|{counter}|b-{n}",
            }
        )
        n += 1
        done.append(time.monotonic())
    counts.append(n)


def measure(db_url: str, workers: int, seconds: float, retry_writes: bool) -> CeilingResult:
    client: MongoClient[dict[str, object]] = MongoClient(
        db_url,
        maxPoolSize=max(workers, 1) + 2,
        retryWrites=retry_writes,
    )
    try:
        db = client[DATABASE]
        db.drop_collection("messages")
        counters = [f"counter-{workers}-{i}" for i in range(workers)]
        for name in counters:
            db.counters.replace_one({"_id": name}, {"_id": name, "seq": 0}, upsert=True)
        # a short warm-up: connections of the pool opened, collections created
        _worker(client, counters[0], time.monotonic() + 0.5, [], [])
        counts: list[int] = []
        done: list[float] = []
        deadline = time.monotonic() + seconds
        started = time.monotonic()
        threads = [
            threading.Thread(target=_worker, args=(client, name, deadline, counts, done))
            for name in counters
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 60)
        elapsed = time.monotonic() - started
        timeline = [0] * max(1, math.ceil(elapsed))
        for at in done:
            timeline[min(len(timeline) - 1, int(at - started))] += 1
        return CeilingResult(workers, retry_writes, elapsed, sum(counts), timeline)
    finally:
        client.close()


def drop(db_url: str) -> None:
    client: MongoClient[dict[str, object]] = MongoClient(db_url)
    try:
        client.drop_database(DATABASE)
    finally:
        client.close()


def stored(db_url: str, database: str = "portalhub") -> dict[str, int]:
    """How many messages and events the hub has stored (its history size)."""
    client: MongoClient[dict[str, object]] = MongoClient(db_url)
    try:
        db = client[database]
        return {name: db[name].estimated_document_count() for name in ("messages", "events")}
    finally:
        client.close()
