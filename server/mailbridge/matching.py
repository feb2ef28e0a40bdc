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


@dataclass
class Match:
    how: str  # code, thread, rule, sender, none
    record: Document | None = None
    activity_id: str | None = None  # the outgoing mail replied to, when known
    # a valid code or thread, but the sender is not one of the record's addresses
    flagged: bool = False
    candidates: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""


class Matcher:
    def __init__(self, store: Store, keys: CodeKeys, inbox_address: str) -> None:
        self._store = store
        self._keys = keys
        self._inbox_local = inbox_address.split("@", 1)[0]

    async def match(
        self,
        mail: ParsedMail,
        recipients: list[str],
        settings: MailSettings,
        distrusted: str | None = None,
    ) -> Match:
        """``distrusted``: why the sender's address is not to be believed (its authentication
        failed); then the sender step only names the records it belongs to, as candidates."""
        for step in (self._by_code, self._by_thread):
            found = await step(mail, recipients)
            if found is not None:
                return found
        found = await self._by_rule(mail, settings)
        if found is not None:
            return found
        by_sender = await self._by_sender(mail)
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

    async def _by_code(self, mail: ParsedMail, recipients: list[str]) -> Match | None:
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
        if not tokens:
            return None
        _current, keys = await self._keys.keys()
        for token in dict.fromkeys(tokens):
            ref = verify(token, keys)
            if ref is None:
                continue  # forged, altered or retired: not a code
            activity = await self._store["crm_activities"].find_one({"_id": ref.activity_id})
            if activity is None:
                continue
            record = await self._store["crm_records"].find_one({"_id": activity["owner_id"]})
            if record is None:
                continue
            return Match(
                "code",
                record,
                activity_id=activity["_id"],
                flagged=not await self._senders_record(mail, record),
            )
        return None

    async def _senders_record(self, mail: ParsedMail, record: Document) -> bool:
        """Whether the sender is one of the record's addresses (or its contacts')."""
        emails = [e["value"] for e in record.get("emails", [])]
        emails += await self._linked_contact_emails(record)
        return sender_matches(mail.from_address, emails)

    async def _linked_contact_emails(self, record: Document) -> list[str]:
        """A deal's or company's mail goes to its contacts: their addresses count as the
        record's."""
        return [e["value"] for c in await self.linked_contacts(record) for e in c.get("emails", [])]

    async def linked_contacts(self, record: Document) -> list[Document]:
        """A deal's contacts (in the deal's order) or a company's; none for others."""
        query: Document | None = None
        if record["type"] == "deal" and record.get("contact_ids"):
            query = {"_id": {"$in": record["contact_ids"]}}
        elif record["type"] == "company":
            query = {"type": "contact", "company_ids": record["_id"]}
        if query is None:
            return []
        found = [
            c
            async for c in self._store["crm_records"]
            .find(query, {"emails": 1, "first_name": 1, "last_name": 1, "title": 1})
            .limit(500)
        ]
        order = {cid: i for i, cid in enumerate(record.get("contact_ids") or [])}
        return sorted(found, key=lambda c: (order.get(c["_id"], len(order)), c["_id"]))

    # 2 ---------------------------------------------------------------------------------------

    async def _by_thread(self, mail: ParsedMail, recipients: list[str]) -> Match | None:
        ids = [i for i in [mail.in_reply_to, *reversed(mail.references)] if i]
        if not ids:
            return None
        # Only our own outgoing mail carries mail.message_id (incoming mail keeps its id in
        # mail.incoming_message_id), so the indexed field alone selects it.
        activity = await self._store["crm_activities"].find_one({"mail.message_id": {"$in": ids}})
        if activity is None:
            return None
        record = await self._store["crm_records"].find_one({"_id": activity["owner_id"]})
        if record is None:
            return None
        # A Message-ID is no secret (it travels in every copy and every reply), so a stranger
        # who was copied in, or wrote References by hand, matches too: flagged, as a code is.
        return Match(
            "thread",
            record,
            activity_id=activity["_id"],
            flagged=not await self._senders_record(mail, record),
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

    async def _by_sender(self, mail: ParsedMail) -> Match:
        sender = normal_email(mail.from_address)
        if not sender:
            return Match("none", reason="no sender address")
        found = [
            r
            async for r in self._store["crm_records"].find({"email_keys": sender}).limit(50)
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
