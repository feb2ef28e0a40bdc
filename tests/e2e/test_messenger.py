"""The messenger in real browsers: live chat, badges across tabs, catching up after a cut."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from playwright.async_api import Browser, Dialog, expect

from tests.e2e.browser import log_in, message, new_context, open_dialog_from_directory, send
from tests.harness import HubHarness


async def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll a server-side condition (not a sleep-and-assert: the loop ends when it holds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_two_users_chat_live_both_ways(web_hub: HubHarness, browser: Browser) -> None:
    await web_hub.create_user("alice", first_name="Alice", last_name="Archer")
    await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    alice = await (await new_context(browser)).new_page()
    bob = await (await new_context(browser)).new_page()
    await log_in(alice, web_hub, "alice")
    await log_in(bob, web_hub, "bob")

    await open_dialog_from_directory(alice, "Bob Baker")
    await send(alice, "Hello Bob, are you there?")

    # Bob's dialog list gets the new dialog live, with an unread badge, without a reload.
    dialog = bob.locator('[data-testid=dialog][data-title="Alice Archer"]')
    await expect(dialog.get_by_test_id("dialog-unread")).to_have_text("1")
    await expect(bob.get_by_test_id("nav-messenger-badge")).to_have_text("1")
    await expect(dialog.get_by_test_id("presence-dot")).to_have_attribute("data-status", "online")
    await dialog.click()
    await expect(message(bob, "Hello Bob, are you there?")).to_have_count(1)
    # Opening the dialog reads it.
    await expect(bob.get_by_test_id("nav-messenger-badge")).to_have_count(0)

    # Typing shows on the other side.
    await bob.get_by_test_id("composer").fill("Yes")
    await expect(alice.get_by_test_id("typing")).to_have_text("Bob is typing…")
    await send(bob, "Yes, hi Alice!")
    await expect(message(alice, "Yes, hi Alice!")).to_have_count(1)
    await expect(alice.get_by_test_id("typing")).to_have_text("")

    await send(alice, "Great, see you at 3")
    await expect(message(bob, "Great, see you at 3")).to_have_count(1)

    # Both windows hold the same conversation, in order, each message once.
    conversation = ["Hello Bob, are you there?", "Yes, hi Alice!", "Great, see you at 3"]
    for page in (alice, bob):
        texts = page.locator("[data-testid=messages] [data-testid=message-text]")
        await expect(texts).to_have_text(conversation)

    # Alice sets do-not-disturb: Bob sees it live.
    await alice.get_by_test_id("presence-select").select_option("dnd")
    await expect(dialog.get_by_test_id("presence-dot")).to_have_attribute("data-status", "dnd")
    await alice.get_by_test_id("presence-select").select_option("auto")
    await expect(dialog.get_by_test_id("presence-dot")).to_have_attribute("data-status", "online")

    # Alice deletes her last message: it goes on both sides, live.
    async def confirm(dialog: Dialog) -> None:
        await dialog.accept()

    alice.on("dialog", confirm)
    last = message(alice, "Great, see you at 3")
    await last.hover()
    await last.get_by_test_id("delete").click()
    for page in (alice, bob):
        texts = page.locator("[data-testid=messages] [data-testid=message-text]")
        await expect(texts).to_have_text([*conversation[:2], "Message deleted"])


async def test_same_user_in_two_tabs_shares_unread_state(
    web_hub: HubHarness, browser: Browser
) -> None:
    carol_id, carol_token = await web_hub.create_user("carol", first_name="Carol", last_name="Cole")
    dave_id, _ = await web_hub.create_user("dave", first_name="Dave", last_name="Dunn")
    context = await new_context(browser)
    first = await context.new_page()
    await log_in(first, web_hub, "dave")
    # The second tab shares the login (localStorage) and connects on its own.
    second = await context.new_page()
    await second.goto(web_hub.base_url + "/")
    await expect(second.get_by_test_id("connection")).to_have_attribute("data-state", "connected")
    await wait_until(lambda: len(web_hub.services.hub.connections_of(dave_id)) == 2)

    for text in ("Dave, the report please", "It is due today"):
        resp = await web_hub.request(
            "POST",
            "/api/v1/im/messages",
            token=carol_token,
            json={"to": [dave_id], "text": text, "client_id": f"c-{len(text)}"},
        )
        assert resp.status == 201, resp.body

    for page in (first, second):
        await expect(page.get_by_test_id("nav-messenger-badge")).to_have_text("2")
        dialog = page.locator('[data-testid=dialog][data-title="Carol Cole"]')
        await expect(dialog.get_by_test_id("dialog-unread")).to_have_text("2")

    # Reading in the first tab clears the badge in the second one, live.
    await first.bring_to_front()
    await first.locator('[data-testid=dialog][data-title="Carol Cole"]').click()
    await expect(message(first, "It is due today")).to_have_count(1)
    await expect(first.get_by_test_id("nav-messenger-badge")).to_have_count(0)
    await expect(second.get_by_test_id("nav-messenger-badge")).to_have_count(0)
    await expect(
        second.locator('[data-testid=dialog][data-title="Carol Cole"] [data-testid=dialog-unread]')
    ).to_have_count(0)
    counters = await web_hub.services.im.counters(dave_id)
    assert counters.unread == 0
    assert carol_id not in counters.chats


async def test_missed_messages_show_once_in_order_after_reconnect(
    web_hub: HubHarness, browser: Browser
) -> None:
    await web_hub.create_user("erin", first_name="Erin", last_name="Evans")
    frank_id, _ = await web_hub.create_user("frank", first_name="Frank", last_name="Fox")
    erin = await (await new_context(browser)).new_page()
    frank_context = await new_context(browser)
    frank = await frank_context.new_page()
    await log_in(erin, web_hub, "erin")
    await log_in(frank, web_hub, "frank")

    await open_dialog_from_directory(erin, "Frank Fox")
    await send(erin, "before the cut")
    await frank.locator('[data-testid=dialog][data-title="Erin Evans"]').click()
    await expect(message(frank, "before the cut")).to_have_count(1)

    # Cut Frank's browser off the network: the client drops its live connection.
    await frank_context.set_offline(True)
    await expect(frank.get_by_test_id("connection")).to_have_attribute("data-state", "offline")
    await wait_until(lambda: not web_hub.services.hub.connections_of(frank_id))

    missed = [f"missed message {n}" for n in range(1, 6)]
    for text in missed:
        await send(erin, text)
    await expect(message(frank, missed[0])).to_have_count(0)

    await frank_context.set_offline(False)
    await expect(frank.get_by_test_id("connection")).to_have_attribute("data-state", "connected")
    for text in missed:
        await expect(message(frank, text)).to_have_count(1)
    texts = frank.locator("[data-testid=messages] [data-testid=message-text]")
    await expect(texts).to_have_text(["before the cut", *missed])

    # Live delivery goes on after the catch-up, still exactly once.
    await send(erin, "after the cut")
    await expect(texts).to_have_text(["before the cut", *missed, "after the cut"])
    # The dialog was open and visible throughout: nothing is left unread.
    await expect(frank.get_by_test_id("nav-messenger-badge")).to_have_count(0)


async def test_history_pages_back_without_duplicates(web_hub: HubHarness, browser: Browser) -> None:
    _, gina_token = await web_hub.create_user("gina", first_name="Gina", last_name="Gray")
    hank_id, _ = await web_hub.create_user("hank", first_name="Hank", last_name="Hill")
    history = [f"history {n:02d}" for n in range(1, 66)]
    for n, text in enumerate(history):
        resp = await web_hub.request(
            "POST",
            "/api/v1/im/messages",
            token=gina_token,
            json={"to": [hank_id], "text": text, "client_id": f"h{n}"},
        )
        assert resp.status == 201, resp.body
    hank = await (await new_context(browser)).new_page()
    await log_in(hank, web_hub, "hank")
    await expect(hank.get_by_test_id("nav-messenger-badge")).to_have_text("65")
    await hank.locator('[data-testid=dialog][data-title="Gina Gray"]').click()

    texts = hank.locator("[data-testid=messages] [data-testid=message-text]")
    await expect(texts).to_have_text(history[-50:])  # the newest page
    await expect(hank.get_by_test_id("nav-messenger-badge")).to_have_count(0)
    await hank.get_by_test_id("load-older").click()
    await expect(texts).to_have_text(history)  # the whole log, oldest first, each once
    await expect(hank.get_by_test_id("load-older")).to_have_count(0)
    assert (await web_hub.services.im.counters(hank_id)).unread == 0
