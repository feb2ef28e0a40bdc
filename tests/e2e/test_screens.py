"""The main screens with the demo company: multi-recipient messages, the directory, and
screenshots of each screen for docs/screenshots/."""

from __future__ import annotations

from playwright.async_api import Browser, Page, expect

from server.demo import DEFAULT_PASSWORD as DEMO_PASSWORD
from server.demo import seed_demo
from tests.e2e.browser import (
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
