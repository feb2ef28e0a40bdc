"""The CRM in real browsers: a manager watches the activity counters of her deal change live as
a colleague logs and completes activities on it; leads are created through the form with
duplicate warnings and converted through the dialog. Screenshots of the deals list and of a
record page go to docs/screenshots/."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from playwright.async_api import Browser, Locator, Page, expect
from playwright.async_api import Error as PlaywrightError

from tests.e2e.browser import SCREENSHOTS, log_in, new_context
from tests.harness import HubHarness


async def shoot(page: Page, name: str) -> None:
    """A screenshot without the toasts of the moment (e.g. "Cleo assigned you a meeting")."""
    toasts = page.get_by_test_id("toast")
    while await toasts.count():
        # a toast may go by itself meanwhile (after 6 s): then the next one, or none
        with contextlib.suppress(PlaywrightError):
            await toasts.first.get_by_role("button", name="Dismiss").click(timeout=1000)
    await expect(toasts).to_have_count(0)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


async def call(hub: HubHarness, token: str, method: str, path: str, body: Any = None) -> Any:
    resp = await hub.request(method, path, token=token, json=body)
    assert resp.status in (200, 201, 204), (method, path, resp.status, resp.body)
    return resp.body


async def crm_team(hub: HubHarness) -> tuple[str, str, str, str]:
    """Mary (a manager, her days counted in UTC), Cleo (a chief executive: sees everyone's
    records) and a portal admin. Returns (mary id, mary token, cleo token, admin token)."""
    mary_id, mary = await hub.create_user("mary", first_name="Mary", last_name="Lopez")
    me = await call(hub, mary, "PATCH", "/api/v1/users/me", {"time_zone": "UTC"})
    assert me["time_zone"] == "UTC"
    cleo_id, cleo = await hub.create_user("cleo", first_name="Cleo", last_name="Park")
    _, root = await hub.create_user("root", admin=True, first_name="Rita", last_name="Admin")
    await call(
        hub,
        root,
        "PUT",
        "/api/v1/crm/roles",
        {"role": "chief", "subject_kind": "user", "subject_id": cleo_id},
    )
    assert (await call(hub, cleo, "GET", "/api/v1/crm/me"))["role"] == "chief"
    assert (await call(hub, mary, "GET", "/api/v1/crm/me"))["role"] == "manager"
    return mary_id, mary, cleo, root


async def due_later_today(hub: HubHarness, admin: str) -> datetime:
    """A deadline a few minutes ahead that is due now for Mary (UTC): still today, or - within
    ten minutes of midnight - inside a due window set in minutes, so the test is deterministic."""
    now = datetime.now(UTC)
    if (now + timedelta(minutes=10)).date() != now.date():
        await call(hub, admin, "PATCH", "/api/v1/crm/settings", {"due_minutes_before": 60})
    return now + timedelta(minutes=5)


async def activity(hub: HubHarness, token: str, owner: dict[str, Any], **fields: Any) -> Any:
    body = {"owner_type": owner["type"], "owner_id": owner["id"], **fields}
    return await call(hub, token, "POST", "/api/v1/crm/activities", body)


def indicator(page: Page, record: dict[str, Any]) -> Locator:
    return page.locator(f"[data-testid=crm-list] [data-testid=indicator-{record['id']}]")


def row(page: Page, title: str) -> Locator:
    return page.locator(f'[data-testid=crm-row][data-title="{title}"]')


async def open_crm(page: Page, tab: str) -> None:
    await page.get_by_test_id("nav-crm").click()
    await page.locator(f"[data-testid=crm-tab][data-tab={tab}]").click()
    await expect(page.locator(f"[data-testid=crm-list][data-type={tab}]")).to_be_visible()
    await expect(page.get_by_text("Loading…")).to_have_count(0)


async def test_a_managers_deal_counter_follows_a_colleagues_activities_live(
    web_hub: HubHarness, browser: Browser
) -> None:
    mary_id, mary, cleo, root = await crm_team(web_hub)
    deal = await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/deals",
        {"title": "Northwind renewal", "amount": 48000, "currency": "EUR"},
    )

    page = await (await new_context(browser)).new_page()
    await log_in(page, web_hub, "mary")
    await open_crm(page, "deal")
    await expect(indicator(page, deal)).to_have_text("0")
    await expect(indicator(page, deal)).to_have_attribute("data-colour", "none")
    await expect(page.get_by_test_id("crm-badge-deal")).to_have_attribute("data-colour", "none")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_text("")

    # Cleo logs an incoming call on Mary's deal: green, the moment it is stored.
    call_in = await activity(
        web_hub,
        cleo,
        deal,
        type="call",
        direction="incoming",
        subject="Asked for a quote",
    )
    assert call_in["state"] == "incoming"
    await expect(indicator(page, deal)).to_have_text("1")
    await expect(indicator(page, deal)).to_have_attribute("data-colour", "green")
    badge = page.get_by_test_id("crm-badge-deal")
    await expect(badge).to_have_text("1")
    await expect(badge).to_have_attribute("data-colour", "green")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_text("1")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_attribute("data-colour", "green")
    await expect(page.get_by_test_id("crm-badge-lead")).to_have_attribute("data-colour", "none")

    # A meeting due later today: two, red and green.
    meeting = await activity(
        web_hub,
        cleo,
        deal,
        type="meeting",
        subject="Demo of the new plan",
        deadline=(await due_later_today(web_hub, root)).isoformat(),
        responsible_id=mary_id,
    )
    assert meeting["state"] == "due"
    await expect(indicator(page, deal)).to_have_text("2")
    await expect(indicator(page, deal)).to_have_attribute("data-colour", "red-green")
    await expect(badge).to_have_text("2")
    await expect(badge).to_have_attribute("data-colour", "red-green")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_attribute("data-colour", "red-green")

    # Both completed: back to nothing, the badge empty.
    for done in (call_in, meeting):
        changed = await call(
            web_hub, cleo, "PATCH", f"/api/v1/crm/activities/{done['id']}", {"completed": True}
        )
        assert changed["state"] == "completed"
    await expect(indicator(page, deal)).to_have_text("0")
    await expect(indicator(page, deal)).to_have_attribute("data-colour", "none")
    await expect(badge).to_have_text("")
    await expect(badge).to_have_attribute("data-colour", "none")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_text("")
    await expect(page.get_by_test_id("nav-crm-badge")).to_have_attribute("data-colour", "none")

    # More deals, for a list with every colour: green, red, red-green, planned (blue dot).
    company = await call(web_hub, mary, "POST", "/api/v1/crm/companies", {"title": "Contoso Ltd"})
    await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/contacts",
        {
            "first_name": "Ann",
            "last_name": "Lee",
            "emails": [{"type": "work", "value": "ann.lee@contoso.test"}],
            "company_ids": [company["id"]],
        },
    )
    deals = {}
    for title, amount in [
        ("Contoso expansion", 120000),
        ("Fabrikam pilot", 9500),
        ("Adatum support plan", 18000),
        ("Litware migration", 64000),
    ]:
        deals[title] = await call(
            web_hub,
            mary,
            "POST",
            "/api/v1/crm/deals",
            {"title": title, "amount": amount, "currency": "EUR", "stage_id": "proposal"},
        )
    contoso = await call(
        web_hub,
        mary,
        "PATCH",
        f"/api/v1/crm/deals/{deals['Contoso expansion']['id']}",
        {"company_id": company["id"]},
    )
    assert len(contoso["contact_ids"]) == 1  # the company's contact came along
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    in_a_week = (datetime.now(UTC) + timedelta(days=7)).isoformat()
    await activity(
        web_hub, cleo, contoso, type="email", direction="incoming", subject="Re: the offer"
    )
    await activity(
        web_hub, mary, contoso, type="task", subject="Send the revised offer", deadline=hour_ago
    )
    await activity(
        web_hub,
        cleo,
        deals["Fabrikam pilot"],
        type="call",
        direction="incoming",
        subject="Missed call",
        missed=True,
    )
    await activity(
        web_hub,
        mary,
        deals["Adatum support plan"],
        type="task",
        subject="Prepare the contract",
        deadline=hour_ago,
    )
    await activity(
        web_hub,
        mary,
        deals["Litware migration"],
        type="meeting",
        subject="Kick-off",
        deadline=in_a_week,
    )
    expected = {
        "Contoso expansion": ("2", "red-green", "none"),
        "Fabrikam pilot": ("1", "green", "none"),
        "Adatum support plan": ("1", "red", "none"),
        "Litware migration": ("0", "gray", "blue"),
        "Northwind renewal": ("0", "none", "none"),
    }
    for title, (number, colour, dot) in expected.items():
        shown = indicator(page, deals.get(title, deal))
        await expect(shown).to_have_text(number)
        await expect(shown).to_have_attribute("data-colour", colour)
        await expect(shown).to_have_attribute("data-dot", dot)
    await expect(badge).to_have_text("4")
    await expect(badge).to_have_attribute("data-colour", "red-green")
    rows = page.get_by_test_id("crm-row")
    await expect(rows).to_have_count(5)
    await expect(rows.first).to_have_attribute("data-title", "Litware migration")  # newest first
    await shoot(page, "crm-deals")

    # "Counted only": the records with a coloured number for Mary.
    await page.get_by_test_id("crm-filter-counted").check()
    await expect(rows).to_have_count(3)
    await page.get_by_test_id("crm-filter-counted").uncheck()
    await expect(rows).to_have_count(5)
    # Search, and the records with an open activity of Cleo's.
    await page.get_by_test_id("crm-search").fill("fabrikam")
    await expect(rows).to_have_count(1)
    await expect(rows).to_have_attribute("data-title", "Fabrikam pilot")
    await page.get_by_test_id("crm-search").fill("")
    await expect(rows).to_have_count(5)
    picker = page.get_by_test_id("crm-filter-activity-responsible")
    await picker.get_by_test_id("picker-input").fill("Cleo")
    await picker.locator('[data-testid=picker-option][data-name="Cleo Park"]').click()
    await expect(rows).to_have_count(2)
    await expect(row(page, "Contoso expansion")).to_have_count(1)
    await expect(row(page, "Fabrikam pilot")).to_have_count(1)
    await picker.get_by_role("button", name="Remove Cleo Park").click()
    await expect(rows).to_have_count(5)

    # The record page: links, the timeline, completing from the page.
    await row(page, "Contoso expansion").click()
    record = page.get_by_test_id("crm-record")
    await expect(record).to_have_attribute("data-id", contoso["id"])
    await expect(page.get_by_test_id("crm-record-title")).to_have_text("Contoso expansion")
    company_box = page.get_by_test_id("crm-deal-company")
    await expect(company_box.get_by_test_id("crm-link")).to_have_text("Contoso Ltd")
    contacts_box = page.get_by_test_id("crm-deal-contacts")
    await expect(contacts_box.get_by_test_id("crm-link")).to_have_text("Ann Lee")
    timeline = page.get_by_test_id("crm-timeline")
    await expect(timeline.locator("[data-state=incoming]")).to_have_count(1)
    await expect(timeline.locator("[data-state=overdue]")).to_have_count(1)
    await expect(page.get_by_test_id("crm-history-entry")).not_to_have_count(0)
    page_indicator = record.get_by_test_id(f"indicator-{contoso['id']}")
    await expect(page_indicator).to_have_attribute("data-colour", "red-green")
    incoming = timeline.locator("[data-state=incoming]")
    await incoming.get_by_test_id("activity-complete").click()
    await expect(timeline.locator("[data-completed=true]")).to_have_count(1)
    await expect(page_indicator).to_have_text("1")
    await expect(page_indicator).to_have_attribute("data-colour", "red")
    await expect(badge).to_have_text("3")

    # Mary plans a call from the page.
    await page.get_by_test_id("crm-add-activity").click()
    form = page.get_by_test_id("crm-activity-form")
    await form.get_by_test_id("activity-form-type").select_option("call")
    await form.get_by_test_id("activity-form-subject").fill("Call Ann about the volumes")
    await form.get_by_test_id("activity-form-deadline").fill(
        (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT10:00")
    )
    await form.get_by_test_id("activity-form-submit").click()
    await expect(form).to_have_count(0)
    planned = timeline.locator("[data-state=future]")
    await expect(planned).to_have_count(1)
    await expect(planned.get_by_test_id("activity-subject")).to_have_text(
        "Call Ann about the volumes"
    )
    await expect(page.get_by_test_id("crm-history")).to_contain_text("Mary Lopez added a call")
    await shoot(page, "crm-record")


async def test_leads_are_created_with_duplicate_warnings_and_converted(
    web_hub: HubHarness, browser: Browser
) -> None:
    mary_id, mary, cleo, _root = await crm_team(web_hub)
    company = await call(web_hub, mary, "POST", "/api/v1/crm/companies", {"title": "Tailspin Toys"})
    buyer = await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/contacts",
        {"first_name": "Bob", "last_name": "Stone", "company_ids": [company["id"]]},
    )

    page = await (await new_context(browser)).new_page()
    await log_in(page, web_hub, "mary")
    await open_crm(page, "lead")
    await expect(page.get_by_test_id("crm-list-empty")).to_be_visible()

    # A lead through the form.
    await page.get_by_test_id("crm-new").click()
    form = page.get_by_test_id("crm-form")
    await expect(form).to_have_attribute("data-type", "lead")
    await form.get_by_test_id("crm-form-submit").click()  # empty: refused in the form
    await expect(form.get_by_test_id("crm-form-problems")).to_contain_text(
        "Give the lead a title, a name or a company."
    )
    await form.get_by_test_id("crm-form-title").fill("Website redesign")
    await form.get_by_test_id("crm-form-first-name").fill("Ann")
    await form.get_by_test_id("crm-form-last-name").fill("Lee")
    await form.get_by_test_id("crm-form-company-title").fill("Contoso")
    await form.get_by_test_id("crm-form-email").fill("ann.lee@example.test")
    await form.get_by_test_id("crm-form-phone").fill("+1 555 0100 200")
    await form.get_by_test_id("crm-form-amount").fill("25000")
    await expect(form.get_by_test_id("crm-duplicates")).to_have_count(0)
    await form.get_by_test_id("crm-form-submit").click()
    await expect(form).to_have_count(0)
    record = page.get_by_test_id("crm-record")
    await expect(page.get_by_test_id("crm-record-title")).to_have_text("Website redesign")
    first_id = await record.get_attribute("data-id")
    assert first_id
    stored = await web_hub.services.store["crm_records"].find_one({"_id": first_id})
    assert stored is not None
    assert stored["type"] == "lead" and stored["responsible_id"] == mary_id
    assert [e["value"] for e in stored["emails"]] == ["ann.lee@example.test"]
    assert stored["amount"] == 25000

    # A second lead with the same e-mail: warned while typing, refused, created anyway.
    await page.get_by_test_id("crm-back").click()
    await expect(row(page, "Website redesign")).to_have_count(1)
    await page.get_by_test_id("crm-new").click()
    form = page.get_by_test_id("crm-form")
    await form.get_by_test_id("crm-form-title").fill("Newsletter sign-up")
    await form.get_by_test_id("crm-form-email").fill("Ann.Lee@example.test")
    warning = form.locator(f"[data-testid=crm-duplicate][data-id='{first_id}']")
    await expect(warning).to_have_count(1)
    await expect(form.get_by_test_id("crm-duplicate-hidden")).to_have_count(0)
    await expect(warning.get_by_test_id("crm-duplicate-open")).to_have_text("Website redesign")
    await expect(warning.get_by_test_id("crm-duplicate-matched")).to_have_text("same e-mail")
    await form.get_by_test_id("crm-form-submit").click()
    await expect(form.get_by_test_id("crm-duplicates")).to_have_attribute("data-refused", "true")
    assert await web_hub.services.store["crm_records"].count_documents({"type": "lead"}) == 1
    await form.get_by_test_id("crm-form-create-anyway").click()
    await expect(form).to_have_count(0)
    await expect(page.get_by_test_id("crm-record-title")).to_have_text("Newsletter sign-up")
    assert await web_hub.services.store["crm_records"].count_documents({"type": "lead"}) == 2

    # A lead that only Cleo's matches: Mary is told that one exists, and nothing about it.
    await call(
        web_hub,
        cleo,
        "POST",
        "/api/v1/crm/leads",
        {"title": "Rival takeover", "emails": [{"value": "zed@rival.example"}]},
    )
    await page.get_by_test_id("crm-back").click()
    await page.get_by_test_id("crm-new").click()
    form = page.get_by_test_id("crm-form")
    await form.get_by_test_id("crm-form-title").fill("Zed's enquiry")
    await form.get_by_test_id("crm-form-email").fill("zed@rival.example")
    await expect(form.get_by_test_id("crm-duplicate-hidden")).to_contain_text(
        "At least one record you have no access to matches:"
    )
    await expect(form.get_by_test_id("crm-duplicate")).to_have_count(0)
    await form.get_by_test_id("crm-form-submit").click()
    await expect(form.get_by_test_id("crm-duplicates")).to_have_attribute("data-refused", "true")
    await expect(form.get_by_test_id("crm-duplicate-hidden")).to_have_count(1)
    assert "Rival" not in await form.inner_text()
    await form.get_by_test_id("crm-form-create-anyway").click()
    await expect(form).to_have_count(0)
    await expect(page.get_by_test_id("crm-record-title")).to_have_text("Zed's enquiry")

    # Convert the first lead into a deal and a contact.
    await page.get_by_test_id("crm-back").click()
    await row(page, "Website redesign").click()
    await expect(record).to_have_attribute("data-id", first_id)
    await page.get_by_test_id("crm-convert-open").click()
    dialog = page.get_by_test_id("crm-convert")
    await expect(dialog.get_by_test_id("convert-mode")).to_have_count(6)
    await dialog.locator("[data-testid=convert-mode][data-mode='deal+contact'] input").check()
    await dialog.get_by_test_id("crm-convert-submit").click()
    await expect(dialog).to_have_count(0)
    await expect(page.get_by_test_id("crm-record-status")).to_have_text("Converted")
    converted = page.get_by_test_id("crm-links-converted").get_by_test_id("crm-link")
    await expect(converted).to_have_count(2)
    await expect(page.get_by_test_id("crm-convert-open")).to_have_count(0)
    lead = await web_hub.services.store["crm_records"].find_one({"_id": first_id})
    assert lead is not None and lead["status"] == "converted"
    assert set(lead["converted"]) == {"deal", "contact"}

    # The deal is in the deals list, with the contact; choosing a company adds its contacts.
    await page.locator("[data-testid=crm-tab][data-tab=deal]").click()
    deal_row = page.locator(f"[data-testid=crm-row][data-id='{lead['converted']['deal']}']")
    await expect(deal_row).to_have_count(1)
    await expect(deal_row).to_have_attribute("data-title", "Website redesign")
    await deal_row.click()
    contacts_box = page.get_by_test_id("crm-deal-contacts")
    await expect(contacts_box.get_by_test_id("crm-link")).to_have_text(["Ann Lee"])
    company_box = page.get_by_test_id("crm-deal-company")
    await company_box.get_by_test_id("record-picker-input").fill("Tailspin")
    await company_box.locator("[data-testid=record-option][data-title='Tailspin Toys']").click()
    await expect(company_box.get_by_test_id("crm-link")).to_have_text("Tailspin Toys")
    await expect(contacts_box.get_by_test_id("crm-link")).to_have_text(["Ann Lee", "Bob Stone"])
    deal = await web_hub.services.store["crm_records"].find_one({"_id": lead["converted"]["deal"]})
    assert deal is not None
    assert deal["company_id"] == company["id"]
    assert buyer["id"] in deal["contact_ids"]

    # The stage from the page, the amount through the edit form.
    await page.get_by_test_id("crm-stage-select").select_option("negotiation")
    await expect(page.get_by_test_id("crm-record-stage")).to_have_text("Negotiation")
    await page.get_by_test_id("crm-edit").click()
    form = page.get_by_test_id("crm-form")
    await expect(form.get_by_test_id("crm-form-title")).to_have_value("Website redesign")
    await form.get_by_test_id("crm-form-amount").fill("30000")
    await form.get_by_test_id("crm-form-submit").click()
    await expect(form).to_have_count(0)
    await expect(page.get_by_test_id("crm-record")).to_contain_text("30,000 USD")
    await expect(
        page.locator("[data-testid=crm-history-entry][data-kind=field]").filter(
            has_text="changed the amount: 25000 → 30000"
        )
    ).to_have_count(1)
    deal = await web_hub.services.store["crm_records"].find_one({"_id": lead["converted"]["deal"]})
    assert deal is not None and deal["amount"] == 30000 and deal["stage_id"] == "negotiation"

    # The contact made by the conversion, through the link on the deal.
    await contacts_box.locator("[data-testid=crm-link]", has_text="Ann Lee").click()
    await expect(record).to_have_attribute("data-type", "contact")
    await expect(page.get_by_test_id("crm-links-deal").get_by_test_id("crm-link")).to_have_text(
        "Website redesign"
    )


def card(page: Page, title: str) -> Locator:
    return page.locator(f'[data-testid=crm-card][data-title="{title}"]')


def column(page: Page, stage: str) -> Locator:
    return page.locator(f"[data-testid=crm-column][data-stage={stage}]")


async def test_the_deals_kanban_moves_deals_by_stage_live_for_other_viewers(
    web_hub: HubHarness, browser: Browser
) -> None:
    _mary_id, mary, _cleo, _root = await crm_team(web_hub)
    acme = await call(web_hub, mary, "POST", "/api/v1/crm/companies", {"title": "Acme Industries"})
    hans = await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/contacts",
        {"first_name": "Hans", "last_name": "Huber", "company_ids": [acme["id"]]},
    )
    big = await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/deals",
        {"title": "Acme: 40 licences", "company_id": acme["id"], "amount": 48000},
    )
    await call(web_hub, mary, "POST", "/api/v1/crm/deals", {"title": "Small pilot", "amount": 900})
    pages: dict[str, Page] = {}
    for login in ("mary", "cleo"):
        page = await (await new_context(browser)).new_page()
        await log_in(page, web_hub, login)
        pages[login] = page
    mary_page, cleo_page = pages["mary"], pages["cleo"]

    # the list names each deal's company and contacts
    await open_crm(mary_page, "deal")
    deal_row = row(mary_page, "Acme: 40 licences")
    await expect(deal_row.get_by_test_id("crm-row-company")).to_have_text("Acme Industries")
    await expect(deal_row.get_by_test_id("crm-row-contacts")).to_have_text("Hans Huber")
    # the board, at its own address, for both
    await mary_page.get_by_test_id("crm-view-kanban").click()
    await expect(mary_page).to_have_url(f"{web_hub.base_url}/crm/deals/kanban")
    await cleo_page.goto(f"{web_hub.base_url}/crm/deals/kanban")
    for page in (mary_page, cleo_page):
        await expect(column(page, "new").get_by_test_id("crm-card")).to_have_count(2)
        await expect(column(page, "new").get_by_test_id("crm-column-summary")).to_have_text(
            "2 deals · 48,900 USD"
        )
    await expect(
        card(mary_page, "Acme: 40 licences").get_by_test_id("crm-card-company")
    ).to_have_text("Acme Industries")
    await shoot(mary_page, "crm-kanban")

    # Mary drags the deal to Proposal: Cleo sees it move
    await card(mary_page, "Acme: 40 licences").drag_to(column(mary_page, "proposal"))
    await expect(column(mary_page, "proposal").get_by_test_id("crm-card")).to_have_count(1)
    await expect(column(cleo_page, "proposal")).to_contain_text("Acme: 40 licences")
    await expect(column(cleo_page, "new").get_by_test_id("crm-card")).to_have_count(1)
    stored = await call(web_hub, mary, "GET", f"/api/v1/crm/deals/{big['id']}")
    assert stored["stage_id"] == "proposal"
    # Cleo moves it on with the card's stage menu (keyboards and phones): Mary sees it
    await card(cleo_page, "Acme: 40 licences").get_by_test_id("crm-card-stage").select_option("won")
    await expect(column(mary_page, "won")).to_contain_text("Acme: 40 licences")
    await expect(column(mary_page, "proposal").get_by_test_id("crm-card")).to_have_count(0)
    assert (await call(web_hub, mary, "GET", f"/api/v1/crm/deals/{big['id']}"))["open"] is False
    # the board searches like the list: by the company's name
    await mary_page.get_by_test_id("crm-search").fill("industries")
    await expect(mary_page.get_by_test_id("crm-card")).to_have_count(1)
    await expect(card(mary_page, "Small pilot")).to_have_count(0)
    # and a reload keeps the board
    await mary_page.reload()
    await expect(mary_page.get_by_test_id("crm-kanban")).to_be_visible()
    # the legend shows colours, not numbers that would read as live counters
    legend = await mary_page.get_by_test_id("crm-legend").inner_text()
    assert not any(ch.isdigit() for ch in legend), legend
    assert hans["id"]


async def test_search_by_part_of_an_email_and_merging_duplicates(
    web_hub: HubHarness, browser: Browser
) -> None:
    _mary_id, mary, cleo, _root = await crm_team(web_hub)
    keep = await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/contacts",
        {"first_name": "Hans", "last_name": "Huber", "emails": [{"value": "hans@acme.example"}]},
    )
    dupe = await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/contacts",
        {
            "first_name": "Hans",
            "last_name": "Huber",
            "emails": [{"value": "HANS@acme.example"}],
            "phones": [{"number": "+49 30 1234567"}],
            "ignore_duplicates": True,
        },
    )
    await call(web_hub, mary, "POST", "/api/v1/crm/contacts", {"first_name": "Otto"})
    deal = await call(
        web_hub,
        mary,
        "POST",
        "/api/v1/crm/deals",
        {"title": "Acme order", "contact_ids": [dupe["id"]]},
    )
    await activity(web_hub, mary, dupe, type="call", subject="Call about the order")

    mary_page = await (await new_context(browser)).new_page()
    await log_in(mary_page, web_hub, "mary")
    await open_crm(mary_page, "contact")
    await mary_page.get_by_test_id("crm-search").fill("acme")
    await expect(mary_page.get_by_test_id("crm-row")).to_have_count(2)
    await mary_page.get_by_test_id("crm-search").fill("1234")
    await expect(mary_page.get_by_test_id("crm-row")).to_have_count(1)
    await expect(mary_page.get_by_test_id("crm-row")).to_have_attribute("data-id", dupe["id"])
    await mary_page.get_by_test_id("crm-search").fill("")

    # Cleo has the duplicate open; Mary merges it into the other
    cleo_page = await (await new_context(browser)).new_page()
    await log_in(cleo_page, web_hub, "cleo")
    await cleo_page.goto(f"{web_hub.base_url}/crm/contacts/{dupe['id']}")
    await expect(cleo_page.get_by_test_id("crm-record-title")).to_have_text("Hans Huber")
    await mary_page.goto(f"{web_hub.base_url}/crm/contacts/{keep['id']}")
    await mary_page.get_by_test_id("crm-merge-open").click()
    dialog = mary_page.get_by_test_id("crm-merge")
    suggestion = dialog.locator(f'[data-testid=crm-merge-suggestion][data-id="{dupe["id"]}"]')
    await suggestion.check()
    await expect(dialog.get_by_test_id("crm-merge-explain")).to_contain_text("is deleted")
    await dialog.get_by_test_id("crm-merge-submit").click()
    await expect(dialog).to_have_count(0)
    # the survivor has the other's phone, deal and activity
    await expect(mary_page.get_by_test_id("crm-info-phones")).to_contain_text("+49 30 1234567")
    await expect(mary_page.get_by_test_id("crm-links-deal")).to_contain_text("Acme order")
    await expect(mary_page.get_by_test_id("crm-timeline")).to_contain_text("Call about the order")
    # Cleo is taken to the survivor
    await expect(cleo_page).to_have_url(f"{web_hub.base_url}/crm/contacts/{keep['id']}")
    await expect(cleo_page.get_by_test_id("crm-timeline")).to_contain_text("Call about the order")
    # and the old address says so
    await mary_page.goto(f"{web_hub.base_url}/crm/contacts/{dupe['id']}")
    await expect(mary_page.get_by_test_id("not-available")).to_be_visible()
    stored = await call(web_hub, cleo, "GET", f"/api/v1/crm/deals/{deal['id']}")
    assert stored["contact_ids"] == [keep["id"]]
