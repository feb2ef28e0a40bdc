"""The messenger in real browsers: live chat, badges across tabs, catching up after a cut."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from playwright.async_api import Browser, Dialog, Locator, Page, Route, expect

from tests.e2e.browser import (
    log_in,
    message,
    new_context,
    open_dialog_from_directory,
    send,
    stored_message,
)
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


async def call(hub: HubHarness, token: str, method: str, path: str, body: Any = None) -> Any:
    resp = await hub.request(method, path, token=token, json=body)
    assert resp.status in (200, 201, 204), (method, path, resp.status, resp.body)
    return resp.body


async def pick_person(page: Page, picker: str, name: str) -> None:
    box = page.get_by_test_id(picker)
    await box.get_by_test_id("picker-input").fill(name.split()[0])
    await box.locator(f'[data-testid=picker-option][data-name="{name}"]').click()
    await expect(box.locator(f'[data-testid=picked][data-name="{name}"]')).to_have_count(1)


def members(page: Page) -> Locator:
    return page.get_by_test_id("chat-members").get_by_test_id("member")


async def test_group_chats_are_made_and_run_from_the_ui_live_for_every_member(
    web_hub: HubHarness, browser: Browser
) -> None:
    await web_hub.create_user("ann", first_name="Ann", last_name="Archer")
    bob_id, _ = await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    carl_id, _ = await web_hub.create_user("carl", first_name="Carl", last_name="Cole")
    dina_id, _ = await web_hub.create_user("dina", first_name="Dina", last_name="Dale")
    pages: dict[str, Page] = {}
    for login in ("ann", "bob", "carl", "dina"):
        pages[login] = await (await new_context(browser)).new_page()
        await log_in(pages[login], web_hub, login)
    ann, bob, carl, dina = (pages[n] for n in ("ann", "bob", "carl", "dina"))

    # Ann makes a group chat with Bob and Carl; it opens at its own address
    await ann.get_by_test_id("new-group").click()
    form = ann.get_by_test_id("group-form")
    await form.get_by_test_id("group-title").fill("Launch")
    await pick_person(ann, "group-members", "Bob Baker")
    await pick_person(ann, "group-members", "Carl Cole")
    await form.get_by_test_id("group-create").click()
    await expect(ann.get_by_test_id("chat-title")).to_have_text("Launch")
    chat_id = ann.url.rsplit("/", 1)[-1]
    await send(ann, "Welcome to the launch chat")

    # Bob gets it live, with its members and their presence
    await bob.locator('[data-testid=dialog][data-title="Launch"]').click()
    await expect(message(bob, "Welcome to the launch chat")).to_have_count(1)
    await expect(bob.get_by_test_id("chat-subtitle")).to_contain_text("3 members · 2 online")
    await bob.get_by_test_id("chat-members-toggle").click()
    await expect(members(bob)).to_have_count(3)
    ann_row = bob.get_by_test_id("chat-members").locator(
        '[data-testid=member][data-name="Ann Archer"]'
    )
    await expect(ann_row).to_contain_text("Owner")
    await expect(ann_row.get_by_test_id("presence-dot")).to_have_attribute("data-status", "online")
    # Bob is no owner: no renaming, adding or removing; he may leave
    await expect(bob.get_by_test_id("chat-rename-input")).to_have_count(0)
    await expect(bob.get_by_test_id("member-remove")).to_have_count(0)
    await expect(bob.get_by_test_id("chat-add")).to_have_count(0)
    await expect(bob.get_by_test_id("chat-leave")).to_be_visible()
    await expect(dina.locator('[data-testid=dialog][data-title="Launch"]')).to_have_count(0)

    # Ann renames it, adds Dina, removes Carl: everyone sees it live
    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    for page in pages.values():
        page.on("dialog", accept)
    await ann.get_by_test_id("chat-members-toggle").click()
    await ann.get_by_test_id("chat-rename-input").fill("Launch plan")
    await ann.get_by_test_id("chat-rename-save").click()
    await expect(bob.get_by_test_id("chat-title")).to_have_text("Launch plan")
    await expect(carl.locator('[data-testid=dialog][data-title="Launch plan"]')).to_have_count(1)
    await pick_person(ann, "chat-add-picker", "Dina Dale")
    await ann.get_by_test_id("chat-add").click()
    await expect(members(bob)).to_have_count(4)
    await expect(dina.locator('[data-testid=dialog][data-title="Launch plan"]')).to_have_count(1)
    await carl.locator('[data-testid=dialog][data-title="Launch plan"]').click()
    await expect(carl.get_by_test_id("chat-title")).to_have_text("Launch plan")
    carl_row = ann.get_by_test_id("chat-members").locator(
        '[data-testid=member][data-name="Carl Cole"]'
    )
    await carl_row.get_by_test_id("member-remove").click()
    await expect(members(bob)).to_have_count(3)
    # Carl, who had it open, is told and sees it no more
    await expect(carl.get_by_test_id("toast").filter(has_text="no longer a member")).to_have_count(
        1
    )
    await expect(carl.locator('[data-testid=dialog][data-title="Launch plan"]')).to_have_count(0)
    await expect(carl).to_have_url(f"{web_hub.base_url}/messenger")

    # Bob leaves: the chat goes from his list; the others see him gone
    await bob.get_by_test_id("chat-leave").click()
    await expect(bob).to_have_url(f"{web_hub.base_url}/messenger")
    await expect(bob.locator('[data-testid=dialog][data-title="Launch plan"]')).to_have_count(0)
    await expect(members(ann)).to_have_count(2)
    await expect(ann.get_by_test_id("chat-subtitle")).to_contain_text("2 members")
    chat = await web_hub.services.im.chat_document(chat_id)
    assert chat["title"] == "Launch plan"
    assert sorted(chat["member_ids"]) == sorted([await web_hub_user(web_hub, "ann"), dina_id])
    assert bob_id not in chat["member_ids"] and carl_id not in chat["member_ids"]
    # the hub keeps to its rules whatever the page shows: Dina may not rename it
    dina_token = await web_hub.login("dina")
    refused = await web_hub.request(
        "PATCH", f"/api/v1/im/chats/{chat_id}", token=dina_token, json={"title": "Mine"}
    )
    assert refused.status == 403


async def web_hub_user(hub: HubHarness, login: str) -> str:
    doc = await hub.services.directory.user_by_login(login)
    assert doc is not None
    return str(doc["_id"])


async def test_search_finds_messages_only_in_ones_chats_and_opens_them_in_their_history(
    web_hub: HubHarness, browser: Browser
) -> None:
    ann_id, ann_token = await web_hub.create_user("ann", first_name="Ann", last_name="Archer")
    bob_id, bob_token = await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    carl_id, carl_token = await web_hub.create_user("carl", first_name="Carl", last_name="Cole")
    texts = [f"note {n:02d}" for n in range(1, 71)]
    texts[4] = "The blue invoice is attached"
    for n, text in enumerate(texts):
        await call(
            web_hub,
            bob_token,
            "POST",
            "/api/v1/im/messages",
            {"to": [ann_id], "text": text, "client_id": f"b{n}"},
        )
    # a chat Ann is not in mentions the blue invoice too
    other = await call(
        web_hub,
        carl_token,
        "POST",
        "/api/v1/im/chats",
        {"title": "Private", "member_ids": [bob_id]},
    )
    await call(
        web_hub,
        carl_token,
        "POST",
        "/api/v1/im/messages",
        {"chat_id": other["id"], "text": "Where is the blue invoice?", "client_id": "c1"},
    )
    ann = await (await new_context(browser)).new_page()
    await log_in(ann, web_hub, "ann")
    await ann.get_by_test_id("messenger-search").fill("blue invoice")
    results = ann.get_by_test_id("search-result")
    await expect(results).to_have_count(1)
    await expect(results).to_contain_text("The blue invoice is attached")
    await expect(results).to_contain_text("Bob Baker")
    found = await call(web_hub, ann_token, "GET", "/api/v1/im/search?q=blue%20invoice")
    assert [m["text"] for m in found] == ["The blue invoice is attached"]

    # the result opens the dialog at that message, with the history around it
    message_id = await results.get_attribute("data-message-id")
    await results.click()
    chat_id = (await web_hub.services.im.open_private(
        await web_hub.services.directory.user_document(ann_id), bob_id
    ))["_id"]  # fmt: skip
    await expect(ann).to_have_url(f"{web_hub.base_url}/messenger/{chat_id}?message={message_id}")
    hit = ann.locator(f'[data-testid=message][data-id="{message_id}"]')
    await expect(hit).to_have_attribute("data-highlighted", "true")
    await expect(hit).to_be_in_viewport()
    await expect(message(ann, "note 01")).to_have_count(1)
    await expect(message(ann, "note 20")).to_have_count(1)
    await expect(message(ann, "note 70")).to_have_count(0)  # the newest are not loaded yet
    # a message arriving meanwhile waits; the history shown keeps no gap
    await call(
        web_hub,
        bob_token,
        "POST",
        "/api/v1/im/messages",
        {"to": [ann_id], "text": "arrived while reading", "client_id": "late"},
    )
    await expect(ann.get_by_test_id("jump-latest")).to_be_visible()
    await ann.wait_for_timeout(500)
    await expect(message(ann, "arrived while reading")).to_have_count(0)
    # a reload comes back to the same message
    await ann.reload()
    await expect(hit).to_have_attribute("data-highlighted", "true")
    # down to the newest: everything, in order, once
    await ann.get_by_test_id("jump-latest").click()
    await expect(message(ann, "arrived while reading")).to_have_count(1)
    await expect(ann.get_by_test_id("jump-latest")).to_have_count(0)
    shown = ann.locator("[data-testid=messages] [data-testid=message-text]")
    await expect(shown.last).to_have_text("arrived while reading")
    await ann.get_by_test_id("load-older").click()
    await expect(shown).to_have_text([*texts, "arrived while reading"])
    assert carl_id


async def test_a_message_written_offline_stays_survives_a_reload_and_is_sent_once(
    web_hub: HubHarness, browser: Browser
) -> None:
    ann_id, _ = await web_hub.create_user("ann", first_name="Ann", last_name="Archer")
    bob_id, bob_token = await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    await call(
        web_hub,
        bob_token,
        "POST",
        "/api/v1/im/messages",
        {"to": [ann_id], "text": "Are you on the train?", "client_id": "b1"},
    )
    context = await new_context(browser)
    ann = await context.new_page()
    await log_in(ann, web_hub, "ann")
    await ann.locator('[data-testid=dialog][data-title="Bob Baker"]').click()
    await expect(message(ann, "Are you on the train?")).to_have_count(1)
    chat_url = ann.url

    # offline: the message stays at the bottom, "sending"
    await context.set_offline(True)
    await expect(ann.get_by_test_id("connection")).to_have_attribute("data-state", "offline")
    await ann.get_by_test_id("composer").fill("Yes, no network here")
    await ann.get_by_test_id("composer").press("Enter")
    written = message(ann, "Yes, no network here")
    await expect(written).to_have_attribute("data-pending", "true")
    await expect(written.get_by_test_id("message-sending")).to_have_text("sending…")
    last = ann.locator("[data-testid=messages] [data-testid=message]").last
    await expect(last).to_have_attribute("data-pending", "true")
    stored = await ann.evaluate(f"localStorage.getItem('portalhub.outbox.{ann_id}')")
    [entry] = json.loads(stored)
    assert entry["text"] == "Yes, no network here"

    # the network is back but the hub cannot be reached; a reload keeps the message
    async def unreachable(route: Route) -> None:
        await route.abort()

    await ann.route("**/api/v1/im/messages", unreachable)
    await context.set_offline(False)
    await expect(ann.get_by_test_id("connection")).to_have_attribute("data-state", "connected")
    await ann.reload()
    assert ann.url == chat_url
    await expect(message(ann, "Are you on the train?")).to_have_count(1)
    await expect(written).to_have_attribute("data-pending", "true")
    await expect(
        ann.locator("[data-testid=messages] [data-testid=message]").last
    ).to_have_attribute("data-pending", "true")
    assert (
        await web_hub.services.store["messages"].count_documents({"text": "Yes, no network here"})
        == 0
    )

    # the next try reaches the hub but its answer is lost; the one after is answered: the
    # hub stores the message once (the same client_id), and the page shows it once
    tries: list[str] = []

    async def answer_lost_once(route: Route) -> None:
        tries.append(route.request.post_data or "")
        if len(tries) == 1:
            await route.fetch()  # the hub stores it...
            await route.abort()  # ...and the answer never arrives
        else:
            await route.continue_()

    # (the new handler first: a retry due meanwhile must not slip through between the two)
    await ann.route("**/api/v1/im/messages", answer_lost_once)
    await ann.unroute("**/api/v1/im/messages", unreachable)
    await context.set_offline(True)
    await context.set_offline(False)
    await expect(written).to_have_attribute("data-pending", "false", timeout=30_000)
    # every try carried the same client_id; once stored, nothing is left to send (the stored
    # copy's event or the answer to a retry empties the outbox), and a retry stores nothing
    assert tries and {json.loads(t)["client_id"] for t in tries} == {entry["client_id"]}
    await ann.wait_for_function(f"localStorage.getItem('portalhub.outbox.{ann_id}') === null")
    await ann.wait_for_timeout(2500)  # a retry already due would come by now
    docs = [
        d async for d in web_hub.services.store["messages"].find({"text": "Yes, no network here"})
    ]
    assert len(docs) == 1 and docs[0]["client_id"] == entry["client_id"]
    await expect(written).to_have_count(1)
    bob = await (await new_context(browser)).new_page()
    await log_in(bob, web_hub, "bob")
    await bob.locator('[data-testid=dialog][data-title="Ann Archer"]').click()
    await expect(message(bob, "Yes, no network here")).to_have_count(1)
    assert bob_id


async def test_enter_sends_shift_enter_breaks_the_line_and_a_setting_swaps_to_ctrl_enter(
    web_hub: HubHarness, browser: Browser
) -> None:
    await web_hub.create_user("ann", first_name="Ann", last_name="Archer")
    await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    context = await new_context(browser)
    ann = await context.new_page()
    await log_in(ann, web_hub, "ann")
    await open_dialog_from_directory(ann, "Bob Baker")
    composer = ann.get_by_test_id("composer")
    await composer.press_sequentially("first line")
    await composer.press("Shift+Enter")
    await composer.press_sequentially("second line")
    await expect(composer).to_have_value("first line\nsecond line")
    await composer.press("Enter")
    await expect(stored_message(ann, "first line\nsecond line")).to_have_count(1)
    await expect(composer).to_have_value("")

    # the setting: Ctrl+Enter sends, Enter breaks the line; another tab follows it live
    other = await context.new_page()
    await other.goto(ann.url)
    await expect(other.get_by_test_id("composer")).to_be_visible()
    await ann.get_by_test_id("nav-settings").click()
    await ann.get_by_test_id("settings-send-ctrl").check()
    await ann.go_back()
    await composer.press_sequentially("one")
    await composer.press("Enter")
    await composer.press_sequentially("two")
    await expect(composer).to_have_value("one\ntwo")
    await expect(message(ann, "one")).to_have_count(0)
    await composer.press("Control+Enter")
    await expect(stored_message(ann, "one\ntwo")).to_have_count(1)
    await other.get_by_test_id("composer").press_sequentially("three")
    await other.get_by_test_id("composer").press("Enter")
    await expect(other.get_by_test_id("composer")).to_have_value("three\n")
    token = await web_hub.login("ann")
    assert (await call(web_hub, token, "GET", "/api/v1/im/settings"))["send_key"] == "ctrl_enter"


async def test_seen_shows_under_what_the_other_person_has_read_live_and_after_a_reload(
    web_hub: HubHarness, browser: Browser
) -> None:
    await web_hub.create_user("alice", first_name="Alice", last_name="Archer")
    await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    alice = await (await new_context(browser)).new_page()
    bob = await (await new_context(browser)).new_page()
    await log_in(alice, web_hub, "alice")
    await log_in(bob, web_hub, "bob")

    await open_dialog_from_directory(alice, "Bob Baker")
    await send(alice, "Are the slides ready?")
    await send(alice, "I need them by noon.")
    seen = alice.get_by_test_id("message-seen")
    await expect(seen).to_have_count(0)  # Bob has not opened it

    # Bob opens the dialog (which reads it): Alice sees "seen" under her newest message, live.
    await bob.locator('[data-testid=dialog][data-title="Alice Archer"]').click()
    await expect(message(bob, "I need them by noon.")).to_have_count(1)
    await expect(
        message(alice, "I need them by noon.").get_by_test_id("message-seen")
    ).to_have_count(1)
    await expect(seen).to_have_count(1)

    # A new message Bob has not read yet: the mark stays on the one he has read.
    await bob.get_by_test_id("nav-employees").click()
    await send(alice, "Thanks!")
    await expect(message(alice, "Thanks!").get_by_test_id("message-seen")).to_have_count(0)
    await expect(
        message(alice, "I need them by noon.").get_by_test_id("message-seen")
    ).to_have_count(1)

    # After a reload the mark comes from the dialog list.
    await alice.reload()
    await expect(
        message(alice, "I need them by noon.").get_by_test_id("message-seen")
    ).to_have_count(1)
    await expect(seen).to_have_count(1)
    # Bob's side marks Alice's read position over his own messages, not hers.
    await expect(bob.get_by_test_id("message-seen")).to_have_count(0)
