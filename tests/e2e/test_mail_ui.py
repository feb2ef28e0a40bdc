"""CRM mail in real browsers: a manager sends a mail with an attachment from a deal through the
send dialog (out through a relay, an aiosmtpd sink), the customer's reply comes back over SMTP to
the hub's listener and shows up live in the deal's timeline (quoted history folded, the HTML in a
sandboxed frame, the attachment downloadable); an administrator works the CRM inbox page (the
options, the subject-rule tester, an IMAP connection test) and puts an unmatched mail on a deal."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from playwright.async_api import Browser, FilePayload, Page, expect
from pydantic import SecretStr

from server.settings import Settings
from server.store.database import Store
from tests.e2e.browser import DIST, log_in, new_context
from tests.harness import HubHarness, start_hub

DOMAIN = "portal.test"


@dataclass
class Sink:
    """The relay: keeps every message it is given."""

    port: int = 0
    received: list[Envelope] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
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
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(found), "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    yield found
    server.close()
    await server.wait_closed()


@pytest.fixture
async def mail_hub(
    chromium_path: str, settings: Settings, store: Store, sink: Sink
) -> AsyncIterator[HubHarness]:
    """A hub serving the built client, sending through the sink, its listener on a free port."""
    if not (DIST / "index.html").is_file():
        pytest.fail(f"{DIST}/index.html is missing: build the web client first with `make web`")
    configured = settings.model_copy(
        update={
            "web_client_dir": DIST,
            "smtp_relay_url": SecretStr(f"smtp://127.0.0.1:{sink.port}"),
            "domain": DOMAIN,
            "mail_trusted_authserv_ids": ["mx.portal.test"],
        }
    )
    async with start_hub(configured, store) as harness:
        yield harness


async def call(hub: HubHarness, token: str, method: str, path: str, body: Any = None) -> Any:
    resp = await hub.request(method, path, token=token, json=body)
    assert resp.status in (200, 201, 204), (method, path, resp.status, resp.body)
    return resp.body


async def deliver(hub: HubHarness, msg: EmailMessage, sender: str, to: str) -> None:
    """Hand a message to the hub's own SMTP listener, as the mail server in front would."""
    port = hub.services.mail.ports["smtp"]
    errors, _ = await aiosmtplib.send(
        msg.as_bytes(), sender=sender, recipients=[to], hostname="127.0.0.1", port=port
    )
    assert not errors, errors


async def settled(hub: HubHarness) -> None:
    """Every stored message has its outcome."""
    raw = hub.services.store["mail_raw"]
    await hub.services.mail.spool_drain.settled()  # the spool into the database first
    for _ in range(200):
        await hub.services.mail.pipeline.drain()
        if await raw.count_documents({"status": "pending"}) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("mail still pending")


async def sales_deal(hub: HubHarness, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A contact with an address, and a deal with that contact (the deal has no address)."""
    carl = await call(
        hub,
        token,
        "POST",
        "/api/v1/crm/contacts",
        {
            "first_name": "Carl",
            "last_name": "Client",
            "emails": [{"type": "work", "value": "client@example.test"}],
        },
    )
    deal = await call(
        hub, token, "POST", "/api/v1/crm/deals", {"title": "Big order", "contact_ids": [carl["id"]]}
    )
    return carl, deal


async def open_record(page: Page, tab: str, title: str) -> None:
    await page.get_by_test_id("nav-crm").click()
    await page.locator(f"[data-testid=crm-tab][data-tab={tab}]").click()
    await page.locator(f'[data-testid=crm-row][data-title="{title}"]').click()
    await expect(page.get_by_test_id("crm-record-title")).to_have_text(title)


def free_port() -> int:
    """A port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_mail_sent_from_a_deal_and_its_reply_live_in_the_timeline(
    mail_hub: HubHarness, sink: Sink, browser: Browser
) -> None:
    _, mary = await mail_hub.create_user("mary", first_name="Mary", last_name="Jones")
    _, root = await mail_hub.create_user("root", admin=True)
    await call(
        mail_hub,
        root,
        "POST",
        "/api/v1/mail/templates",
        {
            "name": "Quote",
            "subject": "Your quote: {{record.title}}",
            "text": "Hello Carl,\n\nthe offer is attached.\n\n{{user.name}}",
        },
    )
    _, deal = await sales_deal(mail_hub, mary)

    page = await (await new_context(browser)).new_page()
    await log_in(page, mail_hub, "mary")
    await open_record(page, "deal", "Big order")
    await page.get_by_test_id("crm-send-email").click()
    dialog = page.get_by_test_id("mail-compose")
    carl = dialog.locator("[data-testid=mail-recipient][data-address='client@example.test']")
    await expect(carl.locator("input")).to_be_checked()  # the contact's address, ticked
    await expect(carl).to_contain_text("Carl Client (contact)")

    # A stranger's address: the hub refuses, the dialog says why and stays open.
    await dialog.get_by_test_id("mail-extra-address").fill("someone@evil.example")
    await dialog.get_by_test_id("mail-extra-address").press("Enter")
    await dialog.get_by_test_id("mail-template").select_option(label="Quote")
    await expect(dialog.get_by_test_id("mail-subject")).to_have_value(
        "Your quote: {{record.title}}"
    )
    await dialog.get_by_test_id("mail-send").click()
    await expect(dialog.get_by_test_id("mail-compose-error")).to_have_text(
        "someone@evil.example is not an address of this record or its contacts"
    )
    assert sink.received == []
    stranger = dialog.locator("[data-testid=mail-recipient][data-address='someone@evil.example']")
    await stranger.locator("input").uncheck()

    # An attachment, uploaded as it is chosen; then sent.
    offer_file: FilePayload = {
        "name": "offer.txt",
        "mimeType": "text/plain",
        "buffer": b"the offer",
    }
    await dialog.get_by_test_id("mail-attach-input").set_input_files(files=[offer_file])
    await expect(dialog.get_by_test_id("mail-compose-attachment")).to_have_attribute(
        "data-filename", "offer.txt"
    )
    await expect(dialog.get_by_test_id("mail-compose-attachment")).to_contain_text("9 B")
    await dialog.get_by_test_id("mail-send").click()
    await expect(dialog).to_have_count(0)

    timeline = page.get_by_test_id("crm-timeline")
    sent_item = timeline.locator("[data-testid=mail-item][data-direction=outgoing]")
    await expect(sent_item).to_have_count(1)
    await expect(sent_item.get_by_test_id("mail-to")).to_have_text("client@example.test")
    await expect(sent_item.get_by_test_id("mail-status")).to_have_text("Sent")
    await expect(sent_item).to_have_attribute("data-status", "sent")
    await expect(sent_item.get_by_test_id("mail-attachment")).to_have_attribute(
        "data-filename", "offer.txt"
    )
    (sent,) = sink.messages()
    assert str(sent["Subject"]).startswith("Your quote: Big order [CRM-")
    assert sink.received[0].rcpt_tos == ["client@example.test"]
    body = sent.get_body(("plain",))
    assert body is not None and "Mary Jones" in body.get_content()
    (offer,) = sent.iter_attachments()
    assert offer.get_filename() == "offer.txt" and offer.get_content() == "the offer"

    # Carl answers from his mail program, to the Reply-To: it comes in live, green.
    reply_to = str(sent["Reply-To"]).split("<")[-1].rstrip(">")
    assert reply_to.startswith("crm+") and reply_to.endswith("@" + DOMAIN)
    reply = EmailMessage()
    reply["From"] = "Carl Client <client@example.test>"
    reply["To"] = reply_to
    reply["Subject"] = "RE: " + str(sent["Subject"])
    reply["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
    reply["In-Reply-To"] = str(sent["Message-ID"])
    reply.set_content("Signed copy attached.\n\n> Hello Carl,\n> the offer is attached.\n")
    reply.add_alternative(
        "<p><b>Signed</b> copy attached.</p><blockquote>Hello Carl, the offer is attached."
        '</blockquote><img src="https://tracker.example/pixel.gif" alt="">'
        '<script>document.title = "pwned"</script>',
        subtype="html",
    )
    reply.add_attachment(b"signed", maintype="text", subtype="plain", filename="signed.txt")
    await deliver(mail_hub, reply, "client@example.test", reply_to)

    got = timeline.locator("[data-testid=mail-item][data-direction=incoming]")
    await expect(got).to_have_count(1)
    item = timeline.locator(
        "li.crm-activity", has=page.locator("[data-testid=mail-item][data-direction=incoming]")
    )
    await expect(item).to_have_attribute("data-state", "incoming")
    await expect(got.get_by_test_id("mail-from")).to_have_text("Carl Client <client@example.test>")
    await expect(got.get_by_test_id("mail-match")).to_contain_text("by its reply code")
    await expect(got.get_by_test_id("mail-status")).to_have_count(0)
    await expect(got.get_by_test_id("mail-flagged")).to_have_count(0)
    await expect(got.get_by_test_id("mail-text")).to_have_text("Signed copy attached.")
    indicator = page.get_by_test_id("crm-record").get_by_test_id(f"indicator-{deal['id']}")
    await expect(indicator).to_have_attribute("data-colour", "green")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_attribute("data-colour", "green")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_text("1")

    # The quoted history: folded, unfolded, folded again.
    await expect(got.get_by_test_id("mail-quoted")).to_have_count(0)
    await got.get_by_test_id("mail-quoted-toggle").click()
    await expect(got.get_by_test_id("mail-quoted")).to_contain_text("> Hello Carl,")
    await got.get_by_test_id("mail-quoted-toggle").click()
    await expect(got.get_by_test_id("mail-quoted")).to_have_count(0)

    # The original HTML in a frame that runs nothing.
    await got.get_by_test_id("mail-html-toggle").click()
    frame = got.get_by_test_id("mail-html")
    await expect(frame).to_have_attribute("sandbox", "")
    inside = page.frame_locator("[data-testid=mail-html]")
    await expect(inside.locator("b")).to_have_text("Signed")
    await expect(inside.locator("blockquote")).to_contain_text("Hello Carl")
    await expect(inside.locator("script")).to_have_count(0)
    srcdoc = await frame.get_attribute("srcdoc")
    assert srcdoc is not None and "default-src 'none'" in srcdoc
    assert await page.title() != "pwned"

    # The attachment, downloaded with the token.
    async with page.expect_download() as download_info:
        await got.locator("[data-testid=mail-attachment][data-filename='signed.txt']").click()
    download = await download_info.value
    assert download.suggested_filename == "signed.txt"
    path = await download.path()
    assert path.read_bytes() == b"signed"

    # Someone else answers with Carl's code: flagged; and the mail server in front found that
    # she is not who she says: suspicious. Carl's out-of-office: marked, not counted.
    forwarded = EmailMessage()
    forwarded["Authentication-Results"] = (
        "mx.portal.test; spf=fail smtp.mailfrom=other.example; dmarc=fail header.from=other.example"
    )
    forwarded["From"] = "Eve Other <eve@other.example>"
    forwarded["To"] = reply_to
    forwarded["Subject"] = "FW: " + str(sent["Subject"])
    forwarded["Message-ID"] = f"<{uuid.uuid4().hex}@other.example>"
    forwarded.set_content("Carl forwarded this to me. Any discount?")
    await deliver(mail_hub, forwarded, "eve@other.example", reply_to)
    flagged = timeline.locator("[data-testid=mail-item][data-flagged=true]")
    await expect(flagged).to_have_count(1)
    await expect(flagged.get_by_test_id("mail-flagged")).to_contain_text("eve@other.example")
    await expect(flagged.get_by_test_id("mail-suspicious")).to_contain_text("dmarc=fail")
    await expect(timeline.locator("[data-testid=mail-item][data-suspicious=true]")).to_have_count(1)
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_text("2")

    away = EmailMessage()
    away["From"] = "Carl Client <client@example.test>"
    away["To"] = reply_to
    away["Subject"] = "Out of office: " + str(sent["Subject"])
    away["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
    away["Auto-Submitted"] = "auto-replied"
    away.set_content("I am away until Monday.")
    await deliver(mail_hub, away, "client@example.test", reply_to)
    auto = timeline.locator("[data-testid=mail-item]", has=page.get_by_test_id("mail-auto-reply"))
    await expect(auto).to_have_count(1)
    await expect(auto.get_by_test_id("mail-text")).to_have_text("I am away until Monday.")
    await expect(timeline.locator("[data-state=incoming]")).to_have_count(2)
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_text("2")


async def test_an_admin_tunes_the_inbox_and_puts_unmatched_mail_on_a_deal(
    mail_hub: HubHarness, browser: Browser
) -> None:
    _, root = await mail_hub.create_user("root", admin=True, first_name="Rita", last_name="Admin")
    _, deal = await sales_deal(mail_hub, root)

    page = await (await new_context(browser)).new_page()
    await log_in(page, mail_hub, "root")
    await page.get_by_test_id("nav-crm").click()
    await page.locator("[data-testid=crm-tab][data-tab=mail]").click()
    admin = page.get_by_test_id("crm-mail-admin")
    await expect(admin.get_by_test_id("mail-info-address")).to_have_text(f"crm@{DOMAIN}")
    smtp = mail_hub.services.mail.ports["smtp"]
    await expect(admin.get_by_test_id("mail-info-smtp")).to_have_text(f"port {smtp}")
    await expect(admin.get_by_test_id("mail-info-relay")).to_have_text("configured")
    await expect(admin.get_by_test_id("mail-dns-hint")).to_contain_text(f"MX 10 mx.{DOMAIN}.")

    # No leads from strangers: their mail waits for an admin.
    options = admin.get_by_test_id("mail-options")
    await expect(options.get_by_test_id("mail-create-leads")).to_be_checked()
    await options.get_by_test_id("mail-create-leads").uncheck()
    await options.get_by_test_id("mail-lead-exceptions").fill(
        "@partner.example\nNoReply@Shop.example"
    )
    await options.get_by_test_id("mail-options-save").click()
    await expect(options.get_by_test_id("mail-options-saved")).to_be_visible()
    await expect(options.get_by_test_id("mail-lead-exceptions")).to_have_value(
        "@partner.example\nnoreply@shop.example"
    )
    stored = await call(mail_hub, root, "GET", "/api/v1/mail/settings")
    assert stored["create_leads"] is False
    assert stored["lead_exceptions"] == ["@partner.example", "noreply@shop.example"]

    # The rule tester: what a rule takes from a subject, and a pattern the hub refuses.
    rules = admin.get_by_test_id("mail-rules")
    await rules.get_by_test_id("mail-rule-add").click()
    await rules.get_by_test_id("mail-rule-pattern").fill(r"Order #(?P<code>\d{6})")
    await rules.get_by_test_id("mail-rule-try").click()
    tester = rules.get_by_test_id("mail-rule-tester")
    await expect(tester.get_by_test_id("mail-test-pattern")).to_have_value(
        r"Order #(?P<code>\d{6})"
    )
    await tester.get_by_test_id("mail-test-subject").fill("RE: Order #104233 shipped?")
    await tester.get_by_test_id("mail-test-run").click()
    await expect(tester.get_by_test_id("mail-test-result")).to_have_attribute("data-code", "104233")
    await expect(tester.get_by_test_id("mail-test-result")).to_have_text("Extracts 104233")
    await tester.get_by_test_id("mail-test-subject").fill("Nothing to see")
    await tester.get_by_test_id("mail-test-run").click()
    await expect(tester.get_by_test_id("mail-test-result")).to_have_text("No match")
    await tester.get_by_test_id("mail-test-pattern").fill("(a+)+")
    await tester.get_by_test_id("mail-test-run").click()
    await expect(tester.get_by_test_id("mail-test-error")).to_contain_text("a repeated group")
    await rules.get_by_test_id("mail-rules-save").click()
    await expect(rules.get_by_test_id("mail-rules-saved")).to_be_visible()
    stored = await call(mail_hub, root, "GET", "/api/v1/mail/settings")
    assert [r["pattern"] for r in stored["subject_rules"]] == [r"Order #(?P<code>\d{6})"]

    # An IMAP mailbox's settings tried before saving: nobody answers on that port.
    boxes = admin.get_by_test_id("mail-mailboxes")
    await boxes.get_by_test_id("mailbox-new").click()
    form = boxes.get_by_test_id("mailbox-form")
    await form.get_by_test_id("mailbox-name").fill("Hosted inbox")
    await form.get_by_test_id("mailbox-host").fill("127.0.0.1")
    await form.get_by_test_id("mailbox-security").select_option("none")
    await form.get_by_test_id("mailbox-port").fill(str(free_port()))
    await form.get_by_test_id("mailbox-login").fill("crm")
    await form.get_by_test_id("mailbox-password").fill("imap-secret")
    await form.get_by_test_id("mailbox-test").click()
    result = form.get_by_test_id("mailbox-test-result")
    await expect(result).to_have_attribute("data-ok", "false")
    await expect(result.get_by_test_id("mailbox-test-detail")).not_to_be_empty()
    assert await mail_hub.services.store["mail_mailboxes"].count_documents({}) == 0
    # Hosted mail (Microsoft 365, Gmail) signs in with XOAUTH2: the OAuth client instead of
    # a password; an http token URL to another machine is refused before it is sent.
    await form.get_by_test_id("mailbox-auth").select_option("xoauth2")
    await expect(form.get_by_test_id("mailbox-password")).to_have_count(0)
    oauth = form.get_by_test_id("mailbox-oauth")
    await oauth.get_by_test_id("mailbox-oauth-client-id").fill("portal-app")
    await oauth.get_by_test_id("mailbox-oauth-client-secret").fill("client-secret-1")
    await oauth.get_by_test_id("mailbox-oauth-token-url").fill("http://idp.example/token")
    await oauth.get_by_test_id("mailbox-oauth-refresh-token").fill("refresh-1")
    await oauth.get_by_test_id("mailbox-oauth-scope").fill("IMAP.AccessAsUser.All")
    await form.get_by_test_id("mailbox-form-enabled").uncheck()
    await form.get_by_test_id("mailbox-save").click()
    await expect(form.get_by_test_id("mailbox-problems")).to_contain_text("must be https")
    await oauth.get_by_test_id("mailbox-oauth-token-url").fill(
        f"http://127.0.0.1:{free_port()}/token"
    )
    await form.get_by_test_id("mailbox-save").click()
    listed = boxes.locator("[data-testid=mailbox][data-name='Hosted inbox']")
    await expect(listed).to_contain_text("OAuth 2.0")
    stored_box = await mail_hub.services.store["mail_mailboxes"].find_one({})
    assert stored_box is not None and stored_box["auth"] == "xoauth2"
    assert stored_box["oauth"]["client_id"] == "portal-app"
    assert stored_box["oauth"]["client_secret"] == "client-secret-1"
    assert stored_box["oauth"]["refresh_token"] == "refresh-1"
    assert stored_box["oauth"]["scope"] == "IMAP.AccessAsUser.All"
    # Changed later: the secrets stay as stored unless typed again.
    await listed.get_by_test_id("mailbox-edit").click()
    await expect(oauth.get_by_test_id("mailbox-oauth-client-id")).to_have_value("portal-app")
    await expect(oauth.get_by_test_id("mailbox-oauth-client-secret")).to_have_value("")
    await oauth.get_by_test_id("mailbox-oauth-scope").fill("https://mail.google.com/")
    await form.get_by_test_id("mailbox-save").click()
    await expect(form).to_have_count(0)
    stored_box = await mail_hub.services.store["mail_mailboxes"].find_one({})
    assert stored_box is not None and stored_box["oauth"]["scope"] == "https://mail.google.com/"
    assert stored_box["oauth"]["client_secret"] == "client-secret-1"
    assert stored_box["oauth"]["refresh_token"] == "refresh-1"

    # A stranger writes to the inbox: no lead, the unmatched list.
    stray = EmailMessage()
    stray["From"] = "Nora New <nora@new.example>"
    stray["To"] = f"crm@{DOMAIN}"
    stray["Subject"] = "About the big order"
    stray["Message-ID"] = f"<{uuid.uuid4().hex}@new.example>"
    stray.set_content("Can we add ten more units?")
    await deliver(mail_hub, stray, "nora@new.example", f"crm@{DOMAIN}")
    promo = EmailMessage()
    promo["From"] = "promo@spam.example"
    promo["To"] = f"crm@{DOMAIN}"
    promo["Subject"] = "Cheap pens"
    promo["Message-ID"] = f"<{uuid.uuid4().hex}@spam.example>"
    promo.set_content("Buy now.")
    await deliver(mail_hub, promo, "promo@spam.example", f"crm@{DOMAIN}")
    await settled(mail_hub)
    assert await mail_hub.services.store["crm_records"].count_documents({"type": "lead"}) == 0

    await page.locator("[data-testid=crm-tab][data-tab=unmatched]").click()
    # The advertisement: downloaded as received, then dismissed.
    spam = page.locator("[data-testid=unmatched][data-from='promo@spam.example']")
    await expect(spam).to_have_count(1)
    async with page.expect_download() as download_info:
        await spam.get_by_test_id("unmatched-download").click()
    download = await download_info.value
    assert download.suggested_filename.endswith(".eml")
    assert b"Subject: Cheap pens" in (await download.path()).read_bytes()
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await spam.get_by_test_id("unmatched-dismiss").click()
    await expect(spam).to_have_count(0)

    waiting = page.locator("[data-testid=unmatched][data-from='nora@new.example']")
    await expect(waiting).to_have_count(1)
    await expect(waiting.get_by_test_id("unmatched-subject")).to_have_text("About the big order")
    await expect(waiting.get_by_test_id("unmatched-reason")).to_have_text("unknown sender")
    await waiting.get_by_test_id("unmatched-pick").click()
    picker = waiting.get_by_test_id("unmatched-picker")
    await picker.get_by_test_id("unmatched-type").select_option("deal")
    await picker.get_by_test_id("record-picker-input").fill("Big")
    await picker.locator("[data-testid=record-option][data-title='Big order']").click()
    await picker.get_by_test_id("unmatched-assign").click()
    await expect(waiting).to_have_count(0)
    await expect(page.get_by_test_id("unmatched-empty")).to_be_visible()
    opened = page.locator(f"[data-testid=unmatched-open-record][data-id='{deal['id']}']")
    await expect(opened).to_have_text("Big order")

    # On the deal: an incoming mail, assigned.
    await opened.click()
    await expect(page.get_by_test_id("crm-record")).to_have_attribute("data-id", deal["id"])
    got = page.locator(
        "[data-testid=crm-timeline] [data-testid=mail-item][data-direction=incoming]"
    )
    await expect(got).to_have_count(1)
    await expect(got.get_by_test_id("mail-from")).to_have_text("Nora New <nora@new.example>")
    await expect(got.get_by_test_id("mail-match")).to_contain_text("assigned by an administrator")
    await expect(got.get_by_test_id("mail-text")).to_have_text("Can we add ten more units?")


async def test_reply_all_continues_the_thread_and_a_misfiled_mail_is_moved_live(
    mail_hub: HubHarness, sink: Sink, browser: Browser
) -> None:
    """Issue 16: Reply all on an incoming mail (To and Cc as the record allows, a preview with
    the placeholders filled), the answer in the customer's thread; a phone reply without a
    code lands on the contact and is moved to the deal, live on the deal's page elsewhere."""
    _, mary = await mail_hub.create_user("mary", first_name="Mary", last_name="Jones")
    carl, deal = await sales_deal(mail_hub, mary)
    cleo = await call(
        mail_hub,
        mary,
        "POST",
        "/api/v1/crm/contacts",
        {
            "first_name": "Cleo",
            "last_name": "Colleague",
            "emails": [{"value": "cleo@example.test"}],
        },
    )
    await call(
        mail_hub,
        mary,
        "PATCH",
        f"/api/v1/crm/deals/{deal['id']}",
        {"contact_ids": [carl["id"], cleo["id"]]},
    )
    await call(
        mail_hub,
        mary,
        "POST",
        f"/api/v1/crm/deals/{deal['id']}/emails",
        {"to": ["client@example.test"], "subject": "Your quote", "text": "Hello"},
    )
    await mail_hub.services.mail.outbox.send_due()
    for _ in range(100):
        if sink.received:
            break
        await asyncio.sleep(0.05)
    (first,) = sink.messages()
    answer = EmailMessage()
    answer["From"] = "Carl Client <client@example.test>"
    answer["To"] = f"crm@{DOMAIN}"
    answer["Cc"] = "cleo@example.test, outsider@elsewhere.test"
    answer["Subject"] = "RE: Your quote"
    answer["Message-ID"] = "<carl-answer@example.test>"
    answer["In-Reply-To"] = str(first["Message-ID"])
    answer["Date"] = "Tue, 24 Nov 2026 09:15:00 +0000"
    answer.set_content("Please go ahead, and keep Cleo informed.")
    await deliver(mail_hub, answer, "client@example.test", f"crm@{DOMAIN}")
    await settled(mail_hub)

    page = await (await new_context(browser)).new_page()
    await log_in(page, mail_hub, "mary")
    await open_record(page, "deal", "Big order")
    got = page.locator(
        "[data-testid=crm-timeline] [data-testid=mail-item][data-direction=incoming]"
    )
    await expect(got).to_have_count(1)
    await expect(got.get_by_test_id("mail-received")).to_contain_text("2026")
    await got.get_by_test_id("mail-reply-all").click()
    dialog = page.get_by_test_id("mail-compose")
    await expect(dialog.get_by_test_id("mail-reply-note")).to_contain_text("RE: Your quote")
    carl_row = dialog.locator("[data-testid=mail-recipient][data-address='client@example.test']")
    cleo_row = dialog.locator("[data-testid=mail-recipient][data-address='cleo@example.test']")
    await expect(carl_row).to_have_attribute("data-kind", "to")
    await expect(cleo_row).to_have_attribute("data-kind", "cc")
    await expect(dialog.get_by_test_id("mail-left-out")).to_contain_text("outsider@elsewhere.test")
    await expect(dialog.get_by_test_id("mail-subject")).to_have_value("Re: Your quote")
    await dialog.get_by_test_id("mail-text-input").fill("Dear {{record.first_name}}, done.")
    await dialog.get_by_test_id("mail-preview-toggle").click()
    await expect(dialog.get_by_test_id("mail-preview-text")).to_have_text("Dear Carl, done.")
    await dialog.get_by_test_id("mail-send").click()
    await expect(dialog).to_have_count(0)
    for _ in range(100):
        if len(sink.received) == 2:
            break
        await mail_hub.services.mail.outbox.send_due()
        await asyncio.sleep(0.05)
    sent = sink.messages()[-1]
    assert sent["In-Reply-To"] == "<carl-answer@example.test>"
    assert str(sent["Cc"]) == "cleo@example.test"
    assert sorted(sink.received[-1].rcpt_tos) == ["cleo@example.test", "client@example.test"]
    assert str(first["Reply-To"]).split("+")[1].split("@")[0] in str(sent["Subject"])

    # The deal open in another browser; Carl answers from his phone, without code or thread.
    watcher = await (await new_context(browser)).new_page()
    await log_in(watcher, mail_hub, "mary")
    await open_record(watcher, "deal", "Big order")
    watched = watcher.locator("[data-testid=crm-timeline] [data-testid=mail-item]")
    await expect(watched).to_have_count(3)
    phone = EmailMessage()
    phone["From"] = "client@example.test"
    phone["To"] = f"crm@{DOMAIN}"
    phone["Subject"] = "ok"
    phone["Message-ID"] = "<carl-phone@example.test>"
    phone.set_content("ok, from my phone")
    await deliver(mail_hub, phone, "client@example.test", f"crm@{DOMAIN}")
    await settled(mail_hub)

    await open_record(page, "contact", "Carl Client")
    on_contact = page.locator("[data-testid=crm-timeline] [data-testid=mail-item]")
    await expect(on_contact).to_have_count(1)
    await on_contact.get_by_test_id("mail-move").click()
    picker = on_contact.get_by_test_id("mail-move-picker")
    await picker.get_by_test_id("mail-move-type").select_option("deal")
    await picker.get_by_test_id("record-picker-input").fill("Big")
    await picker.locator("[data-testid=record-option][data-title='Big order']").click()
    await picker.get_by_test_id("mail-move-submit").click()
    await expect(on_contact).to_have_count(0)
    # live on the deal's page of the other browser, and in both histories
    await expect(watched).to_have_count(4)
    await expect(watched.filter(has_text="ok, from my phone")).to_have_count(1)
    moved = page.locator("[data-testid=crm-history-entry][data-kind=activity_moved]")
    await expect(moved).to_contain_text("moved an e-mail to deal “Big order”")
    await expect(
        watcher.locator("[data-testid=crm-history-entry][data-kind=activity_moved]")
    ).to_contain_text("moved an e-mail here from contact “Carl Client”")


async def test_leads_from_mail_a_live_unmatched_badge_and_conversion_into_an_existing_contact(
    mail_hub: HubHarness, browser: Browser
) -> None:
    """Issue 16: the hourly limit sends the second stranger to the unmatched list, whose count
    the admin sees live with a preview; the lead shows who made it ("E-mail"), who wrote the
    mail and when; converting it offers the existing contact of the same name and uses it."""
    _, root = await mail_hub.create_user("root", admin=True, first_name="Rita", last_name="Admin")
    await call(mail_hub, root, "PATCH", "/api/v1/mail/settings", {"max_new_leads_per_hour": 1})
    nina = await call(
        mail_hub,
        root,
        "POST",
        "/api/v1/crm/contacts",
        {"first_name": "Nora", "last_name": "New", "emails": [{"value": "nora@old.example"}]},
    )
    page = await (await new_context(browser)).new_page()
    await log_in(page, mail_hub, "root")
    await page.get_by_test_id("nav-crm").click()
    badge = page.get_by_test_id("unmatched-badge")
    await expect(badge).to_have_count(0)

    for sender, subject, text in (
        ("Nora New <nora@new.example>", "Ten more units?", "Can we add ten more units?"),
        ("Otto Other <otto@other.example>", "Catalogue", "Please send your catalogue."),
    ):
        stray = EmailMessage()
        stray["From"] = sender
        stray["To"] = f"crm@{DOMAIN}"
        stray["Subject"] = subject
        stray["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
        stray["Date"] = "Tue, 24 Nov 2026 09:15:00 +0000"
        stray.set_content(text)
        await deliver(mail_hub, stray, sender.split("<")[1].rstrip(">"), f"crm@{DOMAIN}")
        await settled(mail_hub)
    await expect(badge).to_have_text("1")  # live, nothing reloaded
    await page.locator("[data-testid=crm-tab][data-tab=unmatched]").click()
    waiting = page.locator("[data-testid=unmatched][data-from='otto@other.example']")
    await expect(waiting.get_by_test_id("unmatched-preview")).to_have_text(
        "Please send your catalogue."
    )
    await expect(waiting.get_by_test_id("unmatched-reason")).to_contain_text("this hour")
    await expect(waiting.get_by_test_id("unmatched-from")).to_have_text(
        "Otto Other <otto@other.example>"
    )

    await open_record(page, "lead", "Lead from Nora New")
    info = page.get_by_test_id("crm-record-info")
    await expect(info).to_contain_text("· E-mail")
    await expect(info).not_to_contain_text("Unknown user")
    added = page.locator("[data-testid=crm-history-entry][data-kind=activity_added]")
    await expect(added).to_contain_text("E-mail received from Nora New <nora@new.example>")
    got = page.locator("[data-testid=crm-timeline] [data-testid=mail-item]")
    await expect(got.get_by_test_id("mail-received")).to_contain_text("2026")

    await page.get_by_test_id("crm-convert-open").click()
    dialog = page.get_by_test_id("crm-convert")
    await dialog.locator("[data-testid=convert-mode][data-mode='deal+contact'] input").check()
    existing = dialog.locator(f"[data-testid=convert-existing][data-id='{nina['id']}']")
    await expect(existing).to_contain_text("Use Nora New")
    await expect(existing.locator("input")).to_be_checked()  # the match, offered first
    await dialog.get_by_test_id("crm-convert-submit").click()
    await expect(dialog).to_have_count(0)
    store = mail_hub.services.store
    assert await store["crm_records"].count_documents({"type": "contact"}) == 1
    deal = await store["crm_records"].find_one({"type": "deal"})
    assert deal is not None and deal["contact_ids"] == [nina["id"]]
    assert await store["crm_activities"].count_documents({"owner_id": deal["_id"]}) == 1
