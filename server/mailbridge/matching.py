"""Which CRM record an incoming mail belongs to, in the order the issue lays down:

1. a reply code (plus-address, subject, body text or HTML) that verifies;
2. ``In-Reply-To`` / ``References`` naming a ``Message-ID`` we sent;
3. an admin's subject rule that extracts a service code;
4. the sender's address belonging to exactly one lead, contact or company - unless the
   mail server in front reported that the sender failed authentication
   (``authresults.py``): a forged ``From`` must not put a stranger's mail on a customer;
5. otherwise the caller decides: a new lead, or the unmatched list.

A code that fails verification is not a match; matching falls through to the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.crm.rules import normal_email
from server.mailbridge.codes import code_from_address, find_codes, verify
from server.mailbridge.keys import CodeKeys
from server.mailbridge.models import MailSettings
from server.mailbridge.parsing import ParsedMail
from server.mailbridge.rules import SubjectRule, apply_rules, sender_matches
from server.store.database import Document, Store

SENDER_TYPES = ("lead", "contact", "company")
# What matching reads of an activity (not the mail's bodies) and of a deal's contacts.
_ACTIVITY_FIELDS = {"owner_id": 1, "mail.message_id": 1}
_CONTACT_FIELDS = {"emails": 1, "first_name": 1, "last_name": 1, "title": 1}


@dataclass
class Match:
    how: str  # code, thread, rule, sender, none
    record: Document | None = None
    activity_id: str | None = None  # the outgoing mail replied to, when known
    # a valid code or thread, but the sender is not one of the record's addresses
    flagged: bool = False
    candidates: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""


@dataclass
class Lookups:
    """What one batch of mail reads before matching, one query per kind (``prefetch``);
    what is not here is read when needed. Keys present with no document: looked up, none."""

    activities: dict[str, Document | None] = field(default_factory=dict)  # by _id
    sent: dict[str, Document] = field(default_factory=dict)  # outgoing, by mail.message_id
    sent_known: set[str] = field(default_factory=set)
    records: dict[str, Document | None] = field(default_factory=dict)  # by _id
    contacts: dict[str, Document] = field(default_factory=dict)  # of deals, by _id
    senders: dict[str, list[Document]] = field(default_factory=dict)  # by normal address
    # earlier copies by Message-ID (``MailPipeline``)
    copies: dict[str, list[Document]] = field(default_factory=dict)
    copies_known: set[str] = field(default_factory=set)


def thread_ids(mail: ParsedMail) -> list[str]:
    return [i for i in [mail.in_reply_to, *reversed(mail.references)] if i]


class Matcher:
    def __init__(self, store: Store, keys: CodeKeys, inbox_address: str) -> None:
        self._store = store
        self._keys = keys
        self._inbox_local = inbox_address.split("@", 1)[0]

    async def prefetch(self, mails: list[ParsedMail], recipients: list[list[str]]) -> Lookups:
        """For a batch of mail: the activities its valid codes name, the mail of ours its
        threads name, their records, the deals' contacts and the records of its senders'
        addresses, each kind in one query (on one indexed field, with ``$in``)."""
        found = Lookups()
        _current, keys = await self._keys.keys()
        code_ids: set[str] = set()
        for mail, to in zip(mails, recipients, strict=False):
            for token in self._tokens(mail, to):
                ref = verify(token, keys)
                if ref is not None:
                    code_ids.add(ref.activity_id)
        acts = self._store["crm_activities"]
        if code_ids:
            found.activities = dict.fromkeys(code_ids)
            async for act in acts.find({"_id": {"$in": sorted(code_ids)}}, _ACTIVITY_FIELDS):
                found.activities[act["_id"]] = act
        threads = sorted({i for mail in mails for i in thread_ids(mail)})
        if threads:
            found.sent_known = set(threads)
            async for act in acts.find({"mail.message_id": {"$in": threads}}, _ACTIVITY_FIELDS):
                found.sent.setdefault(act["mail"]["message_id"], act)
        owners = {a["owner_id"] for a in [*found.activities.values(), *found.sent.values()] if a}
        records = self._store["crm_records"]
        if owners:
            found.records = dict.fromkeys(owners)
            async for record in records.find({"_id": {"$in": sorted(owners)}}):
                found.records[record["_id"]] = record
        contact_ids = {
            cid
            for r in found.records.values()
            if r is not None and r["type"] == "deal"
            for cid in r.get("contact_ids") or []
        }
        if contact_ids:
            async for c in records.find({"_id": {"$in": sorted(contact_ids)}}, _CONTACT_FIELDS):
                found.contacts[c["_id"]] = c
        senders = sorted({s for s in (normal_email(m.from_address) for m in mails) if s})
        if senders:
            found.senders = {s: [] for s in senders}
            async for r in records.find({"email_keys": {"$in": senders}}).limit(50 * len(senders)):
                for key in r.get("email_keys", []):
                    if key in found.senders:
                        found.senders[key].append(r)
        return found

    async def match(
        self,
        mail: ParsedMail,
        recipients: list[str],
        settings: MailSettings,
        distrusted: str | None = None,
        lookups: Lookups | None = None,
    ) -> Match:
        """``distrusted``: why the sender's address is not to be believed (its authentication
        failed); then the sender step only names the records it belongs to, as candidates.
        ``lookups``: what was read for the batch (``prefetch``)."""
        found = lookups or Lookups()
        by_code = await self._by_code(mail, recipients, found)
        if by_code is not None:
            return by_code
        by_thread = await self._by_thread(mail, found)
        if by_thread is not None:
            return by_thread
        by_rule = await self._by_rule(mail, settings)
        if by_rule is not None:
            return by_rule
        by_sender = await self._by_sender(mail, found)
        if distrusted is None:
            return by_sender
        candidates = by_sender.candidates
        if by_sender.record is not None:
            record = by_sender.record
            candidates = [
                {"type": record["type"], "id": record["_id"], "title": record.get("title", "")}
            ]
        return Match(
            "none",
            candidates=candidates,
            reason=f"sender not authenticated ({distrusted}): not matched by its address",
        )

    # 1 ---------------------------------------------------------------------------------------

    def _tokens(self, mail: ParsedMail, recipients: list[str]) -> list[str]:
        tokens: list[str] = []
        for address in [*recipients, *mail.to, *mail.cc]:
            local = address.split("@", 1)[0]
            token = code_from_address(local, self._inbox_local)
            if token:
                tokens.append(token)
        # The mail's own text first; then messages it carries as attachments (a forward as
        # .eml), whose code is the mail's own code forwarded.
        for text in (mail.subject, mail.text, mail.html_sanitised or "", *mail.attached_texts):
            tokens.extend(find_codes(text))
        return list(dict.fromkeys(tokens))

    async def _activity(self, activity_id: str, found: Lookups) -> Document | None:
        if activity_id in found.activities:
            return found.activities[activity_id]
        return await self._store["crm_activities"].find_one({"_id": activity_id}, _ACTIVITY_FIELDS)

    async def _record(self, record_id: str, found: Lookups) -> Document | None:
        if record_id in found.records:
            return found.records[record_id]
        return await self._store["crm_records"].find_one({"_id": record_id})

    async def _by_code(
        self, mail: ParsedMail, recipients: list[str], found: Lookups
    ) -> Match | None:
        tokens = self._tokens(mail, recipients)
        if not tokens:
            return None
        _current, keys = await self._keys.keys()
        for token in tokens:
            ref = verify(token, keys)
            if ref is None:
                continue  # forged, altered or retired: not a code
            activity = await self._activity(ref.activity_id, found)
            if activity is None:
                continue
            record = await self._record(activity["owner_id"], found)
            if record is None:
                continue
            return Match(
                "code",
                record,
                activity_id=activity["_id"],
                flagged=not await self._senders_record(mail, record, found),
            )
        return None

    async def _senders_record(
        self, mail: ParsedMail, record: Document, found: Lookups | None = None
    ) -> bool:
        """Whether the sender is one of the record's addresses (or its contacts')."""
        emails = [e["value"] for e in record.get("emails", [])]
        emails += [
            e["value"]
            for c in await self.linked_contacts(record, found)
            for e in c.get("emails", [])
        ]
        return sender_matches(mail.from_address, emails)

    async def linked_contacts(
        self, record: Document, found: Lookups | None = None
    ) -> list[Document]:
        """A deal's contacts (in the deal's order) or a company's; none for others."""
        query: Document | None = None
        if record["type"] == "deal" and record.get("contact_ids"):
            ids = list(record["contact_ids"])
            if found is not None and all(cid in found.contacts for cid in ids):
                return [found.contacts[cid] for cid in ids]
            query = {"_id": {"$in": ids}}
        elif record["type"] == "company":
            query = {"type": "contact", "company_ids": record["_id"]}
        if query is None:
            return []
        contacts = [
            c async for c in self._store["crm_records"].find(query, _CONTACT_FIELDS).limit(500)
        ]
        order = {cid: i for i, cid in enumerate(record.get("contact_ids") or [])}
        return sorted(contacts, key=lambda c: (order.get(c["_id"], len(order)), c["_id"]))

    # 2 ---------------------------------------------------------------------------------------

    async def _by_thread(self, mail: ParsedMail, found: Lookups) -> Match | None:
        ids = thread_ids(mail)
        if not ids:
            return None
        activity: Document | None
        if all(i in found.sent_known for i in ids):
            activity = next((found.sent[i] for i in ids if i in found.sent), None)
        else:
            # Only our own outgoing mail carries mail.message_id (incoming mail keeps its id
            # in mail.incoming_message_id), so the indexed field alone selects it.
            activity = await self._store["crm_activities"].find_one(
                {"mail.message_id": {"$in": ids}}, _ACTIVITY_FIELDS
            )
        if activity is None:
            return None
        record = await self._record(activity["owner_id"], found)
        if record is None:
            return None
        # A Message-ID is no secret (it travels in every copy and every reply), so a stranger
        # who was copied in, or wrote References by hand, matches too: flagged, as a code is.
        return Match(
            "thread",
            record,
            activity_id=activity["_id"],
            flagged=not await self._senders_record(mail, record, found),
        )

    # 3 ---------------------------------------------------------------------------------------

    async def _by_rule(self, mail: ParsedMail, settings: MailSettings) -> Match | None:
        rules = [
            SubjectRule(r.id, r.pattern, r.record_type, r.field) for r in settings.subject_rules
        ]
        hit = apply_rules(rules, mail.subject)
        if hit is None:
            return None
        rule, code = hit
        key = "_id" if rule.field == "id" else f"custom_fields.{rule.field}"
        record = await self._store["crm_records"].find_one({"type": rule.record_type, key: code})
        if record is None:
            return None
        return Match("rule", record)

    # 4 ---------------------------------------------------------------------------------------

    async def _by_sender(self, mail: ParsedMail, lookups: Lookups) -> Match:
        sender = normal_email(mail.from_address)
        if not sender:
            return Match("none", reason="no sender address")
        # None found for the batch is read again: a lead made from an earlier mail of the
        # same batch is this sender's record now.
        if lookups.senders.get(sender):
            holding = lookups.senders[sender][:50]
        else:
            holding = [
                r async for r in self._store["crm_records"].find({"email_keys": sender}).limit(50)
            ]
        found = [
            r
            for r in holding
            # a converted lead's address lives on in the records made from it; deals have none
            if r["type"] in ("contact", "company")
            or (r["type"] == "lead" and r.get("status") != "converted")
        ][:20]
        if len(found) == 1:
            return Match("sender", found[0])
        if found:
            return Match(
                "none",
                candidates=[
                    {"type": r["type"], "id": r["_id"], "title": r.get("title", "")} for r in found
                ],
                reason="the sender's address belongs to several records",
            )
        return Match("none", reason="unknown sender")
