"""Leads, contacts, companies and deals: create, read, list, change, link, convert, delete.

Every operation goes: the caller's CRM role and scope -> pure rules -> store write ->
history -> the record's viewers told (each with their own indicator) -> counters queued.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ReturnDocument

from server.counters.crm import counted_field
from server.counters.rules import due_threshold
from server.crm.access import Viewer
from server.crm.activities import ActivityService
from server.crm.config import field_defs, stages_of
from server.crm.core import CrmCore, record_title
from server.crm.models import (
    ConversionCandidates,
    ConversionResult,
    DuplicateList,
    DuplicateMatch,
    DuplicateProbe,
    HistoryEntry,
    RecordDetail,
    RecordFields,
    RecordList,
    RecordOut,
    RecordQuery,
    RecordRef,
)
from server.crm.paging import newest_of_ids, newest_of_type
from server.crm.rules import (
    MERGEABLE_TYPES,
    MIN_SUFFIX_DIGITS,
    Candidate,
    ConversionMode,
    CrmRole,
    FieldChange,
    Probe,
    Scope,
    StageSemantics,
    changes,
    clean_custom_values,
    company_from_lead,
    contact_from_lead,
    contacts_for_company_link,
    creates,
    deal_from_lead,
    duplicate_report,
    may_convert,
    merged_record,
    normal_email,
    normal_name,
    phone_digits,
    record_is_open,
    remembered_selection,
    with_added,
)
from server.store.database import Document, new_id, utcnow
from server.web.problems import Problem, conflict, forbidden, not_found

SYSTEM = "system"  # created_by / modified_by of what the portal itself made
MAIL_CREATOR = "email"  # created_by / modified_by of leads the mail bridge made from mail

# Fields whose changes are recorded in a record's history, by type.
TRACKED: dict[str, tuple[str, ...]] = {
    "lead": (
        "title",
        "first_name",
        "last_name",
        "company_title",
        "status",
        "amount",
        "currency",
        "responsible_id",
        "emails",
        "phones",
        "source",
        "comments",
        "custom_fields",
    ),
    "contact": (
        "first_name",
        "last_name",
        "responsible_id",
        "emails",
        "phones",
        "source",
        "comments",
        "custom_fields",
        "company_ids",
    ),
    "company": (
        "title",
        "responsible_id",
        "emails",
        "phones",
        "source",
        "comments",
        "custom_fields",
    ),
    "deal": (
        "title",
        "stage_id",
        "amount",
        "currency",
        "responsible_id",
        "emails",
        "phones",
        "source",
        "comments",
        "custom_fields",
        "company_id",
        "contact_ids",
    ),
}


def phone_key(number: str) -> str:
    """What phones are looked up by: the subscriber tail, the last seven digits once leading
    zeros are dropped, so +49 30 1234567 finds 030 1234567; ``phones_match`` then decides."""
    digits = phone_digits(number)
    stripped = digits.lstrip("0")
    return stripped[-MIN_SUFFIX_DIGITS:] if len(stripped) >= MIN_SUFFIX_DIGITS else digits


def full_name(first: str, last: str) -> str:
    return " ".join(p for p in (first, last) if p)


def search_keys(doc: Document) -> Document:
    """The normalised copies duplicate control and search look records up by."""
    t = doc["type"]
    names = full_name(doc.get("first_name", ""), doc.get("last_name", ""))
    company = doc.get("title", "") if t == "company" else doc.get("company_title", "")
    return {
        "email_keys": sorted({normal_email(e["value"]) for e in doc.get("emails", [])}),
        "phone_keys": sorted({phone_key(p["number"]) for p in doc.get("phones", [])} - {""}),
        "name_key": normal_name(names) if t in ("lead", "contact") else "",
        "company_key": normal_name(company) if t in ("lead", "company") else "",
        "search_text": " ".join(
            part
            for part in (
                normal_name(doc.get("title", "")),
                normal_name(names),
                normal_name(doc.get("company_title", "")),
            )
            if part
        ),
    }


def derived_title(doc: Document) -> str:
    t = doc["type"]
    name = full_name(doc.get("first_name", ""), doc.get("last_name", ""))
    if t == "contact":
        return name
    if t == "lead":
        return str(doc.get("title") or name or doc.get("company_title") or "")
    return str(doc.get("title") or "")


class RecordService:
    def __init__(self, core: CrmCore, activities: ActivityService) -> None:
        self.core = core
        self.activities = activities  # conversion moves the lead's e-mails

    @property
    def _records(self) -> Any:
        return self.core.records

    async def _viewer(self, actor_id: str) -> Viewer:
        viewer = await self.core.access.viewer(actor_id)
        if viewer.scope.everyone is False and not viewer.scope.user_ids:
            raise forbidden("you have no CRM role")
        return viewer

    async def _require_assignable(self, viewer: Viewer, user_id: str) -> None:
        """A record can be given to an active user whose records the giver sees: a manager
        keeps records to themself, a head gives them within the department. A person people
        give records to must hold a CRM role: a chief, who sees everyone, could otherwise
        hand a record to an extranet user, who would be told of it (counters, notices) without
        being let into the CRM. The portal's own records (mail leads) go where the CRM
        administrators' mail settings say."""
        user = await self.core.store.users.find_one({"_id": user_id})
        if user is None or user.get("is_active") is False:
            raise Problem(422, "unknown-reference", "Unknown reference", f"no user {user_id}")
        if not viewer.sees(user_id):
            raise forbidden("you may not give records to this person")
        if viewer.user_id != SYSTEM:
            await self.core.require_crm_user(user_id)

    async def _stage_semantics(self, stage_id: str) -> str:
        for stage in stages_of(await self.core.config.settings()):
            if stage.id == stage_id:
                return stage.semantics.value
        raise Problem(422, "invalid-value", "Invalid value", f"no deal stage {stage_id!r}")

    async def _linked_ids(self, viewer: Viewer, record_type: str, ids: list[str]) -> list[str]:
        """Checks that linked records exist and the caller sees them."""
        unique = list(dict.fromkeys(ids))
        found = {
            d["_id"]: d
            async for d in self._records.find({"_id": {"$in": unique}, "type": record_type})
        }
        for rid in unique:
            doc = found.get(rid)
            if doc is None or not viewer.sees(doc["responsible_id"]):
                raise Problem(
                    422, "unknown-reference", "Unknown reference", f"no {record_type} {rid}"
                )
        return unique

    async def _custom(self, record_type: str, values: dict[str, Any] | None, partial: bool) -> Any:
        settings = await self.core.config.settings()
        defs = field_defs(settings.custom_fields.get(record_type, []))  # type: ignore[call-overload]
        try:
            return clean_custom_values(defs, values or {}, partial=partial)
        except ValueError as exc:
            raise Problem(422, "invalid-value", "Invalid value", str(exc)) from None

    # create ----------------------------------------------------------------------------------

    async def create(self, actor_id: str, record_type: str, data: RecordFields) -> RecordDetail:
        viewer = await self._viewer(actor_id)
        doc = await self._create(viewer, actor_id, record_type, data)
        return await self.detail_of(viewer, doc)

    async def create_for_system(
        self, responsible_id: str, record_type: str, data: RecordFields, creator: str = SYSTEM
    ) -> Document:
        """A record made by the portal itself (a lead from an unknown sender's mail): no
        caller's scope applies; the history names no person. ``creator`` is what the record's
        ``created_by`` says instead of a user id: ``system``, or ``email`` (the mail bridge)."""
        everyone = Viewer(SYSTEM, CrmRole.ADMIN, Scope(everyone=True, user_ids=frozenset()))
        data = data.model_copy(update={"responsible_id": responsible_id})
        data.model_fields_set.add("responsible_id")
        return await self._create(everyone, SYSTEM, record_type, data, creator)

    async def _create(
        self,
        viewer: Viewer,
        actor_id: str,
        record_type: str,
        data: RecordFields,
        creator: str | None = None,
    ) -> Document:
        fields = data.model_dump(exclude_unset=True, exclude={"ignore_duplicates"})
        responsible = fields.pop("responsible_id", None) or actor_id
        await self._require_assignable(viewer, responsible)
        now = utcnow()
        doc: Document = {
            "_id": new_id(),
            "type": record_type,
            "responsible_id": responsible,
            "emails": fields.pop("emails", []),
            "phones": fields.pop("phones", []),
            "source": fields.pop("source", ""),
            "comments": fields.pop("comments", ""),
            "custom_fields": await self._custom(
                record_type, fields.pop("custom_fields", {}), False
            ),
            "created_by": creator or actor_id,
            "created_at": now,
            "modified_by": creator or actor_id,
            "modified_at": now,
            "open_activities": 0,
        }
        company_contacts: list[str] | None = None
        if record_type == "lead":
            doc.update(
                title=fields.get("title", ""),
                first_name=fields.get("first_name", ""),
                last_name=fields.get("last_name", ""),
                company_title=fields.get("company_title", ""),
                status=fields.get("status", "new"),
                amount=fields.get("amount"),
                currency=fields.get("currency", "USD"),
            )
        elif record_type == "contact":
            doc.update(
                first_name=fields.get("first_name", ""),
                last_name=fields.get("last_name", ""),
                company_ids=await self._linked_ids(
                    viewer, "company", fields.get("company_ids", [])
                ),
            )
        elif record_type == "company":
            doc["title"] = fields.get("title", "")
            company_contacts = await self._linked_ids(
                viewer, "contact", fields.get("contact_ids", [])
            )
        else:
            stages = stages_of(await self.core.config.settings())
            doc.update(
                title=fields.get("title", ""),
                stage_id=fields.get("stage_id", stages[0].id),
                amount=fields.get("amount"),
                currency=fields.get("currency", "USD"),
                company_id=None,
                contact_ids=await self._linked_ids(
                    viewer, "contact", fields.get("contact_ids", [])
                ),
            )
            doc["stage_semantics"] = await self._stage_semantics(doc["stage_id"])
            if fields.get("company_id"):
                await self._link_company(viewer, doc, fields["company_id"], "contact_ids" in fields)
        doc["title"] = derived_title(doc)
        if not doc["title"]:
            raise Problem(
                422,
                "invalid-value",
                "Invalid value",
                "give a title, or a first or last name"
                if record_type != "company"
                else "give a title",
            )
        doc["open"] = record_is_open(record_type, doc.get("status"), _semantics(doc))
        doc.update(search_keys(doc))
        if record_type != "deal" and not getattr(data, "ignore_duplicates", False):
            found = await self._duplicates(viewer, _probe_of(doc), None)
            if found.duplicates or found.hidden:
                raise Problem(
                    409,
                    "possible-duplicates",
                    "Possible duplicates",
                    "records with the same email, phone, name or company exist; "
                    "send ignore_duplicates: true to create anyway",
                    **found.model_dump(),
                )
        await self._records.insert_one(doc)
        self.core.counters.records_changed((None, doc))
        if company_contacts:
            await self._records.update_many(
                {"_id": {"$in": company_contacts}}, {"$addToSet": {"company_ids": doc["_id"]}}
            )
        if record_type == "deal" and doc.get("company_id"):
            await self._remember(doc)
        await self.core.record_history(doc, None if actor_id == SYSTEM else actor_id, "created")
        await self.core.announce_record(doc)
        # The other side of a link shows it too: a company's contacts, a contact's companies.
        await self._announce_linked(doc, company_contacts or doc.get("company_ids", []))
        return doc

    async def _link_company(
        self, viewer: Viewer, deal: Document, company_id: str, contacts_given: bool
    ) -> None:
        """A deal's company; unless the caller chose the contacts in the same request, the
        company's contacts are added (those left on a deal the last time, once remembered)."""
        (company,) = await self._linked_ids(viewer, "company", [company_id])
        deal["company_id"] = company
        if contacts_given:
            return
        memory = await self.core.store["crm_link_memory"].find_one({"_id": company})
        added = contacts_for_company_link(
            await self.core.company_contacts(company),
            memory["contact_ids"] if memory is not None else None,
        )
        deal["contact_ids"] = with_added(deal.get("contact_ids", []), added)

    async def _remember(self, deal: Document) -> None:
        company = deal.get("company_id")
        if not company:
            return
        kept = remembered_selection(
            await self.core.company_contacts(company), deal.get("contact_ids", [])
        )
        await self.core.store["crm_link_memory"].update_one(
            {"_id": company}, {"$set": {"contact_ids": kept, "at": utcnow()}}, upsert=True
        )

    async def _announce_linked(self, doc: Document, record_ids: list[str]) -> None:
        """Records whose links changed from the other side (a company's contacts, a contact's
        companies)."""
        async for other in self._records.find({"_id": {"$in": record_ids}}):
            await self.core.announce_record(other)

    # read ------------------------------------------------------------------------------------

    async def get(self, actor_id: str, record_type: str, record_id: str) -> RecordDetail:
        viewer = await self._viewer(actor_id)
        doc = await self.core.visible_record(viewer, record_type, record_id)
        return await self.detail_of(viewer, doc)

    async def detail_of(self, viewer: Viewer, doc: Document) -> RecordDetail:
        out = await self.core.record_for(viewer, doc)
        links: dict[str, list[RecordRef]] = {}
        queries: dict[str, Document] = {}
        t, rid = doc["type"], doc["_id"]
        if t == "contact":
            queries["company"] = {"_id": {"$in": doc.get("company_ids", [])}, "type": "company"}
            queries["deal"] = {"type": "deal", "contact_ids": rid}
        elif t == "company":
            queries["contact"] = {"type": "contact", "company_ids": rid}
            queries["deal"] = {"type": "deal", "company_id": rid}
        elif t == "deal":
            queries["company"] = {"_id": doc.get("company_id"), "type": "company"}
            queries["contact"] = {"_id": {"$in": doc.get("contact_ids", [])}, "type": "contact"}
        else:
            made = list((doc.get("converted") or {}).values())
            queries["converted"] = {"_id": {"$in": made}}
        for key, query in queries.items():
            refs = []
            async for linked in self._records.find(query).sort("_id", 1).limit(200):
                if viewer.sees(linked["responsible_id"]):
                    refs.append(
                        RecordRef(type=linked["type"], id=linked["_id"], title=record_title(linked))
                    )
            links[key] = refs
        return RecordDetail(**out.model_dump(), links=links)

    async def find(self, actor_id: str, record_type: str, query: RecordQuery) -> RecordList:
        viewer = await self._viewer(actor_id)
        # Each condition of the list, as a filter (for the search, which the database scans
        # for anyway) and as a check of a record read from a bounded window (``paging``).
        conditions: list[tuple[Document, Callable[[Document], bool]]] = []
        if not viewer.scope.everyone:
            visible = set(viewer.scope.user_ids)
            conditions.append(
                (
                    {"responsible_id": {"$in": sorted(visible)}},
                    lambda d: d.get("responsible_id") in visible,
                )
            )
        if query.responsible_id:
            responsible = query.responsible_id
            conditions.append(
                ({"responsible_id": responsible}, lambda d: d.get("responsible_id") == responsible)
            )
        if query.status:
            if record_type not in ("lead", "deal"):
                raise Problem(
                    422, "invalid-value", "Invalid value", "only leads and deals have a status"
                )
            key = "status" if record_type == "lead" else "stage_id"
            status = query.status
            conditions.append(({key: status}, lambda d: d.get(key) == status))
        if query.open is not None:
            is_open = query.open
            conditions.append(({"open": is_open}, lambda d: d.get("open") is is_open))
        ids: set[str] | None = None  # records named by the caller's open work
        if query.activity_responsible_id:
            ids = set(
                await self.core.activities.distinct(
                    "owner_id",
                    {
                        "responsible_id": query.activity_responsible_id,
                        "owner_type": record_type,
                        "completed": False,
                    },
                )
            )
        if query.counted:
            counted = set(await self._counted_owner_ids(viewer, record_type))
            ids = counted if ids is None else ids & counted
        below = _cursor(query.cursor) if query.cursor else None
        size = query.limit + 1

        def keep(doc: Document) -> bool:
            return all(check(doc) for _, check in conditions)

        if query.q:
            filters: list[Document] = [{"type": record_type}, *(f for f, _ in conditions)]
            filters.append(await self._search_filter(record_type, query.q))
            if ids is not None:
                filters.append({"_id": {"$in": sorted(ids)}})
            if below is not None:
                filters.append({"_id": {"$lt": below}})
            docs = [
                d async for d in self._records.find({"$and": filters}).sort("_id", -1).limit(size)
            ]
        elif ids is not None:
            docs = await newest_of_ids(self._records, record_type, ids, keep, below, size)
        else:
            docs = await newest_of_type(self._records, record_type, keep, below, size, utcnow())
        more = len(docs) > query.limit
        docs = docs[: query.limit]
        indicators = (await self.core.indicators([viewer], docs))[viewer.user_id]
        records: list[RecordOut] = []
        contacts = (
            await self.core.companies_contacts([d["_id"] for d in docs])
            if record_type == "company"
            else {}
        )
        for doc in docs:
            records.append(
                self.core.record_out(doc, indicators[doc["_id"]], contacts.get(doc["_id"]))
            )
        return RecordList(
            records=records,
            next_cursor=docs[-1]["_id"] if more and docs else None,
            linked=await self._linked_refs(viewer, records),
        )

    async def _linked_refs(self, viewer: Viewer, records: list[RecordOut]) -> dict[str, RecordRef]:
        """The companies and contacts a page of records links to, as the caller sees them."""
        ids: set[str] = set()
        for r in records:
            ids.update(r.company_ids or [])
            ids.update(r.contact_ids or [])
            if r.company_id:
                ids.add(r.company_id)
        if not ids:
            return {}
        return {
            d["_id"]: RecordRef(type=d["type"], id=d["_id"], title=record_title(d))
            async for d in self._records.find(
                {"_id": {"$in": sorted(ids)}}, {"type": 1, "title": 1, "responsible_id": 1}
            )
            if viewer.sees(d["responsible_id"])
        }

    async def _search_filter(self, record_type: str, q: str) -> Document:
        """The list's search box: a part of the title or name, of an e-mail address ("acme"
        finds hans@acme.example), of a phone number as typed ("555 12"), or of the name of
        the company a contact or deal belongs to."""
        ors: list[Document] = [_text_filter(q)]
        needle = q.strip()
        if needle:
            ors.append({"email_keys": {"$regex": re.escape(normal_email(needle))}})
        digits = phone_digits(needle)
        if len(digits) >= MIN_PARTIAL_PHONE_DIGITS and _PHONE_TEXT.match(needle):
            # the digits in order, whatever is written between them: "555 12" finds 555-1234
            ors.append({"phones.number": {"$regex": r"\D*".join(digits)}})
        if record_type in ("contact", "deal") and normal_name(needle):
            companies = [
                d["_id"]
                async for d in self._records.find(
                    {"type": "company", "search_text": {"$regex": re.escape(normal_name(needle))}},
                    {"_id": 1},
                ).limit(500)
            ]
            if companies:
                key = "company_ids" if record_type == "contact" else "company_id"
                ors.append({key: {"$in": companies}})
        return {"$or": ors}

    async def _counted_owner_ids(self, viewer: Viewer, record_type: str) -> list[Any]:
        """The records with an activity that counts for the caller: incoming, or due before
        the window's end. Two reads of a leading run of the counting index's keys (an
        ``$or`` of the two would have the embedded database scan every activity)."""
        cfg = await self.core.config.counter_config()
        tz = await self.core.zone(viewer.user_id)
        mine = {counted_field(cfg.mode): viewer.user_id, "owner_type": record_type}
        threshold = due_threshold(utcnow(), tz, cfg.window)
        incoming, due = await asyncio.gather(
            self.core.activities.distinct(
                "owner_id", {**mine, "completed": False, "incoming": True}
            ),
            self.core.activities.distinct(
                "owner_id",
                {**mine, "completed": False, "incoming": False, "deadline": {"$lt": threshold}},
            ),
        )
        return sorted({*incoming, *due})

    async def history(self, actor_id: str, record_type: str, record_id: str) -> list[HistoryEntry]:
        viewer = await self._viewer(actor_id)
        await self.core.visible_record(viewer, record_type, record_id)
        return [
            HistoryEntry(
                id=h["_id"],
                record_type=h["record_type"],
                record_id=h["record_id"],
                user_id=h.get("user_id"),
                kind=h["kind"],
                field=h.get("field"),
                before=h.get("before"),
                after=h.get("after"),
                at=h["at"],
            )
            async for h in self.core.store["crm_history"]
            .find({"record_id": record_id})
            .sort([("at", 1), ("_id", 1)])
            .limit(1000)
        ]

    # duplicates ------------------------------------------------------------------------------

    async def check_duplicates(self, actor_id: str, probe: DuplicateProbe) -> DuplicateList:
        viewer = await self._viewer(actor_id)
        doc: Document = {
            "type": probe.type,
            "first_name": probe.first_name,
            "last_name": probe.last_name,
            "title": probe.title,
            "company_title": probe.company_title if probe.type == "lead" else "",
            "emails": [{"value": e} for e in probe.emails],
            "phones": [{"number": p} for p in probe.phones],
        }
        if probe.type == "company":
            doc["company_title"] = probe.title
        exclude = (probe.type, probe.exclude_id) if probe.exclude_id else None
        return await self._duplicates(viewer, _probe_of(doc), exclude)

    async def _duplicates(
        self,
        viewer: Viewer,
        probe: Probe,
        exclude: tuple[str, str] | None,
        types: tuple[str, ...] = ("lead", "contact", "company"),
    ) -> DuplicateList:
        """Matches are looked for among every record (of ``types``), so that a hidden one
        still warns; what the caller learns of those is decided by ``duplicate_report``."""
        ors: list[Document] = []
        if probe.emails:
            ors.append({"email_keys": {"$in": sorted(probe.emails)}})
        if probe.phones:
            ors.append({"phone_keys": {"$in": sorted(phone_key(p) for p in probe.phones)}})
        if probe.full_name:
            ors.append({"name_key": probe.full_name})
        if probe.company_title:
            ors.append({"company_key": probe.company_title})
        if not ors:
            return DuplicateList(duplicates=[], hidden=False)
        candidates = [
            Candidate.of(
                type=d["type"],
                id=d["_id"],
                title=record_title(d),
                responsible_id=d["responsible_id"],
                emails=[e["value"] for e in d.get("emails", [])],
                phones=[p["number"] for p in d.get("phones", [])],
                first_name=d.get("first_name", "") if d["type"] != "company" else "",
                last_name=d.get("last_name", "") if d["type"] != "company" else "",
                company_title=d.get("title", "")
                if d["type"] == "company"
                else d.get("company_title", ""),
            )
            async for d in self._records.find({"type": {"$in": list(types)}, "$or": ors}).limit(100)
        ]
        report = duplicate_report(probe, candidates, viewer.sees, exclude)
        return DuplicateList(
            duplicates=[
                DuplicateMatch(
                    type=c.type,
                    id=c.id,
                    title=c.title,
                    responsible_id=c.responsible_id,
                    matched=list(fields),
                )
                for c, fields in report.shown
            ],
            hidden=report.hidden,
        )

    # update ----------------------------------------------------------------------------------

    async def update(
        self, actor_id: str, record_type: str, record_id: str, patch: RecordFields
    ) -> RecordDetail:
        viewer = await self._viewer(actor_id)
        doc = await self.core.visible_record(viewer, record_type, record_id)
        fields = patch.model_dump(exclude_unset=True)
        before = dict(doc)
        after = dict(doc)
        company_contacts: list[str] | None = None
        if "responsible_id" in fields:
            await self._require_assignable(viewer, fields["responsible_id"])
        if "custom_fields" in fields:
            cleaned = await self._custom(record_type, fields.pop("custom_fields"), True)
            merged = {**doc.get("custom_fields", {}), **cleaned}
            after["custom_fields"] = {k: v for k, v in merged.items() if v is not None}
        if record_type == "lead" and doc.get("status") == "converted" and "status" in fields:
            raise conflict("a converted lead keeps its status")
        if record_type == "contact" and "company_ids" in fields:
            fields["company_ids"] = await self._linked_ids(viewer, "company", fields["company_ids"])
        if record_type == "company" and "contact_ids" in fields:
            company_contacts = await self._linked_ids(viewer, "contact", fields.pop("contact_ids"))
        if record_type == "deal":
            if "contact_ids" in fields:
                fields["contact_ids"] = await self._linked_ids(
                    viewer, "contact", fields["contact_ids"]
                )
            if "stage_id" in fields:
                after["stage_semantics"] = await self._stage_semantics(fields["stage_id"])
            if "company_id" in fields:
                new_company = fields.pop("company_id")
                if new_company is None:
                    after["company_id"] = None
                elif new_company != doc.get("company_id"):
                    after["contact_ids"] = fields.get("contact_ids", doc.get("contact_ids", []))
                    await self._link_company(viewer, after, new_company, "contact_ids" in fields)
        after.update(fields)
        after["title"] = derived_title(after)
        if not after["title"]:
            raise Problem(422, "invalid-value", "Invalid value", "the record would have no title")
        after["open"] = record_is_open(record_type, after.get("status"), _semantics(after))
        after.update(search_keys(after))
        changed = changes(before, after, TRACKED[record_type])
        contacts_before: list[str] = []
        if company_contacts is not None:
            contacts_before = await self.core.company_contacts(record_id)
        if not changed and company_contacts is None:
            return await self.detail_of(viewer, doc)
        now = utcnow()
        after["modified_by"] = actor_id
        after["modified_at"] = now
        sets = {k: v for k, v in after.items() if k != "_id" and before.get(k) != v}
        await self._write_counted(doc, sets)
        for change in changed:
            await self.core.record_history(
                after, actor_id, "field", change.field, change.old, change.new
            )
        if company_contacts is not None:
            await self._set_company_contacts(after, actor_id, contacts_before, company_contacts)
        if record_type == "deal" and ("company_id" in sets or "contact_ids" in sets):
            await self._remember(after)
        if record_type == "contact" and "company_ids" in sets:
            moved = set(before.get("company_ids", [])) ^ set(after.get("company_ids", []))
            await self._announce_linked(after, sorted(moved))
        await self._after_change(after, before, changed)
        return await self.detail_of(viewer, after)

    async def _write_counted(self, doc: Document, sets: Document) -> None:
        """Write ``sets`` on a record, telling the idle number the record as it really was
        just before: guarded by what counting reads of it, read again if that moved (an
        activity added meanwhile moves its count of open activities)."""
        current: Document | None = doc
        for _attempt in range(GUARDED_ATTEMPTS):
            if current is None:
                raise not_found(f"{doc['type']} {doc['_id']}")
            result = await self._records.update_one(
                {"_id": doc["_id"], **{f: current.get(f) for f in COUNTED_RECORD_FIELDS}},
                {"$set": sets},
            )
            if result.matched_count:
                self.core.counters.records_changed((current, {**current, **sets}))
                return
            current = await self._records.find_one({"_id": doc["_id"]})
        await self._records.update_one({"_id": doc["_id"]}, {"$set": sets})
        self.core.counters.touch([doc["responsible_id"], sets.get("responsible_id", "")])

    async def _set_company_contacts(
        self, company: Document, actor_id: str, before: list[str], wanted: list[str]
    ) -> None:
        added = [c for c in wanted if c not in before]
        removed = [c for c in before if c not in wanted]
        if added:
            await self._records.update_many(
                {"_id": {"$in": added}}, {"$addToSet": {"company_ids": company["_id"]}}
            )
        if removed:
            await self._records.update_many(
                {"_id": {"$in": removed}}, {"$pull": {"company_ids": company["_id"]}}
            )
        if added or removed:
            await self.core.record_history(
                company, actor_id, "field", "contact_ids", before, wanted
            )
            await self._announce_linked(company, added + removed)

    async def _after_change(
        self, after: Document, before: Document, changed: list[FieldChange]
    ) -> None:
        """Activities follow their record's responsible person, and so do their counters
        (in the "item" mode, where they count for the record's responsible person)."""
        old, new = before["responsible_id"], after["responsible_id"]
        if old != new:
            await self.core.activities.update_many(
                {"owner_id": after["_id"]}, {"$set": {"record_responsible_id": new}}
            )
            # Those the update moved: an activity added meanwhile with the old copy was
            # counted for the old person, and the check puts its copy right.
            # (the owner index's run, the copy checked here: see ``ActivityService.find``)
            moved = self.core.activities.find({"owner_id": after["_id"], "completed": False})
            self.core.counters.activities_changed(
                *[
                    ({**act, "record_responsible_id": old}, act)
                    async for act in moved
                    if act.get("record_responsible_id") == new
                ]
            )
        await self.core.announce_record(after, before["responsible_id"])

    # conversion ------------------------------------------------------------------------------

    async def conversion_candidates(self, actor_id: str, lead_id: str) -> ConversionCandidates:
        """The existing contacts and companies the lead's contact and company would duplicate,
        by the duplicate rules (e-mail, phone, name, company title): offered in their place."""
        viewer = await self._viewer(actor_id)
        lead = await self.core.visible_record(viewer, "lead", lead_id)
        return await self._candidates(viewer, lead)

    async def _candidates(self, viewer: Viewer, lead: Document) -> ConversionCandidates:
        source = {**lead, "id": lead["_id"]}
        contact = {"type": "contact", **contact_from_lead(source)}
        company = {"type": "company", **company_from_lead(source)}
        contacts = await self._duplicates(viewer, _probe_of(contact), None, ("contact",))
        companies = await self._duplicates(viewer, _probe_of(company), None, ("company",))
        return ConversionCandidates(
            contacts=contacts.duplicates,
            companies=companies.duplicates,
            hidden=contacts.hidden or companies.hidden,
        )

    async def convert(
        self,
        actor_id: str,
        lead_id: str,
        mode: ConversionMode,
        existing: dict[str, str] | None = None,
        emails_to: str | None = None,
        ignore_duplicates: bool = False,
    ) -> ConversionResult:
        """``existing``: a contact or company (by type) to use instead of making one.
        ``emails_to``: which of the records the lead's e-mails move to (default: the deal,
        else the contact, else the company). Making a contact or company that duplicates
        existing ones answers 409 ``possible-duplicates`` unless ``ignore_duplicates``."""
        viewer = await self._viewer(actor_id)
        lead = await self.core.visible_record(viewer, "lead", lead_id)
        if not may_convert(lead.get("status", "new")):
            raise conflict(f"a lead with status {lead.get('status')!r} cannot be converted")
        types = creates(mode)
        used: dict[str, Document] = {}
        for record_type, record_id in (existing or {}).items():
            if record_type not in types or record_type not in ("contact", "company"):
                raise Problem(
                    422,
                    "invalid-value",
                    "Invalid value",
                    f"this conversion makes no {record_type} to use an existing one for",
                )
            (found,) = await self._linked_ids(viewer, record_type, [record_id])
            used[record_type] = await self._records.find_one({"_id": found})
        target = emails_to or next(t for t in ("deal", "contact", "company") if t in types)
        if target not in types:
            raise Problem(
                422,
                "invalid-value",
                "Invalid value",
                f"emails_to: this conversion makes no {target}",
            )
        if not ignore_duplicates:
            await self._refuse_duplicates(viewer, lead, [t for t in types if t not in used])
        token = new_id()
        # Claimed first so that two people converting at once make one set of records.
        claimed = await self._records.find_one_and_update(
            {"_id": lead_id, "status": {"$nin": ["converted", "junk"]}, "converting": None},
            {"$set": {"converting": token}},
            return_document=ReturnDocument.AFTER,
        )
        if claimed is None:
            raise conflict("the lead is being converted or was converted already")
        try:
            return await self._convert(viewer, actor_id, lead, mode, token, used, target)
        except BaseException:
            # Records made before the failure stay (linked to the lead); the lead can be
            # converted again.
            await self._records.update_one(
                {"_id": lead_id, "converting": token}, {"$set": {"converting": None}}
            )
            raise

    async def _refuse_duplicates(self, viewer: Viewer, lead: Document, making: list[str]) -> None:
        """409 when the contact or company the conversion would make exists already."""
        found = await self._candidates(viewer, lead)
        contacts = found.contacts if "contact" in making else []
        companies = found.companies if "company" in making else []
        if contacts or companies or (found.hidden and {"contact", "company"} & set(making)):
            raise Problem(
                409,
                "possible-duplicates",
                "Possible duplicates",
                "a contact or company like the lead's exists already: pass its id in "
                "contact_id or company_id to use it, or ignore_duplicates: true to make new ones",
                contacts=[c.model_dump() for c in contacts],
                companies=[c.model_dump() for c in companies],
                hidden=found.hidden,
            )

    async def _convert(
        self,
        viewer: Viewer,
        actor_id: str,
        lead: Document,
        mode: ConversionMode,
        token: str,
        used: dict[str, Document],
        emails_to: str,
    ) -> ConversionResult:
        lead_id = lead["_id"]
        source = {**lead, "id": lead_id}
        made: dict[str, Document] = {}
        now = utcnow()
        settings = await self.core.config.settings()
        for record_type in creates(mode):
            if record_type in used:
                made[record_type] = await self._use_existing(
                    used[record_type], lead, actor_id, made.get("company")
                )
                continue
            if record_type == "company":
                fields = company_from_lead(source)
            elif record_type == "contact":
                fields = contact_from_lead(source)
                if "company" in made:
                    fields["company_ids"] = [made["company"]["_id"]]
            else:
                fields = deal_from_lead(source)
                stages = stages_of(await self.core.config.settings())
                fields.update(
                    stage_id=stages[0].id,
                    stage_semantics=stages[0].semantics.value,
                    company_id=made["company"]["_id"] if "company" in made else None,
                    contact_ids=[made["contact"]["_id"]] if "contact" in made else [],
                )
            doc: Document = {
                "emails": [],
                "phones": [],
                "source": "",
                "comments": "",
                "custom_fields": {},
                **fields,
                "_id": new_id(),
                "type": record_type,
                "lead_id": lead_id,
                "created_by": actor_id,
                "created_at": now,
                "modified_by": actor_id,
                "modified_at": now,
                "open_activities": 0,
            }
            # Only the custom fields the new record's type defines come along.
            known = {d.code for d in settings.custom_fields.get(record_type, [])}  # type: ignore[call-overload]
            doc["custom_fields"] = {
                k: v for k, v in doc.get("custom_fields", {}).items() if k in known
            }
            doc["title"] = derived_title(doc) or record_title(lead)
            doc["open"] = record_is_open(record_type, doc.get("status"), _semantics(doc))
            doc.update(search_keys(doc))
            await self._records.insert_one(doc)
            self.core.counters.records_changed((None, doc))
            await self.core.record_history(doc, actor_id, "created", "lead_id", None, lead_id)
            made[record_type] = doc
        converted = {t: d["_id"] for t, d in made.items()}
        updated = await self._records.find_one_and_update(
            {"_id": lead_id, "converting": token},
            {
                "$set": {
                    "status": "converted",
                    "open": False,
                    "converted": converted,
                    "converting": None,
                    "modified_by": actor_id,
                    "modified_at": now,
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        assert updated is not None
        self.core.counters.records_changed(({**updated, "open": bool(lead.get("open"))}, updated))
        await self.core.record_history(updated, actor_id, "converted", "mode", None, mode.value)
        # The lead's mail goes with it, open and completed, and with it its codes and threads:
        # replies to mail sent from the lead land on the record it became.
        # (read by the owner index and the type checked here: with the type in the filter the
        # embedded database reads every activity of the company)
        emails = [
            a
            async for a in self.core.activities.find({"owner_id": lead_id})
            if a.get("type") == "email"
        ]
        if emails:
            target = made[emails_to]
            await self.activities.relocate(emails, updated, target, actor_id)
            updated = await self._records.find_one({"_id": lead_id}) or updated
            made[emails_to] = await self._records.find_one({"_id": target["_id"]}) or target
        for doc in made.values():
            if doc["type"] == "deal":
                await self._remember(doc)
            await self.core.announce_record(doc)
        await self.core.announce_record(updated)
        created: dict[str, RecordOut] = {}
        for t, doc in made.items():
            created[t] = await self.core.record_for(viewer, doc)
        return ConversionResult(lead=await self.core.record_for(viewer, updated), created=created)

    async def _use_existing(
        self, doc: Document, lead: Document, actor_id: str, company: Document | None
    ) -> Document:
        """An existing contact or company the lead converts into: it gets the lead's e-mails
        and phones it lacks (so that the lead's mail keeps finding it) and, for a contact, the
        conversion's company."""
        before = dict(doc)
        after = dict(doc)
        after["emails"] = _merged(doc.get("emails", []), lead.get("emails", []), "value")
        after["phones"] = _merged(doc.get("phones", []), lead.get("phones", []), "number")
        if doc["type"] == "contact" and company is not None:
            after["company_ids"] = with_added(doc.get("company_ids", []), [company["_id"]])
        after.update(search_keys(after))
        changed = changes(before, after, TRACKED[doc["type"]])
        sets = {k: v for k, v in after.items() if k != "_id" and before.get(k) != v}
        if sets:
            after["modified_by"] = sets["modified_by"] = actor_id
            after["modified_at"] = sets["modified_at"] = utcnow()
            await self._records.update_one({"_id": doc["_id"]}, {"$set": sets})
        for change in changed:
            await self.core.record_history(
                after, actor_id, "field", change.field, change.old, change.new
            )
        await self.core.record_history(after, actor_id, "linked", "lead_id", None, lead["_id"])
        return after

    # delete ----------------------------------------------------------------------------------

    async def _delete_counted(self, doc: Document) -> None:
        """Delete a record, telling the idle number what it was (see ``_write_counted``)."""
        current: Document | None = doc
        for _attempt in range(GUARDED_ATTEMPTS):
            if current is None:
                return  # deleted meanwhile
            result = await self._records.delete_one(
                {"_id": doc["_id"], **{f: current.get(f) for f in COUNTED_RECORD_FIELDS}}
            )
            if result.deleted_count:
                self.core.counters.records_changed((current, None))
                return
            current = await self._records.find_one({"_id": doc["_id"]})
        await self._records.delete_one({"_id": doc["_id"]})
        self.core.counters.touch([doc["responsible_id"]])

    async def delete(self, actor_id: str, record_type: str, record_id: str) -> None:
        viewer = await self._viewer(actor_id)
        doc = await self.core.visible_record(viewer, record_type, record_id)
        activities = [a async for a in self.core.activities.find({"owner_id": record_id})]
        await self.core.activities.delete_many({"owner_id": record_id})
        self.core.counters.activities_changed(
            *[(a, None) for a in activities if not a.get("completed")]
        )
        await self._delete_counted(doc)
        linked = [
            r["_id"]
            async for r in self._records.find(
                {
                    "$or": [
                        {"company_ids": record_id},
                        {"company_id": record_id},
                        {"contact_ids": record_id},
                    ]
                },
                {"_id": 1},
            )
        ]
        if record_type == "company":
            await self._records.update_many(
                {"type": "contact", "company_ids": record_id}, {"$pull": {"company_ids": record_id}}
            )
            await self._records.update_many(
                {"type": "deal", "company_id": record_id}, {"$set": {"company_id": None}}
            )
            await self.core.store["crm_link_memory"].delete_one({"_id": record_id})
        elif record_type == "contact":
            await self._records.update_many(
                {"type": "deal", "contact_ids": record_id}, {"$pull": {"contact_ids": record_id}}
            )
        await self.core.record_history(doc, actor_id, "deleted")
        await self.core.announce_record_removed(doc)
        for act in activities:
            await self.core.announce_activity(act, doc, removed=True)
        async for other in self._records.find({"_id": {"$in": linked}}):
            await self.core.record_history(
                other, actor_id, "field", "unlinked", {"type": record_type, "id": record_id}, None
            )
            await self.core.announce_record(other)

    # merge -----------------------------------------------------------------------------------

    async def merge(
        self, actor_id: str, record_type: str, survivor_id: str, other_id: str
    ) -> RecordDetail:
        """Two duplicates become one. The survivor takes in what the other has and it lacks
        (``merged_record``), then the other's links, activities (its mail with them: replies
        find their record through the activity) and history; the other is deleted. The caller
        must see both."""
        if record_type not in MERGEABLE_TYPES:
            raise Problem(
                422, "invalid-value", "Invalid value", "only leads, contacts and companies merge"
            )
        if survivor_id == other_id:
            raise Problem(
                422, "invalid-value", "Invalid value", "a record cannot be merged with itself"
            )
        viewer = await self._viewer(actor_id)
        survivor = await self.core.visible_record(viewer, record_type, survivor_id)
        other = await self.core.visible_record(viewer, record_type, other_id)
        if record_type == "lead":
            if survivor.get("converting") or other.get("converting"):
                raise conflict("one of the leads is being converted")
            if other.get("status") == "converted" and survivor.get("status") != "converted":
                raise conflict("merge the other way round: the converted lead survives")
        after = {**survivor, **merged_record(survivor, other)}
        if record_type == "lead" and other.get("converted"):
            after["converted"] = {**other["converted"], **(survivor.get("converted") or {})}
        after["title"] = derived_title(after)
        after["open"] = record_is_open(record_type, after.get("status"), _semantics(after))
        after.update(search_keys(after))
        after["modified_by"] = actor_id
        after["modified_at"] = utcnow()
        # The other's activities, each moved by a write guarded by what counting reads of
        # it, so that the counters take each one's exact difference (no recount of anyone);
        # one added to the other meanwhile is taken by the next look.
        moving = {"owner_id": survivor_id, "record_responsible_id": after["responsible_id"]}
        moved: list[Document] = []
        for _look in range(GUARDED_ATTEMPTS):
            left = [a async for a in self.core.activities.find({"owner_id": other_id})]
            if not left:
                break
            for act in left:
                done = await self.activities.put_on(act, other, moving)
                if done is not None:
                    moved.append(done)
        opened = sum(1 for a in moved if not a.get("completed"))
        linked = await self._move_links(record_type, survivor_id, other_id)
        if record_type == "contact":
            linked.update(after.get("company_ids", []))  # a company lists its contacts
        await self.core.store["crm_history"].update_many(
            {"record_id": other_id}, {"$set": {"record_id": survivor_id}}
        )
        sets = {
            k: v
            for k, v in after.items()
            if k not in ("_id", "open_activities") and survivor.get(k) != v
        }
        after = await self._merge_counted(survivor, sets, opened)
        await self._delete_counted(other)
        for change in changes(survivor, after, TRACKED[record_type]):
            await self.core.record_history(
                after, actor_id, "field", change.field, change.old, change.new
            )
        await self.core.record_history(
            after,
            actor_id,
            "merged",
            "record",
            None,
            {"id": other_id, "title": record_title(other)},
        )
        await self.core.announce_record_removed(other, merged_into=survivor_id)
        await self.core.announce_record(after)
        for act in moved:
            await self.core.announce_activity(act, after)
        async for doc in self._records.find({"_id": {"$in": sorted(linked - {survivor_id})}}):
            await self.core.announce_record(doc)
        return await self.detail_of(viewer, after)

    async def _merge_counted(self, survivor: Document, sets: Document, opened: int) -> Document:
        """The survivor takes the merged fields and the other's ``opened`` open activities
        (added to its count, which may have moved meanwhile); the idle number is told the
        record as it really was just before (see ``_write_counted``). The survivor as
        written."""
        current: Document | None = survivor
        update: Document = {"$inc": {"open_activities": opened}}
        if sets:
            update["$set"] = sets
        for _attempt in range(GUARDED_ATTEMPTS):
            if current is None:
                raise not_found(f"{survivor['type']} {survivor['_id']}")
            result = await self._records.update_one(
                {"_id": survivor["_id"], **{f: current.get(f) for f in COUNTED_RECORD_FIELDS}},
                update,
            )
            if result.matched_count:
                written = {
                    **current,
                    **sets,
                    "open_activities": int(current.get("open_activities", 0)) + opened,
                }
                self.core.counters.records_changed((current, written))
                return written
            current = await self._records.find_one({"_id": survivor["_id"]})
        await self._records.update_one({"_id": survivor["_id"]}, update)
        self.core.counters.touch([survivor["responsible_id"], sets.get("responsible_id", "")])
        found = await self._records.find_one({"_id": survivor["_id"]})
        return found or {**survivor, **sets}

    async def _move_links(self, record_type: str, survivor_id: str, other_id: str) -> set[str]:
        """What linked to the merged-away record links to the survivor; returns the records
        whose links changed."""
        records = self._records
        linked: set[str] = set()
        if record_type == "contact":
            query: Document = {"type": "deal", "contact_ids": other_id}
            linked.update([d["_id"] async for d in records.find(query, {"_id": 1})])
            await records.update_many(query, {"$addToSet": {"contact_ids": survivor_id}})
            await records.update_many(query, {"$pull": {"contact_ids": other_id}})
        elif record_type == "company":
            query = {"type": "contact", "company_ids": other_id}
            linked.update([d["_id"] async for d in records.find(query, {"_id": 1})])
            await records.update_many(query, {"$addToSet": {"company_ids": survivor_id}})
            await records.update_many(query, {"$pull": {"company_ids": other_id}})
            query = {"type": "deal", "company_id": other_id}
            linked.update([d["_id"] async for d in records.find(query, {"_id": 1})])
            await records.update_many(query, {"$set": {"company_id": survivor_id}})
            await self.core.store["crm_link_memory"].delete_one({"_id": other_id})
        else:
            query = {"lead_id": other_id}
            linked.update([d["_id"] async for d in records.find(query, {"_id": 1})])
            await records.update_many(query, {"$set": {"lead_id": survivor_id}})
        return linked


GUARDED_ATTEMPTS = 20
# What the idle number reads of a record.
COUNTED_RECORD_FIELDS = ("type", "responsible_id", "open", "open_activities")


def _merged(mine: list[Document], theirs: list[Document], key: str) -> list[Document]:
    """``mine`` and then those of ``theirs`` it lacks (compared as duplicate control does)."""
    norm = normal_email if key == "value" else phone_key
    known = {norm(str(e.get(key, ""))) for e in mine}
    out = list(mine)
    for entry in theirs:
        value = norm(str(entry.get(key, "")))
        if value and value not in known:
            known.add(value)
            out.append(dict(entry))
    return out[:20]


def _semantics(doc: Document) -> StageSemantics | None:
    value = doc.get("stage_semantics")
    return StageSemantics(value) if value else None


def _probe_of(doc: Document) -> Probe:
    t = doc["type"]
    company = doc.get("title", "") if t == "company" else doc.get("company_title", "")
    return Probe.of(
        emails=[e["value"] for e in doc.get("emails", [])],
        phones=[p["number"] for p in doc.get("phones", [])],
        first_name=doc.get("first_name", "") if t != "company" else "",
        last_name=doc.get("last_name", "") if t != "company" else "",
        company_title=company,
    )


MIN_PARTIAL_PHONE_DIGITS = 3
_PHONE_TEXT = re.compile(r"^\+?[\d\s().\/-]+$")


def _text_filter(q: str) -> Document:
    needle = q.strip()
    pattern = re.escape(normal_name(needle))
    ors: list[Document] = [{"search_text": {"$regex": pattern}}]
    if "@" in needle:
        ors.append({"email_keys": normal_email(needle)})
    digits = phone_digits(needle)
    if len(digits) >= 5:
        ors.append({"phone_keys": phone_key(needle)})
    return {"$or": ors}


def _cursor(value: str) -> str:
    try:
        ObjectId(value)
    except (InvalidId, TypeError):
        raise Problem(422, "invalid-value", "Invalid value", "pass next_cursor as given") from None
    return value
