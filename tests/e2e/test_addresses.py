"""Addresses in real browsers: every screen has its own, Back and Forward and a reload bring it
back, a link works for whoever may see the thing, and shows a clear "not available" page to
anyone else."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser, Page, expect

from tests.e2e.browser import log_in, message, new_context
from tests.harness import DEFAULT_PASSWORD, HubHarness


async def call(hub: HubHarness, token: str, method: str, path: str, body: Any = None) -> Any:
    resp = await hub.request(method, path, token=token, json=body)
    assert resp.status in (200, 201, 204), (method, path, resp.status, resp.body)
    return resp.body


def path_of(page: Page, hub: HubHarness) -> str:
    return page.url.removeprefix(hub.base_url)


async def test_back_forward_reload_and_the_top_bar_keep_to_the_address(
    web_hub: HubHarness, browser: Browser
) -> None:
    ann_id, ann = await web_hub.create_user("ann", first_name="Ann", last_name="Archer")
    bob_id, _ = await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    [task] = (
        await call(
            web_hub, ann, "POST", "/api/v1/tasks", {"title": "Plan Q3", "responsible_ids": [ann_id]}
        )
    )["tasks"]
    deal = await call(web_hub, ann, "POST", "/api/v1/crm/deals", {"title": "Acme renewal"})
    sent = await call(
        web_hub,
        ann,
        "POST",
        "/api/v1/im/messages",
        {"to": [bob_id], "text": "Hello Bob", "client_id": "a1"},
    )
    chat_id = sent["messages"][0]["chat_id"]
    page = await (await new_context(browser)).new_page()
    await log_in(page, web_hub, "ann")
    assert path_of(page, web_hub) == "/"

    # the messenger with the open chat has its address
    await page.locator(f'[data-testid=dialog][data-chat-id="{chat_id}"]').click()
    await expect(page).to_have_url(f"{web_hub.base_url}/messenger/{chat_id}")
    await expect(message(page, "Hello Bob")).to_have_count(1)
    # a task from the list, then its page
    await page.get_by_test_id("nav-tasks").click()
    await expect(page).to_have_url(f"{web_hub.base_url}/tasks")
    await page.locator(f'[data-testid=task-row][data-task-id="{task["id"]}"]').click()
    await expect(page).to_have_url(f"{web_hub.base_url}/tasks/{task['id']}")
    await expect(page.get_by_test_id("task-page-title")).to_have_text("Plan Q3")
    # the top bar's Tasks returns to the list from a task
    await page.get_by_test_id("nav-tasks").click()
    await expect(page.get_by_test_id("task-list")).to_be_visible()
    await expect(page).to_have_url(f"{web_hub.base_url}/tasks")
    # the CRM: a deal, then the top bar's CRM back to the list
    await page.get_by_test_id("nav-crm").click()
    await expect(page).to_have_url(f"{web_hub.base_url}/crm/deals")
    await page.locator('[data-testid=crm-row][data-title="Acme renewal"]').click()
    await expect(page).to_have_url(f"{web_hub.base_url}/crm/deals/{deal['id']}")
    await expect(page.get_by_test_id("crm-record-title")).to_have_text("Acme renewal")
    await page.get_by_test_id("nav-crm").click()
    await expect(page.get_by_test_id("crm-list")).to_be_visible()

    # Back walks the same way back, within the app; Forward comes again
    await page.go_back()
    await expect(page.get_by_test_id("crm-record-title")).to_have_text("Acme renewal")
    await page.go_back()
    await expect(page.get_by_test_id("crm-list")).to_be_visible()
    await page.go_back()
    await expect(page.get_by_test_id("task-list")).to_be_visible()
    await page.go_back()
    await expect(page.get_by_test_id("task-page-title")).to_have_text("Plan Q3")
    await page.go_back()
    await page.go_back()
    await expect(page.get_by_test_id("chat-title")).to_have_text("Bob Baker")
    await expect(message(page, "Hello Bob")).to_have_count(1)
    await page.go_forward()
    await expect(page.get_by_test_id("task-list")).to_be_visible()
    await page.go_forward()
    await expect(page.get_by_test_id("task-page-title")).to_have_text("Plan Q3")

    # a reload keeps the screen: the task, the deal, the chat, the settings
    for path, check in (
        (f"/tasks/{task['id']}", ("task-page-title", "Plan Q3")),
        (f"/crm/deals/{deal['id']}", ("crm-record-title", "Acme renewal")),
        (f"/messenger/{chat_id}", ("chat-title", "Bob Baker")),
    ):
        await page.goto(web_hub.base_url + path)
        await expect(page.get_by_test_id(check[0])).to_have_text(check[1])
        await page.reload()
        await expect(page.get_by_test_id(check[0])).to_have_text(check[1])
        assert path_of(page, web_hub) == path
    await page.get_by_test_id("nav-settings").click()
    await page.reload()
    await expect(page.get_by_test_id("messenger-settings")).to_be_visible()
    # the page of a deep link carries the page's security policy
    response = await page.goto(f"{web_hub.base_url}/tasks/{task['id']}")
    assert response is not None and response.status == 200
    headers = await response.all_headers()
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert headers["x-frame-options"] == "DENY"


async def test_a_shared_link_opens_for_those_who_may_see_it_and_not_for_others(
    web_hub: HubHarness, browser: Browser
) -> None:
    ann_id, ann = await web_hub.create_user("ann", first_name="Ann", last_name="Archer")
    bob_id, _ = await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    await web_hub.create_user("eve", first_name="Eve", last_name="Evans")
    [task] = (
        await call(
            web_hub,
            ann,
            "POST",
            "/api/v1/tasks",
            {"title": "Budget review", "responsible_ids": [bob_id]},
        )
    )["tasks"]
    deal = await call(web_hub, ann, "POST", "/api/v1/crm/deals", {"title": "Secret deal"})
    group = await call(
        web_hub, ann, "POST", "/api/v1/im/chats", {"title": "Board", "member_ids": [bob_id]}
    )
    await call(
        web_hub,
        ann,
        "POST",
        "/api/v1/im/messages",
        {"chat_id": group["id"], "text": "Numbers are in", "client_id": "g1"},
    )
    links = {
        "task": f"/tasks/{task['id']}",
        "chat": f"/messenger/{group['id']}",
        "deal": f"/crm/deals/{deal['id']}",
    }

    # Bob, on the task and in the chat, follows Ann's links
    bob = await (await new_context(browser)).new_page()
    await log_in(bob, web_hub, "bob")
    await bob.goto(web_hub.base_url + links["task"])
    await expect(bob.get_by_test_id("task-page-title")).to_have_text("Budget review")
    await bob.goto(web_hub.base_url + links["chat"])
    await expect(bob.get_by_test_id("chat-title")).to_have_text("Board")
    await expect(message(bob, "Numbers are in")).to_have_count(1)
    # the deal is Ann's: a manager (Bob) does not see it
    await bob.goto(web_hub.base_url + links["deal"])
    await expect(bob.get_by_test_id("not-available")).to_contain_text("This deal is not available")

    # Eve sees none of it: one clear page each, and the way back
    eve = await (await new_context(browser)).new_page()
    await log_in(eve, web_hub, "eve")
    for what, path in links.items():
        await eve.goto(web_hub.base_url + path)
        page_text = eve.get_by_test_id("not-available")
        await expect(page_text).to_contain_text(f"This {what} is not available")
    await expect(eve.get_by_test_id("chat-title")).to_have_count(0)
    await eve.goto(f"{web_hub.base_url}/employees/{'0' * 24}")
    await expect(eve.get_by_test_id("not-available")).to_contain_text("employee is not available")
    await eve.goto(f"{web_hub.base_url}/tasks/not-a-task")
    await expect(eve.get_by_test_id("not-available")).to_contain_text("This task is not available")
    await eve.goto(f"{web_hub.base_url}/crm/nothing-here")
    await expect(eve.get_by_test_id("not-available")).to_contain_text("This page is not available")
    await eve.get_by_test_id("not-available-back").click()
    await expect(eve).to_have_url(f"{web_hub.base_url}/messenger")

    # a link opened before logging in lands there after the login
    fresh = await (await new_context(browser)).new_page()
    await fresh.goto(web_hub.base_url + links["task"])
    await fresh.get_by_test_id("login").fill("bob")
    await fresh.get_by_test_id("password").fill(DEFAULT_PASSWORD)
    await fresh.get_by_test_id("login-submit").click()
    await expect(fresh.get_by_test_id("task-page-title")).to_have_text("Budget review")
    assert ann_id
