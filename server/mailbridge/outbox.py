"""Outgoing CRM mail: composed here, queued in a persisted outbox, sent by a background loop.

A relay that is down, slow or answering 4xx delays a message (retried with back-off, for up
to ``GIVE_UP_AFTER``); a 5xx answer is permanent and is written on the email activity.
Messages are claimed with a lease (``leases.py``), so with several nodes each is sent by one
of them, and a node dying mid-send leaves it to be sent again (at least once: SMTP has no way
to ask a relay whether it already took a message).

Header injection is refused before anything is composed: no CR, LF or NUL in a subject,
name or address, and every address must parse as one mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

import aiosmtplib
from bson import Binary
from pymongo import ReturnDocument

from server.background import raise_if_stopping, stop
from server.mailbridge.leases import LEASE, orphaned, renewing
from server.store.database import Document, Store, new_id, utcnow

log = logging.getLogger(__name__)

ORIGIN_HEADER = "X-PortalHub-Origin"
HOLD = timedelta(minutes=1)
GIVE_UP_AFTER = timedelta(days=2)
IDLE_POLL_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 60.0


class HeaderInjection(ValueError):
    pass


def safe_header(value: str, what: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise HeaderInjection(f"{what} may not contain line breaks")
    return value


def mailbox(address: str, name: str = "") -> Address:
    """One mailbox, or HeaderInjection: a display name or address cannot smuggle headers
    or a second recipient."""
    safe_header(address, "an address")
    safe_header(name, "a name")
    local, sep, domain = address.strip().rpartition("@")
    if not sep or not local or not domain or any(c in address for c in ',;<>"() \t'):
        raise HeaderInjection(f"not one mail address: {address!r}")
    try:
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError) as exc:
        raise HeaderInjection(f"not one mail address: {address!r}") from exc


@dataclass(frozen=True, slots=True)
class OutgoingAttachment:
    filename: str
    content_type: str
    data: bytes


def compose(
    *,
    sender_name: str,
    from_address: str,
    reply_to: str,
    to: list[str],
    subject: str,
    text: str,
    html: str | None,
    message_id: str,
    origin: str,
    attachments: list[OutgoingAttachment],
    cc: list[str] | None = None,
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    date: datetime | None = None,
) -> bytes:
    """The message as sent. Bcc recipients are not written in it: they are only in the SMTP
    envelope. ``in_reply_to`` and ``references`` continue the thread of the mail answered."""
    msg = EmailMessage()
    msg["From"] = mailbox(from_address, sender_name)
    msg["Reply-To"] = mailbox(reply_to, sender_name)
    msg["To"] = [mailbox(a) for a in to]
    if cc:
        msg["Cc"] = [mailbox(a) for a in cc]
    msg["Subject"] = safe_header(subject, "the subject")
    # "+0000", not formatdate's "-0000", which RFC 5322 (3.3) reserves for a time whose zone
    # is unknown: ours is UTC, known.
    msg["Date"] = format_datetime((date or datetime.now(UTC)).astimezone(UTC))
    msg["Message-ID"] = safe_header(message_id, "the Message-ID")
    if in_reply_to:
        msg["In-Reply-To"] = safe_header(in_reply_to, "In-Reply-To")
    # The thread's ids, then ours: some relays rewrite Message-ID, and replies still name the
    # original through References.
    thread = [safe_header(r, "References") for r in (references or []) if r != message_id]
    msg["References"] = " ".join([*thread, message_id])
    msg[ORIGIN_HEADER] = safe_header(origin, "the origin")
    msg.set_content(text or "")
    if html:
        msg.add_alternative(html, subtype="html")
    for part in attachments:
        maintype, _, subtype = part.content_type.partition("/")
        msg.add_attachment(
            part.data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=safe_header(part.filename, "an attachment name"),
        )
    return msg.as_bytes()


def new_message_id(domain: str) -> str:
    return f"<{new_id()}.{secrets.token_hex(4)}@{domain}>"


@dataclass(frozen=True, slots=True)
class Relay:
    host: str
    port: int
    use_tls: bool  # implicit TLS (smtps)
    start_tls: bool | None  # None: if offered
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> Relay:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("the relay URL must look like smtp://host:587 or smtps://host:465")
        implicit = parts.scheme == "smtps"
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if implicit else 587),
            use_tls=implicit,
            start_tls=None if not implicit else False,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


class Outbox:
    def __init__(
        self, store: Store, relay_url: str | None, node: str = "", sole_node: bool = False
    ) -> None:
        self._store = store
        self._relay = Relay.from_url(relay_url) if relay_url else None
        self._node = node or new_id()
        self._sole_node = sole_node
        self._sending: str | None = None  # the message being sent, leased to this node
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Called with the activity id after its delivery status changed.
        self.on_marked: list[Callable[[str], Awaitable[None]]] = []

    @property
    def collection(self) -> Any:
        return self._store["mail_outbox"]

    async def queue(
        self, activity_id: str, envelope_from: str, recipients: list[str], raw: bytes
    ) -> str:
        """Stored, but held until ``release``: its activity is written in between, so the
        sender never reports on an activity that does not exist yet. A hold left by a crash
        lapses after ``HOLD``."""
        doc = {
            "_id": new_id(),
            "activity_id": activity_id,
            "envelope_from": envelope_from,
            "recipients": recipients,
            "raw": Binary(raw),
            "status": "queued",
            "attempts": 0,
            # Not before: the hold's end now, later a lease's end or a retry time. One field,
            # so the claim names only indexed fields (the embedded database scans otherwise).
            "next_at": utcnow() + HOLD,
            "claimed_by": self._node,
            "created_at": utcnow(),
        }
        await self.collection.insert_one(doc)
        return str(doc["_id"])

    async def release(self, outbox_id: str) -> None:
        await self.collection.update_one(
            {"_id": outbox_id}, {"$set": {"next_at": utcnow()}, "$unset": {"claimed_by": ""}}
        )
        self._wake.set()

    async def take_orphans(self) -> int:
        """At start-up on the embedded database: holds and leases of a process that died
        end now (``leases.orphaned``)."""
        if not self._sole_node:
            return 0
        now = utcnow()
        held = [
            d["_id"]
            async for d in self.collection.find(
                {"status": "queued", "next_at": {"$gt": now}}, {"claimed_by": 1}
            )
            if orphaned(d.get("claimed_by"), self._node, self._sole_node)
        ]
        if held:
            await self.collection.update_many(
                {"_id": {"$in": held}, "status": "queued"},
                {"$set": {"next_at": now}, "$unset": {"claimed_by": ""}},
            )
        return len(held)

    async def _renew(self, outbox_id: str) -> bool:
        result = await self.collection.update_one(
            {"_id": outbox_id, "claimed_by": self._node, "status": "queued"},
            {"$set": {"next_at": utcnow() + LEASE}},
        )
        return bool(result.matched_count)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mail-outbox")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None
        if self._sending is not None:
            # Stopped mid-send: whether the relay took it is unknown; sent again at the next
            # start (at least once) rather than after the lease.
            outbox_id, self._sending = self._sending, None
            try:
                await self.collection.update_one(
                    {"_id": outbox_id, "claimed_by": self._node, "status": "queued"},
                    {"$set": {"next_at": utcnow()}, "$unset": {"claimed_by": ""}},
                )
            except Exception:
                log.warning("could not give back outgoing mail %s", outbox_id, exc_info=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.send_due()
            except Exception:
                raise_if_stopping()
                log.exception("outbox round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)

    async def send_due(self) -> int:
        sent = 0
        while self._relay is not None:
            now = utcnow()
            doc = await self.collection.find_one_and_update(
                {"status": "queued", "next_at": {"$lte": now}},
                {
                    "$set": {"next_at": now + LEASE, "claimed_by": self._node},
                    "$inc": {"attempts": 1},
                },
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                break
            outbox_id = str(doc["_id"])
            self._sending = outbox_id
            async with renewing(partial(self._renew, outbox_id), f"outgoing mail {outbox_id}"):
                await self._send_one(doc)
            self._sending = None
            sent += 1
        return sent

    async def _send_one(self, doc: Document) -> None:
        relay = self._relay
        assert relay is not None
        try:
            refused, _answer = await aiosmtplib.send(
                bytes(doc["raw"]),
                sender=doc["envelope_from"],
                recipients=doc["recipients"],
                hostname=relay.host,
                port=relay.port,
                username=relay.username,
                password=relay.password,
                use_tls=relay.use_tls,
                start_tls=relay.start_tls,
                timeout=SEND_TIMEOUT_SECONDS,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if codes and all(500 <= c < 600 for c in codes):
                await self._failed(doc, detail)
            else:
                await self._later(doc, detail)
            return
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:
                await self._failed(doc, f"{exc.code} {exc.message}")
            else:
                await self._later(doc, f"{exc.code} {exc.message}")
            return
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._later(doc, repr(exc))
            return
        await self.collection.update_one(
            {"_id": doc["_id"]},
            {"$set": {"status": "sent", "sent_at": utcnow()}, "$unset": {"claimed_by": ""}},
        )
        fields: Document = {"mail.status": "sent", "mail.sent_at": utcnow()}
        if refused:  # some recipients refused, the others took it
            fields["mail.refused"] = {str(k): f"{v[0]} {v[1]}" for k, v in refused.items()}
        await self._mark_activity(doc, fields)

    async def _later(self, doc: Document, error: str) -> None:
        if utcnow() - doc["created_at"] > GIVE_UP_AFTER:
            await self._failed(doc, f"gave up after {doc['attempts']} attempts: {error}")
            return
        delay = min(timedelta(seconds=30) * 2 ** min(doc["attempts"] - 1, 10), timedelta(hours=1))
        await self.collection.update_one(
            {"_id": doc["_id"]},
            {
                "$set": {"next_at": utcnow() + delay, "last_error": error},
                "$unset": {"claimed_by": ""},
            },
        )
        await self._mark_activity(doc, {"mail.status": "retrying", "mail.error": error})

    async def _failed(self, doc: Document, error: str) -> None:
        await self.collection.update_one(
            {"_id": doc["_id"]},
            {"$set": {"status": "failed", "last_error": error}, "$unset": {"claimed_by": ""}},
        )
        await self._mark_activity(doc, {"mail.status": "failed", "mail.error": error})

    async def prune(self, older_than: datetime) -> int:
        """Forget the copies of mail sent (or failed for good) before ``older_than``; what it
        said stays on its activity."""
        result = await self.collection.delete_many(
            {
                "$or": [
                    {"status": "sent", "sent_at": {"$lt": older_than}},
                    {"status": "failed", "created_at": {"$lt": older_than}},
                ]
            }
        )
        return int(result.deleted_count)

    async def _mark_activity(self, doc: Document, fields: Document) -> None:
        await self._store["crm_activities"].update_one(
            {"_id": doc["activity_id"]}, {"$set": {**fields, "modified_at": utcnow()}}
        )
        for callback in self.on_marked:
            try:
                await callback(doc["activity_id"])
            except Exception:
                log.exception("announcing the delivery status of %s failed", doc["activity_id"])
