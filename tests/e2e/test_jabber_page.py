"""The profile page "Connect a Jabber client": what it shows is what the XMPP listener serves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl

from playwright.async_api import Browser, Route, expect

from server.demo import DEFAULT_PASSWORD as DEMO_PASSWORD
from server.demo import seed_demo
from tests.e2e.browser import SCREENSHOTS, log_in, new_context
from tests.harness import HubHarness

CLIENTS = ("pidgin", "miranda", "psi", "gajim", "profanity")


async def served_fingerprint(port: int, algorithm: str = "sha256") -> str:
    """The fingerprint of the certificate the direct TLS port presents, as AB:CD:... (like
    clients)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test hub's certificate is self-signed
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    digest = hashlib.new(algorithm, der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


async def test_jabber_page_shows_what_to_type(web_hub: HubHarness, browser: Browser) -> None:
    xmpp = web_hub.services.xmpp
    assert xmpp is not None and xmpp.ports and xmpp.fingerprint
    starttls, tls = str(xmpp.ports["starttls"]), str(xmpp.ports["tls"])
    await seed_demo(web_hub.services.store, web_hub.services.directory)

    context = await new_context(browser)
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=web_hub.base_url)
    page = await context.new_page()
    await log_in(page, web_hub, "john", DEMO_PASSWORD)

    # The user's name in the header opens the profile page.
    await page.get_by_test_id("me-name").click()
    jabber = page.get_by_test_id("jabber-page")
    await expect(jabber.get_by_test_id("jabber-jid")).to_have_text(f"john@{xmpp.domain}")
    await expect(jabber.get_by_test_id("jabber-login")).to_have_text("john")
    await expect(jabber.get_by_test_id("jabber-domain")).to_have_text(xmpp.domain)
    await expect(jabber.get_by_test_id("jabber-host")).to_have_text(xmpp.domain)
    await expect(jabber.get_by_test_id("jabber-starttls-port")).to_have_text(starttls)
    await expect(jabber.get_by_test_id("jabber-tls-port")).to_have_text(tls)
    await expect(jabber.get_by_test_id("jabber-conference")).to_have_text(
        f"conference.{xmpp.domain}"
    )
    # The fingerprint reads as the hub's, selects and copies as one string, and is the one of
    # the certificate a Jabber client actually gets.
    fingerprint = jabber.get_by_test_id("jabber-fingerprint")
    await expect(fingerprint).to_have_text(xmpp.fingerprint)
    assert await served_fingerprint(xmpp.ports["tls"]) == xmpp.fingerprint
    # and its SHA-1 form, which Profanity shows
    await expect(jabber.get_by_test_id("jabber-fingerprint-sha1")).to_have_text(
        await served_fingerprint(xmpp.ports["tls"], "sha1")
    )
    assert await fingerprint.evaluate("e => getComputedStyle(e).fontFamily.includes('monospace')")
    await expect(jabber.get_by_test_id("jabber-self-signed")).to_be_visible()
    await page.set_viewport_size({"width": 1280, "height": 1000})  # the whole page, steps too
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "jabber.png"))
    await jabber.get_by_test_id("copy-fingerprint").click()
    await expect(jabber.get_by_test_id("copy-fingerprint")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == xmpp.fingerprint

    # Every client's steps carry this user's values.
    steps = jabber.get_by_test_id("client-steps")
    for client in CLIENTS:
        await jabber.get_by_test_id(f"client-{client}").click()
        await expect(steps).to_have_attribute("data-client", client)
        await expect(steps).to_contain_text(starttls)
        await expect(steps).to_contain_text(tls)
        await expect(steps).to_contain_text(xmpp.domain)
        await expect(steps).to_contain_text("john")
    await expect(steps).to_contain_text(f"/account set portal jid john@{xmpp.domain}")

    # The "Jabber" item of the navigation leads there too, and away again.
    await page.get_by_test_id("nav-messenger").click()
    await expect(jabber).to_have_count(0)
    await page.get_by_test_id("nav-settings").click()
    await expect(jabber.get_by_test_id("jabber-jid")).to_have_text(f"john@{xmpp.domain}")


async def test_jabber_page_when_xmpp_is_off(web_hub: HubHarness, browser: Browser) -> None:
    await web_hub.create_user("ada", first_name="Ada", last_name="Lovelace")
    page = await (await new_context(browser)).new_page()

    # A portal with XMPP turned off answers 404 problem+json (as server/web/routes/xmpp.py).
    async def xmpp_off(route: Route) -> None:
        problem = {
            "type": "urn:portalhub:problem:not-found",
            "title": "Not found",
            "status": 404,
            "detail": "XMPP is turned off on this portal",
            "instance": "/api/v1/xmpp/account",
        }
        await route.fulfill(
            status=404, content_type="application/problem+json", body=json.dumps(problem)
        )

    await page.route("**/api/v1/xmpp/account", xmpp_off)
    await log_in(page, web_hub, "ada")
    await page.get_by_test_id("nav-settings").click()
    jabber = page.get_by_test_id("jabber-page")
    await expect(jabber.get_by_test_id("jabber-off")).to_contain_text("Jabber is turned off")
    await expect(jabber.get_by_test_id("jabber-settings")).to_have_count(0)
    await expect(jabber.get_by_test_id("jabber-guides")).to_have_count(0)
    await expect(page.get_by_test_id("me-name")).to_have_text("Ada Lovelace")
