"""The main screens with the demo company: multi-recipient messages, the directory, and
screenshots of each screen for docs/screenshots/."""

from __future__ import annotations

from playwright.async_api import Browser, Page, ViewportSize, expect

from server.demo import DEFAULT_PASSWORD as DEMO_PASSWORD
from server.demo import seed_demo
from tests.e2e.browser import (
    PAGE_ERRORS,
    SCREENSHOTS,
    log_in,
    message,
    new_context,
    open_dialog_from_directory,
    send,
)
from tests.harness import HubHarness


async def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


async def user_id(hub: HubHarness, login: str) -> str:
    doc = await hub.services.directory.user_by_login(login)
    assert doc is not None
    return str(doc["_id"])


async def test_main_screens_with_the_demo_company(web_hub: HubHarness, browser: Browser) -> None:
    await seed_demo(web_hub.services.store, web_hub.services.directory)
    mary_token = await web_hub.login("mary", DEMO_PASSWORD)
    await web_hub.connect(await web_hub.login("sophie", DEMO_PASSWORD))  # online colleagues
    await web_hub.connect(mary_token)
    john_id = await user_id(web_hub, "john")

    page = await (await new_context(browser)).new_page()

    # Login screen, with the error a wrong password gets (problem+json detail).
    await page.goto(web_hub.base_url + "/")
    await page.get_by_test_id("login").fill("john")
    await page.get_by_test_id("password").fill("not the password")
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("login-error")).to_have_text("wrong login or password")
    await page.get_by_test_id("password").fill("")
    await shoot(page, "login")
    await log_in(page, web_hub, "john", DEMO_PASSWORD)
    await expect(page.get_by_test_id("me-name")).to_have_text("John Carter")

    # Employees: structure tree, presence, search by department, name and phone digits.
    await page.get_by_test_id("nav-employees").click()
    people = page.get_by_test_id("person")
    await expect(people).to_have_count(20)
    mary_row = page.locator('[data-testid=person][data-name="Mary Lopez"]')
    await expect(mary_row.get_by_test_id("presence-dot").first).to_have_attribute(
        "data-status", "online"
    )
    await shoot(page, "employees")
    await page.get_by_test_id("tree-department").filter(has_text="Paris finance").click()
    await expect(people).to_have_count(3)
    await page.get_by_test_id("tree-department").filter(has_text="Demo Company").click()
    await expect(people).to_have_count(20)  # the whole tree below the root department
    await page.get_by_test_id("directory-search").fill("lopez")
    await expect(people).to_have_count(1)
    await expect(people).to_have_attribute("data-name", "Mary Lopez")
    await page.get_by_test_id("directory-search").fill("0100 105")
    await expect(people).to_have_count(1)
    await expect(people).to_have_attribute("data-name", "Linda Brooks")
    await page.get_by_test_id("directory-search").fill("")
    await page.get_by_test_id("directory-online").select_option("online")
    await expect(people).to_have_count(3)  # John himself, Mary and Sophie

    # A conversation: Mary writes over the API, John answers in the browser.
    for n, text in enumerate(
        [
            "Hi John, the Q3 numbers are ready for review.",
            "I put the spreadsheet in the finance share.",
        ]
    ):
        resp = await web_hub.request(
            "POST",
            "/api/v1/im/messages",
            token=mary_token,
            json={"to": [john_id], "text": text, "client_id": f"mary-{n}"},
        )
        assert resp.status == 201, resp.body
    await expect(page.get_by_test_id("nav-messenger-badge")).to_have_text("2")
    await open_dialog_from_directory(page, "Mary Lopez")
    await expect(message(page, "I put the spreadsheet in the finance share.")).to_have_count(1)
    await send(page, "Thanks Mary! I will go through them this afternoon.")
    await send(page, "Typo in the title: it should say Q3, not Q2.")
    # Edit one's own message.
    edited = message(page, "Typo in the title: it should say Q3, not Q2.")
    await edited.hover()
    await edited.get_by_test_id("edit").click()
    await page.get_by_test_id("edit-box").fill("Small thing: the title should say Q3.")
    await page.get_by_test_id("edit-box").press("Control+Enter")
    await expect(message(page, "Small thing: the title should say Q3.")).to_have_count(1)
    await expect(message(page, "Small thing: the title should say Q3.")).to_contain_text("edited")
    await expect(page.get_by_test_id("nav-messenger-badge")).to_have_count(0)

    # New message to several users: a whole department, by the company structure.
    await page.get_by_test_id("new-message").click()
    compose = page.get_by_test_id("compose")
    await compose.locator('[data-testid=pick-person][data-name="Olga Ivanova"]').check()
    await compose.locator('[data-testid=pick-person][data-name="Klaus Becker"]').check()
    await compose.get_by_test_id("compose-text").fill(
        "Reminder: the quarterly close meeting is on Friday at 10:00."
    )
    await expect(compose.get_by_test_id("recipients")).to_contain_text("Olga Ivanova")
    await shoot(page, "multi-recipient")
    await compose.locator('[data-testid=pick-department][data-name="Paris finance"]').click()
    await expect(compose.get_by_test_id("recipients")).to_contain_text(
        "Paris finance — everyone (3)"
    )
    await compose.get_by_test_id("compose-send").click()
    await expect(
        page.get_by_test_id("toast").filter(has_text="Delivered to 3 people")
    ).to_have_count(1)
    await expect(compose).to_have_count(0)
    for name in ("Sophie Martin", "Lucas Bernard", "Chloe Dubois"):
        await expect(page.locator(f'[data-testid=dialog][data-title="{name}"]')).to_have_count(1)
    sophie_dialogs = await web_hub.services.im.counters(await user_id(web_hub, "sophie"))
    assert sophie_dialogs.unread == 1

    # The messenger with its dialog list and the conversation with Mary.
    await page.locator('[data-testid=dialog][data-title="Mary Lopez"]').click()
    await expect(message(page, "Small thing: the title should say Q3.")).to_have_count(1)
    await page.get_by_test_id("composer").fill("Shall we meet at 4?")
    await page.get_by_test_id("toast").get_by_role("button", name="Dismiss").click()
    await expect(page.get_by_test_id("toast")).to_have_count(0)
    await shoot(page, "messenger")

    # A group chat with its members (and their presence), made from the messenger.
    await page.get_by_test_id("new-group").click()
    form = page.get_by_test_id("group-form")
    await form.get_by_test_id("group-title").fill("Q3 close")
    for name in ("Mary Lopez", "Sophie Martin", "Klaus Becker"):
        picker = form.get_by_test_id("group-members")
        await picker.get_by_test_id("picker-input").fill(name.split()[0])
        await picker.locator(f'[data-testid=picker-option][data-name="{name}"]').click()
    await form.get_by_test_id("group-create").click()
    await expect(page.get_by_test_id("chat-title")).to_have_text("Q3 close")
    group_id = page.url.rsplit("/", 1)[-1]
    for n, text in enumerate(
        [
            "Berlin's numbers are in the share, the invoice totals still to check.",
            "Paris is done. I will send the summary tonight.",
        ]
    ):
        resp = await web_hub.request(
            "POST",
            "/api/v1/im/messages",
            token=mary_token,
            json={"chat_id": group_id, "text": text, "client_id": f"group-{n}"},
        )
        assert resp.status == 201, resp.body
    await send(page, "Thanks both. Let's close on Friday.")
    await page.get_by_test_id("chat-members-toggle").click()
    await expect(page.get_by_test_id("chat-members").get_by_test_id("member")).to_have_count(4)
    await shoot(page, "group-chat")

    # Message search across the chats: a result opens its chat at that message.
    await page.get_by_test_id("messenger-search").fill("invoice")
    await expect(page.get_by_test_id("search-result")).to_have_count(1)
    await page.get_by_test_id("search-result").click()
    await expect(page.locator("[data-testid=message][data-highlighted=true]")).to_have_count(1)
    await shoot(page, "message-search")


PHONE: ViewportSize = {"width": 390, "height": 844}

# Everything that scrolls sideways, or pokes out of the screen: the page itself, any element
# scrolling horizontally (a table in a scrolling pane would hide its overflow from the page's
# width), and any control reaching beyond the right edge.
OVERFLOW_JS = """
() => {
  const width = document.documentElement.clientWidth;
  const found = [];
  const name = (el) => {
    const testid = el.dataset.testid ? `[${el.dataset.testid}]` : "";
    const cls = typeof el.className === "string" && el.className ? `.${el.className}` : "";
    return el.tagName.toLowerCase() + testid + cls;
  };
  const page = document.documentElement.scrollWidth;
  if (page > width + 1) found.push(`page ${page}px`);
  if (document.body.scrollWidth > width + 1) found.push(`body ${document.body.scrollWidth}px`);
  for (const el of document.querySelectorAll("body *")) {
    const style = getComputedStyle(el);
    if (style.display === "none" || style.visibility === "hidden") continue;
    const rect = el.getBoundingClientRect();
    if (rect.width === 0 || rect.height === 0) continue;
    const scrolls = style.overflowX === "auto" || style.overflowX === "scroll";
    const field = el.matches("input, textarea, select");
    if (scrolls && !field && el.scrollWidth > el.clientWidth + 1) {
      found.push(`${name(el)} scrolls ${el.scrollWidth}>${el.clientWidth}`);
    }
    const control = el.matches("button, a, input, select, textarea, [data-testid]");
    if (control && (rect.right > width + 1 || rect.left < -1)) {
      found.push(`${name(el)} at ${Math.round(rect.left)}..${Math.round(rect.right)}`);
    }
  }
  return found;
}
"""


async def fits(page: Page, screen: str) -> None:
    await page.wait_for_timeout(150)  # layout after the last change
    problems = await page.evaluate(OVERFLOW_JS)
    assert problems == [], f"{screen} does not fit a phone: {problems}"


async def reachable(page: Page, *testids: str) -> None:
    """Each control is on screen (scrolled to if need be) and inside the phone's width."""
    for testid in testids:
        control = page.get_by_test_id(testid).first
        await control.scroll_into_view_if_needed()
        await expect(control).to_be_visible()
        box = await control.bounding_box()
        assert box is not None, testid
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 1, (testid, box)


async def shoot_phone(page: Page, name: str) -> None:
    toasts = page.get_by_test_id("toast")
    for _ in range(await toasts.count()):
        await toasts.first.get_by_role("button", name="Dismiss").click()
    await shoot(page, f"phone-{name}")


async def test_every_screen_fits_a_phone(web_hub: HubHarness, browser: Browser) -> None:
    """At 390x844: a menu for the navigation, the dialog list and the conversation as separate
    panes, and no screen scrolls sideways; every main action is on screen."""
    svc = web_hub.services
    await seed_demo(svc.store, svc.directory, crm=svc.crm)
    ceo_id = await user_id(web_hub, "ceo")
    sarah_token = await web_hub.login("sarah", DEMO_PASSWORD)
    await web_hub.connect(sarah_token)
    for n, text in enumerate(
        [
            "Catherine, the Northwind contract is signed: 40 licences from October.",
            "Shall I set up the kick-off with their IT department next week?",
        ]
    ):
        resp = await web_hub.request(
            "POST",
            "/api/v1/im/messages",
            token=sarah_token,
            json={"to": [ceo_id], "text": text, "client_id": f"sarah-{n}"},
        )
        assert resp.status == 201, resp.body
    ceo_token = await web_hub.login("ceo", DEMO_PASSWORD)
    resp = await web_hub.request(
        "POST",
        "/api/v1/tasks",
        token=ceo_token,
        json={
            "title": "Quarterly forecast for the board meeting, with the European numbers",
            "description": "Collect the numbers of every region; a short comment on each.",
            "responsible_ids": [await user_id(web_hub, "mike")],
        },
    )
    assert resp.status == 201, resp.body
    task_id = resp.body["tasks"][0]["id"]
    deals = await web_hub.request("GET", "/api/v1/crm/deals", token=ceo_token)
    deal_id = next(r["id"] for r in deals.body["records"] if r["title"].startswith("Globex"))

    context = await browser.new_context(
        viewport=PHONE, locale="en-US", timezone_id="UTC", is_mobile=True, has_touch=True
    )
    context.set_default_timeout(15_000)
    page = await context.new_page()
    page.on("pageerror", lambda e: PAGE_ERRORS.append(str(e)))
    await page.goto(web_hub.base_url + "/")
    await fits(page, "login")
    await log_in(page, web_hub, "ceo", DEMO_PASSWORD)

    # the messenger: the dialog list alone, then the conversation alone, and back
    await expect(page.get_by_test_id("dialog-pane")).to_be_visible()
    await expect(page.get_by_test_id("chat")).to_have_count(0)
    await fits(page, "dialog list")
    await reachable(page, "nav-menu", "new-message", "new-group", "messenger-search", "dialog")
    await shoot_phone(page, "dialogs")
    await page.locator('[data-testid=dialog][data-title="Sarah Kim"]').click()
    await expect(page.get_by_test_id("dialog-pane")).to_be_hidden()
    await expect(page.get_by_test_id("chat-title")).to_have_text("Sarah Kim")
    await page.get_by_test_id("composer").fill("Yes please, Tuesday works for me.")
    await fits(page, "conversation")
    await reachable(page, "chat-back", "composer", "send")
    await shoot_phone(page, "chat")
    await page.get_by_test_id("send").click()
    await expect(page.get_by_test_id("message-sending")).to_have_count(0)
    await page.get_by_test_id("chat-back").click()
    await expect(page.get_by_test_id("dialog-pane")).to_be_visible()

    # the menu holds the navigation, the status and logging out
    await page.get_by_test_id("nav-menu").click()
    await fits(page, "menu")
    await reachable(
        page, "nav-messenger", "nav-employees", "nav-tasks", "nav-crm", "nav-settings",
        "presence-select", "me-name", "logout",
    )  # fmt: skip
    await shoot_phone(page, "menu")

    # employees, and a profile
    await page.get_by_test_id("nav-employees").click()
    await expect(page.get_by_test_id("main-nav")).to_be_hidden()  # the menu closes
    await expect(page.get_by_test_id("person")).to_have_count(20)
    await fits(page, "employees")
    await reachable(page, "directory-search", "directory-department", "directory-online", "write")
    await page.locator('[data-testid=person][data-name="Sarah Kim"]').click()
    await expect(page.get_by_test_id("profile-name")).to_contain_text("Sarah Kim")
    await fits(page, "profile")
    await reachable(page, "profile-message", "profile-assign-task", "profile-back")

    # tasks: the list with its filters, a task, its edit form, the new-task form
    await page.get_by_test_id("nav-menu").click()
    await page.get_by_test_id("nav-tasks").click()
    await expect(page.get_by_test_id("task-row")).to_have_count(1)
    await fits(page, "tasks")
    await reachable(
        page, "new-task-narrow", "task-role-select", "task-status-select", "task-search"
    )
    await shoot_phone(page, "tasks")
    await page.get_by_test_id("task-row").click()
    await expect(page).to_have_url(f"{web_hub.base_url}/tasks/{task_id}")
    await fits(page, "task page")
    await reachable(page, "task-back", "task-edit-open", "task-action", "comment-input")
    await page.get_by_test_id("task-edit-open").click()
    await fits(page, "task edit form")
    await reachable(page, "task-edit-title", "task-edit-deadline", "task-edit-save")
    await page.get_by_test_id("task-edit").get_by_role("button", name="Close").click()
    await page.get_by_test_id("task-back").click()
    await page.get_by_test_id("new-task-narrow").click()
    await fits(page, "new task form")
    await reachable(page, "task-form-title", "task-form-submit")
    await page.get_by_test_id("task-form").get_by_role("button", name="Close").click()

    # the CRM: the list, the Kanban, a deal
    await page.get_by_test_id("nav-menu").click()
    await page.get_by_test_id("nav-crm").click()
    await expect(page.get_by_test_id("crm-row").first).to_be_visible()
    await fits(page, "crm deals")
    await reachable(page, "crm-tab", "crm-search", "crm-new", "crm-view-kanban", "crm-row")
    await page.get_by_test_id("crm-view-kanban").click()
    await expect(page.get_by_test_id("crm-card").first).to_be_visible()
    await fits(page, "kanban")
    await reachable(page, "crm-view-list", "crm-card", "crm-card-stage")
    await shoot_phone(page, "kanban")
    await page.goto(f"{web_hub.base_url}/crm/deals/{deal_id}")
    await expect(page.get_by_test_id("crm-record-title")).to_have_text("Globex: EU roll-out")
    await fits(page, "deal")
    await reachable(
        page, "crm-back", "crm-add-activity", "crm-send-email", "crm-edit", "crm-delete"
    )
    await page.get_by_test_id("crm-tab").filter(has_text="Contacts").click()
    await expect(page.get_by_test_id("crm-row").first).to_be_visible()
    await fits(page, "crm contacts")

    # settings
    await page.get_by_test_id("nav-menu").click()
    await page.get_by_test_id("nav-settings").click()
    await expect(page.get_by_test_id("jabber-page")).to_be_visible()
    await fits(page, "settings")
    await reachable(page, "settings-send-enter", "settings-send-ctrl", "settings-sound")
    await context.close()


async def test_the_screens_fit_a_small_phone_and_a_tablet(
    web_hub: HubHarness, browser: Browser
) -> None:
    """The same screens, by address, at 360 px (a small phone), 414 px, 768 and 1024 px (a
    tablet upright and across) and 1280 px: none scrolls sideways."""
    svc = web_hub.services
    await seed_demo(svc.store, svc.directory, crm=svc.crm)
    ceo_token = await web_hub.login("ceo", DEMO_PASSWORD)
    sarah_id = await user_id(web_hub, "sarah")
    sent = await web_hub.request(
        "POST",
        "/api/v1/im/messages",
        token=ceo_token,
        json={"to": [sarah_id], "text": "A long line " * 30, "client_id": "c1"},
    )
    chat_id = sent.body["messages"][0]["chat_id"]
    task = await web_hub.request(
        "POST",
        "/api/v1/tasks",
        token=ceo_token,
        json={"title": "Review " * 20, "responsible_ids": [sarah_id], "description": "x " * 400},
    )
    task_id = task.body["tasks"][0]["id"]
    deals = await web_hub.request("GET", "/api/v1/crm/deals", token=ceo_token)
    deal_id = deals.body["records"][0]["id"]
    paths = [
        "/messenger",
        f"/messenger/{chat_id}",
        "/employees",
        f"/employees/{sarah_id}",
        "/tasks",
        f"/tasks/{task_id}",
        "/crm/deals",
        "/crm/deals/kanban",
        f"/crm/deals/{deal_id}",
        "/crm/contacts",
        "/crm/leads",
        "/crm/activities",
        "/settings",
    ]
    for width, height in ((360, 740), (414, 896), (768, 1024), (1024, 768), (1280, 800)):
        context = await browser.new_context(
            viewport={"width": width, "height": height}, locale="en-US", timezone_id="UTC"
        )
        context.set_default_timeout(15_000)
        page = await context.new_page()
        page.on("pageerror", lambda e: PAGE_ERRORS.append(str(e)))
        await log_in(page, web_hub, "ceo", DEMO_PASSWORD)
        for path in paths:
            await page.goto(web_hub.base_url + path)
            await expect(page.get_by_test_id("connection")).to_have_attribute(
                "data-state", "connected"
            )
            await expect(page.get_by_text("Loading…")).to_have_count(0)
            await fits(page, f"{path} at {width}px")
        await context.close()
