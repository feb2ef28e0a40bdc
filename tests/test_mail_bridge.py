"""The mail bridge over real SMTP: CRM mail out through a relay (an aiosmtpd sink), replies in
through the hub's own listener, matched to records, counted live."""

from __future__ import annotations

import asyncio
import email
import email.policy
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import SecretStr

from server.mailbridge.inbox import Source
from server.settings import Settings
from server.store.database import Store, utcnow
from server.xmpp.certs import ensure_self_signed
from tests.harness import HubHarness, start_hub


@dataclass
class Sink:
    """A relay that keeps what it is given (or refuses, when told to)."""

    port: int = 0
    received: list[Envelope] = field(default_factory=list)
    refuse_with: str | None = None
    refuse_rcpt: str | None = None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.refuse_rcpt:
            return self.refuse_rcpt
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refuse_with:
            return self.refuse_with
        self.received.append(envelope)
        return "250 OK"

    def messages(self) -> list[EmailMessage]:
        return [
            email.message_from_bytes(bytes(e.original_content or b""), policy=email.policy.default)
            for e in self.received
        ]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    found = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(found), "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    yield found
    server.close()
    await server.wait_closed()


@pytest.fixture
async def mailhub(settings: Settings, store: Store, sink: Sink) -> AsyncIterator[HubHarness]:
    configured = settings.model_copy(
        update={
            "smtp_relay_url": SecretStr(f"smtp://127.0.0.1:{sink.port}"),
            "domain": "portal.test",
        }
    )
    async with start_hub(configured, store) as harness:
        yield harness


async def deliver(hub: HubHarness, msg: EmailMessage | bytes, to: list[str]) -> str:
    raw = msg if isinstance(msg, bytes) else msg.as_bytes()
    port = hub.services.mail.ports["smtp"]
    errors, response = await aiosmtplib.send(
        raw, sender="client@example.test", recipients=to, hostname="127.0.0.1", port=port
    )
    assert not errors, errors
    # The 250 means "in the spool"; the database has it once the spool's drain moved it.
    await hub.services.mail.spool_drain.settled()
    return response


async def settled(hub: HubHarness) -> None:
    """Every stored message reached its outcome (here or in the hub's own pipeline workers)
    and the workers are done with it (its notices are posted after the outcome is stored)."""
    raw = hub.services.store["mail_raw"]
    pipeline = hub.services.mail.pipeline
    await hub.services.mail.spool_drain.settled()
    for _ in range(200):
        await pipeline.drain()
        if await raw.count_documents({"status": "pending"}) == 0 and not pipeline.busy:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("mail still pending")
    await hub.services.crm.counters.settled()


async def mail_setup(hub: HubHarness) -> dict[str, Any]:
    mary_id, mary = await hub.create_user("mary")
    contact = await hub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={
            "first_name": "Carl",
            "last_name": "Client",
            "emails": [{"value": "client@example.test"}],
        },
    )
    assert contact.status == 201, contact.body
    deal = await hub.request(
        "POST",
        "/api/v1/crm/deals",
        token=mary,
        json={"title": "Big order", "contact_ids": [contact.body["id"]]},
    )
    assert deal.status == 201, deal.body
    return {"mary_id": mary_id, "mary": mary, "contact": contact.body, "deal": deal.body}


async def send_from_deal(
    hub: HubHarness, ctx: dict[str, Any], sink: Sink, **body: Any
) -> EmailMessage:
    before = len(sink.received)
    resp = await hub.request(
        "POST",
        f"/api/v1/crm/deals/{ctx['deal']['id']}/emails",
        token=ctx["mary"],
        json={"to": ["client@example.test"], "subject": "Your quote", "text": "Hello Carl", **body},
    )
    assert resp.status == 201, resp.body
    await hub.services.mail.outbox.send_due()
    for _ in range(100):  # the hub's own outbox loop may be the one sending it
        if len(sink.received) > before:
            break
        await asyncio.sleep(0.05)
    else:
        outbox = [d async for d in hub.services.store["mail_outbox"].find({}, {"raw": 0})]
        raise AssertionError(f"the relay got nothing: {outbox}")
    return sink.messages()[-1]


def reply_to(
    original: EmailMessage, *, prefix: str = "RE: ", text: str = "Yes, go ahead."
) -> EmailMessage:
    """A reply as a mail program makes it: to the Reply-To, the subject prefixed, quoting."""
    reply = EmailMessage()
    reply["From"] = "Carl Client <client@example.test>"
    reply["To"] = str(original["Reply-To"])
    reply["Subject"] = prefix + str(original["Subject"])
    reply["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
    reply.set_content(f"{text}\n\n> {original.get_body(('plain',)).get_content()}")  # type: ignore[union-attr]
    return reply


async def test_a_reply_lands_on_the_deal_and_lights_the_counter_green(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    client = await mailhub.connect(ctx["mary"])
    await client.wait_for("snapshot")
    sent = await send_from_deal(mailhub, ctx, sink)
    assert sink.received[-1].rcpt_tos == ["client@example.test"]
    code_local = str(sent["Reply-To"]).split("<")[-1].split("@")[0]
    assert code_local.startswith("crm+")
    assert "[CRM-" in str(sent["Subject"])
    assert sent["References"] == sent["Message-ID"]
    assert sent["X-PortalHub-Origin"] == "portal.test"
    activities = await mailhub.request(
        "GET",
        f"/api/v1/crm/activities?owner_type=deal&owner_id={ctx['deal']['id']}&status=all",
        token=ctx["mary"],
    )
    (outgoing,) = activities.body["activities"]
    assert outgoing["direction"] == "outgoing" and outgoing["completed"]

    reply = reply_to(sent)
    response = await deliver(mailhub, reply, [str(sent["Reply-To"]).split("<")[-1].rstrip(">")])
    assert response.startswith("2.0.0 OK") or "OK" in response
    await settled(mailhub)
    await client.wait_until(lambda: client.crm_counters().get("deal", {}).get("incoming") == 1)
    assert client.crm_counters()["deal"]["colour"] == "green"
    timeline = await mailhub.request(
        "GET",
        f"/api/v1/crm/activities?owner_type=deal&owner_id={ctx['deal']['id']}&status=all",
        token=ctx["mary"],
    )
    incoming = [a for a in timeline.body["activities"] if a["direction"] == "incoming"]
    assert len(incoming) == 1 and incoming[0]["state"] == "incoming"
    assert incoming[0]["description"].startswith("Yes, go ahead.")
    doc = await mailhub.services.store["crm_activities"].find_one({"_id": incoming[0]["id"]})
    assert doc is not None and doc["mail"]["match"] == "code" and not doc["mail"]["flagged"]


async def test_the_listener_is_no_open_relay_and_refuses_oversize_and_bombs(
    settings: Settings, store: Store
) -> None:
    small = settings.model_copy(
        update={"mail_max_message_bytes": 64 * 1024, "domain": "portal.test"}
    )
    async with start_hub(small, store) as hub:
        port = hub.services.mail.ports["smtp"]
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        await smtp.mail("someone@example.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await smtp.rcpt("victim@elsewhere.test")
        assert refused.value.code == 550
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await smtp.rcpt("sales@portal.test")
        await smtp.rcpt("CRM+anything@Portal.Test")
        with pytest.raises(aiosmtplib.SMTPResponseException) as too_big:
            await smtp.data(b"Subject: big\r\n\r\n" + (b"x" * 900 + b"\r\n") * 80)
        assert too_big.value.code == 552
        await smtp.quit()
        # a MIME bomb: nesting deeper than anything a mail program makes
        bomb = b"Subject: bomb\r\nMIME-Version: 1.0\r\n"
        depth = 300
        for i in range(depth):
            bomb += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
        bomb += b"Content-Type: text/plain\r\n\r\nboom\r\n"
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused_bomb:
            await aiosmtplib.send(
                bomb,
                sender="a@example.test",
                recipients=["crm@portal.test"],
                hostname="127.0.0.1",
                port=port,
            )
        assert refused_bomb.value.code == 552
        assert await hub.services.store["mail_raw"].count_documents({}) == 0


async def test_the_same_message_twice_by_both_paths_is_stored_and_delivered_once(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    sent = await send_from_deal(mailhub, ctx, sink)
    reply = reply_to(sent)
    target = [str(sent["Reply-To"]).split("<")[-1].rstrip(">")]
    await deliver(mailhub, reply, target)
    await deliver(mailhub, reply, target)  # an SMTP retry: the very same bytes
    await mailhub.services.mail.receive(reply.as_bytes(), Source("imap", "box", 7, 1))
    resent = EmailMessage()
    for key, value in reply.items():
        resent[key] = value
    resent["X-Relayed-By"] = "another hop"  # other bytes, the same Message-ID
    resent.set_content("Yes, go ahead.")
    await deliver(mailhub, resent, target)
    await settled(mailhub)
    store = mailhub.services.store
    # the SMTP retry is the same bytes: stored once; the IMAP copy has bare LF line ends
    # (SMTP made them CRLF) and the re-sent one other headers: stored, found out by Message-ID
    assert await store["mail_raw"].count_documents({}) == 3
    incoming = await store["crm_activities"].count_documents({"direction": "incoming"})
    assert incoming == 1
    statuses = sorted([d["status"] async for d in store["mail_raw"].find({})])
    assert statuses == ["done", "duplicate", "duplicate"]


async def test_a_forged_code_is_no_code_and_matching_falls_through_to_the_sender(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    sent = await send_from_deal(mailhub, ctx, sink)
    subject = str(sent["Subject"])
    start = subject.index("[CRM-") + 5
    code = subject[start : subject.index("]", start)]
    forged_code = code[:-1] + ("0" if code[-1] != "0" else "1")
    forged = EmailMessage()
    forged["From"] = "client@example.test"
    forged["To"] = f"crm+{forged_code}@portal.test"
    forged["Subject"] = f"Re: [CRM-{forged_code}]"
    forged["Message-ID"] = "<forged@example.test>"
    forged.set_content("tampered")
    await deliver(mailhub, forged, [f"crm+{forged_code}@portal.test"])
    await settled(mailhub)
    raw = await mailhub.services.store["mail_raw"].find_one({"message_id": "<forged@example.test>"})
    assert raw is not None and raw["status"] == "done", raw
    # not the deal (the code was the deal's): the contact, whose address the sender is
    assert raw["result"]["how"] == "sender" and raw["result"]["record_type"] == "contact"


async def test_unknown_senders_make_one_lead_within_limits_or_wait_for_an_admin(
    mailhub: HubHarness,
) -> None:
    _, root = await mailhub.create_user("root", admin=True)

    def stranger(sender: str, n: int) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = f"Nora New <{sender}>"
        msg["To"] = "crm@portal.test"
        msg["Subject"] = f"Question {n}"
        msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
        msg.set_content("Do you ship to Norway?")
        return msg

    # concurrent deliveries from one new sender: one lead
    await asyncio.gather(
        *(deliver(mailhub, stranger("nora@new.test", n), ["crm@portal.test"]) for n in range(4))
    )
    await settled(mailhub)
    store = mailhub.services.store
    leads = [r async for r in store["crm_records"].find({"type": "lead"})]
    assert len(leads) == 1 and leads[0]["title"] == "Lead from Nora New"
    assert await store["crm_activities"].count_documents({"owner_id": leads[0]["_id"]}) == 4
    # exceptions and the per-sender limit
    resp = await mailhub.request(
        "PATCH",
        "/api/v1/mail/settings",
        token=root,
        json={"lead_exceptions": ["@partner.test"], "max_new_leads_per_sender": 1},
    )
    assert resp.status == 200, resp.body
    await deliver(mailhub, stranger("bob@partner.test", 9), ["crm@portal.test"])
    await settled(mailhub)
    assert await store["crm_records"].count_documents({"type": "lead"}) == 1
    unmatched = await mailhub.request("GET", "/api/v1/mail/unmatched", token=root)
    assert [m["from_address"] for m in unmatched.body["mails"]] == ["bob@partner.test"]
    # option off: everything unknown waits for an admin, who assigns it
    await mailhub.request(
        "PATCH", "/api/v1/mail/settings", token=root, json={"create_leads": False}
    )
    await deliver(mailhub, stranger("zed@other.test", 10), ["crm@portal.test"])
    await settled(mailhub)
    assert await store["crm_records"].count_documents({"type": "lead"}) == 1
    unmatched = await mailhub.request("GET", "/api/v1/mail/unmatched", token=root)
    assert len(unmatched.body["mails"]) == 2, [
        d async for d in store["mail_raw"].find({}, {"data": 0})
    ]
    zed = next(m for m in unmatched.body["mails"] if m["from_address"] == "zed@other.test")
    assigned = await mailhub.request(
        "POST",
        f"/api/v1/mail/unmatched/{zed['id']}/assign",
        token=root,
        json={"record_type": "lead", "record_id": leads[0]["_id"]},
    )
    assert assigned.status == 200, assigned.body
    assert await store["crm_activities"].count_documents({"owner_id": leads[0]["_id"]}) == 5


async def test_auto_replies_make_no_lead_and_bounces_mark_the_sent_mail(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    sent = await send_from_deal(mailhub, ctx, sink)
    auto = EmailMessage()
    auto["From"] = "holiday@unknown.test"
    auto["To"] = "crm@portal.test"
    auto["Subject"] = "Out of office"
    auto["Auto-Submitted"] = "auto-replied"
    auto["Message-ID"] = "<auto@unknown.test>"
    auto.set_content("I am away.")
    await deliver(mailhub, auto, ["crm@portal.test"])
    bounce = (
        "From: MAILER-DAEMON@relay.test\r\n"
        "To: crm@portal.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <bounce1@relay.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="R"\r\n\r\n'
        "--R\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--R\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; relay.test\r\n\r\n"
        "Final-Recipient: rfc822; client@example.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--R\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {sent['Message-ID']}\r\nSubject: {sent['Subject']}\r\n"
        "--R--\r\n"
    ).encode()
    await deliver(mailhub, bounce, ["crm@portal.test"])
    await settled(mailhub)
    store = mailhub.services.store
    assert await store["crm_records"].count_documents({"type": "lead"}) == 0
    auto_raw = await store["mail_raw"].find_one({"message_id": "<auto@unknown.test>"})
    assert auto_raw is not None and auto_raw["status"] == "unmatched"
    assert auto_raw["result"]["reason"].startswith("auto-reply")
    outgoing = await store["crm_activities"].find_one({"mail.message_id": str(sent["Message-ID"])})
    assert outgoing is not None and outgoing["mail"]["status"] == "bounced"
    assert len(sink.received) == 1  # nothing was sent back to anyone


async def test_a_crash_between_receipt_and_commit_loses_and_doubles_nothing(
    settings: Settings, store: Store, sink: Sink
) -> None:
    configured = settings.model_copy(
        update={
            "smtp_relay_url": SecretStr(f"smtp://127.0.0.1:{sink.port}"),
            "domain": "portal.test",
        }
    )
    async with start_hub(configured, store) as hub:
        ctx = await mail_setup(hub)
        sent = await send_from_deal(hub, ctx, sink)
        first, second = reply_to(sent, text="first"), reply_to(sent, text="second")
        await hub.services.mail.pipeline.close()  # the node "dies" before processing
        await deliver(hub, first, ["crm@portal.test"])
        # and for the second, right after its activity was written, before the outcome
        raw_id = await hub.services.mail.inbox.put(second.as_bytes(), Source("smtp"))
        doc = await store["mail_raw"].find_one({"_id": raw_id.id})
        assert doc is not None
        from server.mailbridge.parsing import parse

        match = await hub.services.mail.matcher.match(
            parse(second.as_bytes()), [], await hub.services.mail.settings()
        )
        await hub.services.mail.pipeline.deliver(doc, parse(second.as_bytes()), match)
    async with start_hub(configured, store) as hub:  # restart: the pending ones are taken up
        await settled(hub)
        texts = sorted(
            [
                a["description"].split("\n")[0]
                async for a in store["crm_activities"].find({"direction": "incoming"})
            ]
        )
        assert texts == ["first", "second"]
        assert await store["mail_raw"].count_documents({"status": "done"}) == 2


async def test_the_outbox_survives_a_relay_that_is_down_and_records_refusals(
    settings: Settings, store: Store, sink: Sink
) -> None:
    down = settings.model_copy(
        update={"smtp_relay_url": SecretStr("smtp://127.0.0.1:9"), "domain": "portal.test"}
    )
    async with start_hub(down, store) as hub:
        ctx = await mail_setup(hub)
        resp = await hub.request(
            "POST",
            f"/api/v1/crm/deals/{ctx['deal']['id']}/emails",
            token=ctx["mary"],
            json={"to": ["client@example.test"], "subject": "Quote", "text": "Hi"},
        )
        assert resp.status == 201
        queued = activity = None
        for _ in range(100):  # the hub's outbox loop tries at once; wait for its first failure
            await hub.services.mail.outbox.send_due()
            queued = await store["mail_outbox"].find_one({"last_error": {"$exists": True}})
            # the activity is marked just after the outbox entry: wait for both
            activity = await store["crm_activities"].find_one(
                {"_id": resp.body["emails"][0]["activity_id"], "mail.status": "retrying"}
            )
            if queued is not None and activity is not None:
                break
            await asyncio.sleep(0.05)
        assert queued is not None and queued["status"] == "queued", queued
        assert activity is not None and activity["mail"]["error"]
    up = down.model_copy(update={"smtp_relay_url": SecretStr(f"smtp://127.0.0.1:{sink.port}")})
    async with start_hub(up, store) as hub:
        await store["mail_outbox"].update_many({}, {"$set": {"next_at": queued["created_at"]}})
        for _ in range(100):
            await hub.services.mail.outbox.send_due()
            if sink.received:
                break
            await asyncio.sleep(0.05)
        assert len(sink.received) == 1
        activity = await store["crm_activities"].find_one(
            {"_id": resp.body["emails"][0]["activity_id"]}
        )
        assert activity is not None and activity["mail"]["status"] == "sent"
        # a permanent refusal is written on the activity
        sink.refuse_with = "550 5.1.1 no such user"
        again = await hub.request(
            "POST",
            f"/api/v1/crm/deals/{ctx['deal']['id']}/emails",
            token=ctx["mary"],
            json={"to": ["client@example.test"], "subject": "Again", "text": "Hi"},
        )
        failed = None
        for _ in range(100):
            await hub.services.mail.outbox.send_due()
            failed = await store["crm_activities"].find_one(
                {"_id": again.body["emails"][0]["activity_id"], "mail.status": "failed"}
            )
            if failed is not None:
                break
            await asyncio.sleep(0.05)
        assert failed is not None and failed["mail"]["status"] == "failed"
        assert "550" in failed["mail"]["error"]


async def test_header_injection_and_strangers_are_refused(mailhub: HubHarness) -> None:
    ctx = await mail_setup(mailhub)
    path = f"/api/v1/crm/deals/{ctx['deal']['id']}/emails"
    injected = await mailhub.request(
        "POST",
        path,
        token=ctx["mary"],
        json={"to": ["client@example.test"], "subject": "Hi\r\nBcc: victim@evil.test", "text": "x"},
    )
    assert injected.status == 422, injected.body
    stranger = await mailhub.request(
        "POST", path, token=ctx["mary"], json={"to": ["someone@evil.test"], "subject": "Hi"}
    )
    assert stranger.status == 422 and "not an address" in stranger.body["detail"]
    assert await mailhub.services.store["mail_outbox"].count_documents({}) == 0


async def test_thread_headers_and_subject_rules_match_when_there_is_no_code(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    _, root = await mailhub.create_user("root", admin=True)
    sent = await send_from_deal(mailhub, ctx, sink)
    # a mail program that drops the Reply-To and the code, but keeps In-Reply-To
    threaded = EmailMessage()
    threaded["From"] = "Someone Else <other@elsewhere.test>"
    threaded["To"] = "crm@portal.test"
    threaded["Subject"] = "AW: your quote"
    threaded["In-Reply-To"] = str(sent["Message-ID"])
    threaded["Message-ID"] = "<threaded@elsewhere.test>"
    threaded.set_content("Forwarded to our buyer.")
    await deliver(mailhub, threaded, ["crm@portal.test"])
    # an admin rule: "Deal <id>" in a subject names the deal
    rules = await mailhub.request(
        "PATCH",
        "/api/v1/mail/settings",
        token=root,
        json={"subject_rules": [{"pattern": r"Deal ([0-9a-f]{24})", "record_type": "deal"}]},
    )
    assert rules.status == 200, rules.body
    catastrophic = await mailhub.request(
        "PATCH",
        "/api/v1/mail/settings",
        token=root,
        json={"subject_rules": [{"pattern": r"(a+)+$", "record_type": "deal"}]},
    )
    assert catastrophic.status == 422, catastrophic.body
    ruled = EmailMessage()
    ruled["From"] = "nobody@unknown.test"
    ruled["To"] = "crm@portal.test"
    ruled["Subject"] = f"Invoice for Deal {ctx['deal']['id']}"
    ruled["Message-ID"] = "<ruled@unknown.test>"
    ruled.set_content("Please find the invoice.")
    await deliver(mailhub, ruled, ["crm@portal.test"])
    await settled(mailhub)
    store = mailhub.services.store
    for message_id, how in (
        ("<threaded@elsewhere.test>", "thread"),
        ("<ruled@unknown.test>", "rule"),
    ):
        raw = await store["mail_raw"].find_one({"message_id": message_id})
        assert raw is not None and raw["status"] == "done", raw
        assert raw["result"]["how"] == how and raw["result"]["record_id"] == ctx["deal"]["id"]
    assert await store["crm_records"].count_documents({"type": "lead"}) == 0


async def test_another_portals_mail_is_a_customers_and_converted_leads_step_aside(
    mailhub: HubHarness, sink: Sink
) -> None:
    mary_id, mary = await mailhub.create_user("mary")
    lead = await mailhub.request(
        "POST",
        "/api/v1/crm/leads",
        token=mary,
        json={"title": "Partner", "emails": [{"value": "ops@partner2.test"}]},
    )
    converted = await mailhub.request(
        "POST", f"/api/v1/crm/leads/{lead.body['id']}/convert", token=mary, json={"mode": "contact"}
    )
    assert converted.status == 201
    contact_id = converted.body["created"]["contact"]["id"]
    msg = EmailMessage()
    msg["From"] = "ops@partner2.test"
    msg["To"] = "crm@portal.test"
    msg["Subject"] = "From their own Portal Hub"
    msg["Message-ID"] = "<other-hub@partner2.test>"
    msg["X-PortalHub-Origin"] = "partner2.test"  # not ours: a customer who runs Portal Hub
    msg.set_content("Hello from the other side")
    await deliver(mailhub, msg, ["crm@portal.test"])
    ours = EmailMessage()
    ours["From"] = "crm@portal.test"
    ours["To"] = "crm@portal.test"
    ours["Subject"] = "looped"
    ours["Message-ID"] = "<loop@portal.test>"
    ours["X-PortalHub-Origin"] = "portal.test"
    ours.set_content("our own")
    await deliver(mailhub, ours, ["crm@portal.test"])
    await settled(mailhub)
    store = mailhub.services.store
    raw = await store["mail_raw"].find_one({"message_id": "<other-hub@partner2.test>"})
    assert raw is not None and raw["status"] == "done", raw
    assert raw["result"]["record_id"] == contact_id  # not "several records": the lead stepped aside
    loop = await store["mail_raw"].find_one({"result.subject": "looped"})
    assert loop is not None and loop["status"] == "ignored"
    assert mary_id


async def test_a_relay_refusing_every_recipient_fails_the_mail_at_once(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    sink.refuse_rcpt = "550 5.1.1 no such user"
    resp = await mailhub.request(
        "POST",
        f"/api/v1/crm/deals/{ctx['deal']['id']}/emails",
        token=ctx["mary"],
        json={"to": ["client@example.test"], "subject": "Quote", "text": "Hi"},
    )
    assert resp.status == 201
    store = mailhub.services.store
    failed = None
    for _ in range(100):
        await mailhub.services.mail.outbox.send_due()
        failed = await store["crm_activities"].find_one(
            {"_id": resp.body["emails"][0]["activity_id"], "mail.status": "failed"}
        )
        if failed is not None:
            break
        await asyncio.sleep(0.05)
    assert failed is not None and "550" in failed["mail"]["error"]


async def test_the_timeline_shows_the_mail_and_its_attachments_only_to_those_who_see_the_deal(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    watcher = await mailhub.connect(ctx["mary"])
    await watcher.wait_for("snapshot")
    upload = await mailhub.request(
        "POST",
        "/api/v1/mail/attachments?filename=offer.txt",
        token=ctx["mary"],
        data=b"the offer",
        headers={"Content-Type": "text/plain"},
    )
    assert upload.status == 201, upload.body
    sent = await send_from_deal(mailhub, ctx, sink, attachment_ids=[upload.body["id"]])
    # the sender's timeline learns the delivery status live, not only on the next read
    await watcher.wait_until(
        lambda: any(
            (e["data"]["activity"].get("mail") or {}).get("status") == "sent"
            for e in watcher.of_type("crm.activity.updated")
        )
    )
    reply = reply_to(sent, text="Signed copy attached.")
    reply.add_attachment(
        b"signed", maintype="text", subtype="plain", filename="Vertrag \u00fcber\u00b7.txt"
    )
    await deliver(mailhub, reply, [str(sent["Reply-To"]).split("<")[-1].rstrip(">")])
    await settled(mailhub)

    listed = await mailhub.request(
        "GET",
        f"/api/v1/crm/activities?owner_type=deal&owner_id={ctx['deal']['id']}&status=all",
        token=ctx["mary"],
    )
    by_direction = {a["direction"]: a for a in listed.body["activities"]}
    out, incoming = by_direction["outgoing"], by_direction["incoming"]
    assert out["mail"]["status"] == "sent" and out["mail"]["to"] == ["client@example.test"]
    assert out["mail"]["code"] and out["mail"]["text"] is None  # bodies only one at a time
    assert incoming["mail"]["from_address"] == "client@example.test"
    assert incoming["mail"]["match"] == "code" and incoming["mail"]["html"] is None

    one = await mailhub.request(
        "GET", f"/api/v1/crm/activities/{incoming['id']}", token=ctx["mary"]
    )
    assert one.body["mail"]["text"].startswith("Signed copy attached.")
    assert one.body["mail"]["quoted"].lstrip().startswith(">")
    (received,) = one.body["mail"]["attachments"]
    assert received["filename"] == "Vertrag \u00fcber\u00b7.txt" and received["size"] == 6
    (offered,) = out["mail"]["attachments"]
    assert offered["filename"] == "offer.txt" and offered["id"] == upload.body["id"]

    got = await mailhub.request(
        "GET", f"/api/v1/mail/attachments/{received['id']}", token=ctx["mary"]
    )
    assert got.status == 200 and got.body == "signed"
    assert "filename*=UTF-8''Vertrag%20%C3%BCber%C2%B7.txt" in got.headers["Content-Disposition"]
    got = await mailhub.request(
        "GET", f"/api/v1/mail/attachments/{offered['id']}", token=ctx["mary"]
    )
    assert got.status == 200 and got.body == "the offer"

    _, stranger = await mailhub.create_user("stranger")  # a manager: sees own records only
    for file_id in (received["id"], offered["id"]):
        denied = await mailhub.request("GET", f"/api/v1/mail/attachments/{file_id}", token=stranger)
        assert denied.status == 404, denied.body
    denied = await mailhub.request(
        "GET", f"/api/v1/crm/activities/{incoming['id']}", token=stranger
    )
    assert denied.status == 404

    # Without a CRM role, mail is closed like the rest of the CRM: forbidden, not "not found".
    _, boss = await mailhub.create_user("boss", admin=True)
    outsider_id, outsider = await mailhub.create_user("outsider")
    grant = await mailhub.request(
        "PUT",
        "/api/v1/crm/roles",
        token=boss,
        json={"role": "none", "subject_kind": "user", "subject_id": outsider_id},
    )
    assert grant.status == 200, grant.body
    closed = await mailhub.request(
        "POST",
        f"/api/v1/crm/deals/{ctx['deal']['id']}/emails",
        token=outsider,
        json={"to": ["client@example.test"], "subject": "Hi", "text": "Hi"},
    )
    assert closed.status == 403, closed.body
    closed = await mailhub.request(
        "POST", "/api/v1/mail/attachments?filename=x.txt", token=outsider, data=b"x"
    )
    assert closed.status == 403, closed.body


def code_of(sent: EmailMessage) -> str:
    subject = str(sent["Subject"])
    start = subject.index("[CRM-") + 5
    return subject[start : subject.index("]", start)]


async def test_rotated_keys_keep_verifying_until_retired_then_matching_falls_through(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    keys = mailhub.services.mail.keys
    before = await send_from_deal(mailhub, ctx, sink)
    old_kid = (await keys.keys())[0]
    new_kid = await keys.rotate()
    after = await send_from_deal(mailhub, ctx, sink)
    assert code_of(after) != code_of(before)

    await deliver(mailhub, reply_to(before, text="Old code, still good."), ["crm@portal.test"])
    await settled(mailhub)
    raw = mailhub.services.store["mail_raw"]
    first = await raw.find_one({}, sort=[("received_at", -1)])
    assert first is not None and first["result"]["how"] == "code", first
    assert first["result"]["record_type"] == "deal"

    await keys.retire(old_kid)
    assert [(k.id, k.current, k.retired) for k in await keys.describe()] == [
        (old_kid, False, True),
        (new_kid, True, False),
    ]
    late = reply_to(before, text="Old code, now retired.")  # no thread headers: sender decides
    await deliver(mailhub, late, ["crm@portal.test"])
    await settled(mailhub)
    second = await raw.find_one({"message_id": late["Message-ID"]})
    assert second is not None and second["result"]["how"] == "sender", second
    assert second["result"]["record_type"] == "contact"
    # the retired key's id is given out again only when no unused id is left
    assert await keys.rotate() not in {old_kid, new_kid}


async def test_stored_mail_is_pruned_yet_copies_stay_duplicates_and_admins_clear_the_list(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    _, root = await mailhub.create_user("root", admin=True)
    sent = await send_from_deal(mailhub, ctx, sink)
    reply = reply_to(sent)
    await deliver(mailhub, reply, ["crm@portal.test"])
    await settled(mailhub)
    store = mailhub.services.store
    assert await mailhub.services.mail.prune() == {"incoming": 0, "outgoing": 0}  # too young
    assert await store["mail_raw_data"].count_documents({}) == 1  # the bytes, kept apart
    future = await mailhub.services.mail.inbox.prune(utcnow() + timedelta(days=1))
    assert future == 1
    assert await mailhub.services.mail.outbox.prune(utcnow() + timedelta(days=1)) == 1
    kept = await store["mail_raw"].find_one({})
    assert kept is not None and "data" not in kept and kept["status"] == "done"
    assert await store["mail_raw_data"].count_documents({}) == 0
    await deliver(mailhub, reply, ["crm@portal.test"])  # the same bytes again
    await settled(mailhub)
    assert await store["mail_raw"].count_documents({}) == 1
    assert await store["crm_activities"].count_documents({"direction": "incoming"}) == 1

    # refused mail (an IMAP server cannot refuse a bomb) can be read or dismissed, not assigned
    bomb = b"From: x@example.test\r\nSubject: bomb\r\nMIME-Version: 1.0\r\n"
    for i in range(300):
        bomb += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
    bomb += b"Content-Type: text/plain\r\n\r\nboom\r\n"
    await mailhub.services.mail.receive(bomb, Source("imap", "box", 1, 7))
    await mailhub.request(
        "PATCH", "/api/v1/mail/settings", token=root, json={"create_leads": False}
    )
    stray = EmailMessage()
    stray["From"] = "zed@other.test"
    stray["To"] = "crm@portal.test"
    stray["Subject"] = "Who are you?"
    stray.set_content("?")
    await deliver(mailhub, stray, ["crm@portal.test"])
    await settled(mailhub)
    listed = (await mailhub.request("GET", "/api/v1/mail/unmatched", token=root)).body["mails"]
    by_status = {m["status"]: m for m in listed}
    assert set(by_status) == {"unmatched", "refused"} and by_status["refused"]["size"] == len(bomb)
    refused_id = by_status["refused"]["id"]
    assign = await mailhub.request(
        "POST",
        f"/api/v1/mail/unmatched/{refused_id}/assign",
        token=root,
        json={"record_type": "deal", "record_id": ctx["deal"]["id"]},
    )
    assert assign.status == 409, assign.body
    raw = await mailhub.request("GET", f"/api/v1/mail/unmatched/{refused_id}/raw", token=root)
    assert raw.status == 200 and raw.body.startswith("From: x@example.test")
    assert (
        await mailhub.request("GET", f"/api/v1/mail/unmatched/{refused_id}/raw", token=ctx["mary"])
    ).status == 403
    for mail in listed:
        gone = await mailhub.request("DELETE", f"/api/v1/mail/unmatched/{mail['id']}", token=root)
        assert gone.status == 204, gone.body
    assert (await mailhub.request("GET", "/api/v1/mail/unmatched", token=root)).body["mails"] == []
    again = await mailhub.request("DELETE", f"/api/v1/mail/unmatched/{refused_id}", token=root)
    assert again.status == 404


async def test_the_listener_offers_starttls_with_a_certificate_and_takes_mail_over_it(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    cert, key = ensure_self_signed(tmp_path, "portal.test")
    secured = settings.model_copy(
        update={"domain": "portal.test", "smtp_cert_file": cert, "smtp_key_file": key}
    )
    async with start_hub(secured, store) as hub:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=hub.services.mail.ports["smtp"],
            start_tls=False,
            validate_certs=False,
        )
        await smtp.connect()
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        await smtp.starttls()
        assert smtp.get_transport_info("sslcontext") is not None
        msg = EmailMessage()
        msg["From"] = "client@example.test"
        msg["To"] = "crm@portal.test"
        msg["Subject"] = "Over TLS"
        msg.set_content("secret")
        await smtp.send_message(msg)
        await smtp.quit()
        await hub.services.mail.spool_drain.settled()
        assert await hub.services.store["mail_raw"].count_documents({}) == 1


async def test_concurrent_first_sends_share_one_first_key(mailhub: HubHarness, sink: Sink) -> None:
    ctx = await mail_setup(mailhub)
    statuses = await asyncio.gather(
        *(
            mailhub.request(
                "POST",
                f"/api/v1/crm/deals/{ctx['deal']['id']}/emails",
                token=ctx["mary"],
                json={"to": ["client@example.test"], "subject": f"Quote {n}", "text": "Hi"},
            )
            for n in range(6)
        )
    )
    assert [r.status for r in statuses] == [201] * 6, [r.body for r in statuses]
    keys = [k["_id"] async for k in mailhub.services.store["mail_keys"].find({})]
    assert keys == ["0"]
    codes = {r.body["emails"][0]["code"][0] for r in statuses}
    assert codes == {"0"}


async def test_a_relay_may_pass_a_burst_over_one_session(mailhub: HubHarness) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=mailhub.services.mail.ports["smtp"])
    await smtp.connect()
    for n in range(60):  # more than the old per-session budget of 50 MAIL commands
        msg = EmailMessage()
        msg["From"] = "client@example.test"
        msg["To"] = "crm@portal.test"
        msg["Subject"] = f"Burst {n}"
        msg["Message-ID"] = f"<burst-{n}@example.test>"
        msg.set_content(f"number {n}")
        await smtp.send_message(msg)
    with pytest.raises(aiosmtplib.SMTPResponseException) as cut:
        for _ in range(60):
            await smtp.noop()  # a loop on one command is still cut off
    assert cut.value.code == 421
    await mailhub.services.mail.spool_drain.settled()
    assert await mailhub.services.store["mail_raw"].count_documents({}) == 60


def authenticated(msg: EmailMessage, *results: str) -> bytes:
    """``msg`` as the mail server in front passes it on: its Authentication-Results fields
    (``results``: "mx.portal.test; dmarc=fail ...") and its Received on top of the sender's
    header - which may carry a forged field of its own below."""
    top = "".join(f"Authentication-Results: {r}\r\n" for r in results)
    top += "Received: from mail.evil.test (203.0.113.9) by mx.portal.test with ESMTPS\r\n"
    return top.encode() + msg.as_bytes(policy=email.policy.SMTP)


async def test_a_forged_from_of_a_known_contact_is_flagged_and_not_matched_by_sender(
    settings: Settings, store: Store, sink: Sink
) -> None:
    configured = settings.model_copy(
        update={
            "smtp_relay_url": SecretStr(f"smtp://127.0.0.1:{sink.port}"),
            "domain": "portal.test",
            "mail_trusted_authserv_ids": ["mx.portal.test"],
        }
    )
    async with start_hub(configured, store) as hub:
        ctx = await mail_setup(hub)
        _, root = await hub.create_user("root", admin=True)

        def from_carl(subject: str, forged_pass: bool = False) -> EmailMessage:
            msg = EmailMessage()
            if forged_pass:  # the sender's own field, claiming the trusted server's id
                msg["Authentication-Results"] = "mx.portal.test; dmarc=pass header.from=ex"
            msg["From"] = "Carl Client <client@example.test>"
            msg["To"] = "crm@portal.test"
            msg["Subject"] = subject
            msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
            msg.set_content("Please pay the new account: DE00 1234.")
            return msg

        dmarc_fail = "mx.portal.test; spf=fail smtp.mailfrom=evil.test; dmarc=fail (p=reject) "
        dmarc_fail += "header.from=example.test"
        forged = from_carl("New bank details", forged_pass=True)
        await deliver(hub, authenticated(forged, dmarc_fail), ["crm@portal.test"])
        genuine = from_carl("Genuine")
        passed = "mx.portal.test; spf=pass smtp.mailfrom=example.test; dmarc=pass"
        await deliver(hub, authenticated(genuine, passed), ["crm@portal.test"])
        # a failure reported by a server that is not trusted: ignored
        elsewhere = from_carl("Relayed")
        await deliver(
            hub, authenticated(elsewhere, "mx.elsewhere.test; dmarc=fail"), ["crm@portal.test"]
        )
        # a forged From of a new address: no lead either
        stranger = from_carl("Hello")
        stranger.replace_header("From", "nobody@example.test")
        await deliver(hub, authenticated(stranger, dmarc_fail), ["crm@portal.test"])
        await settled(hub)

        def raw_of(msg: EmailMessage) -> Any:
            return store["mail_raw"].find_one({"message_id": str(msg["Message-ID"])})

        doc = await raw_of(forged)
        assert doc is not None and doc["status"] == "unmatched", doc
        assert doc["result"]["suspicious"] == "dmarc=fail (header.from=example.test)"
        assert doc["result"]["reason"].startswith("sender not authenticated (dmarc=fail")
        assert doc["result"]["candidates"] == [
            {"type": "contact", "id": ctx["contact"]["id"], "title": "Carl Client"}
        ]
        for fine in (genuine, elsewhere):
            doc = await raw_of(fine)
            assert doc is not None and doc["status"] == "done", doc
            assert doc["result"]["how"] == "sender" and "suspicious" not in doc["result"]
        doc = await raw_of(stranger)
        assert doc is not None and doc["status"] == "unmatched"
        assert await store["crm_records"].count_documents({"type": "lead"}) == 0
        listed = await hub.request("GET", "/api/v1/mail/unmatched", token=root)
        shown = {m["subject"]: m for m in listed.body["mails"]}
        assert shown["New bank details"]["suspicious"] and shown["Hello"]["suspicious"]
        assert shown["New bank details"]["candidates"][0]["id"] == ctx["contact"]["id"]

        # a valid reply code is the code's business: on the deal, flagged as suspicious
        sent = await send_from_deal(hub, ctx, sink)
        reply = reply_to(sent)
        target = [str(sent["Reply-To"]).split("<")[-1].rstrip(">")]
        await deliver(hub, authenticated(reply, dmarc_fail), target)
        await settled(hub)
        doc = await raw_of(reply)
        assert doc is not None and doc["status"] == "done" and doc["result"]["how"] == "code"
        timeline = await hub.request(
            "GET",
            f"/api/v1/crm/activities?owner_type=deal&owner_id={ctx['deal']['id']}&status=all",
            token=ctx["mary"],
        )
        (incoming,) = [a for a in timeline.body["activities"] if a["direction"] == "incoming"]
        assert incoming["mail"]["suspicious"] is True
        assert incoming["mail"]["suspicious_reason"] == "dmarc=fail (header.from=example.test)"
        contact_timeline = await hub.request(
            "GET",
            f"/api/v1/crm/activities?owner_type=contact&owner_id={ctx['contact']['id']}&status=all",
            token=ctx["mary"],
        )
        subjects = sorted(a["subject"] for a in contact_timeline.body["activities"])
        assert subjects == ["Genuine", "Relayed"]  # never the forged one
        assert all(not a["mail"]["suspicious"] for a in contact_timeline.body["activities"])
        # an admin who knows better puts it on the contact: it stays flagged there
        assigned = await hub.request(
            "POST",
            f"/api/v1/mail/unmatched/{shown['New bank details']['id']}/assign",
            token=root,
            json={"record_type": "contact", "record_id": ctx["contact"]["id"]},
        )
        assert assigned.status == 200, assigned.body
        activity = await store["crm_activities"].find_one({"_id": assigned.body["activity_id"]})
        assert activity is not None and activity["mail"]["match"] == "assigned"
        assert activity["mail"]["suspicious"] is True


async def test_a_reply_to_a_merged_duplicates_mail_lands_on_the_survivor(
    mailhub: HubHarness, sink: Sink
) -> None:
    """Merging two contacts moves the other's mail: its sent mail is on the survivor's
    timeline, and the customer's reply to it arrives there."""
    _, mary = await mailhub.create_user("mary")
    keep = await mailhub.request(
        "POST", "/api/v1/crm/contacts", token=mary, json={"first_name": "Carl", "last_name": "C"}
    )
    dupe = await mailhub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={
            "first_name": "Carl",
            "last_name": "Client",
            "emails": [{"value": "client@example.test"}],
        },
    )
    assert keep.status == 201 and dupe.status == 201, (keep.body, dupe.body)
    sent = await mailhub.request(
        "POST",
        f"/api/v1/crm/contacts/{dupe.body['id']}/emails",
        token=mary,
        json={"to": ["client@example.test"], "subject": "Your quote", "text": "Hello Carl"},
    )
    assert sent.status == 201, sent.body
    await mailhub.services.mail.outbox.send_due()
    for _ in range(100):
        if sink.received:
            break
        await asyncio.sleep(0.05)
    original = sink.messages()[-1]
    merged = await mailhub.request(
        "POST",
        f"/api/v1/crm/contacts/{keep.body['id']}/merge",
        token=mary,
        json={"other_id": dupe.body["id"]},
    )
    assert merged.status == 200, merged.body
    assert [e["value"] for e in merged.body["emails"]] == ["client@example.test"]

    reply = reply_to(original)
    await deliver(mailhub, reply, [str(original["Reply-To"]).split("<")[-1].rstrip(">")])
    await settled(mailhub)
    timeline = await mailhub.request(
        "GET",
        f"/api/v1/crm/activities?owner_type=contact&owner_id={keep.body['id']}&status=all",
        token=mary,
    )
    mails = sorted((a["direction"], a["type"]) for a in timeline.body["activities"])
    assert mails == [("incoming", "email"), ("outgoing", "email")]
    assert not await mailhub.services.store["crm_activities"].count_documents(
        {"owner_id": dupe.body["id"]}
    )
