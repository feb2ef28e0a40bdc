"""What the record and activity services share: documents to API shapes, the activity
indicator of each record for a viewer, history, and telling the record's viewers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pymongo.asynchronous.collection import AsyncCollection

from server.counters.crm import CrmCounters, activity_facts
from server.counters.rules import (
    ActivityFacts,
    DueWindow,
    RecordFacts,
    classify,
    indicator,
)
from server.crm.access import CrmAccess, Viewer
from server.crm.config import CrmConfig
from server.crm.models import ActivityMail, ActivityOut, Indicator, MailAttachment, RecordOut
from server.crm.rules import CrmRole, sees_others
from server.directory.service import DirectoryService
from server.events.streams import StreamLog, user_stream
from server.im.service import ImService
from server.store.database import Document, Store, new_id, plain, utcnow
from server.store.groupcommit import GroupCommit
from server.web.problems import Problem, forbidden, not_found

# What ``activity_facts`` reads of an activity: the fields its counters depend on.
COUNTED_FIELDS = (
    "owner_type",
    "owner_id",
    "record_responsible_id",
    "responsible_id",
    "type",
    "direction",
    "deadline",
    "completed",
)
FACT_FIELDS = {f: 1 for f in COUNTED_FIELDS}


def record_facts(doc: Document) -> RecordFacts:
    return RecordFacts(doc["type"], doc["_id"], doc["responsible_id"], bool(doc.get("open")))


def record_title(doc: Document) -> str:
    return str(doc.get("title") or "")


class CrmCore:
    def __init__(
        self,
        store: Store,
        streams: StreamLog,
        access: CrmAccess,
        config: CrmConfig,
        counters: CrmCounters,
        directory: DirectoryService,
        im: ImService,
    ) -> None:
        self.store = store
        self.streams = streams
        self.access = access
        self.config = config
        self.counters = counters
        self.directory = directory
        self.im = im
        # Gathered inserts: activities and history entries written side by side (a batch of
        # mail) go in one insert_many each.
        self.activity_inserts = GroupCommit(store["crm_activities"], journal=False)
        self.history_inserts = GroupCommit(store["crm_history"], journal=False)

    async def close(self) -> None:
        await self.activity_inserts.close()
        await self.history_inserts.close()

    @property
    def records(self) -> AsyncCollection[Document]:
        return self.store["crm_records"]

    @property
    def activities(self) -> AsyncCollection[Document]:
        return self.store["crm_activities"]

    async def zone(self, user_id: str) -> ZoneInfo:
        return (await self.zones([user_id]))[user_id]

    async def zones(self, user_ids: Iterable[str]) -> dict[str, ZoneInfo]:
        """The users' time zones for what they are shown (an activity's state, a record's
        indicator), from the directory's copies of the users: kept fresh through the bus, and
        no read per event pushed. Counting reads its own (``CrmCounters``)."""
        ids = list(dict.fromkeys(user_ids))
        docs = await self.directory.cached_users(ids)
        return {
            uid: self.counters.zone_named((docs.get(uid) or {}).get("time_zone")) for uid in ids
        }

    async def member(self, actor_id: str) -> Viewer:
        """The caller as a CRM viewer; "forbidden" for a user without a CRM role."""
        viewer = await self.access.viewer(actor_id)
        if viewer.role is CrmRole.NONE:
            raise forbidden("you have no CRM role")
        return viewer

    async def require_crm_user(self, user_id: str) -> None:
        """``user_id`` may be made responsible for CRM work: they hold a CRM role."""
        if (await self.access.viewer(user_id)).role is CrmRole.NONE:
            raise Problem(
                422, "unknown-reference", "Unknown reference", f"user {user_id} has no CRM role"
            )

    async def visible_record(
        self, viewer: Viewer, record_type: str | None, record_id: str
    ) -> Document:
        """The record, if the viewer may see it; otherwise "not found", never "forbidden", so
        that existence does not leak."""
        doc = await self.records.find_one({"_id": record_id})
        if doc is None or (record_type is not None and doc["type"] != record_type):
            raise not_found(f"{record_type or 'record'} {record_id}")
        if not viewer.sees(doc["responsible_id"]):
            raise not_found(f"{record_type or 'record'} {record_id}")
        return doc

    # indicators ------------------------------------------------------------------------------

    async def open_activities_of(self, record_ids: Iterable[str]) -> dict[str, list[ActivityFacts]]:
        ids = list(record_ids)
        found: dict[str, list[ActivityFacts]] = {rid: [] for rid in ids}
        if not ids:
            return found
        # What an indicator reads of each, not the activities' texts (an e-mail's bodies), in
        # one reply however many are open (the driver's first batch holds 101). One record is
        # looked up by both fields of the ``owner`` index; several by the ``owner_open`` index,
        # which holds only open activities (the embedded database scans the collection for
        # ``owner_id $in`` beside ``completed`` on a compound index): the records' completed
        # history is not read.
        query: Document = (
            {"owner_id": ids[0], "completed": False}
            if len(ids) == 1
            else {"owner_id": {"$in": ids}, "completed": False}
        )
        async for act in self.activities.find(query, FACT_FIELDS, batch_size=10_000):
            found.setdefault(act["owner_id"], []).append(activity_facts(act))
        return found

    async def indicators(
        self,
        viewers: list[Viewer],
        docs: list[Document],
        activities: dict[str, list[ActivityFacts]] | None = None,
    ) -> dict[str, dict[str, Indicator]]:
        """viewer id -> record id -> the record's indicator for that viewer."""
        cfg = await self.config.counter_config()
        if activities is None:
            activities = await self.open_activities_of(d["_id"] for d in docs)
        zones = await self.zones(v.user_id for v in viewers)
        now = utcnow()
        result: dict[str, dict[str, Indicator]] = {}
        for viewer in viewers:
            per: dict[str, Indicator] = {}
            for doc in docs:
                ind = indicator(
                    viewer.user_id,
                    record_facts(doc),
                    activities.get(doc["_id"], []),
                    cfg.mode,
                    now,
                    zones[viewer.user_id],
                    cfg.window,
                    sees_others(viewer.role),
                )
                per[doc["_id"]] = Indicator.model_validate(ind.as_dict())
            result[viewer.user_id] = per
        return result

    # shapes ----------------------------------------------------------------------------------

    async def company_contacts(self, company_id: str) -> list[str]:
        return [
            c["_id"]
            async for c in self.records.find(
                {"type": "contact", "company_ids": company_id}, {"_id": 1}
            ).sort("_id", 1)
        ]

    async def companies_contacts(self, company_ids: list[str]) -> dict[str, list[str]]:
        """``company_contacts`` of several companies in one read (a list page of them). The
        filter is the link alone: with an ``$in`` beside another field the embedded database
        uses no index, so the type is checked here."""
        contacts: dict[str, list[str]] = {c: [] for c in company_ids}
        async for c in self.records.find(
            {"company_ids": {"$in": company_ids}}, {"_id": 1, "type": 1, "company_ids": 1}
        ).sort("_id", 1):
            if c.get("type") != "contact":
                continue
            for company in c.get("company_ids", []):
                if company in contacts:
                    contacts[company].append(c["_id"])
        return contacts

    def record_out(
        self, doc: Document, ind: Indicator, contact_ids: list[str] | None = None
    ) -> RecordOut:
        t = doc["type"]
        return RecordOut(
            id=doc["_id"],
            type=t,
            title=record_title(doc),
            first_name=doc.get("first_name") if t in ("lead", "contact") else None,
            last_name=doc.get("last_name") if t in ("lead", "contact") else None,
            company_title=doc.get("company_title") if t == "lead" else None,
            status=doc.get("status") if t == "lead" else None,
            stage_id=doc.get("stage_id") if t == "deal" else None,
            open=bool(doc.get("open")),
            amount=doc.get("amount") if t in ("lead", "deal") else None,
            currency=doc.get("currency") if t in ("lead", "deal") else None,
            responsible_id=doc["responsible_id"],
            emails=doc.get("emails", []),
            phones=doc.get("phones", []),
            source=doc.get("source", ""),
            comments=doc.get("comments", ""),
            custom_fields=doc.get("custom_fields", {}),
            company_ids=doc.get("company_ids", []) if t == "contact" else None,
            company_id=doc.get("company_id") if t == "deal" else None,
            contact_ids=(
                doc.get("contact_ids", [])
                if t == "deal"
                else contact_ids
                if t == "company"
                else None
            ),
            lead_id=doc.get("lead_id"),
            converted=doc.get("converted") if t == "lead" else None,
            created_by=doc["created_by"],
            created_at=doc["created_at"],
            modified_by=doc["modified_by"],
            modified_at=doc["modified_at"],
            open_activities=int(doc.get("open_activities", 0)),
            indicator=ind,
        )

    async def record_for(self, viewer: Viewer, doc: Document) -> RecordOut:
        ind = (await self.indicators([viewer], [doc]))[viewer.user_id][doc["_id"]]
        contacts = await self.company_contacts(doc["_id"]) if doc["type"] == "company" else None
        return self.record_out(doc, ind, contacts)

    def activity_out(
        self, act: Document, owner_title: str, state: str, bodies: bool = False
    ) -> ActivityOut:
        return ActivityOut(
            id=act["_id"],
            owner_type=act["owner_type"],
            owner_id=act["owner_id"],
            owner_title=owner_title,
            type=act["type"],
            direction=act["direction"],
            missed=bool(act.get("missed")),
            subject=act.get("subject", ""),
            description=act.get("description", ""),
            responsible_id=act["responsible_id"],
            deadline=act.get("deadline"),
            completed=bool(act.get("completed")),
            completed_at=act.get("completed_at"),
            state=state,
            created_by=act["created_by"],
            created_at=act["created_at"],
            modified_at=act["modified_at"],
            mail=activity_mail(act["mail"], bodies) if "mail" in act else None,
        )

    # history and events ----------------------------------------------------------------------

    async def record_history(
        self,
        doc: Document,
        actor_id: str | None,
        kind: str,
        field: str | None = None,
        before: Any = None,
        after: Any = None,
    ) -> None:
        await self.history_inserts.insert(
            history_entry(doc, actor_id, kind, field, before, after, utcnow()), 1
        )

    async def record_histories(
        self, entries: list[tuple[Document, str | None, str, str | None, Any, Any]]
    ) -> None:
        """Many history entries (``record_history``'s arguments each) in one insert."""
        if not entries:
            return
        at = utcnow()
        await self.store["crm_history"].insert_many(
            [history_entry(*entry, at) for entry in entries]
        )

    async def announce_record(
        self,
        doc: Document,
        previous_responsible: str | None = None,
        activities: dict[str, list[ActivityFacts]] | None = None,
    ) -> None:
        """Tell everyone who sees the record its new state, each with their own indicator;
        those who saw it only through the previous responsible person lose it.
        ``activities``: the record's open activities, read for several records at once
        (``open_activities_of``); left out, read here."""
        snapshot = await self.access.snapshot()
        viewer_ids = snapshot.viewers_of(doc["responsible_id"])
        viewers = [snapshot.viewer(uid) for uid in viewer_ids]
        indicators = await self.indicators(viewers, [doc], activities)
        contacts = await self.company_contacts(doc["_id"]) if doc["type"] == "company" else None
        sends = [
            self.streams.append(
                user_stream(v.user_id),
                "crm.record.updated",
                {
                    "record": self.record_out(
                        doc, indicators[v.user_id][doc["_id"]], contacts
                    ).model_dump(mode="json")
                },
            )
            for v in viewers
        ]
        if previous_responsible is not None and previous_responsible != doc["responsible_id"]:
            gone = set(snapshot.viewers_of(previous_responsible)) - set(viewer_ids)
            sends.extend(
                self.streams.append(
                    user_stream(uid),
                    "crm.record.removed",
                    {"type": doc["type"], "id": doc["_id"]},
                )
                for uid in sorted(gone)
            )
        await asyncio.gather(*sends)

    async def announce_records(self, record_ids: list[str]) -> None:
        """Re-send records whose indicators changed without a write (time passing)."""
        async for doc in self.records.find({"_id": {"$in": record_ids}}):
            await self.announce_record(doc)

    async def announce_record_removed(self, doc: Document, merged_into: str | None = None) -> None:
        """``merged_into``: the record was merged into that one, which clients open instead."""
        snapshot = await self.access.snapshot()
        payload: dict[str, Any] = {"type": doc["type"], "id": doc["_id"]}
        if merged_into is not None:
            payload["merged_into"] = merged_into
        await asyncio.gather(
            *(
                self.streams.append(user_stream(uid), "crm.record.removed", payload)
                for uid in snapshot.viewers_of(doc["responsible_id"])
            )
        )

    async def announce_activity(
        self, act: Document, owner: Document, removed: bool = False, also: Iterable[str] = ()
    ) -> None:
        """The activity to whoever sees its record, its responsible person (and ``also``: a
        previous responsible person)."""
        snapshot = await self.access.snapshot()
        recipients = set(snapshot.viewers_of(owner["responsible_id"]))
        # The activity's people only while they hold a CRM role: one who lost it (an extranet
        # user once a manager by default, a revoked grant) hears no more of the record.
        recipients.update(
            uid
            for uid in (act["responsible_id"], *also)
            if snapshot.viewer(uid).role is not CrmRole.NONE
        )
        if removed:
            payload: dict[str, Any] = {"id": act["_id"], "owner_id": act["owner_id"]}
            await asyncio.gather(
                *(
                    self.streams.append(user_stream(uid), "crm.activity.removed", payload)
                    for uid in sorted(recipients)
                )
            )
            return
        cfg = await self.config.counter_config()
        zones = await self.zones(recipients)
        now = utcnow()
        sends = []
        for uid in sorted(recipients):
            state = activity_state(act, now, zones[uid], cfg.window)
            out = self.activity_out(act, record_title(owner), state)
            sends.append(
                self.streams.append(
                    user_stream(uid),
                    "crm.activity.updated",
                    {"activity": out.model_dump(mode="json")},
                )
            )
        await asyncio.gather(*sends)


def activity_state(act: Document, now: datetime, tz: ZoneInfo, window: DueWindow) -> str:
    if act.get("completed"):
        return "completed"
    kind = classify(activity_facts(act), now, tz, window)
    return kind.value if kind is not None else "completed"


def activity_mail(mail: Document, bodies: bool) -> ActivityMail:
    out = ActivityMail(
        status=mail.get("status"),
        error=mail.get("error"),
        from_address=mail.get("from"),
        from_name=mail.get("from_name"),
        to=mail.get("to", []),
        cc=mail.get("cc", []),
        bcc=mail.get("bcc", []),
        date=mail.get("date"),
        received_at=mail.get("received_at"),
        message_id=mail.get("message_id") or mail.get("incoming_message_id"),
        code=mail.get("code"),
        match=mail.get("match"),
        flagged=bool(mail.get("flagged")),
        suspicious=bool(mail.get("suspicious")),
        suspicious_reason=mail.get("suspicious_reason"),
        auto_reply=bool(mail.get("auto_reply")),
        in_reply_to_activity=mail.get("in_reply_to_activity"),
        bounced_recipients=mail.get("bounced_recipients", []),
        attachments=[MailAttachment(**{"id": None, **a}) for a in mail.get("attachments", [])],
    )
    if bodies:
        out.html, out.text, out.quoted = mail.get("html"), mail.get("text"), mail.get("quoted")
    return out


def history_entry(
    doc: Document,
    actor_id: str | None,
    kind: str,
    field: str | None,
    before: Any,
    after: Any,
    at: datetime,
) -> Document:
    """One entry of a record's history (``record_history`` writes one, ``record_histories``
    a batch's)."""
    return {
        "_id": new_id(),
        "record_type": doc["type"],
        "record_id": doc["_id"],
        "user_id": actor_id,
        "kind": kind,
        "field": field,
        "before": plain(before),
        "after": plain(after),
        "at": at,
    }
