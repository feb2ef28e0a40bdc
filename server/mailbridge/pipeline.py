"""From a stored raw message to an incoming email activity on the right record.

One loop per node claims stored messages with a lease and processes them: parse (in a
thread: large MIME is slow), sort out noise (our own mail coming back, bounces,
auto-replies), drop copies already delivered, match, and append the activity. Every outcome
is written back on the raw message - ``done``, ``duplicate``, ``bounce``, ``ignored``,
``unmatched`` (kept for an admin to assign), ``refused`` (too complex to parse safely) - so
nothing is silently dropped. The activity carries the raw message's id under a unique index:
a message processed again after a crash cannot make a second activity.

A claim is a lease held by this node (``leases.py``): renewed while the message is processed,
given back when the node stops, taken over at once after a crash on the embedded database.
On the embedded database this node is the only one there can be, so its claims are kept in
memory (``_held``) and cost no write: the message's document is written once, with its
outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from gridfs import AsyncGridFSBucket
from pymongo.errors import DuplicateKeyError

from server.background import POLLER_GAP_WAIT, Gap, no_gap, raise_if_stopping, stop
from server.crm.activities import NewActivity
from server.crm.models import LeadCreate, TypedEmail
from server.crm.records import MAIL_CREATOR
from server.crm.rules import may_manage_settings
from server.crm.service import Crm
from server.im.service import ImService
from server.mailbridge.authresults import UNCHECKED, Verdict, judge, trusted_results
from server.mailbridge.inbox import RawInbox
from server.mailbridge.leases import LEASE, orphaned, renewing
from server.mailbridge.matching import Lookups, Match, Matcher
from server.mailbridge.models import MailSettings
from server.mailbridge.noise import Noise, bounce_info, classify, failed_in_text
from server.mailbridge.parsing import Limits, MailTooComplex, ParsedMail, parse
from server.mailbridge.rules import lead_allowed, split_name
from server.observability import instruments
from server.observability.context import traced
from server.store.database import Document, Store, utcnow
from server.text import clean_name

log = logging.getLogger(__name__)

RETRY_AFTER = timedelta(seconds=30)
IDLE_POLL_SECONDS = 5.0
# Workers per node, each claiming a few messages at a time: while one waits for the database
# another parses or matches. The claims are plain reads and guarded writes (``inbox.py``):
# concurrent findAndModify claims were seen to hang the embedded database.
WORKERS = 4
CLAIM_BATCH = 8
LEAD_WAIT_SECONDS = 5.0
PREVIEW_CHARS = 500  # of an unmatched mail's text, for the list admins assign from
MAX_REFERENCES_KEPT = 20  # of an incoming mail's References, for a reply's own
# Final outcomes a copy of a mail (the same Message-ID) is a duplicate of: delivered, or
# waiting on (or dismissed from) the unmatched list, which shows each mail once.
COPY_OF = frozenset({"done", "unmatched", "dismissed"})
WAITING = ("unmatched", "refused")
NOTICE_LINES = 5  # mails named in one notice of a batch's new mail on one record
NO_LEAD = "unknown sender; no lead made (exception or too many)"


def is_postmaster(address: str) -> bool:
    """RFC 5321's ``postmaster`` (with or without a domain): the listener takes it for the
    administrators, never for a record."""
    bare = address.strip().strip("<>")
    local = bare.rpartition("@")[0] if "@" in bare else bare
    return local.lower() == "postmaster"


def _sender(mail: ParsedMail) -> str:
    return mail.from_name or mail.from_address


def _from(mail: ParsedMail, verdict: Verdict) -> str:
    """The sender as a notice names them, flagged when not authenticated."""
    warning = " (sender not authenticated)" if verdict.suspicious else ""
    return f"{_sender(mail)}{warning}"


def hour_bucket(now: datetime) -> str:
    """The clock hour (UTC) the global limit on leads from mail counts in."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H")


# A claimed message, what parsing made of it (or the exception reading or parsing raised:
# ``MailTooComplex`` is an outcome, anything else is retried), and its bytes.
Read = tuple[Document, "ParsedMail | Exception", bytes]


@dataclass
class Delivery:
    """A message matched to a record, waiting to be written with the rest of its batch."""

    doc: Document
    mail: ParsedMail
    match: Match
    auto_reply: bool
    verdict: Verdict
    summary: Document

    def outcome(self, activity_id: str | None) -> Document:
        record = self.match.record
        assert record is not None
        return {
            **self.summary,
            "how": self.match.how,
            "record_type": record["type"],
            "record_id": record["_id"],
            "activity_id": activity_id,
            "flagged": self.match.flagged,
        }


async def _raise(exc: Exception) -> None:
    raise exc


class TryLater(Exception):
    """Not a failure: the message waits for something another delivery is doing."""


class MailPipeline:
    def __init__(
        self,
        store: Store,
        inbox: RawInbox,
        matcher: Matcher,
        crm: Crm,
        im: ImService,
        settings: Callable[[], Awaitable[MailSettings]],
        limits: Limits,
        node: str,
        sole_node: bool = False,
        trusted_authserv_ids: frozenset[str] = frozenset(),
    ) -> None:
        self._store = store
        self._inbox = inbox
        self._matcher = matcher
        self._crm = crm
        self._im = im
        self._settings = settings
        self._limits = limits
        # Not flushed per chunk: the journaled insert of the activity that names them comes
        # after them and flushes the database's log through them.
        self._files = AsyncGridFSBucket(store.relaxed_db(), bucket_name="mail_attachments")
        self.origin: str | None = None  # our X-PortalHub-Origin value (the portal's domain)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Set by the node that writes events (``StreamLog.after_batch``); at once otherwise.
        self.gap: Gap = no_gap
        self._node = node
        self._sole_node = sole_node  # the embedded database: no other node can exist
        self.trusted_authserv_ids = trusted_authserv_ids
        self._held: set[str] = set()  # raw messages this node has claimed and not finished
        # On the sole node: those finished while a worker's read of what waits is under way.
        # That read may have been answered before their outcomes were written, and they have
        # already left ``_held``: without this they were taken again, their activity insert
        # met its own unique key, and each such message cost its user a full recount.
        self._finished_while_reading: set[str] | None = None
        self._claiming = asyncio.Lock()  # in memory (the sole node): one worker picks at a time
        # Told when a message reached its outcome (the IMAP collector then moves or deletes it).
        self.on_finished: list[Callable[[Document], Awaitable[None]]] = []
        # Told when the unmatched list changed (its count is a live badge for CRM admins).
        self.on_unmatched: list[Callable[[], Awaitable[None]]] = []

    async def take_orphans(self) -> None:
        """At start-up on the embedded database: what a process that died held is free now
        (its messages' leases, and the claims it made to create a lead)."""
        if not self._sole_node:
            return
        taken = await self._inbox.take_orphans(self._node, self._sole_node)
        claims = self._store["mail_lead_claims"]
        stale = [
            c["_id"]
            async for c in claims.find({"lead_id": None})
            if orphaned(c.get("node"), self._node, self._sole_node) or "node" not in c
        ]
        if stale:
            await claims.delete_many({"_id": {"$in": stale}, "lead_id": None})
        if taken or stale:
            log.info("took over %s mail leases and %s lead claims of a stopped node", taken, stale)

    @property
    def busy(self) -> bool:
        """Whether this node is still working on messages it claimed: an outcome is stored
        before what follows it (the notices, the unmatched count) is done."""
        return bool(self._held)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"mail-pipeline-{n}") for n in range(WORKERS)
        ]

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        await stop(*self._tasks)
        self._tasks = []
        held, self._held = sorted(self._held), set()
        if held and not self._sole_node:  # in memory only on the sole node
            # Given back, so that the next start (or another node) takes them at once.
            try:
                await self._inbox.give_back(held, self._node)
            except Exception:
                log.warning("could not give back %s mail leases", len(held), exc_info=True)

    async def _run(self) -> None:
        polled = False
        while True:
            try:
                if polled:
                    # The idle poll (not a wake: new mail goes at once) in the gap after a
                    # batch of events, not beside a chat message's inserts (background.Gap).
                    await self.gap(POLLER_GAP_WAIT)
                await self.drain()
            except Exception:
                raise_if_stopping()
                log.exception("mail pipeline round failed")
            self._wake.clear()
            polled = False
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                polled = True

    async def drain(self) -> int:
        """Process every message waiting; returns how many reached an outcome here."""
        done = 0
        while batch := await self._claim():
            done += await self._process_claimed(batch)
        return done

    async def _claim(self) -> list[Document]:
        if not self._sole_node:
            leasing: set[str] = set()
            try:
                # ``_process_claimed`` holds what this returns before its first wait
                return await self._inbox.claim_some(self._node, CLAIM_BATCH, leasing)
            except asyncio.CancelledError:
                # A stop between the lease and its return: ``close`` gives those back too.
                self._held.update(leasing)
                raise
        async with self._claiming:  # held before another worker reads what is waiting
            finished: set[str] = set()
            self._finished_while_reading = finished
            try:
                found = await self._inbox.waiting(CLAIM_BATCH, self._held)
            finally:
                self._finished_while_reading = None
            # A message finished before this read began has its outcome stored (the write
            # returned first): the read does not see it waiting.
            batch = [doc for doc in found if doc["_id"] not in finished]
            self._held.update(doc["_id"] for doc in batch)
            return batch

    async def _process_claimed(self, batch: list[Document]) -> int:
        """The messages of one claim, their leases renewed together, processed side by side:
        what each writes after its match (the activity's events, the counters, the notice)
        then goes out in the shared writers' batches instead of one round trip per reply,
        and what each reads first (copies delivered before, the records codes and threads
        name) is read once for the lot. Copies of one message (the same Message-ID) go one
        after the other, so that a later copy finds the earlier one's outcome."""
        left = [doc["_id"] for doc in batch]
        self._held.update(left)
        done = 0
        leased = (
            contextlib.nullcontext()
            if self._sole_node
            else renewing(partial(self._inbox.renew_some, left, self._node), "mail claim")
        )
        async with leased:
            read = await asyncio.gather(*(self._read(doc) for doc in batch))
            try:
                lookups = await self._look_up([r for r in read if isinstance(r[1], ParsedMail)])
            except Exception:
                raise_if_stopping()
                # Each message then reads what it needs itself (and fails, and is retried,
                # on its own if the database is away).
                log.warning("reading for a batch of mail failed", exc_info=True)
                lookups = Lookups()
            groups: dict[str, list[Read]] = {}
            for one in read:
                mail = one[1]
                key = mail.message_id if isinstance(mail, ParsedMail) else ""
                groups.setdefault(key or f"-{one[0]['_id']}", []).append(one)

            async def attempt(one: Read, run: Awaitable[None]) -> bool:
                """Runs ``run`` for one message; False when it failed and was released."""
                raw_id = one[0]["_id"]
                try:
                    with traced(request_id=f"mail-{raw_id}"):  # for its logs and events
                        await run
                    return True
                except TryLater as exc:
                    log.info("mail %s waits: %s", raw_id, exc)
                    await self._inbox.release(raw_id, str(exc), utcnow() + RETRY_AFTER)
                except Exception as exc:
                    log.exception("mail %s failed; it is retried", raw_id)
                    await self._inbox.release(raw_id, repr(exc), utcnow() + RETRY_AFTER)
                return False

            def settled(one: Read) -> None:
                left.remove(one[0]["_id"])
                self._held.discard(one[0]["_id"])
                if self._finished_while_reading is not None:
                    self._finished_while_reading.add(one[0]["_id"])

            # The first copy of each message side by side; those that reach a record wait in
            # ``pending`` and are written together (``_deliver_all``): one insert of their
            # activities, one update per record, one of their outcomes - by construction.
            pending: list[Delivery] = []
            firsts = [copies[0] for copies in groups.values()]
            decided = await asyncio.gather(
                *(attempt(one, self.process(one[0], one, lookups, pending)) for one in firsts)
            )
            delivered = await self._deliver_all(pending)
            waited = {d.doc["_id"] for d in pending}
            for one, ok in zip(firsts, decided, strict=True):
                if one[0]["_id"] in waited:
                    failure = delivered.get(one[0]["_id"])
                    if failure is not None:
                        ok = await attempt(one, _raise(failure))
                done += ok
                settled(one)

            async def in_turn(copies: list[Read]) -> int:
                # a later copy looks again: the one before it has just finished
                finished = 0
                for one in copies:
                    finished += await attempt(one, self.process(one[0], one))
                    settled(one)
                return finished

            later = [copies[1:] for copies in groups.values() if len(copies) > 1]
            done += sum(await asyncio.gather(*(in_turn(c) for c in later)))
        return done

    async def _read(self, doc: Document) -> Read:
        """The message's bytes and what parsing made of them (or why it refused), in a
        thread: large MIME is slow."""
        try:
            raw = await self._inbox.raw_of(doc)
        except Exception as exc:  # raised again where the message is processed: retried
            return doc, exc, b""
        try:
            return doc, await asyncio.to_thread(parse, raw, self._limits), raw
        except Exception as exc:  # MailTooComplex is an outcome; anything else is retried
            return doc, exc, raw

    async def _look_up(self, read: list[Read]) -> Lookups:
        """What the batch's messages need read, in one query per kind: the outcomes of
        earlier copies (by Message-ID) and what matching reads (``Matcher.prefetch``)."""
        mails = [m for _doc, m, _raw in read if isinstance(m, ParsedMail)]
        lookups = await self._matcher.prefetch(mails, [list(self._recipients(d)) for d, *_ in read])
        ids = sorted({m.message_id for m in mails if m.message_id})
        if ids:
            # One indexed field with ``$in``: an index lookup per Message-ID.
            async for d in self._inbox.collection.find(
                {"message_id": {"$in": ids}}, {"status": 1, "message_id": 1}
            ).limit(100 * len(ids)):
                lookups.copies.setdefault(d["message_id"], []).append(d)
        lookups.copies_known = set(ids)
        return lookups

    @staticmethod
    def _recipients(doc: Document) -> list[str]:
        return list(doc.get("source", {}).get("recipients", []))

    async def _finish(self, doc: Document, status: str, result: Document) -> None:
        await self._finish_many([(doc, status, result)])

    async def _finish_many(self, outcomes: list[tuple[Document, str, Document]]) -> None:
        """The messages' outcomes, in one write; then what follows each (the IMAP collector's
        move, the unmatched count)."""
        await self._inbox.finish_many(
            [
                (doc["_id"], status, result, doc.get("message_id"))
                for doc, status, result in outcomes
            ]
        )
        for doc, status, result in outcomes:
            instruments.mail_finished(status)
            finished = {**doc, "status": status, "result": result}
            for hook in self.on_finished:
                try:
                    await hook(finished)
                except Exception:
                    log.exception("after-delivery step for mail %s failed", doc["_id"])
        if any(status in WAITING for _doc, status, _result in outcomes):
            await self.unmatched_changed()

    async def unmatched_changed(self) -> None:
        for unmatched_hook in self.on_unmatched:
            try:
                await unmatched_hook()
            except Exception:
                log.exception("telling about the unmatched mail failed")

    async def process(
        self,
        doc: Document,
        read: Read | None = None,
        lookups: Lookups | None = None,
        pending: list[Delivery] | None = None,
    ) -> None:
        """``read``: the message as ``_read`` gave it; ``lookups``: what was read for its
        batch (left out, each is read here); ``pending``: where a message matched to a
        record waits to be delivered with its batch (left out, it is delivered here)."""
        _doc, parsed, raw = read or await self._read(doc)
        if isinstance(parsed, MailTooComplex):
            await self._finish(doc, "refused", {"reason": f"refused: {parsed}"})
            return
        if isinstance(parsed, Exception):
            raise parsed
        mail = parsed
        summary: Document = {
            "from": mail.from_address,
            "from_name": mail.from_name[:200],
            "subject": mail.subject[:500],
        }
        noise = classify(mail, self.origin)
        if noise is Noise.OUR_OWN:
            await self._finish(doc, "ignored", {**summary, "reason": "our own mail came back"})
            return
        if noise is Noise.BOUNCE:
            await self._finish(doc, "bounce", {**summary, **await self._bounced(raw, mail)})
            return
        if mail.message_id:
            # Stored with the outcome (``_finish``): a later copy looks for a copy done.
            doc["message_id"] = mail.message_id
            # Filtered on the indexed field only, the rest here: the embedded database uses an
            # index only when the filter names nothing else.
            if lookups is not None and mail.message_id in lookups.copies_known:
                found = lookups.copies.get(mail.message_id, [])
            else:
                copies = self._inbox.collection.find({"message_id": mail.message_id}, {"status": 1})
                found = [d async for d in copies.limit(100)]
            earlier = [d for d in found if d["status"] in COPY_OF and d["_id"] != doc["_id"]]
            if earlier:
                original = earlier[0]
                if original["status"] == "unmatched":  # one entry on the list, counting copies
                    await self._inbox.collection.update_one(
                        {"_id": original["_id"]}, {"$inc": {"copies": 1}}
                    )
                await self._finish(doc, "duplicate", {**summary, "of": original["_id"]})
                if original["status"] == "unmatched":
                    await self.unmatched_changed()
                return
        summary["date"] = mail.date
        summary["preview"] = (mail.new_text or mail.text)[:PREVIEW_CHARS]
        recipients = self._recipients(doc)
        if recipients and all(is_postmaster(r) for r in recipients):
            await self._to_postmaster(doc, mail, summary)
            return
        settings = await self._settings()
        verdict = self.verdict(mail)
        match = await self._matcher.match(
            mail,
            recipients,
            settings,
            distrusted=verdict.reason if verdict.suspicious else None,
            lookups=lookups,
        )
        if verdict.suspicious:
            summary["suspicious"] = verdict.reason
        if (
            match.record is None
            and not match.candidates
            and noise is Noise.NORMAL
            and settings.create_leads
            and not verdict.suspicious  # a forged address does not go into the CRM
        ):
            lead, why_not = await self._lead_for(mail, settings)
            if lead is not None:
                match = Match("new_lead", lead)
            else:
                match.reason = why_not
        if match.record is None:
            reason = match.reason or "no record matched"
            if noise is Noise.AUTO_REPLY:
                reason = f"auto-reply: {reason}"
            await self._finish(
                doc, "unmatched", {**summary, "reason": reason, "candidates": match.candidates}
            )
            return
        delivery = Delivery(doc, mail, match, noise is Noise.AUTO_REPLY, verdict, summary)
        if pending is not None:
            pending.append(delivery)
            return
        activity_id = await self.deliver(
            doc, mail, match, auto_reply=delivery.auto_reply, verdict=verdict
        )
        await self._finish(
            doc, "done" if activity_id else "duplicate", delivery.outcome(activity_id)
        )

    async def _to_postmaster(self, doc: Document, mail: ParsedMail, summary: Document) -> None:
        """Mail to ``postmaster@`` (RFC 5321 wants the address to work) is for the people who
        run the portal's mail: it waits in the unmatched list, never on a record nor as a
        lead, and the CRM administrators are told."""
        await self._finish(
            doc,
            "unmatched",
            {**summary, "reason": "addressed to postmaster: for the administrators"},
        )
        sender = mail.from_name or mail.from_address or "(no sender)"
        for admin in await self.crm_admins():
            await self._im.post_system_notice(
                admin,
                f"Mail to postmaster from {sender}: {mail.subject or '(no subject)'} "
                "(in the CRM's unmatched mail)",
            )

    async def crm_admins(self) -> list[str]:
        """The CRM administrators (portal admins among them), who look after the inbox."""
        snapshot = await self._crm.access.snapshot()
        return sorted(
            uid for uid, viewer in snapshot.viewers.items() if may_manage_settings(viewer.role)
        )

    def verdict(self, mail: ParsedMail) -> Verdict:
        """What the trusted mail server in front says of the sender (``authresults.py``)."""
        if not self.trusted_authserv_ids:
            return UNCHECKED
        return judge(trusted_results(mail.trace, self.trusted_authserv_ids), mail.from_address)

    async def deliver(
        self,
        doc: Document,
        mail: ParsedMail,
        match: Match,
        auto_reply: bool = False,
        verdict: Verdict = UNCHECKED,
    ) -> str | None:
        """Append the incoming email activity; None when this message already has one."""
        record = match.record
        assert record is not None
        attachments = await self._save_attachments(doc["_id"], mail)
        try:
            activity = await self._crm.activities.add_one(
                self._incoming(doc, mail, match, attachments, auto_reply, verdict)
            )
        except DuplicateKeyError:
            return await self._already_delivered(doc, record)
        if not auto_reply:
            await self._notify(record, mail, verdict)
        return activity.id

    async def _deliver_all(self, pending: list[Delivery]) -> dict[str, Exception]:
        """The batch's messages that reached a record: their activities added together
        (``add_many``: one insert, one open-count update per record, one insert of history),
        then their notices and their outcomes (one write). Returns the failures, by raw
        message id: those messages are released and retried."""
        failures: dict[str, Exception] = {}
        items: list[tuple[Delivery, NewActivity]] = []
        for d in pending:
            try:
                attachments = await self._save_attachments(d.doc["_id"], d.mail)
            except Exception as exc:
                raise_if_stopping()
                failures[d.doc["_id"]] = exc
                continue
            items.append(
                (d, self._incoming(d.doc, d.mail, d.match, attachments, d.auto_reply, d.verdict))
            )
        if not items:
            return failures
        try:
            results = await self._crm.activities.add_many([item for _d, item in items])
        except Exception as exc:
            raise_if_stopping()
            log.warning("adding a batch of %s mail activities failed", len(items), exc_info=True)
            return {**failures, **{d.doc["_id"]: exc for d, _item in items}}
        finished: list[tuple[Delivery, str | None]] = []
        for (d, _item), result in zip(items, results, strict=True):
            record = d.match.record
            assert record is not None
            try:
                if isinstance(result, DuplicateKeyError):
                    finished.append((d, await self._already_delivered(d.doc, record)))
                elif isinstance(result, Exception):
                    failures[d.doc["_id"]] = result
                else:
                    finished.append((d, result))
            except Exception as exc:
                raise_if_stopping()
                failures[d.doc["_id"]] = exc
        # One notice per responsible person for the batch's new mail on their records.
        told: dict[str, list[Delivery]] = {}
        for d, activity_id in finished:
            record = d.match.record
            if activity_id is not None and not d.auto_reply and record is not None:
                told.setdefault(record["responsible_id"], []).append(d)
        for failed in await asyncio.gather(
            *(self._notify_many(batch) for batch in told.values()), return_exceptions=True
        ):
            if isinstance(failed, Exception):
                log.warning("a new mail's notice failed", exc_info=failed)
        outcomes = [
            (d.doc, "done" if activity_id else "duplicate", d.outcome(activity_id))
            for d, activity_id in finished
        ]
        try:
            await self._finish_many(outcomes)
        except Exception as exc:
            raise_if_stopping()
            # retried: each then finds its activity (the unique raw id) and finishes
            failures.update({doc["_id"]: exc for doc, _status, _result in outcomes})
        return failures

    def _incoming(
        self,
        doc: Document,
        mail: ParsedMail,
        match: Match,
        attachments: list[dict[str, Any]],
        auto_reply: bool,
        verdict: Verdict,
    ) -> NewActivity:
        """A received mail's activity on the record it matched."""
        record = match.record
        assert record is not None
        return NewActivity(
            owner=record,
            responsible_id=record["responsible_id"],
            type_="email",
            direction="incoming",
            subject=mail.subject[:250],
            description=(mail.new_text or mail.text)[:20_000],
            completed=auto_reply,  # an auto-reply is shown, never counted
            extra=self._mail_part(doc, mail, match, attachments, auto_reply, verdict),
            # the history names who wrote it
            history={"from": _sender(mail), "from_address": mail.from_address},
        )

    def _mail_part(
        self,
        doc: Document,
        mail: ParsedMail,
        match: Match,
        attachments: list[dict[str, Any]],
        auto_reply: bool,
        verdict: Verdict,
    ) -> Document:
        extra: Document = {
            "mail": {
                "raw_id": doc["_id"],
                "from": mail.from_address,
                "from_name": mail.from_name,
                "to": mail.to,
                "cc": mail.cc,
                "html": mail.html_sanitised,
                "text": mail.text,
                "quoted": mail.quoted_text,
                "attachments": attachments,
                "date": mail.date,  # as the sender's Date: says; received_at as we got it
                "received_at": doc.get("received_at"),
                "references": list(mail.references[-MAX_REFERENCES_KEPT:]),
                "match": match.how,
                "flagged": match.flagged,
                "suspicious": verdict.suspicious,
                "suspicious_reason": verdict.reason,
                "auto_reply": auto_reply,
                "in_reply_to_activity": match.activity_id,
            }
        }
        if mail.message_id:  # left out, not null, without one: the unique index is sparse
            extra["mail"]["incoming_message_id"] = mail.message_id
        return extra

    async def _already_delivered(self, doc: Document, record: Document) -> str | None:
        """The activity insert met a unique key already taken: this message's own activity
        (an earlier attempt stopped before its outcome: finish that), or None (the same
        message, delivered by the other path)."""
        mine = await self._store["crm_activities"].find_one({"mail.raw_id": doc["_id"]})
        if mine is None:
            return None
        self._crm.counters.touch([record["responsible_id"]], [record["type"]])
        return str(mine["_id"])

    async def _notify(self, record: Document, mail: ParsedMail, verdict: Verdict) -> None:
        await self._im.post_system_notice(
            record["responsible_id"],
            f"New email from {_from(mail, verdict)} on “{record.get('title', '')}”: "
            f"{mail.subject or '(no subject)'}",
        )

    async def _notify_many(self, batch: list[Delivery]) -> None:
        """New mail of one batch to one responsible person: one notice (one message per mail
        was one chat write per reply; one per record still about one per reply in a burst,
        the batch's replies going to different records: a message insert and its event
        each). On one record it names the record once, on several each line names its own."""
        first = batch[0]
        record = first.match.record
        assert record is not None
        if len(batch) == 1:
            await self._notify(record, first.mail, first.verdict)
            return
        one_record = all((d.match.record or {}).get("_id") == record["_id"] for d in batch)

        def line(d: Delivery) -> str:
            said = f"{_from(d.mail, d.verdict)}: {d.mail.subject or '(no subject)'}"
            if one_record or d.match.record is None:
                return said
            return f"{said} (on “{d.match.record.get('title', '')}”)"

        lines = [line(d) for d in batch[:NOTICE_LINES]]
        if len(batch) > NOTICE_LINES:
            lines.append(f"and {len(batch) - NOTICE_LINES} more")
        where = f" on “{record.get('title', '')}”" if one_record else ""
        await self._im.post_system_notice(
            record["responsible_id"], f"{len(batch)} new emails{where}: " + "; ".join(lines)
        )

    async def _save_attachments(self, raw_id: str, mail: ParsedMail) -> list[dict[str, Any]]:
        saved = []
        for index, part in enumerate(mail.attachments):
            name = f"{raw_id}/{index}"
            existing = await self._store["mail_attachments.files"].find_one({"filename": name})
            if existing is None:
                file_id = await self._files.upload_from_stream(
                    name,
                    part.data,
                    metadata={"filename": part.filename, "content_type": part.content_type},
                )
            else:
                file_id = existing["_id"]
            saved.append(
                {
                    "id": str(file_id),
                    "filename": part.filename,
                    "content_type": part.content_type,
                    "size": part.size,
                }
            )
        return saved

    async def _bounced(self, raw: bytes, mail: ParsedMail) -> Document:
        info = await asyncio.to_thread(bounce_info, raw)
        if info is None or not info.original_message_id:
            return {"reason": "bounce for a message we cannot identify"}
        activity = await self._store["crm_activities"].find_one(
            {"mail.message_id": info.original_message_id}
        )
        if activity is None:
            return {"reason": "bounce for a message we did not send"}
        sent = activity.get("mail", {})
        failed = list(info.recipients)
        if not failed:  # a plain-text bounce no detector reads: its words name them
            sent_to = [*sent.get("to", []), *sent.get("cc", []), *sent.get("bcc", [])]
            failed = list(failed_in_text(mail.text, sent_to))
        known = list(sent.get("bounced_recipients", []))
        news = [a for a in failed if a not in known]
        await self._store["crm_activities"].update_one(
            {"_id": activity["_id"]},
            {
                "$set": {
                    "mail.status": "bounced",
                    "mail.bounced_recipients": known + news,
                    "modified_at": utcnow(),
                }
            },
        )
        await self.announce(activity["_id"])
        if news or sent.get("status") != "bounced":
            await self._tell_sender_of_bounce(activity, news or failed, info.diagnostic)
        return {"activity_id": activity["_id"], "recipients": failed}

    async def _tell_sender_of_bounce(
        self, activity: Document, failed: list[str], diagnostic: str | None
    ) -> None:
        """The person who sent the mail learns in the messenger that it came back: the record's
        timeline says so too, but nobody watches a mail already sent."""
        sender = activity.get("created_by")
        if not sender or await self._store.users.find_one({"_id": sender}) is None:
            return
        owner = await self._store["crm_records"].find_one({"_id": activity["owner_id"]})
        where = f" on “{owner.get('title', '')}”" if owner is not None else ""
        who = ", ".join(failed) if failed else "a recipient"
        why = f" ({diagnostic[:200]})" if diagnostic else ""
        await self._im.post_system_notice(
            sender,
            f"Your e-mail “{activity.get('subject') or '(no subject)'}”{where} bounced: "
            f"{who} did not get it{why}",
        )

    async def announce(self, activity_id: str) -> None:
        """An email activity's mail part changed (delivery status, bounce): tell its viewers."""
        activity = await self._store["crm_activities"].find_one({"_id": activity_id})
        if activity is None:
            return
        owner = await self._store["crm_records"].find_one({"_id": activity["owner_id"]})
        if owner is not None:
            await self._crm.records.core.announce_activity(activity, owner)

    async def _lead_for(
        self, mail: ParsedMail, settings: MailSettings
    ) -> tuple[Document | None, str]:
        """One lead per unknown sender, however many of their mails arrive at once; or why
        none was made."""
        sender = mail.from_address.lower()
        since = utcnow() - timedelta(minutes=settings.lead_period_minutes)
        recent = await self._store["mail_lead_log"].count_documents(
            {"sender": sender, "at": {"$gte": since}}
        )
        if not lead_allowed(
            sender, settings.lead_exceptions, recent, settings.max_new_leads_per_sender
        ):
            return None, NO_LEAD
        claims = self._store["mail_lead_claims"]
        try:
            await claims.insert_one(
                {"_id": sender, "lead_id": None, "at": utcnow(), "node": self._node}
            )
        except DuplicateKeyError:
            # Another delivery from this sender is making the lead: wait for it, then use it.
            deadline = asyncio.get_running_loop().time() + LEAD_WAIT_SECONDS
            while asyncio.get_running_loop().time() < deadline:
                claim = await claims.find_one({"_id": sender})
                if claim is None:
                    return await self._lead_for(mail, settings)
                if claim.get("lead_id"):
                    lead = await self._store["crm_records"].find_one({"_id": claim["lead_id"]})
                    if lead is not None:
                        return lead, ""
                    await claims.delete_one({"_id": sender, "lead_id": claim["lead_id"]})
                    return await self._lead_for(mail, settings)
                if self._abandoned(claim):
                    # Its maker died half-way. A lead it did make is found by its address
                    # when this message is matched again; none was made if it is not.
                    await claims.delete_one({"_id": sender, "lead_id": None, "at": claim["at"]})
                    raise TryLater(f"cleared a stopped node's lead claim: {sender}") from None
                await asyncio.sleep(0.05)
            raise TryLater("another delivery is still making the lead for this sender") from None
        bucket: str | None = None
        try:
            responsible = await self._lead_owner(settings)
            if responsible is None:
                await claims.delete_one({"_id": sender, "lead_id": None})
                return None, NO_LEAD
            bucket = await self._reserve_lead(settings, responsible)
            if bucket is None:
                await claims.delete_one({"_id": sender, "lead_id": None})
                return None, (
                    f"unknown sender; no lead made: {settings.max_new_leads_per_hour} leads "
                    "from mail this hour, the limit"
                )
            first, last = split_name(mail.from_name, sender)
            created = await self._crm.records.create_for_system(
                responsible,
                "lead",
                LeadCreate(
                    # (an address may hold what a name may not, such as U+202E)
                    title=clean_name(f"Lead from {mail.from_name or sender}")[:250],
                    first_name=clean_name(first)[:100],
                    last_name=clean_name(last)[:100],
                    emails=[TypedEmail(value=sender)],
                    source="email",
                    ignore_duplicates=True,
                ),
                creator=MAIL_CREATOR,
            )
            await claims.update_one({"_id": sender}, {"$set": {"lead_id": created["_id"]}})
            await self._store["mail_lead_log"].insert_one(
                {"sender": sender, "at": utcnow(), "lead_id": created["_id"]}
            )
            return created, ""
        except Exception:
            await claims.delete_one({"_id": sender, "lead_id": None})
            if bucket is not None:
                await self._store["mail_lead_budget"].update_one(
                    {"_id": bucket}, {"$inc": {"n": -1}}
                )
            raise

    async def _reserve_lead(self, settings: MailSettings, owner: str) -> str | None:
        """One lead of this clock hour's allowance (``max_new_leads_per_hour``, all senders
        together), taken atomically; None past it. The first mail past it tells the lead owner
        and the CRM administrators, once an hour: not one notice per mail."""
        limit = settings.max_new_leads_per_hour
        if limit <= 0:
            return None  # no leads from mail at all: nothing is paused, nobody is told
        now = utcnow()
        bucket = hour_bucket(now)
        budgets = self._store["mail_lead_budget"]
        try:
            # Matches only while under the limit; otherwise the upsert's insert collides with
            # the hour's document: refused, with nothing counted.
            result = await budgets.update_one(
                {"_id": bucket, "n": {"$lt": limit}},
                {"$inc": {"n": 1}, "$setOnInsert": {"at": now}},
                upsert=True,
            )
        except DuplicateKeyError:
            result = None
        if result is not None and (result.modified_count or result.upserted_id is not None):
            if result.upserted_id is not None:  # a new hour: forget those of days ago
                await budgets.delete_many({"at": {"$lt": now - timedelta(days=2)}})
            return bucket
        first = await budgets.update_one(
            {"_id": bucket, "noticed": {"$ne": True}}, {"$set": {"noticed": True}}
        )
        if first.modified_count:
            text = (
                f"Leads from e-mail are paused: {limit} leads were made from mail this hour, "
                "the limit. Mail from new senders waits in the CRM's unmatched mail until the "
                "next hour."
            )
            for user_id in sorted({owner, *await self.crm_admins()}):
                await self._im.post_system_notice(user_id, text)
        return None

    def _abandoned(self, claim: Document) -> bool:
        """A lead claim nobody will finish: its node is gone, or it is older than a lease."""
        if orphaned(claim.get("node"), self._node, self._sole_node):
            return True
        at = claim.get("at")
        if not isinstance(at, datetime):
            return True
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return utcnow() - at > LEASE

    async def _lead_owner(self, settings: MailSettings) -> str | None:
        if settings.lead_responsible_id:
            user = await self._store.users.find_one(
                {"_id": settings.lead_responsible_id, "is_active": {"$ne": False}}
            )
            if user is not None:
                return str(user["_id"])
        admin = await self._store.users.find_one(
            {"is_admin": True, "is_active": {"$ne": False}}, sort=[("_id", 1)]
        )
        return str(admin["_id"]) if admin else None
