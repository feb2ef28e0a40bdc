"""Task counters of users with a history of tasks, run from a checkout: a paired micro-probe.

``cd <checkout> && PYTHONPATH=. python /path/to/bench/task_counters_probe.py MONGODB_URL
TASKS_PER_USER``: the hub's code is the checkout's (``server``, ``tests.harness``), so the
same script measures a checkout from before it existed. Run each checkout in turns against
one database server (``secantusd-py --host 127.0.0.1 --port P --storage-path :memory:
--standalone``; ``MONGODB_URL``: ``mongodb://127.0.0.1:P/?directConnection=true``).

Ten users are each responsible for ``TASKS_PER_USER`` tasks, 20 of them open and the rest
completed (stored directly: the history of years of work). Printed: the median time of a
cold read of the ten users' counters at once (nothing kept: a connect burst after a
restart), and of the count, store and push after one change of a task (``push_counters``),
per user. A checkout whose ``TaskService`` has no
``stored_counters`` (before the counters were stored) counts them on read.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from server.settings import Settings
from server.store.database import Store, new_id
from tests.harness import start_hub

USERS = 10
OPEN = 20


async def probe(url: str, per_user: int) -> str:
    name = f"probe_{uuid.uuid4().hex[:10]}"
    settings = Settings(
        mongodb_url=url,
        mongodb_database=name,
        http_port=0,
        data_dir=Path(tempfile.mkdtemp()) / "var",
    )
    store = Store(url, name)
    await store.ensure_indexes()
    try:
        async with start_hub(settings, store) as hub:
            author_id, _ = await hub.create_user("author")
            users = [(await hub.create_user(f"u{i}"))[0] for i in range(USERS)]
            now = datetime.now(UTC)
            docs: list[dict[str, Any]] = [
                {
                    "_id": new_id(),
                    "title": "t",
                    "status": 2 if n < OPEN else 5,
                    "author_id": author_id,
                    "responsible_id": user_id,
                    "participant_ids": [],
                    "observer_ids": [],
                    "group_id": None,
                    "created_at": now,
                    "updated_at": now,
                    "comment_count": 0,
                    "update_count": 0,
                    "deadline": now + timedelta(days=3),
                }
                for user_id in users
                for n in range(per_user)
            ]
            await store["tasks"].insert_many(docs)
            tasks: Any = hub.services.tasks
            stored = hasattr(tasks, "stored_counters")
            if stored:  # written behind the service's back: counted once and stored
                await store["task_counters"].delete_many({})
            tasks.forget_all()
            await asyncio.gather(*(tasks.counters(u) for u in users))
            reads = []
            for _ in range(7):
                tasks.forget_all()
                started = time.perf_counter()
                await asyncio.gather(*(tasks.counters(u) for u in users))
                reads.append((time.perf_counter() - started) * 1000)
            changed = docs[0]["_id"]
            changes = []
            for user_id in users:
                started = time.perf_counter()
                if stored:
                    await tasks.push_counters([user_id], [changed])
                else:
                    await tasks.push_counters([user_id])
                changes.append((time.perf_counter() - started) * 1000)
    finally:
        await store.client.drop_database(name)
        await store.close()
    return (
        f"{'stored' if stored else 'counted on read'}, {per_user} tasks a user: cold read of "
        f"{USERS} users {statistics.median(reads):.1f} ms, count+store+push after a change "
        f"{statistics.median(changes):.1f} ms"
    )


if __name__ == "__main__":
    print(asyncio.run(probe(sys.argv[1], int(sys.argv[2]))))
