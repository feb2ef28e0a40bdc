"""CRM mail a sales team lives in (issue 16), over real SMTP (the hub's own listener, a relay
that is an aiosmtpd sink) and IMAP (a real Dovecot): conversion takes the lead's mail along,
replies from the CRM continue the customer's thread, misfiled mail is moved, the unmatched list
has a preview and a live count, leads from mail have a global hourly limit, and the odd cases
(postmaster, forwarded .eml, codes wrapped in quotes, outsiders in a thread, plain-text
bounces) go where they belong."""

# ruff: noqa: F811 - the fixtures imported are how pytest hands them over, not redefinitions

from __future__ import annotations

import asyncio
import uuid
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import aiosmtplib
import pytest

from server.mailbridge.inbox import Source
from tests.harness import HubHarness, SocketClient
from tests.test_mail_bridge import (
    Sink,
    deliver,
    mail_setup,
    mailhub,  # noqa: F401 - fixture
    reply_to,
    send_from_deal,
    settled,
    sink,  # noqa: F401 - fixture
)
from tests.test_mail_imap import (
    Dovecot,
    add_mailbox,
    append,
    count,
    dovecot,  # noqa: F401 - fixture
    wait_for,
)

INBOX = "crm@portal.test"


def plus_address(sent: EmailMessage) -> str:
    return parseaddr(str(sent["Reply-To"]))[1]


def code_of(sent: EmailMessage) -> str:
    return plus_address(sent).split("@")[0].split("+", 1)[1]


def mail(
    sender: str,
    subject: str,
    text: str = "Hello",
    *,
    to: str = INBOX,
    message_id: str | None = None,
    **headers: str,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@example.test>"
    msg["Date"] = "Tue, 24 Nov 2026 09:15:00 +0100"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(text)
    return msg


async def notices(hub: HubHarness, user_id: str) -> list[str]:
    """The texts of the portal's notices to a user, oldest first."""
    store = hub.services.store
    chat = await store["chats"].find_one({"pair_key": f"system|{user_id}"})
    if chat is None:
        return []
    return [
        m["text"]
        async for m in store["messages"].find({"chat_id": chat["_id"]}).sort("created_at", 1)
    ]


async def timeline(hub: HubHarness, token: str, record_type: str, record_id: str) -> list[Any]:
    resp = await hub.request(
        "GET",
        f"/api/v1/crm/activities?owner_type={record_type}&owner_id={record_id}&status=all",
        token=token,
    )
    assert resp.status == 200, resp.body
    return list(resp.body["activities"])


async def history(hub: HubHarness, token: str, plural: str, record_id: str) -> list[Any]:
    resp = await hub.request("GET", f"/api/v1/crm/{plural}/{record_id}/history", token=token)
    assert resp.status == 200, resp.body
    return list(resp.body["history"])


# --- 1. conversion takes the lead's mail ---------------------------------------------------------


async def test_conversion_moves_the_leads_mail_and_replies_with_its_old_code_follow(
    mailhub: HubHarness, sink: Sink
) -> None:
    root_id, root = await mailhub.create_user("root", admin=True)
    store = mailhub.services.store
    client = await mailhub.connect(root)
    await client.wait_for("snapshot")
    # an unknown sender's mail makes a lead: named first / last, made by "E-mail"
    await deliver(mailhub, mail("Nora Newman <nora@new.test>", "Prices?"), [INBOX])
    await settled(mailhub)
    (lead,) = [r async for r in store["crm_records"].find({"type": "lead"})]
    assert (lead["first_name"], lead["last_name"]) == ("Nora", "Newman")
    got = await mailhub.request("GET", f"/api/v1/crm/leads/{lead['_id']}", token=root)
    assert got.body["created_by"] == "email" and got.body["modified_by"] == "email"
    added = [h for h in await history(mailhub, root, "leads", lead["_id"])]
    mail_added = next(h for h in added if h["kind"] == "activity_added")
    assert mail_added["user_id"] is None and mail_added["after"]["from"] == "Nora Newman"
    assert mail_added["after"]["from_address"] == "nora@new.test"
    # a mail from the lead, and the customer's answer to it (open, counted on the lead)
    sent = await mailhub.request(
        "POST",
        f"/api/v1/crm/leads/{lead['_id']}/emails",
        token=root,
        json={"to": ["nora@new.test"], "subject": "Our prices", "text": "See attached"},
    )
    assert sent.status == 201, sent.body
    await mailhub.services.mail.outbox.send_due()
    await wait_until_sent(sink, 1)
    original = sink.messages()[-1]
    await deliver(mailhub, reply_to(original, text="Thanks, what about delivery?"), [INBOX])
    await settled(mailhub)
    await client.wait_until(lambda: client.crm_counters().get("lead", {}).get("incoming") == 2)
    assert len(await timeline(mailhub, root, "lead", lead["_id"])) == 3

    refused = await mailhub.request(
        "POST",
        f"/api/v1/crm/leads/{lead['_id']}/convert",
        token=root,
        json={"mode": "deal+contact", "emails_to": "company"},
    )
    assert refused.status == 422, refused.body
    converted = await mailhub.request(
        "POST",
        f"/api/v1/crm/leads/{lead['_id']}/convert",
        token=root,
        json={"mode": "deal+contact"},
    )
    assert converted.status == 201, converted.body
    deal = converted.body["created"]["deal"]
    contact = converted.body["created"]["contact"]
    # every e-mail, open and completed, is on the deal now; the lead has none left
    assert await timeline(mailhub, root, "lead", lead["_id"]) == []
    moved = await timeline(mailhub, root, "deal", deal["id"])
    assert len(moved) == 3 and {a["owner_id"] for a in moved} == {deal["id"]}
    assert sum(1 for a in moved if a["state"] == "incoming") == 2
    await client.wait_until(
        lambda: (
            client.crm_counters().get("lead", {}).get("incoming") == 0
            and client.crm_counters().get("deal", {}).get("incoming") == 2
        )
    )
    kinds = [h["kind"] for h in await history(mailhub, root, "deals", deal["id"])]
    assert kinds.count("activity_moved") == 3
    # a reply with the code of the mail sent from the lead lands on the deal
    await deliver(mailhub, reply_to(original, text="One more question"), [plus_address(original)])
    await settled(mailhub)
    assert len(await timeline(mailhub, root, "deal", deal["id"])) == 4
    await client.wait_until(lambda: client.crm_counters().get("deal", {}).get("incoming") == 3)
    # a mail from the person without any code finds the contact made from the lead
    await deliver(mailhub, mail("Nora Newman <nora@new.test>", "Hello again"), [INBOX])
    await settled(mailhub)
    assert len(await timeline(mailhub, root, "contact", contact["id"])) == 1
    assert await store["crm_records"].count_documents({"type": "lead"}) == 1
    assert root_id


async def wait_until_sent(sink: Sink, n: int) -> None:
    for _ in range(200):
        if len(sink.received) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the relay got {len(sink.received)} mails, not {n}")


async def test_conversion_offers_existing_contacts_and_companies_and_uses_them(
    mailhub: HubHarness,
) -> None:
    _, mary = await mailhub.create_user("mary")
    store = mailhub.services.store
    carl = await mailhub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={"first_name": "Carl", "last_name": "Client", "emails": [{"value": "carl@a.test"}]},
    )
    acme = await mailhub.request(
        "POST", "/api/v1/crm/companies", token=mary, json={"title": "Acme"}
    )
    lead = await mailhub.request(
        "POST",
        "/api/v1/crm/leads",
        token=mary,
        json={
            "title": "Acme wants more",
            "first_name": "Carl",
            "last_name": "Client",
            "company_title": "Acme",
            "emails": [{"value": "carl.client@acme.test"}],
            "ignore_duplicates": True,
        },
    )
    assert lead.status == 201, lead.body
    lead_id = lead.body["id"]
    offered = await mailhub.request(
        "GET", f"/api/v1/crm/leads/{lead_id}/convert/candidates", token=mary
    )
    assert offered.status == 200, offered.body
    assert [c["id"] for c in offered.body["contacts"]] == [carl.body["id"]]
    assert offered.body["contacts"][0]["matched"] == ["name"]
    assert [c["id"] for c in offered.body["companies"]] == [acme.body["id"]]
    # converting without a choice no longer duplicates them silently
    blind = await mailhub.request(
        "POST",
        f"/api/v1/crm/leads/{lead_id}/convert",
        token=mary,
        json={"mode": "deal+contact+company"},
    )
    assert blind.status == 409 and blind.body["type"].endswith("possible-duplicates")
    assert [c["id"] for c in blind.body["contacts"]] == [carl.body["id"]]
    assert await store["crm_records"].count_documents({"type": "contact"}) == 1
    used = await mailhub.request(
        "POST",
        f"/api/v1/crm/leads/{lead_id}/convert",
        token=mary,
        json={
            "mode": "deal+contact+company",
            "contact_id": carl.body["id"],
            "company_id": acme.body["id"],
        },
    )
    assert used.status == 201, used.body
    created = used.body["created"]
    assert created["contact"]["id"] == carl.body["id"]
    assert created["company"]["id"] == acme.body["id"]
    assert created["deal"]["contact_ids"] == [carl.body["id"]]
    assert created["deal"]["company_id"] == acme.body["id"]
    assert used.body["lead"]["converted"]["contact"] == carl.body["id"]
    assert await store["crm_records"].count_documents({"type": "contact"}) == 1
    assert await store["crm_records"].count_documents({"type": "company"}) == 1
    # the contact got the lead's address (its mail keeps finding it) and the company
    contact = await store["crm_records"].find_one({"_id": carl.body["id"]})
    assert contact is not None
    assert [e["value"] for e in contact["emails"]] == ["carl@a.test", "carl.client@acme.test"]
    assert contact["company_ids"] == [acme.body["id"]]
    kinds = [h["kind"] for h in await history(mailhub, mary, "contacts", carl.body["id"])]
    assert "linked" in kinds
    # someone else's contact cannot be used by one who does not see it
    _, sam = await mailhub.create_user("sam")
    other = await mailhub.request(
        "POST",
        "/api/v1/crm/leads",
        token=sam,
        json={"title": "Other", "last_name": "Other", "ignore_duplicates": True},
    )
    hidden = await mailhub.request(
        "POST",
        f"/api/v1/crm/leads/{other.body['id']}/convert",
        token=sam,
        json={"mode": "contact", "contact_id": carl.body["id"]},
    )
    assert hidden.status == 422, hidden.body


# --- 2. replies from the CRM continue the thread --------------------------------------------------


async def test_a_reply_from_the_crm_continues_the_customers_thread_with_cc_and_bcc(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    mary, deal_id = ctx["mary"], ctx["deal"]["id"]
    colleague = await mailhub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={
            "first_name": "Cleo",
            "last_name": "Colleague",
            "emails": [{"value": "cleo@ex.test"}],
        },
    )
    boss = await mailhub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={"first_name": "Bo", "last_name": "Boss", "emails": [{"value": "bo@ex.test"}]},
    )
    await mailhub.request(
        "PATCH",
        f"/api/v1/crm/deals/{deal_id}",
        token=mary,
        json={"contact_ids": [ctx["contact"]["id"], colleague.body["id"], boss.body["id"]]},
    )
    first = await send_from_deal(mailhub, ctx, sink)
    assert str(first["Date"]).endswith("+0000")  # not "-0000": the zone is known, UTC
    code = code_of(first)
    # the customer answers from a program that drops the Reply-To code but keeps the thread
    answer = mail(
        "Carl Client <client@example.test>",
        "AW: Your quote",
        "Yes please, and copy Cleo.",
        message_id="<answer-1@example.test>",
        In_Reply_To=str(first["Message-ID"]),
        References=f"<earlier@example.test> {first['Message-ID']}",
    )
    await deliver(mailhub, answer, [INBOX])
    await settled(mailhub)
    incoming = next(
        a for a in await timeline(mailhub, mary, "deal", deal_id) if a["direction"] == "incoming"
    )
    assert incoming["mail"]["match"] == "thread"
    assert incoming["mail"]["date"].startswith("2026-11-24T08:15:00")  # its Date:, in UTC
    assert incoming["mail"]["received_at"]

    # the send dialog's preview: placeholders from the deal's contact the mail goes to
    preview = await mailhub.request(
        "POST",
        f"/api/v1/crm/deals/{deal_id}/emails/preview",
        token=mary,
        json={
            "to": ["cleo@ex.test"],
            "subject": "",
            "text": "Dear {{record.first_name}} {{contact.last_name}}, from {{user.name}}",
            "in_reply_to": incoming["id"],
        },
    )
    assert preview.status == 200, preview.body
    (shown,) = preview.body["previews"]
    assert shown["text"] == "Dear Cleo Colleague, from mary"
    assert shown["subject"] == "Re: Your quote"

    # Reply all: the customer, with a copy to a colleague and a blind copy to the boss
    before = len(sink.received)
    replied = await mailhub.request(
        "POST",
        f"/api/v1/crm/deals/{deal_id}/emails",
        token=mary,
        json={
            "to": ["client@example.test"],
            "cc": ["cleo@ex.test"],
            "bcc": ["bo@ex.test"],
            "text": "Dear {{record.first_name}}, done.",
            "in_reply_to": incoming["id"],
        },
    )
    assert replied.status == 201, replied.body
    (out,) = replied.body["emails"]
    assert out["code"] == code and out["cc"] == ["cleo@ex.test"] and out["bcc"] == ["bo@ex.test"]
    await mailhub.services.mail.outbox.send_due()
    await wait_until_sent(sink, before + 1)
    envelope = sink.received[-1]
    sent = sink.messages()[-1]
    assert sorted(envelope.rcpt_tos) == ["bo@ex.test", "cleo@ex.test", "client@example.test"]
    assert sent["In-Reply-To"] == "<answer-1@example.test>"
    assert str(sent["References"]).split() == [
        "<earlier@example.test>",
        str(first["Message-ID"]),
        "<answer-1@example.test>",
        str(sent["Message-ID"]),
    ]
    assert str(sent["Cc"]) == "cleo@ex.test" and sent["Bcc"] is None
    assert b"bo@ex.test" not in bytes(envelope.original_content or b"")
    assert str(sent["Subject"]) == f"Re: Your quote [CRM-{code}]"  # the same code, kept
    assert code_of(sent) == code
    assert sent.get_body(("plain",)).get_content().startswith("Dear Carl, done.")  # type: ignore[union-attr]
    activity = await mailhub.services.store["crm_activities"].find_one({"_id": out["activity_id"]})
    assert activity is not None and activity["mail"]["bcc"] == ["bo@ex.test"]
    assert activity["mail"]["in_reply_to_activity"] == incoming["id"]
    # the customer's next answer to the reply comes back by the kept code
    await deliver(mailhub, reply_to(sent, text="Thank you"), [plus_address(sent)])
    await settled(mailhub)
    raw = await mailhub.services.store["mail_raw"].find_one({"result.how": "code"})
    assert raw is not None and raw["result"]["record_id"] == deal_id

    # Cc and Bcc follow the recipient rule; bulk mail takes neither; the answered mail must be
    # an e-mail of this record
    for body, why in (
        ({"to": ["client@example.test"], "cc": ["x@elsewhere.test"]}, "x@elsewhere.test"),
        ({"to": ["client@example.test"], "bcc": ["x@elsewhere.test"]}, "x@elsewhere.test"),
        (
            {"to": ["client@example.test", "cleo@ex.test"], "cc": ["bo@ex.test"], "bulk": True},
            "bulk",
        ),
        ({"to": ["client@example.test"], "in_reply_to": "0" * 24}, "in_reply_to"),
    ):
        bad = await mailhub.request(
            "POST",
            f"/api/v1/crm/deals/{deal_id}/emails",
            token=mary,
            json={"subject": "x", "text": "x", **body},
        )
        assert bad.status == 422 and why in bad.body["detail"], bad.body


# --- 3. moving mail -----------------------------------------------------------------------------


async def test_a_mobile_reply_on_the_contact_is_moved_to_the_deal_live_for_both(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    mary, deal_id, contact_id = ctx["mary"], ctx["deal"]["id"], ctx["contact"]["id"]
    _, sam = await mailhub.create_user("sam")  # a manager who sees neither
    await send_from_deal(mailhub, ctx, sink)
    # a mobile reply to the plain inbox, without any code or thread: the sender's contact
    await deliver(
        mailhub, mail("client@example.test", "about the order", "ok from my phone"), [INBOX]
    )
    await settled(mailhub)
    (on_contact,) = await timeline(mailhub, mary, "contact", contact_id)
    assert on_contact["mail"]["match"] == "sender"
    watcher = await mailhub.connect(mary)
    await watcher.wait_for("snapshot")
    await watcher.wait_until(lambda: watcher.crm_counters().get("contact", {}).get("incoming") == 1)

    path = f"/api/v1/crm/activities/{on_contact['id']}/move"
    for who, body, status in (
        (sam, {"owner_type": "deal", "owner_id": deal_id}, 404),  # sees neither record
        (mary, {"owner_type": "deal", "owner_id": "0" * 24}, 404),
        (mary, {"owner_type": "lead", "owner_id": deal_id}, 404),  # not a lead
    ):
        refused = await mailhub.request("POST", path, token=who, json=body)
        assert refused.status == status, refused.body
    moved = await mailhub.request(
        "POST", path, token=mary, json={"owner_type": "deal", "owner_id": deal_id}
    )
    assert moved.status == 200, moved.body
    assert moved.body["owner_type"] == "deal" and moved.body["owner_id"] == deal_id
    assert await timeline(mailhub, mary, "contact", contact_id) == []
    assert on_contact["id"] in [a["id"] for a in await timeline(mailhub, mary, "deal", deal_id)]
    # live: the contact's viewers lose it, the deal's get it; the counters follow
    await watcher.wait_until(
        lambda: (
            any(
                e["type"] == "crm.activity.removed" and e["data"]["owner_id"] == contact_id
                for e in _user_events(watcher)
            )
            and any(
                e["type"] == "crm.activity.updated"
                and e["data"]["activity"]["id"] == on_contact["id"]
                and e["data"]["activity"]["owner_id"] == deal_id
                for e in _user_events(watcher)
            )
        )
    )
    await watcher.wait_until(
        lambda: (
            watcher.crm_counters().get("contact", {}).get("incoming") == 0
            and watcher.crm_counters().get("deal", {}).get("incoming") == 1
        )
    )
    # the history of both records says so
    for plural, record_id in (("contacts", contact_id), ("deals", deal_id)):
        (entry,) = [
            h
            for h in await history(mailhub, mary, plural, record_id)
            if h["kind"] == "activity_moved"
        ]
        assert entry["before"]["record"]["id"] == contact_id
        assert entry["after"]["record"]["id"] == deal_id
        assert entry["after"]["activity"]["id"] == on_contact["id"]
    # only e-mails move
    call = await mailhub.request(
        "POST",
        "/api/v1/crm/activities",
        token=mary,
        json={"owner_type": "deal", "owner_id": deal_id, "type": "call", "subject": "ring"},
    )
    not_mail = await mailhub.request(
        "POST",
        f"/api/v1/crm/activities/{call.body['id']}/move",
        token=mary,
        json={"owner_type": "contact", "owner_id": contact_id},
    )
    assert not_mail.status == 422, not_mail.body


def _user_events(client: SocketClient) -> list[dict[str, Any]]:
    return [
        e
        for _name, e in client.events
        if isinstance(e, dict) and str(e.get("stream", "")).startswith("user:")
    ]


# --- 4. the unmatched list, and the hourly limit on leads from mail ------------------------------


async def test_leads_from_mail_stop_at_the_hourly_limit_with_one_notice_and_a_live_badge(
    mailhub: HubHarness,
) -> None:
    root_id, root = await mailhub.create_user("root", admin=True)
    store = mailhub.services.store
    admin = await mailhub.connect(root)
    (snapshot,) = await admin.wait_for("snapshot")
    assert snapshot["mail"] == {"unmatched": 0}
    changed = await mailhub.request(
        "PATCH", "/api/v1/mail/settings", token=root, json={"max_new_leads_per_hour": 3}
    )
    assert changed.status == 200 and changed.body["max_new_leads_per_hour"] == 3
    senders = [f"Person {n} <p{n}@many.test>" for n in range(7)]
    await asyncio.gather(
        *(
            deliver(mailhub, mail(s, f"Hello {n}", f"question {n}"), [INBOX])
            for n, s in enumerate(senders)
        )
    )
    await settled(mailhub)
    assert await store["crm_records"].count_documents({"type": "lead"}) == 3
    listed = await mailhub.request("GET", "/api/v1/mail/unmatched", token=root)
    assert listed.body["count"] == 4 and len(listed.body["mails"]) == 4
    for entry in listed.body["mails"]:
        assert "3 leads from mail this hour" in entry["reason"], entry
        assert entry["preview"].startswith("question ") and entry["from_name"].startswith("Person")
        assert entry["date"].startswith("2026-11-24T08:15:00")
    paused = [t for t in await notices(mailhub, root_id) if "paused" in t]
    assert len(paused) == 1, await notices(mailhub, root_id)
    counted = await mailhub.request("GET", "/api/v1/mail/unmatched/count", token=root)
    assert counted.body == {"count": 4}
    await admin.wait_until(lambda: _unmatched(admin) == 4)
    # the same mail again by another path (other bytes, its Message-ID) is no second entry
    first = listed.body["mails"][-1]
    raw = await store["mail_raw"].find_one({"_id": first["id"]})
    assert raw is not None
    again = (await mailhub.services.mail.inbox.raw_of(raw)).replace(b"\r\n", b"\n")  # as IMAP
    await mailhub.services.mail.receive(again, Source("imap", "box", 1, 1))
    await settled(mailhub)
    listed = await mailhub.request("GET", "/api/v1/mail/unmatched", token=root)
    assert listed.body["count"] == 4
    assert next(m for m in listed.body["mails"] if m["id"] == first["id"])["copies"] == 2
    # dismissing and assigning bring the badge down live
    await mailhub.request("DELETE", f"/api/v1/mail/unmatched/{first['id']}", token=root)
    await admin.wait_until(lambda: _unmatched(admin) == 3)
    lead = await store["crm_records"].find_one({"type": "lead"})
    assert lead is not None
    second = listed.body["mails"][0]
    assigned = await mailhub.request(
        "POST",
        f"/api/v1/mail/unmatched/{second['id']}/assign",
        token=root,
        json={"record_type": "lead", "record_id": lead["_id"]},
    )
    assert assigned.status == 200, assigned.body
    await admin.wait_until(lambda: _unmatched(admin) == 2)
    # a manager sees no count and gets none
    _, mary = await mailhub.create_user("mary")
    assert (await mailhub.request("GET", "/api/v1/mail/unmatched/count", token=mary)).status == 403
    manager = await mailhub.connect(mary)
    (theirs,) = await manager.wait_for("snapshot")
    assert theirs["mail"] == {}


def _unmatched(client: SocketClient) -> int | None:
    counts = [d["count"] for d in client.of_type("mail.unmatched")]
    return counts[-1] if counts else None


async def test_an_imap_copy_of_mail_received_by_smtp_is_moved_like_delivered_mail(
    mailhub: HubHarness, dovecot: Dovecot
) -> None:
    ctx = await mail_setup(mailhub)
    store = mailhub.services.store
    reply = mail("Carl Client <client@example.test>", "Re: our call", "see you")
    # the mail server in front delivers to the hub and keeps a copy in the collected mailbox
    # (the very same bytes), and a second copy another way (other bytes, the same Message-ID)
    raw = reply.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    port = mailhub.services.mail.ports["smtp"]
    await aiosmtplib.send(
        raw, sender="a@example.test", recipients=[INBOX], hostname="127.0.0.1", port=port
    )
    await settled(mailhub)
    await append(dovecot, raw)
    await append(dovecot, b"X-Copy: relayed\r\n" + raw)
    await add_mailbox(mailhub, dovecot)

    async def moved() -> bool:
        return await count(dovecot, "INBOX") == 0 and await count(dovecot, "Processed") == 2

    await wait_for(moved, timeout=30)
    assert await store["crm_activities"].count_documents({"direction": "incoming"}) == 1
    assert len(await timeline(mailhub, ctx["mary"], "contact", ctx["contact"]["id"])) == 1


# --- 5. the odd cases ----------------------------------------------------------------------------


async def test_postmaster_is_accepted_and_goes_to_the_admins_not_to_a_record(
    mailhub: HubHarness,
) -> None:
    root_id, root = await mailhub.create_user("root", admin=True)
    port = mailhub.services.mail.ports["smtp"]
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("someone@example.test")
    bare = await smtp.execute_command(b"RCPT", b"TO:<Postmaster>")
    assert bare.code == 250, bare
    await smtp.rcpt("postmaster@Portal.Test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused):
        await smtp.rcpt("postmaster@elsewhere.test")  # still no relay
    await smtp.data(mail("Admin Elsewhere <admin@elsewhere.test>", "Your server", "FYI").as_bytes())
    await smtp.quit()
    await settled(mailhub)
    store = mailhub.services.store
    assert await store["crm_records"].count_documents({}) == 0  # no lead
    listed = await mailhub.request("GET", "/api/v1/mail/unmatched", token=root)
    (entry,) = listed.body["mails"]
    assert "postmaster" in entry["reason"] and entry["subject"] == "Your server"
    (told,) = [t for t in await notices(mailhub, root_id) if "postmaster" in t]
    assert "Admin Elsewhere" in told and "Your server" in told


async def test_codes_in_forwarded_eml_or_wrapped_quotes_find_the_deal_and_outsiders_are_flagged(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    store = mailhub.services.store
    sent = await send_from_deal(mailhub, ctx, sink)
    code = code_of(sent)
    # a colleague forwards the customer's mail as an attachment, from the plain inbox
    forward = mail("Carl Client <client@example.test>", "Fwd: see below", "Forwarding this.")
    forward.add_attachment(
        reply_to(sent).as_bytes(),
        maintype="application",
        subtype="octet-stream",
        filename="answer.eml",
    )
    # a client that wraps the quoted subject line inside the code
    wrapped = mail(
        "Carl Client <client@example.test>",
        "answer",
        "Fine by me.\n\n> From: mary\n> Subject: Your quote [CRM-"
        + code[:15]
        + "\n> "
        + code[15:]
        + "]\n> Hello Carl",
    )
    # someone the deal does not know, answering in the thread (References only)
    outsider = mail(
        "Olaf Outsider <olaf@elsewhere.test>",
        "I was copied",
        "Me too.",
        References=str(sent["Message-ID"]),
    )
    for msg in (forward, wrapped, outsider):
        await deliver(mailhub, msg, [INBOX])
    await settled(mailhub)
    how = {}
    async for raw in store["mail_raw"].find({"status": "done"}):
        how[raw["result"]["subject"]] = raw["result"]
    assert how["Fwd: see below"]["how"] == "code"
    assert how["Fwd: see below"]["record_id"] == ctx["deal"]["id"]
    assert how["answer"]["how"] == "code" and how["answer"]["record_id"] == ctx["deal"]["id"]
    assert not how["answer"]["flagged"]
    assert how["I was copied"]["how"] == "thread" and how["I was copied"]["flagged"]
    flagged = await store["crm_activities"].find_one({"mail.from": "olaf@elsewhere.test"})
    assert flagged is not None and flagged["mail"]["flagged"]
    assert await store["crm_records"].count_documents({"type": "lead"}) == 0


async def test_a_plain_text_bounce_names_the_failed_address_and_tells_the_sender(
    mailhub: HubHarness, sink: Sink
) -> None:
    ctx = await mail_setup(mailhub)
    sent = await send_from_deal(mailhub, ctx, sink)
    bounce = (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.test>\r\n"
        f"To: {INBOX}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <bounce-2@mx.example.test>\r\n"
        "\r\n"
        "Hello, this is the mail system at mx.example.test.\r\n\r\n"
        "I could not deliver your message to client@example.test: the mailbox is full.\r\n\r\n"
        "--- Original message follows ---\r\n"
        f"> Message-ID: {sent['Message-ID']}\r\n"
        "> To: client@example.test\r\n"
        f"> Subject: {sent['Subject']}\r\n"
    ).encode()
    await deliver(mailhub, bounce, [INBOX])
    await settled(mailhub)
    store = mailhub.services.store
    outgoing = await store["crm_activities"].find_one({"mail.message_id": str(sent["Message-ID"])})
    assert outgoing is not None and outgoing["mail"]["status"] == "bounced"
    assert outgoing["mail"]["bounced_recipients"] == ["client@example.test"]
    (told,) = [t for t in await notices(mailhub, ctx["mary_id"]) if "bounced" in t]
    assert "client@example.test" in told and "Big order" in told
