"""The mail bridge, wired: settings, templates, mailboxes, sending from records, the two ways
in, the pipeline, and the unmatched list."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import nh3
from bson import ObjectId
from bson.errors import InvalidId
from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pydantic import SecretStr, ValidationError

from server.background import raise_if_stopping, stop
from server.caching import SharedLoad
from server.crm.core import record_title
from server.crm.rules import may_manage_settings
from server.crm.service import Crm
from server.directory.models import display_name
from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.events.streams import user_stream
from server.im.service import ImService
from server.mailbridge.codes import (
    CodeRef,
    body_line,
    issue,
    strip_reply_prefixes,
    subject_with_code,
    subject_without_codes,
    verify,
)
from server.mailbridge.imap import MailboxCollector, MailboxConfig, test_connection
from server.mailbridge.inbox import RawInbox, Source
from server.mailbridge.ingress import IngressHandler, IngressServers
from server.mailbridge.keys import CodeKeys
from server.mailbridge.matching import Match, Matcher
from server.mailbridge.models import (
    AttachmentOut,
    ConnectionTest,
    EmailPreview,
    MailboxIn,
    MailboxOut,
    MailboxUpdate,
    MailSettings,
    MailSettingsUpdate,
    OAuthClientIn,
    OAuthClientOut,
    OAuthClientUpdate,
    SendEmail,
    SentEmail,
    SkippedMail,
    SubjectRuleOut,
    TemplateIn,
    TemplateOut,
    UnmatchedMail,
)
from server.mailbridge.oauth import TokenSource
from server.mailbridge.outbox import (
    HeaderInjection,
    Outbox,
    OutgoingAttachment,
    compose,
    new_message_id,
)
from server.mailbridge.parsing import Limits, parse
from server.mailbridge.pipeline import WAITING, MailPipeline
from server.mailbridge.rules import SubjectRule, apply_rules, validate_rule
from server.mailbridge.spool import Spool, SpoolDrain
from server.settings import Settings
from server.store.database import Document, Store, new_id, utcnow
from server.web.problems import Problem, conflict, not_found

log = logging.getLogger(__name__)

SETTINGS_TTL_SECONDS = 2.0
PRUNE_EVERY_SECONDS = 24 * 3600.0
PRUNE_RETRY_SECONDS = 3600.0
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_RECIPIENTS = 100  # To, Cc and Bcc of one request together
MAX_REFERENCES = 20  # of the thread, in a reply's References
UNMATCHED_EVENT = "mail.unmatched"
"""Live-only, to CRM administrators: ``{count}`` of the unmatched list, after each change."""
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\.([a-z_]+)\s*\}\}")


def fill(template: str, values: dict[str, dict[str, str]]) -> str:
    """{{record.title}}, {{contact.first_name}}, {{user.name}}; unknown ones are left blank."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), {}).get(m.group(2), ""), template)


def placeholder_values(
    record: Document, contact: Document | None, actor: Document
) -> dict[str, dict[str, str]]:
    """What the placeholders stand for in a mail from ``record`` to ``contact`` (the person
    the mail goes to: a lead or contact is its own; a deal's or company's is the contact the
    mail is addressed to, or else its first). A deal or company has no name of its own, so its
    ``record.first_name`` and ``record.last_name`` are its contact's: "Dear
    {{record.first_name}}," reads right from every record."""
    person = record if record["type"] in ("lead", "contact") else (contact or {})
    first = str(person.get("first_name") or "")
    last = str(person.get("last_name") or "")
    return {
        "record": {"title": record_title(record), "first_name": first, "last_name": last},
        "contact": {
            "first_name": first,
            "last_name": last,
            "name": " ".join(p for p in (first, last) if p),
        },
        "user": {"name": display_name(actor), "email": str(actor.get("email", ""))},
    }


def _contact_for(record: Document, contacts: list[Document], to: list[str]) -> Document | None:
    """The contact of a deal or company that a mail to ``to`` is for: whose address is its
    first recipient (then any), else the record's first contact."""
    addressed = [a.lower() for a in to]
    for address in addressed:
        for contact in contacts:
            if address in {e["value"].lower() for e in contact.get("emails", [])}:
                return contact
    return contacts[0] if contacts else None


def reply_subject(subject: str) -> str:
    """``Re: `` and the subject answered, without its reply prefixes and reply codes."""
    bare = strip_reply_prefixes(subject_without_codes(subject))
    return f"Re: {bare}" if bare else "Re:"


@dataclass(frozen=True, slots=True)
class _Mail:
    to: list[str]
    subject: str
    text: str
    html: str | None


@dataclass(frozen=True, slots=True)
class _Thread:
    activity_id: str
    subject: str
    message_id: str | None
    references: list[str]
    code: str | None


@dataclass(frozen=True, slots=True)
class _Plan:
    record: Document
    actor: Document
    mails: list[_Mail]
    thread: _Thread | None


class MailBridge:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        crm: Crm,
        im: ImService,
        node: str | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._crm = crm
        self._bus = bus
        # Leases name this node: the node registry's id when the app gives it.
        self._node = node or f"{socket.gethostname()}:{new_id()}"
        # The embedded database belongs to this one process (its data directory's lock):
        # no other node can hold a lease there, so one not ours is a dead process's.
        self._sole_node = settings.mongodb_url is None
        self.keys = CodeKeys(store)
        self.inbox = RawInbox(store)
        self.address = settings.crm_inbox_address
        self.limits = Limits(max_attachment_bytes=min(settings.mail_max_message_bytes, 25 << 20))
        self.matcher = Matcher(store, self.keys, self.address)
        self.pipeline = MailPipeline(
            store,
            self.inbox,
            self.matcher,
            crm,
            im,
            self.settings,
            self.limits,
            node=self._node,
            sole_node=self._sole_node,
            trusted_authserv_ids=frozenset(settings.mail_trusted_authserv_ids or ()),
        )
        self.pipeline.on_finished.append(self._finished)
        self.pipeline.on_unmatched.append(self._unmatched_changed)
        self.pipeline.origin = settings.domain
        relay = settings.smtp_relay_url.get_secret_value() if settings.smtp_relay_url else None
        self.outbox = Outbox(store, relay, self._node, self._sole_node)
        self.outbox.on_marked.append(self.pipeline.announce)
        self._files = AsyncGridFSBucket(store.db, bucket_name="mail_attachments")
        self._uploads = AsyncGridFSBucket(store.db, bucket_name="mail_uploads")
        self._cached: MailSettings | None = None
        self._cached_at = 0.0
        # One read when the copy runs out: every message of every worker's batch asks for
        # the settings, and each read them again (0.13 reads per reply in a burst).
        self._settings_read: SharedLoad[MailSettings] = SharedLoad()
        self._settings_generation = 0  # moved by an update: no read begun before it is kept
        # IMAP's XOAUTH2 access tokens, per mailbox (the mailboxes are this service's data)
        self.tokens = TokenSource(self._rotated)
        self._collectors: dict[str, MailboxCollector] = {}
        self.ingress: IngressServers | None = None
        # What the listener accepted, on this node's disk until the database has it.
        self.spool = Spool(
            settings.mail_spool_dir or settings.data_dir / "mail-spool",
            settings.mail_spool_max_bytes,
        )
        self.spool_drain = SpoolDrain(self.spool, self.inbox, self.pipeline.wake)
        self._pruner: asyncio.Task[None] | None = None

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.inbox.upgrade()
        await self.pipeline.take_orphans()
        await self.outbox.take_orphans()
        self.pipeline.start()
        self.outbox.start()
        self._pruner = asyncio.create_task(self._prune_daily(), name="mail-prune")
        if self._settings.smtp_enabled:
            # What an earlier process accepted and had not moved into the database yet.
            left = await asyncio.to_thread(self.spool.open)
            if left:
                log.info("mail spool: %d accepted messages to move into the database", left)
            self.spool_drain.start()
            self.ingress = IngressServers(
                self._handler,
                self._settings.smtp_host or self._settings.host,
                self._settings.smtp_port,
                self._settings.lmtp_port,
                self._settings.domain,
                self._settings.mail_max_message_bytes,
                self._tls(),
            )
            await self.ingress.start()
        async for box in self._store["mail_mailboxes"].find({"enabled": True}):
            self._start_collector(box)

    async def stop(self) -> None:
        """Stops taking mail, lets the journaled writes under way finish, and gives every
        lease back (messages being processed or sent, mailboxes), so that the next start -
        here or on another node - takes them up at once."""
        if self.ingress is not None:
            await self.ingress.stop()
        await self.spool.close()
        await self.spool_drain.close()
        for collector in list(self._collectors.values()):
            await self._stop_collector(collector)
        await self.inbox.close()
        await self.pipeline.close()
        await self.inbox.outcomes.close()  # what the stopped workers left to write
        await self.outbox.close()
        await stop(self._pruner)

    async def prune(self, days: int | None = None) -> dict[str, int]:
        """Drop stored mail bytes older than the retention (idempotent: any node may run it)."""
        cutoff = utcnow() - timedelta(days=days or self._settings.mail_retention_days)
        return {
            "incoming": await self.inbox.prune(cutoff),
            "outgoing": await self.outbox.prune(cutoff),
        }

    async def _prune_daily(self) -> None:
        while True:
            try:
                pruned = await self.prune()
                if any(pruned.values()):
                    log.info("pruned stored mail: %s", pruned)
            except Exception:
                raise_if_stopping()
                log.exception("pruning stored mail failed; tried again in an hour")
                await asyncio.sleep(PRUNE_RETRY_SECONDS)
                continue
            await asyncio.sleep(PRUNE_EVERY_SECONDS)

    def _tls(self) -> ssl.SSLContext | None:
        if self._settings.smtp_cert_file is None or self._settings.smtp_key_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._settings.smtp_cert_file, self._settings.smtp_key_file)
        return context

    def _handler(self, kind: str) -> IngressHandler:
        return IngressHandler(
            self.spool,
            self.address,
            self.limits,
            self._settings.mail_max_recipients,
            kind,
            self._store.space.refusal,
            (self._settings.domain,),
        )

    def _start_collector(self, box: Document) -> None:
        collector = MailboxCollector(
            self._store,
            self.inbox,
            MailboxConfig.of(box),
            self._settings.mail_max_message_bytes,
            self._node,
            self._sole_node,
            self.tokens,
        )
        collector.on_stored(self.pipeline.wake)
        collector.task = asyncio.create_task(collector.supervise(), name=f"imap:{box['_id']}")
        self._collectors[box["_id"]] = collector

    async def _stop_collector(self, collector: MailboxCollector) -> None:
        self._collectors.pop(collector.cfg.id, None)
        await stop(collector.task)
        await collector.give_back()

    async def _finished(self, doc: Document) -> None:
        mailbox_id = doc.get("source", {}).get("mailbox_id")
        if mailbox_id and mailbox_id in self._collectors:
            self._collectors[mailbox_id].after_delivery()

    async def receive(self, raw: bytes, source: Source) -> str:
        """Store a raw message (tests, tools) and let the pipeline take it."""
        stored = await self.inbox.put(raw, source)
        self.pipeline.wake()
        return stored.id

    # settings --------------------------------------------------------------------------------

    async def settings(self) -> MailSettings:
        if self._cached is not None and time.monotonic() - self._cached_at < SETTINGS_TTL_SECONDS:
            return self._cached
        return await self._settings_read.run(self._settings_generation, self._read_settings)

    async def _read_settings(self) -> MailSettings:
        taken, generation = time.monotonic(), self._settings_generation
        doc = await self._store["mail_settings"].find_one({"_id": "settings"}) or {}
        doc.pop("_id", None)
        found = MailSettings.model_validate(doc)
        if generation == self._settings_generation:
            self._cached, self._cached_at = found, taken
        return found

    async def update_settings(self, patch: MailSettingsUpdate) -> MailSettings:
        current = (await self.settings()).model_dump()
        changes = patch.model_dump(exclude_unset=True)
        if "subject_rules" in changes:
            rules = []
            for rule in changes["subject_rules"]:
                try:
                    validate_rule(rule["pattern"])
                except ValueError as exc:
                    raise Problem(422, "invalid-value", "Invalid value", str(exc)) from None
                rules.append({"id": new_id(), **rule})
            changes["subject_rules"] = rules
        owner = changes.get("lead_responsible_id")
        if owner and await self._store.users.find_one({"_id": owner}) is None:
            raise Problem(422, "invalid-value", "Invalid value", "no such lead owner")
        try:
            merged = MailSettings.model_validate({**current, **changes})
        except ValidationError as exc:
            raise Problem(422, "invalid-value", "Invalid value", str(exc)) from None
        await self._store["mail_settings"].update_one(
            {"_id": "settings"}, {"$set": merged.model_dump()}, upsert=True
        )
        self._settings_generation += 1
        self._cached, self._cached_at = merged, time.monotonic()
        return merged

    def test_rule(self, rule: SubjectRuleOut, subject: str) -> str | None:
        hit = apply_rules(
            [SubjectRule(rule.id, rule.pattern, rule.record_type, rule.field)], subject
        )
        return hit[1] if hit else None

    # templates -------------------------------------------------------------------------------

    async def templates(self) -> list[TemplateOut]:
        return [
            TemplateOut(id=t["_id"], name=t["name"], subject=t["subject"], text=t["text"])
            async for t in self._store["mail_templates"].find({}).sort("name", 1)
        ]

    async def save_template(self, data: TemplateIn, template_id: str | None = None) -> TemplateOut:
        tid = template_id or new_id()
        result = await self._store["mail_templates"].update_one(
            {"_id": tid}, {"$set": data.model_dump()}, upsert=template_id is None
        )
        if template_id is not None and result.matched_count == 0:
            raise not_found(f"template {template_id}")
        return TemplateOut(id=tid, **data.model_dump())

    async def delete_template(self, template_id: str) -> None:
        if (
            await self._store["mail_templates"].delete_one({"_id": template_id})
        ).deleted_count == 0:
            raise not_found(f"template {template_id}")

    # mailboxes -------------------------------------------------------------------------------

    async def _mailbox_out(self, doc: Document) -> MailboxOut:
        skipped = [
            SkippedMail(**d)
            async for d in self._store["mail_skipped"]
            .find({"mailbox_id": doc["_id"]})
            .sort("at", -1)
            .limit(20)
        ]
        oauth = doc.get("oauth")
        return MailboxOut(
            id=doc["_id"],
            name=doc["name"],
            host=doc["host"],
            port=doc["port"],
            security=doc["security"],
            auth=doc.get("auth", "password"),
            login=doc["login"],
            oauth=OAuthClientOut(
                client_id=oauth["client_id"],
                token_url=oauth["token_url"],
                scope=oauth.get("scope"),
            )
            if isinstance(oauth, dict)
            else None,
            folder=doc["folder"],
            processed_folder=doc.get("processed_folder"),
            delete_after_delivery=bool(doc.get("delete_after_delivery")),
            poll_seconds=int(doc.get("poll_seconds", 60)),
            enabled=bool(doc.get("enabled")),
            state=doc.get("state", {}),
            skipped=skipped,
        )

    async def mailboxes(self) -> list[MailboxOut]:
        return [
            await self._mailbox_out(d)
            async for d in self._store["mail_mailboxes"].find({}).sort("_id")
        ]

    async def add_mailbox(self, data: MailboxIn) -> MailboxOut:
        doc = {"_id": new_id(), **_mailbox_fields(data), "state": {}}
        await self._store["mail_mailboxes"].insert_one(doc)
        if doc["enabled"]:
            self._start_collector(doc)
        return await self._mailbox_out(doc)

    async def update_mailbox(self, mailbox_id: str, patch: MailboxUpdate) -> MailboxOut:
        changes = patch.model_dump(exclude_unset=True, exclude={"password", "oauth"})
        if patch.password is not None:
            changes["password"] = patch.password.get_secret_value()
        current: Document | None = None
        if patch.oauth is not None or "auth" in changes:
            current = await self._store["mail_mailboxes"].find_one({"_id": mailbox_id})
            if current is None:
                raise not_found(f"mailbox {mailbox_id}")
        if patch.oauth is not None and current is not None:
            merged = {**(current.get("oauth") or {}), **_oauth_fields(patch.oauth)}
            missing = [f for f in OAUTH_REQUIRED if not merged.get(f)]
            if missing:
                raise Problem(
                    422, "invalid-value", "Invalid value", f"oauth needs {', '.join(missing)}"
                )
            changes["oauth"] = merged
            self.tokens.forget(mailbox_id)
        if current is not None:
            # the way of logging in needs its credentials, stored or in this change
            after = {**current, **changes}
            if after.get("auth") == "xoauth2" and not after.get("oauth"):
                raise Problem(422, "invalid-value", "Invalid value", "xoauth2 needs oauth")
            if after.get("auth", "password") == "password" and not after.get("password"):
                raise Problem(422, "invalid-value", "Invalid value", "password auth needs one")
        if changes:
            result = await self._store["mail_mailboxes"].update_one(
                {"_id": mailbox_id}, {"$set": changes}
            )
            if result.matched_count == 0:
                raise not_found(f"mailbox {mailbox_id}")
        doc = await self._store["mail_mailboxes"].find_one({"_id": mailbox_id})
        if doc is None:
            raise not_found(f"mailbox {mailbox_id}")
        running = self._collectors.get(mailbox_id)
        if running is not None:
            await self._stop_collector(running)
        if doc.get("enabled"):
            self._start_collector(doc)
        return await self._mailbox_out(doc)

    async def delete_mailbox(self, mailbox_id: str) -> None:
        running = self._collectors.get(mailbox_id)
        if running is not None:
            await self._stop_collector(running)
        if (await self._store["mail_mailboxes"].delete_one({"_id": mailbox_id})).deleted_count == 0:
            raise not_found(f"mailbox {mailbox_id}")

    async def test_mailbox(self, data: MailboxIn) -> ConnectionTest:
        cfg = MailboxConfig.of({"_id": f"test-{new_id()}", **_mailbox_fields(data)})
        # its own tokens: a rotated refresh token of a test has no mailbox to go to
        return ConnectionTest(**await test_connection(cfg, TokenSource(_kept_nowhere)))

    async def _rotated(self, mailbox_id: str, refresh_token: str) -> None:
        """The provider gave a new refresh token: the old one may stop working now."""
        await self._store["mail_mailboxes"].update_one(
            {"_id": mailbox_id}, {"$set": {"oauth.refresh_token": refresh_token}}
        )

    # sending ---------------------------------------------------------------------------------

    async def upload(self, owner_id: str, filename: str, content_type: str, data: bytes) -> str:
        await self._crm.records.core.member(owner_id)
        if len(data) > MAX_UPLOAD_BYTES:
            raise Problem(413, "body-too-large", "Attachment too large", "10 MiB at most")
        file_id = await self._uploads.upload_from_stream(
            filename[:200],
            data,
            metadata={"owner_id": owner_id, "content_type": content_type, "filename": filename},
        )
        return str(file_id)

    async def _upload(self, owner_id: str, upload_id: str) -> OutgoingAttachment:
        try:
            oid = ObjectId(upload_id)
        except (InvalidId, TypeError):
            raise not_found(f"attachment {upload_id}") from None
        meta = await self._store["mail_uploads.files"].find_one({"_id": oid})
        if meta is None or meta.get("metadata", {}).get("owner_id") != owner_id:
            raise not_found(f"attachment {upload_id}")
        stream = await self._uploads.open_download_stream(oid)
        return OutgoingAttachment(
            meta["metadata"]["filename"], meta["metadata"]["content_type"], await stream.read()
        )

    async def _plan(
        self, actor_id: str, record_type: str, record_id: str, data: SendEmail
    ) -> _Plan:
        """What sending ``data`` from the record would do: checked (recipients, the mail
        answered, the template), the text filled per mail; nothing stored yet."""
        core = self._crm.records.core
        viewer = await core.member(actor_id)
        record = await core.visible_record(viewer, record_type, record_id)
        contacts = await self.matcher.linked_contacts(record)
        allowed = {e["value"].lower() for e in record.get("emails", [])}
        allowed.update(e["value"].lower() for c in contacts for e in c.get("emails", []))
        everyone = [*data.to, *data.cc, *data.bcc]
        strangers = list(dict.fromkeys(a for a in everyone if a.lower() not in allowed))
        if strangers:
            raise Problem(
                422,
                "invalid-value",
                "Invalid value",
                f"{', '.join(strangers)} is not an address of this record or its contacts",
            )
        if len(everyone) > MAX_RECIPIENTS:
            raise Problem(
                422, "invalid-value", "Invalid value", f"at most {MAX_RECIPIENTS} recipients"
            )
        if data.bulk and (data.cc or data.bcc):
            raise Problem(
                422,
                "invalid-value",
                "Invalid value",
                "a bulk mail goes to each recipient alone: it takes no Cc or Bcc",
            )
        thread = await self._thread(record, data.in_reply_to) if data.in_reply_to else None
        actor = await self._store.users.find_one({"_id": actor_id}) or {"login": "?"}
        subject, text = data.subject, data.text
        if data.template_id:
            template = await self._store["mail_templates"].find_one({"_id": data.template_id})
            if template is None:
                raise not_found(f"template {data.template_id}")
            subject = subject or template["subject"]
            text = text or template["text"]
        if not subject and thread is not None:
            subject = reply_subject(thread.subject)
        batches = [[a] for a in data.to] if data.bulk else [list(data.to)]
        mails = []
        for to in batches:
            values = placeholder_values(record, _contact_for(record, contacts, to), actor)
            html = nh3.clean(fill(data.html, values)) if data.html else None
            mails.append(_Mail(to, fill(subject, values), fill(text, values), html))
        return _Plan(record, actor, mails, thread)

    async def _thread(self, record: Document, activity_id: str) -> _Thread:
        """The e-mail activity of ``record`` being answered, with the ids its thread carries
        and the reply code to keep (that of the mail of ours the thread started from, while it
        is on this record and verifies)."""
        answered = await self._store["crm_activities"].find_one(
            {"_id": activity_id, "owner_id": record["_id"], "type": "email"}
        )
        if answered is None or "mail" not in answered:
            raise Problem(
                422,
                "invalid-value",
                "Invalid value",
                f"in_reply_to: no e-mail {activity_id} on this record",
            )
        mail = answered["mail"]
        message_id = mail.get("incoming_message_id") or mail.get("message_id")
        references = [r for r in mail.get("references", []) if isinstance(r, str)]
        if message_id:
            references.append(message_id)
        ours = answered if answered["direction"] == "outgoing" else None
        if ours is None and mail.get("in_reply_to_activity"):
            ours = await self._store["crm_activities"].find_one(
                {"_id": mail["in_reply_to_activity"], "owner_id": record["_id"]}
            )
        code = (ours or {}).get("mail", {}).get("code")
        if code:
            _current, keys = await self.keys.keys()
            ref = verify(code, keys)
            # The code names the activity it was issued for: kept only if that is where it
            # still leads (a retired key, a deleted or moved mail: a new code instead).
            if ref is None or ours is None or ref.activity_id != ours["_id"]:
                code = None
        return _Thread(
            activity_id=answered["_id"],
            subject=str(answered.get("subject") or ""),
            message_id=message_id,
            references=references[-MAX_REFERENCES:],
            code=code,
        )

    async def preview(
        self, actor_id: str, record_type: str, record_id: str, data: SendEmail
    ) -> list[EmailPreview]:
        """The mails as they would go out, placeholders filled, for the send dialog."""
        plan = await self._plan(actor_id, record_type, record_id, data)
        return [
            EmailPreview(to=m.to, subject=m.subject, text=m.text, html=m.html) for m in plan.mails
        ]

    async def send(
        self, actor_id: str, record_type: str, record_id: str, data: SendEmail
    ) -> list[SentEmail]:
        plan = await self._plan(actor_id, record_type, record_id, data)
        record, actor, thread = plan.record, plan.actor, plan.thread
        attachments = [await self._upload(actor_id, u) for u in data.attachment_ids]
        settings = await self.settings()
        current_kid, keys = await self.keys.keys()
        sent: list[SentEmail] = []
        for planned in plan.mails:
            to, subject, text, html = planned.to, planned.subject, planned.text, planned.html
            activity_id = new_id()
            # A reply keeps its thread's code, so the customer sees one conversation.
            code = (thread.code if thread is not None else None) or issue(
                CodeRef(record_type, activity_id), current_kid, keys[current_kid]
            )
            message_id = new_message_id(self._settings.domain)
            local, _, domain = self.address.partition("@")
            reply_to = f"{local}+{code}@{domain}"
            mail_subject = (
                subject_with_code(subject, code) if settings.code_in == "subject" else subject
            )
            mail_text = text if settings.code_in == "subject" else f"{text}\n\n{body_line(code)}\n"
            mail_html = html
            if html is not None and settings.code_in == "body":
                mail_html = f"{html}<p>{body_line(code)}</p>"
            references = thread.references if thread is not None else []
            try:
                raw = compose(
                    sender_name=display_name(actor),
                    from_address=self.address,
                    reply_to=reply_to,
                    to=to,
                    cc=list(data.cc),
                    subject=mail_subject,
                    text=mail_text,
                    html=mail_html,
                    message_id=message_id,
                    origin=self._settings.domain,
                    attachments=attachments,
                    in_reply_to=thread.message_id if thread is not None else None,
                    references=references,
                )
            except HeaderInjection as exc:
                raise Problem(422, "invalid-value", "Invalid value", str(exc)) from None
            # Queued first: a crash after this loses no mail (the activity may be missing).
            envelope = list(dict.fromkeys([*to, *data.cc, *data.bcc]))
            outbox_id = await self.outbox.queue(activity_id, self.address, envelope, raw)
            activity = await self._crm.activities.add(
                record,
                actor_id=actor_id,
                responsible_id=actor_id,
                type_="email",
                direction="outgoing",
                subject=mail_subject[:250],
                description=text[:20_000],
                completed=True,
                extra={
                    "_id": activity_id,
                    "mail": {
                        "message_id": message_id,
                        "code": code,
                        "to": to,
                        "cc": list(data.cc),
                        "bcc": list(data.bcc),
                        "references": references,
                        "in_reply_to_activity": thread.activity_id if thread else None,
                        "status": "queued",
                        "html": mail_html,
                        "text": mail_text,
                        "attachments": [
                            {
                                "id": upload_id,
                                "bucket": "uploads",  # the upload is what was sent
                                "filename": a.filename,
                                "content_type": a.content_type,
                                "size": len(a.data),
                            }
                            for upload_id, a in zip(data.attachment_ids, attachments, strict=True)
                        ],
                    },
                },
                viewer_id=actor_id,
            )
            await self.outbox.release(outbox_id)
            sent.append(
                SentEmail(
                    activity_id=activity.id,
                    to=to,
                    cc=list(data.cc),
                    bcc=list(data.bcc),
                    message_id=message_id,
                    code=code,
                    status="queued",
                )
            )
        return sent

    # reading mail ------------------------------------------------------------------------------

    async def attachment(self, actor_id: str, file_id: str) -> tuple[AttachmentOut, bytes]:
        """An attachment of a mail on a record the caller sees."""
        core = self._crm.records.core
        viewer = await core.member(actor_id)
        try:
            oid = ObjectId(file_id)
        except (InvalidId, TypeError):
            raise not_found(f"attachment {file_id}") from None
        activity = await self._store["crm_activities"].find_one({"mail.attachments.id": file_id})
        if activity is None:
            raise not_found(f"attachment {file_id}")
        await core.visible_record(viewer, None, activity["owner_id"])
        meta = next(a for a in activity["mail"]["attachments"] if a.get("id") == file_id)
        bucket = self._uploads if meta.get("bucket") == "uploads" else self._files
        try:
            stream = await bucket.open_download_stream(oid)
        except NoFile:
            raise not_found(f"attachment {file_id}") from None
        return AttachmentOut(**meta), await stream.read()

    async def unmatched(self, limit: int = 200) -> list[UnmatchedMail]:
        return [
            UnmatchedMail(
                id=d["_id"],
                received_at=d["received_at"],
                from_address=d.get("result", {}).get("from", ""),
                from_name=d.get("result", {}).get("from_name", ""),
                subject=d.get("result", {}).get("subject", ""),
                reason=d.get("result", {}).get("reason", ""),
                candidates=d.get("result", {}).get("candidates", []),
                status=d["status"],
                size=d.get("size", 0),
                suspicious=bool(d.get("result", {}).get("suspicious")),
                date=d.get("result", {}).get("date"),
                preview=d.get("result", {}).get("preview", ""),
                copies=1 + int(d.get("copies", 0)),
            )
            async for d in self.inbox.collection.find(
                {"status": {"$in": list(WAITING)}}, {"data": 0}
            )
            .sort("received_at", -1)
            .limit(limit)
        ]

    async def unmatched_count(self) -> int:
        return int(await self.inbox.collection.count_documents({"status": {"$in": list(WAITING)}}))

    async def _unmatched_changed(self) -> None:
        """The unmatched list changed: its count goes to the CRM administrators' screens (a
        live badge), on every node (the bus)."""
        if self._bus is None:
            return
        admins = await self.pipeline.crm_admins()
        if not admins:
            return
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                UNMATCHED_EVENT,
                {"count": await self.unmatched_count()},
                tuple(user_stream(uid) for uid in admins),
            )
        )

    async def unmatched_snapshot(self, user_id: str) -> dict[str, Any]:
        """The part of a connecting client's snapshot: the count, for CRM administrators."""
        if not may_manage_settings((await self._crm.access.viewer(user_id)).role):
            return {}
        return {"unmatched": await self.unmatched_count()}

    async def _waiting(self, raw_id: str) -> Document:
        doc: Document | None = await self.inbox.collection.find_one(
            {"_id": raw_id, "status": {"$in": ["unmatched", "refused"]}}, {"data": 0}
        )
        if doc is None:
            raise not_found(f"unmatched mail {raw_id}")
        return doc

    async def unmatched_raw(self, raw_id: str) -> bytes:
        """The message as received, for an admin to look at (refused mail included)."""
        return await self.inbox.raw_of(await self._waiting(raw_id))

    async def dismiss(self, raw_id: str) -> None:
        """Off the list, on no record; kept (until pruned) so a copy is still a duplicate."""
        doc = await self._waiting(raw_id)
        await self.inbox.finish(raw_id, "dismissed", doc.get("result", {}))
        await self.pipeline.unmatched_changed()

    async def assign(self, raw_id: str, record_type: str, record_id: str) -> str:
        """An admin puts an unmatched mail on a record."""
        doc = await self._waiting(raw_id)
        if doc["status"] == "refused":
            raise conflict(
                "this mail was refused as unsafe to parse; it cannot go on a record "
                "(download it to read it, or dismiss it)"
            )
        record = await self._store["crm_records"].find_one({"_id": record_id, "type": record_type})
        if record is None:
            raise not_found(f"{record_type} {record_id}")
        raw = await self.inbox.raw_of(doc)
        mail = await asyncio.to_thread(parse, raw, self.limits)
        # An admin's choice, but a forged sender stays flagged on the record.
        activity_id = await self.pipeline.deliver(
            doc, mail, Match("assigned", record), verdict=self.pipeline.verdict(mail)
        )
        await self.inbox.finish(
            raw_id,
            "done",
            {
                **doc.get("result", {}),
                "how": "assigned",
                "record_type": record_type,
                "record_id": record_id,
                "activity_id": activity_id,
            },
        )
        await self.pipeline.unmatched_changed()
        return activity_id or ""

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.ingress.ports) if self.ingress is not None else {}


OAUTH_REQUIRED = ("client_id", "client_secret", "token_url", "refresh_token")


def _oauth_fields(oauth: OAuthClientIn | OAuthClientUpdate) -> Document:
    """The OAuth client as stored: its secrets in clear, since they are sent to the token
    endpoint; never shown again (``MailboxOut`` has no place for them)."""
    fields: Document = {}
    for name, value in oauth.model_dump(exclude_unset=True).items():
        fields[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return fields


def _mailbox_fields(data: MailboxIn) -> Document:
    """A mailbox as stored. IMAP needs the password itself to log in: it is stored, never
    shown again."""
    fields: Document = data.model_dump(exclude={"password", "oauth"})
    fields["password"] = data.password.get_secret_value() if data.password else None
    fields["oauth"] = _oauth_fields(data.oauth) if data.oauth else None
    return fields


async def _kept_nowhere(_mailbox_id: str, _refresh_token: str) -> None:
    """A connection test's rotated refresh token: the mailbox is not stored yet."""
