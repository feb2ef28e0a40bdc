"""Where a counter update spends its database time: the queries of the live path (the
guarded write of a user's numbers and its read back, ``CrmCounters._fast``; the deadlines a
time-driven wake-up reads, ``CrmCounters._deadlines``), a record's indicator, and those of a
recount of one user from index ranges (``CrmCounters._count``: the repair of last resort and
the periodic check), each timed alone against the hub's database with the same filters, for
one user, with the database's plan (``explain``): the stages and how many index keys and
documents it read.

The hub runs the four counts of a record type at once and the four types at once; here they
run one after the other, so that each one's own cost shows. A whole-collection count is
timed too, for scale.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from pymongo import MongoClient
from pymongo.database import Database

from server.counters.crm import counts_of
from server.counters.deltas import reading_range
from server.counters.rules import DueWindow, due_threshold

Document = dict[str, Any]
DATABASE = "portalhub"


def _plan_stages(plan: Document) -> str:
    """The winning plan as ``SORT <- FETCH <- IXSCAN count_item``."""
    stages = []
    node: Document | None = plan
    while node:
        name = str(node.get("stage", "?"))
        if node.get("indexName"):
            name += f" {node['indexName']}"
        stages.append(name)
        node = node.get("inputStage")
    return " <- ".join(stages)


def explain(db: Database[Document], command: Document) -> Document:
    """Plan and work of a ``find`` or ``aggregate``, as the database reports them."""
    found = db.command("explain", command, verbosity="executionStats")
    if "stages" in found:  # an aggregation: the first stage is the cursor that reads
        found = found["stages"][0]["$cursor"]
    stats = found.get("executionStats", {})
    return {
        "plan": _plan_stages(found.get("queryPlanner", {}).get("winningPlan", {})),
        "keys_examined": stats.get("totalKeysExamined"),
        "docs_examined": stats.get("totalDocsExamined"),
    }


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def query_times(
    db_url: str, user_id: str, zone: str, deal_id: str, repeat: int = 5
) -> dict[str, Any]:
    """Median milliseconds of each query, and how many documents each one counts."""
    client: MongoClient[Document] = MongoClient(db_url, retryWrites=False, tz_aware=True)
    try:
        db = client[DATABASE]
        activities, records = db["crm_activities"], db["crm_records"]
        now = datetime.now(UTC)
        threshold = due_threshold(now, ZoneInfo(zone), DueWindow())
        counts: dict[str, tuple[Any, Document]] = {}
        for record_type in ("deal", "lead"):
            base = {"record_responsible_id": user_id, "owner_type": record_type, "completed": False}
            counts[f"{record_type}: incoming"] = (activities, {**base, "incoming": True})
            counts[f"{record_type}: overdue"] = (
                activities,
                {**base, "incoming": False, "deadline": {"$lte": now}},
            )
            counts[f"{record_type}: due"] = (
                activities,
                {**base, "incoming": False, "deadline": {"$gt": now, "$lt": threshold}},
            )
            idle = {"responsible_id": user_id, "type": record_type, "open": True}
            counts[f"{record_type}: idle records"] = (records, {**idle, "open_activities": 0})
        counts["the record's open activities (indicators)"] = (
            activities,
            {"owner_id": deal_id, "completed": False},
        )
        out: dict[str, Any] = {}
        for label, (collection, query) in counts.items():

            def count(c: Any = collection, q: Document = query) -> int:
                return int(c.count_documents(q))

            pipeline = [{"$match": query}, {"$group": {"_id": 1, "n": {"$sum": 1}}}]
            out[label] = {
                "ms": _median_ms(count, repeat),
                "documents": count(),
                **explain(db, {"aggregate": collection.name, "pipeline": pipeline, "cursor": {}}),
            }
        # CrmCounters._deadlines: what a wake-up reads, one range of count_item per type
        lo, hi = reading_range(None, now, ZoneInfo(zone), DueWindow())
        wake = {
            "record_responsible_id": user_id,
            "owner_type": "deal",
            "completed": False,
            "incoming": False,
            "deadline": {"$gt": lo, "$lt": hi},
        }
        out["wake-up: deadlines up to the horizon, per record type (x4)"] = {
            "ms": _median_ms(lambda: list(activities.find(wake)), repeat),
            "documents": activities.count_documents(wake),
            **explain(db, {"find": "crm_activities", "filter": wake}),
        }
        # CrmCounters._fast: the guarded difference (here one of zero) and the read back
        counters = db["crm_counters"]
        stored = counters.find_one({"_id": user_id}) or {}
        guard = {
            "_id": user_id,
            "rules": stored.get("rules"),
            "zone": stored.get("zone"),
            "as_of": {"$lte": now},
            "next_at": {"$gt": now},
        }
        difference = {"$inc": {"values.deal.incoming": 0}}
        # The database's explain of this update (and of a find with this filter) says
        # COLLSCAN, but its update path looks the ``_id`` up first and checks the rest on that
        # one document (its time stays flat with the collection's size): the plan shown is
        # that of the ``_id`` lookup.
        out["live: the guarded difference (update, crm_counters)"] = {
            "ms": _median_ms(lambda: counters.update_one(guard, difference), repeat),
            "documents": counters.count_documents(guard),
            **explain(db, {"find": "crm_counters", "filter": {"_id": user_id}}),
        }
        out["live: the numbers read back (crm_counters)"] = {
            "ms": _median_ms(lambda: counters.find_one({"_id": user_id}), repeat),
            "documents": 1,
            **explain(db, {"find": "crm_counters", "filter": {"_id": user_id}}),
        }
        started = time.perf_counter()
        total = activities.count_documents({"completed": False})
        out["all open activities (whole collection)"] = {
            "ms": (time.perf_counter() - started) * 1000,
            "documents": total,
        }
        return out
    finally:
        client.close()


def stored_counters(db_url: str, user_ids: list[str]) -> dict[str, Any]:
    """The numbers the hub last stored (and pushed) for each of ``user_ids``."""
    client: MongoClient[Document] = MongoClient(db_url, retryWrites=False)
    try:
        found = client[DATABASE]["crm_counters"].find({"_id": {"$in": user_ids}})
        # stored as the four numbers per record type; pushed as badges (with total, colour)
        return {str(doc["_id"]): counts_of(doc.get("values", {})) for doc in found}
    finally:
        client.close()
