"""The directory and the profile page in a real browser: one search box finds people by name,
position, department, e-mail or phone; a profile shows who they are and leads to writing to
them or giving them a task."""

from __future__ import annotations

from playwright.async_api import Browser, Page, expect

from server.demo import DEFAULT_PASSWORD as DEMO_PASSWORD
from server.demo import seed_demo
from tests.e2e.browser import SCREENSHOTS, log_in, new_context
from tests.harness import HubHarness


async def names_found(page: Page, text: str, expected: list[str]) -> None:
    """The search box finds exactly these people (waiting for the answer to this text)."""
    await page.get_by_test_id("directory-search").fill(text)
    people = page.get_by_test_id("person")
    found: list[str] = []
    for _ in range(100):
        found = sorted(await people.evaluate_all("rows => rows.map(r => r.dataset.name)"))
        if found == sorted(expected):
            return
        await page.wait_for_timeout(100)
    raise AssertionError(f"{text!r} found {found}, not {sorted(expected)}")


async def test_search_by_anything_on_the_card_and_the_profile_page(
    web_hub: HubHarness, browser: Browser
) -> None:
    svc = web_hub.services
    await seed_demo(svc.store, svc.directory)
    await web_hub.connect(await web_hub.login("linda", DEMO_PASSWORD))  # online
    page = await (await new_context(browser)).new_page()
    await log_in(page, web_hub, "john", DEMO_PASSWORD)
    await page.get_by_test_id("nav-employees").click()
    await expect(page.get_by_test_id("person")).to_have_count(20)

    await names_found(page, "accountant", ["Mary Lopez", "Anna Schmidt"])  # position
    await names_found(page, "sales manager", ["David Olsen", "Marco Bianchi", "Ines Garcia"])
    await names_found(page, "paris", ["Sophie Martin", "Lucas Bernard", "Chloe Dubois"])  # dept
    await names_found(page, "linda@demo", ["Linda Brooks"])  # e-mail
    await names_found(page, "0100 105", ["Linda Brooks"])  # phone, typed with a space
    await names_found(page, "berlin clerk", ["Jonas Weber"])  # department and position

    # the profile: position, department, manager, phone, e-mail, presence
    await page.locator('[data-testid=person][data-name="Jonas Weber"] .person-name').click()
    await expect(page.get_by_test_id("profile-name")).to_have_text("Jonas Weber")
    jonas_url = page.url
    await page.go_back()
    await page.locator('[data-testid=person][data-name="Linda Brooks"] .person-name').click()
    profile = page.get_by_test_id("profile")
    await expect(page.get_by_test_id("profile-name")).to_have_text("Linda Brooks")
    await expect(page.get_by_test_id("profile-position")).to_have_text("Payroll specialist")
    await expect(page.get_by_test_id("profile-department")).to_have_text(
        "Demo Company \u203a New York finance"
    )
    await expect(page.get_by_test_id("profile-manager")).to_have_text("John Carter")
    await expect(page.get_by_test_id("profile-phones")).to_contain_text("+1 555 0100 105")
    await expect(page.get_by_test_id("profile-email")).to_have_text("linda@demo.portalhub.test")
    await expect(profile.get_by_test_id("presence-dot").first).to_have_attribute(
        "data-status", "online"
    )
    await expect(page.get_by_test_id("profile-presence")).to_contain_text("Online")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "employee-profile.png"))
    linda_url = page.url
    assert linda_url != jonas_url

    # "Send message" opens the dialog; Back returns to the profile
    await page.get_by_test_id("profile-message").click()
    await expect(page.get_by_test_id("chat-title")).to_have_text("Linda Brooks")
    await page.go_back()
    await expect(page.get_by_test_id("profile-name")).to_have_text("Linda Brooks")
    # "Assign a task": the form with her as responsible
    await page.get_by_test_id("profile-assign-task").click()
    form = page.get_by_test_id("task-form")
    await expect(form.locator('[data-testid=picked][data-name="Linda Brooks"]')).to_have_count(1)
    await form.get_by_test_id("task-form-title").fill("Check the May payroll")
    await form.get_by_test_id("task-form-submit").click()
    await expect(
        page.locator('[data-testid=task-row][data-title="Check the May payroll"]')
    ).to_have_count(1)

    # John's own profile lists who reports to him; the manager's name is a link
    await page.goto(linda_url)
    await page.get_by_test_id("profile-manager").get_by_role("link").click()
    await expect(page.get_by_test_id("profile-name")).to_contain_text("John Carter")
    await expect(page.get_by_test_id("profile")).to_contain_text("Reports to John (3)")
