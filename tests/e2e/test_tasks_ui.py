"""Tasks in real browsers: an author and a responsible person run a task through its workflow,
each seeing the other's steps live; the list groups, folds, filters and colours tasks.
Screenshots of the list and of a task page go to docs/screenshots/."""

from __future__ import annotations

import re
from typing import Any

from playwright.async_api import Browser, Locator, Page, expect

from server.demo import DEFAULT_PASSWORD as DEMO_PASSWORD
from server.demo import seed_demo
from tests.e2e.browser import SCREENSHOTS, log_in, new_context
from tests.harness import HubHarness

# The colours of task names (web-client/src/style.css, .task-colour-*), as the browser reports them.
GREEN = "rgb(26, 154, 75)"
BLUE = "rgb(47, 111, 237)"
BLACK = "rgb(0, 0, 0)"
RED = "rgb(208, 49, 45)"
VIOLET = "rgb(122, 76, 194)"
GREY = "rgb(138, 148, 163)"
ORANGE = "rgb(224, 120, 0)"


async def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


async def call(hub: HubHarness, token: str, method: str, path: str, body: Any = None) -> Any:
    resp = await hub.request(method, path, token=token, json=body)
    assert resp.status in (200, 201, 204), (method, path, resp.status, resp.body)
    return resp.body


async def user_id(hub: HubHarness, login: str) -> str:
    doc = await hub.services.directory.user_by_login(login)
    assert doc is not None
    return str(doc["_id"])


async def demo_company(hub: HubHarness) -> tuple[dict[str, str], dict[str, str], str]:
    """The demo company: (login -> id, login -> token, id of the "Website relaunch" group)."""
    await seed_demo(hub.services.store, hub.services.directory)
    logins = ["sarah", "marco", "olga", "ines", "tom", "david", "mike"]
    ids = {login: await user_id(hub, login) for login in logins}
    tokens = {login: await hub.login(login, DEMO_PASSWORD) for login in logins}
    groups = await call(hub, tokens["sarah"], "GET", "/api/v1/workgroups")
    group_id = next(g["id"] for g in groups if g["name"] == "Website relaunch")
    return ids, tokens, group_id


def row(page: Page, title: str) -> Locator:
    return page.locator(f'[data-testid=task-row][data-title="{title}"]')


def row_of(page: Page, task: dict[str, Any]) -> Locator:
    return page.locator(f'[data-testid=task-row][data-task-id="{task["id"]}"]')


def title_of(page: Page, title: str) -> Locator:
    return row(page, title).get_by_test_id("task-title")


def filter_count(page: Page, kind: str, key: str) -> Locator:
    attr = "data-role" if kind == "role" else "data-status"
    chosen = f"[data-testid=task-{kind}-filter][{attr}={key}]"
    return page.locator(f"{chosen} [data-testid=filter-count]")


async def open_tasks(page: Page) -> None:
    await page.get_by_test_id("nav-tasks").click()
    await expect(page.get_by_test_id("task-list")).to_be_visible()
    await expect(page.get_by_text("Loading tasks…")).to_have_count(0)


async def pick(page: Page, picker: str, name: str) -> None:
    box = page.get_by_test_id(picker)
    await box.get_by_test_id("picker-input").fill(name.split()[0])
    await box.locator(f'[data-testid=picker-option][data-name="{name}"]').click()
    await expect(box.locator(f'[data-testid=picked][data-name="{name}"]')).to_have_count(1)


async def test_author_and_responsible_run_a_task_live(
    web_hub: HubHarness, browser: Browser
) -> None:
    ids, _tokens, group_id = await demo_company(web_hub)
    sarah = await (await new_context(browser)).new_page()  # the author
    marco = await (await new_context(browser)).new_page()  # the responsible person
    await log_in(sarah, web_hub, "sarah", DEMO_PASSWORD)
    await log_in(marco, web_hub, "marco", DEMO_PASSWORD)
    await open_tasks(sarah)
    await open_tasks(marco)
    await marco.locator("[data-testid=task-role-filter][data-role=responsible]").click()
    await expect(marco.get_by_test_id("task-list-empty")).to_be_visible()
    await expect(marco.get_by_test_id("nav-tasks-badge")).to_have_count(0)

    # Sarah sets Marco a task that needs her approval, through the New task form.
    title = "Prepare the launch checklist"
    await sarah.get_by_test_id("new-task").click()
    form = sarah.get_by_test_id("task-form")
    await form.get_by_test_id("task-form-submit").click()  # empty: refused in the form
    await expect(form.get_by_test_id("task-form-problems")).to_contain_text(
        "Choose who is responsible."
    )
    await form.get_by_test_id("task-form-title").fill(title)
    await form.get_by_test_id("task-form-description").fill(
        "Everything that must be true on launch day: pages, redirects, analytics."
    )
    await pick(sarah, "pick-responsible", "Marco Bianchi")
    await pick(sarah, "pick-participants", "Olga Ivanova")
    await pick(sarah, "pick-observers", "Michael Reed")
    await form.get_by_test_id("task-form-group").select_option(label="Website relaunch")
    await form.get_by_test_id("task-form-deadline").fill("2030-06-01T17:00")
    await form.get_by_test_id("task-form-priority").select_option("high")
    await form.get_by_test_id("task-form-approval").check()
    await shoot(sarah, "tasks-new-task")
    await form.get_by_test_id("task-form-submit").click()
    await expect(form).to_have_count(0)

    stored = await web_hub.services.store["tasks"].find_one({"title": title})
    assert stored is not None
    assert stored["responsible_id"] == ids["marco"]
    assert stored["author_id"] == ids["sarah"]
    assert stored["participant_ids"] == [ids["olga"]]
    assert stored["observer_ids"] == [ids["mike"]]
    assert stored["group_id"] == group_id
    assert stored["require_approval"] is True
    assert stored["priority"] == "high"
    assert stored["deadline"].isoformat().startswith("2030-06-01T17:00:00")

    # Sarah's list has it under its workgroup, green: not accepted yet.
    group = sarah.locator('[data-testid=task-group][data-name="Website relaunch"]')
    await expect(group.locator(f'[data-testid=task-row][data-title="{title}"]')).to_have_count(1)
    await expect(row(sarah, title)).to_have_attribute("data-colour", "new")
    await expect(title_of(sarah, title)).to_have_css("color", GREEN)

    # Marco's list gets it live, green, with the badges of a task new to him.
    await expect(row(marco, title)).to_have_attribute("data-status", "new")
    await expect(title_of(marco, title)).to_have_css("color", GREEN)
    await expect(marco.get_by_test_id("nav-tasks-badge")).to_have_text("1")
    await expect(filter_count(marco, "role", "responsible")).to_have_text("1")

    # He opens it: the task page shows it all, and only the actions he may take.
    await row(marco, title).click()
    page = marco.get_by_test_id("task-page")
    await expect(page.get_by_test_id("task-page-title")).to_have_text(title)
    await expect(page.get_by_test_id("task-status")).to_have_text("New (not accepted)")
    await expect(page.get_by_test_id("info-author")).to_have_text("Sarah Kim")
    await expect(page.get_by_test_id("info-responsible")).to_have_text("Marco Bianchi")
    await expect(page.get_by_test_id("info-participants")).to_have_text("Olga Ivanova")
    await expect(page.get_by_test_id("info-observers")).to_have_text("Michael Reed")
    await expect(page.get_by_test_id("info-priority")).to_have_text("High")
    await expect(page.get_by_test_id("info-deadline")).to_contain_text("Jun 1, 2030")
    await expect(page.get_by_test_id("info-workgroup")).to_have_text("Website relaunch")
    await expect(page.get_by_test_id("task-action")).to_have_text(
        ["Accept", "Start", "Complete", "Decline", "Defer", "Copy"]
    )
    # Opening it marked it seen: the badge goes, live.
    await expect(marco.get_by_test_id("nav-tasks-badge")).to_have_count(0)

    # He starts: black, on both sides.
    await page.locator("[data-testid=task-action][data-action=start]").click()
    await expect(page.get_by_test_id("task-status")).to_have_text("In progress")
    await expect(page.get_by_test_id("task-page-title")).to_have_css("color", BLACK)
    await expect(page.get_by_test_id("task-action")).to_have_text(
        ["Complete", "Pause", "Defer", "Copy"]
    )
    await expect(row(sarah, title)).to_have_attribute("data-colour", "in-progress")
    await expect(title_of(sarah, title)).to_have_css("color", BLACK)

    comment = "Draft is in the shared folder; redirects still to check."
    await page.get_by_test_id("comment-input").fill(comment)
    await page.get_by_test_id("comment-send").click()
    await expect(page.get_by_test_id("task-comment-text")).to_have_text([comment])

    # He completes: it goes to Sarah for approval.
    await page.locator("[data-testid=task-action][data-action=complete]").click()
    await expect(page.get_by_test_id("task-status")).to_have_text("Awaiting control")
    await expect(page.get_by_test_id("task-action")).to_have_text(["Copy"])
    await marco.get_by_test_id("task-back").click()
    await expect(row(marco, title)).to_have_attribute("data-status", "awaiting_control")

    # Sarah sees it move to awaiting control live, with her badge and filter count.
    await expect(row(sarah, title)).to_have_attribute("data-status", "awaiting_control")
    await expect(title_of(sarah, title)).to_have_css("color", VIOLET)
    await expect(sarah.get_by_test_id("nav-tasks-badge")).to_have_text("1")
    await expect(filter_count(sarah, "status", "awaiting_control")).to_have_text("1")
    await row(sarah, title).click()
    page = sarah.get_by_test_id("task-page")
    await expect(page.get_by_test_id("task-status")).to_have_text("Awaiting control")
    await expect(page.get_by_test_id("task-action")).to_have_text(
        ["Approve", "Return for completion", "Copy", "Delete"]
    )
    await expect(page.get_by_test_id("task-comment-text")).to_have_text([comment])
    await expect(page.get_by_test_id("task-history-text")).to_have_text(
        [
            "Sarah Kim created the task",
            "Marco Bianchi started work on the task",
            "Marco Bianchi commented",
            "Marco Bianchi handed the task in for approval",
        ]
    )
    # A comment from Sarah reaches Marco's list as unseen, live.
    await page.get_by_test_id("comment-input").fill("Thanks Marco, checking it now.")
    await page.get_by_test_id("comment-send").click()
    await expect(row(marco, title).get_by_test_id("task-unseen-comments")).to_contain_text("1")
    await shoot(sarah, "task-page")

    # She approves: completed, grey in both lists, her badge gone.
    await page.locator("[data-testid=task-action][data-action=approve]").click()
    await expect(page.get_by_test_id("task-status")).to_have_text("Completed")
    await expect(page.get_by_test_id("task-page-title")).to_have_css("color", GREY)
    await expect(sarah.get_by_test_id("nav-tasks-badge")).to_have_count(0)
    await expect(row(marco, title)).to_have_attribute("data-colour", "done")
    await expect(title_of(marco, title)).to_have_css("color", GREY)
    await sarah.get_by_test_id("task-back").click()
    await expect(row(sarah, title)).to_have_attribute("data-colour", "done")
    await expect(title_of(sarah, title)).to_have_css("color", GREY)
    # The status filters follow: not open any more, completed.
    await sarah.locator("[data-testid=task-status-filter][data-status=open]").click()
    await expect(row(sarah, title)).to_have_count(0)
    await sarah.locator("[data-testid=task-status-filter][data-status=completed]").click()
    await expect(row(sarah, title)).to_have_count(1)

    doc = await web_hub.services.store["tasks"].find_one({"_id": stored["_id"]})
    assert doc is not None and doc["status"] == 5  # completed


async def test_task_list_groups_folds_filters_and_colours(
    web_hub: HubHarness, browser: Browser
) -> None:
    ids, tokens, group_id = await demo_company(web_hub)
    sarah_token = tokens["sarah"]

    async def create(token: str, **fields: Any) -> list[dict[str, Any]]:
        body = await call(web_hub, token, "POST", "/api/v1/tasks", fields)
        return list(body["tasks"])

    async def act(token: str, task: dict[str, Any], action: str) -> None:
        await call(web_hub, token, "POST", f"/api/v1/tasks/{task['id']}/actions/{action}")

    # What Sarah has on her plate: set by her, in the workgroup and outside it.
    [photos] = await create(
        sarah_token,
        title="Collect photos for the team page",
        responsible_ids=[ids["olga"]],
        group_id=group_id,
        deadline="2030-05-20T12:00:00Z",
    )
    await act(tokens["olga"], photos, "start")
    translate = await create(
        sarah_token,
        title="Translate the product pages",
        responsible_ids=[ids["ines"], ids["tom"]],
        group_id=group_id,
        priority="high",
    )
    master, *copies = translate
    assert [c["parent_id"] for c in copies] == [master["id"], master["id"]]
    [banner] = await create(
        sarah_token,
        title="Approve the new banner",
        responsible_ids=[ids["olga"]],
        group_id=group_id,
        require_approval=True,
    )
    await act(tokens["olga"], banner, "complete")
    [cards] = await create(
        sarah_token,
        title="Order business cards",
        responsible_ids=[ids["tom"]],
        deadline="2026-01-15T09:00:00Z",  # long past: overdue
    )
    [prices] = await create(
        sarah_token, title="Update the price list", responsible_ids=[ids["david"]]
    )
    await act(tokens["david"], prices, "decline")
    [venue] = await create(
        sarah_token, title="Book the launch party venue", responsible_ids=[ids["olga"]]
    )
    await act(sarah_token, venue, "defer")
    [review] = await create(
        tokens["mike"],
        title="Prepare the Q2 sales review",
        responsible_ids=[ids["sarah"]],  # Mike is her head: it starts accepted
        deadline="2030-04-30T15:00:00Z",
    )
    [logo] = await create(
        tokens["mike"],
        title="Check the new logo files",
        responsible_ids=[ids["olga"]],
        observer_ids=[ids["sarah"]],
    )
    await act(tokens["olga"], logo, "complete")

    sarah = await (await new_context(browser)).new_page()
    await log_in(sarah, web_hub, "sarah", DEMO_PASSWORD)
    await open_tasks(sarah)

    # Grouped by workgroup, "No workgroup" last; the copies folded under their master.
    groups = sarah.get_by_test_id("task-group")
    await expect(groups).to_have_count(2)
    await expect(groups.nth(0)).to_have_attribute("data-name", "Website relaunch")
    await expect(groups.nth(1)).to_have_attribute("data-name", "No workgroup")
    relaunch = groups.nth(0).get_by_test_id("task-row")
    await expect(relaunch).to_have_count(3)
    # the master and its copies share the title: one row while folded
    await expect(row(sarah, "Translate the product pages")).to_have_count(1)
    fold = row_of(sarah, master).get_by_test_id("task-fold")
    await expect(fold).to_have_attribute("aria-expanded", "false")
    await fold.click()
    await expect(relaunch).to_have_count(5)
    await expect(sarah.locator("[data-testid=task-row][data-depth='1']")).to_have_count(2)
    for copy in copies:
        nested = row_of(sarah, copy)
        await expect(nested).to_have_attribute("data-depth", "1")
        await expect(nested.get_by_test_id("task-title")).to_have_css("color", GREEN)
    await fold.click()
    await expect(relaunch).to_have_count(3)
    await fold.click()
    await expect(relaunch).to_have_count(5)

    # Each state in its colour.
    expected = {
        "Collect photos for the team page": ("in-progress", BLACK),
        "Approve the new banner": ("awaiting", VIOLET),
        "Order business cards": ("overdue", RED),
        "Update the price list": ("declined", ORANGE),
        "Book the launch party venue": ("done", GREY),
        "Prepare the Q2 sales review": ("accepted", BLUE),
        "Check the new logo files": ("done", GREY),
    }
    for title, (colour, css) in expected.items():
        await expect(row(sarah, title)).to_have_attribute("data-colour", colour)
        await expect(title_of(sarah, title)).to_have_css("color", css)
    # the master is Sarah's own (she is its responsible person): accepted from the start
    await expect(row_of(sarah, master)).to_have_attribute("data-colour", "accepted")
    await expect(row_of(sarah, master).get_by_test_id("task-title")).to_have_css("color", BLUE)

    # The counters beside the filters come from the hub's counters.
    counters = await web_hub.services.tasks.counters(ids["sarah"])
    assert counters["responsible"]["new"] == 1  # Mike's review, not opened yet
    assert counters["author"]["awaiting_control"] == 1
    assert counters["author"]["overdue"] == 1
    await expect(sarah.get_by_test_id("nav-tasks-badge")).to_have_text("2")  # 1 new + 1 to approve
    await expect(filter_count(sarah, "role", "responsible")).to_have_text("1")
    await expect(filter_count(sarah, "role", "author")).to_have_text("2")  # awaiting + overdue
    await expect(filter_count(sarah, "role", "participant")).to_have_count(0)
    await expect(filter_count(sarah, "status", "overdue")).to_have_text(
        str(counters["total"]["overdue"])
    )
    await expect(filter_count(sarah, "status", "completed")).to_have_count(0)
    await shoot(sarah, "tasks-list")

    # Role filters: what I do, what I follow, what I set.
    await sarah.locator("[data-testid=task-role-filter][data-role=responsible]").click()
    doing = sarah.get_by_test_id("task-row")
    await expect(doing).to_have_count(2)  # Mike's review and the master of the translation
    await sarah.locator("[data-testid=task-role-filter][data-role=observer]").click()
    await expect(sarah.get_by_test_id("task-row")).to_have_attribute(
        "data-title", "Check the new logo files"
    )
    await sarah.locator("[data-testid=task-role-filter][data-role=author]").click()
    await sarah.locator("[data-testid=task-status-filter][data-status=overdue]").click()
    await expect(sarah.get_by_test_id("task-row")).to_have_attribute(
        "data-title", "Order business cards"
    )
    await sarah.locator("[data-testid=task-status-filter][data-status=open]").click()
    # photos, the translation with its two copies (still unfolded), cards
    await expect(sarah.get_by_test_id("task-row")).to_have_count(5)

    # A change made elsewhere shows at once: Tom accepts the cards, Olga's photo task is
    # deleted by Sarah over the API, and a new task from Mike appears.
    await act(tokens["tom"], cards, "accept")
    await expect(row(sarah, "Order business cards")).to_have_attribute("data-status", "pending")
    await expect(title_of(sarah, "Order business cards")).to_have_css("color", RED)  # still late
    await call(web_hub, sarah_token, "DELETE", f"/api/v1/tasks/{photos['id']}")
    await expect(row(sarah, "Collect photos for the team page")).to_have_count(0)
    await sarah.locator("[data-testid=task-role-filter][data-role=responsible]").click()
    await expect(sarah.get_by_test_id("task-row")).to_have_count(2)
    await create(tokens["mike"], title="Plan the autumn campaign", responsible_ids=[ids["sarah"]])
    await expect(row(sarah, "Plan the autumn campaign")).to_have_attribute(
        "data-colour", "accepted"
    )
    await expect(sarah.get_by_test_id("task-row")).to_have_count(3)
    await expect(sarah.get_by_test_id("nav-tasks-badge")).to_have_text("3")
    assert review["status_name"] == "pending"


async def test_editing_follows_the_apis_rules_field_by_field_and_shows_live(
    web_hub: HubHarness, browser: Browser
) -> None:
    """The author edits a task; the responsible person and an observer watch it change live.
    The responsible person may edit only once the author lets them move the deadline, and then
    only the deadline; the observer never. A past deadline is refused until confirmed."""
    await web_hub.create_user("ann", first_name="Ann", last_name="Archer")
    bob_id, _ = await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    carl_id, _ = await web_hub.create_user("carl", first_name="Carl", last_name="Cole")
    await web_hub.create_user("dina", first_name="Dina", last_name="Dale")
    ann_token = await web_hub.login("ann")
    [task] = (
        await call(
            web_hub,
            ann_token,
            "POST",
            "/api/v1/tasks",
            {
                "title": "Draft the offer",
                "responsible_ids": [bob_id],
                "observer_ids": [carl_id],
                "deadline": "2031-03-01T15:00:00Z",
            },
        )
    )["tasks"]
    url = f"{web_hub.base_url}/tasks/{task['id']}"
    pages: dict[str, Page] = {}
    for login in ("ann", "bob", "carl"):
        page = await (await new_context(browser)).new_page()
        await log_in(page, web_hub, login)
        await page.goto(url)
        await expect(page.get_by_test_id("task-page-title")).to_have_text("Draft the offer")
        pages[login] = page
    ann, bob, carl = pages["ann"], pages["bob"], pages["carl"]
    await expect(bob.get_by_test_id("task-edit-open")).to_have_count(0)
    await expect(carl.get_by_test_id("task-edit-open")).to_have_count(0)

    # the author changes title, description, participants and the deadline
    await ann.get_by_test_id("task-edit-open").click()
    form = ann.get_by_test_id("task-edit")
    await form.get_by_test_id("task-edit-title").fill("Draft the offer for Acme")
    await form.get_by_test_id("task-edit-description").fill("Prices as agreed on the call.")
    await pick(ann, "task-edit-participants", "Dina Dale")
    # a deadline in the past: warned, and not saved without a yes
    await form.get_by_test_id("task-edit-deadline").fill("2020-01-02T10:30")
    await expect(form.get_by_test_id("task-deadline-past")).to_contain_text("already passed")
    await form.get_by_test_id("task-edit-save").click()
    await expect(form.get_by_test_id("task-deadline-past-refused")).to_be_visible()
    await expect(form).to_be_visible()
    assert (await call(web_hub, ann_token, "GET", f"/api/v1/tasks/{task['id']}"))[
        "title"
    ] == "Draft the offer"
    await form.get_by_test_id("task-edit-deadline").fill("2031-04-02T10:30")
    await expect(form.get_by_test_id("task-deadline-past")).to_have_count(0)
    await form.get_by_test_id("task-edit-save").click()
    await expect(form).to_have_count(0)
    for page in (ann, bob, carl):
        await expect(page.get_by_test_id("task-page-title")).to_have_text(
            "Draft the offer for Acme"
        )
        await expect(page.get_by_test_id("task-description")).to_have_text(
            "Prices as agreed on the call."
        )
        await expect(page.get_by_test_id("info-participants")).to_have_text("Dina Dale")
        await expect(page.get_by_test_id("info-deadline")).to_contain_text("Apr 2, 2031")
    stored = await call(web_hub, ann_token, "GET", f"/api/v1/tasks/{task['id']}")
    assert stored["deadline"].startswith("2031-04-02T10:30")

    # the author lets the responsible person move the deadline: an Edit button appears, live
    await ann.get_by_test_id("task-edit-open").click()
    await form.get_by_test_id("task-edit-deadline-right").check()
    await form.get_by_test_id("task-edit-save").click()
    await expect(form).to_have_count(0)
    await expect(bob.get_by_test_id("task-edit-open")).to_be_visible()
    await expect(carl.get_by_test_id("task-edit-open")).to_have_count(0)
    await bob.get_by_test_id("task-edit-open").click()
    bob_form = bob.get_by_test_id("task-edit")
    await expect(bob_form.get_by_test_id("task-edit-deadline-only")).to_be_visible()
    await expect(bob_form.get_by_test_id("task-edit-title")).to_be_disabled()
    await expect(bob_form.get_by_test_id("task-edit-priority")).to_be_disabled()
    await expect(bob_form.get_by_test_id("task-edit-participants")).to_have_count(0)
    # a past deadline, confirmed: saved, and the task is overdue at once for everyone
    await bob_form.get_by_test_id("task-edit-deadline").fill("2021-05-06T09:00")
    await bob_form.get_by_test_id("task-deadline-past-confirm").check()
    await bob_form.get_by_test_id("task-edit-save").click()
    await expect(bob_form).to_have_count(0)
    for page in (ann, bob, carl):
        await expect(page.get_by_test_id("info-deadline")).to_contain_text("May 6, 2021")
        await expect(page.get_by_test_id("task-status")).to_have_attribute(
            "class", re.compile("pill-overdue")
        )
    stored = await call(web_hub, ann_token, "GET", f"/api/v1/tasks/{task['id']}")
    assert stored["deadline"].startswith("2021-05-06T09:00") and stored["overdue"]
    assert stored["title"] == "Draft the offer for Acme"
