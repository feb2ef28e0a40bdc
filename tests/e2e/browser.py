"""Helpers for the browser tests: paths, Chromium options, and the steps a person takes."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    ViewportSize,
    expect,
)

from tests.harness import DEFAULT_PASSWORD, HubHarness

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "web-client" / "dist"
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}

expect.set_options(timeout=15_000)

# Uncaught errors and content security policy violations in any page of the current test: a
# test with one fails.
PAGE_ERRORS: list[str] = []


def _csp_violation(message: ConsoleMessage) -> None:
    """Something the hub's content security policy refused, in the page itself. A received
    mail's frame (about:srcdoc) refuses remote images and the like on purpose."""
    in_page = not message.location.get("url", "").startswith("about:")
    if message.type == "error" and "Content Security Policy" in message.text and in_page:
        PAGE_ERRORS.append(message.text)


def _watch(page: Page) -> None:
    page.on("pageerror", lambda e: PAGE_ERRORS.append(str(e)))
    page.on("console", _csp_violation)


async def new_context(browser: Browser) -> BrowserContext:
    context = await browser.new_context(viewport=VIEWPORT, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(15_000)
    context.on("page", _watch)
    return context


async def log_in(page: Page, hub: HubHarness, login: str, password: str = DEFAULT_PASSWORD) -> None:
    """Log in through the login form and wait until the live connection is up."""
    await page.goto(hub.base_url + "/")
    await page.get_by_test_id("login").fill(login)
    await page.get_by_test_id("password").fill(password)
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "connected")


async def open_dialog_from_directory(page: Page, name: str) -> None:
    """Employees -> the person's "Message" button -> their dialog opens."""
    await page.get_by_test_id("nav-employees").click()
    await page.locator(f'[data-testid=person][data-name="{name}"]').get_by_test_id("write").click()
    await expect(page.get_by_test_id("chat-title")).to_have_text(name)


async def send(page: Page, text: str) -> None:
    """Type into the composer and send with Ctrl+Enter; wait until the hub stored it."""
    composer = page.get_by_test_id("composer")
    await composer.fill(text)
    await composer.press("Control+Enter")
    await expect(stored_message(page, text)).to_have_count(1)


def message(page: Page, text: str) -> Locator:
    """Message elements in the open chat whose text is exactly ``text``."""
    exact = re.compile(rf"^\s*{re.escape(text)}\s*$")
    return page.locator("[data-testid=messages] [data-testid=message]").filter(
        has=page.locator("[data-testid=message-text]", has_text=exact)
    )


def stored_message(page: Page, text: str) -> Locator:
    """Like ``message``, but only copies the hub has confirmed (not the optimistic one)."""
    return message(page, text).and_(page.locator("[data-pending=false]"))
