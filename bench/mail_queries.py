"""Where a reply spends its database time: the queries the mail pipeline runs for one reply,
timed alone against the hub's database after the run, with the same filters as the hub's
code, and the database's plan (``explain``): its stages and how many index keys and
documents it read. The filters are copied from ``server/mailbridge`` (``inbox.py``,
``pipeline.py``, ``matching.py``) and ``server/counters/crm.py``: a change there must be
made here too.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database

from bench.crm_queries import DATABASE, _median_ms, explain

Document = dict[str, Any]
REPEAT = 5


def pipeline_queries(db_url: str, user_id: str) -> Document:
    """Each query of one reply's way through the pipeline, for real documents of the run,
    and how many raw messages, activities and records there were."""
    client: MongoClient[Document] = MongoClient(db_url, serverSelectionTimeoutMS=10_000)
    try:
        db: Database[Document] = client[DATABASE]
        raw = db["mail_raw"].find_one({"status": "done"}, {"data": 0}) or {}
        sent = db["crm_activities"].find_one({"direction": "outgoing", "type": "email"}) or {}
        contact = db["crm_records"].find_one({"type": "contact", "email_keys": {"$ne": []}}) or {}
        message_id = str(raw.get("message_id", ""))
        sent_id = str((sent.get("mail") or {}).get("message_id", ""))
        address = str((contact.get("email_keys") or [""])[0])
        now = datetime.now(UTC)
        finds: list[tuple[str, str, Document, Document | None, Document | None]] = [
            (
                "claim the next message (RawInbox.claim)",
                "mail_raw",
                {"status": "pending", "claimed_until": {"$lt": now}},
                None,
                {"data": 0},
            ),
            (
                "the same bytes stored before? (RawInbox.put)",
                "mail_raw",
                {"sha256": raw.get("sha256", "")},
                None,
                {"_id": 1},
            ),
            (
                "delivered before by Message-ID? (MailPipeline.process)",
                "mail_raw",
                {"message_id": message_id},
                None,
                {"status": 1},
            ),
            (
                "by code: the outgoing activity (Matcher._by_code)",
                "crm_activities",
                {"_id": sent.get("_id")},
                None,
                None,
            ),
            (
                "by thread: the outgoing mail by Message-ID (Matcher._by_thread)",
                "crm_activities",
                {"mail.message_id": {"$in": [sent_id]}},
                None,
                None,
            ),
            (
                "by sender: records with the address (Matcher._by_sender)",
                "crm_records",
                {"email_keys": address},
                None,
                None,
            ),
        ]
        out: Document = {"queries": {}}
        for label, collection, query, sort, projection in finds:

            def run(
                collection: str = collection,
                query: Document = query,
                sort: Document | None = sort,
                projection: Document | None = projection,
            ) -> object:
                return db[collection].find_one(
                    query, projection, sort=list(sort.items()) if sort else None
                )

            command: Document = {"find": collection, "filter": query, "limit": 1}
            if sort:
                command["sort"] = sort
            out["queries"][label] = {"ms": _median_ms(run, REPEAT), **explain(db, command)}
        # a recount of the user's incoming deal activities (CrmCounters.compute, item mode)
        incoming = {
            "record_responsible_id": user_id,
            "owner_type": "deal",
            "completed": False,
            "incoming": True,
        }
        count: Callable[[], object] = lambda: db["crm_activities"].count_documents(incoming)  # noqa: E731
        out["queries"]["counter: the user's incoming deal activities (CrmCounters)"] = {
            "ms": _median_ms(count, REPEAT),
            "counted": db["crm_activities"].count_documents(incoming),
            **explain(db, {"find": "crm_activities", "filter": incoming}),
        }
        out["stored"] = {
            name: db[name].estimated_document_count()
            for name in ("mail_raw", "crm_activities", "crm_records")
        }
        for name in ("mail_raw", "crm_activities"):
            stats = db.command("collStats", name)
            out.setdefault("mean_bytes", {})[name] = stats.get("avgObjSize")
        return out
    finally:
        client.close()
