"""Browser tests: the built web client, served by a real hub, driven in headless Chromium."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from playwright.async_api import Browser, async_playwright

from server.settings import Settings
from server.store.database import Store
from tests.conftest import require_binary
from tests.e2e.browser import CHROMIUM_ARGS, DIST, PAGE_ERRORS
from tests.harness import HubHarness, start_hub


@pytest.fixture(autouse=True)
def no_page_errors() -> Iterator[None]:
    PAGE_ERRORS.clear()
    yield
    assert not PAGE_ERRORS, f"uncaught errors in the web client: {PAGE_ERRORS}"


@pytest.fixture
def chromium_path() -> str:
    return require_binary("chromium", "chromium")


@pytest.fixture
async def web_hub(
    chromium_path: str, settings: Settings, store: Store
) -> AsyncIterator[HubHarness]:
    """A hub that serves the built client from web-client/dist."""
    if not (DIST / "index.html").is_file():
        pytest.fail(f"{DIST}/index.html is missing: build the web client first with `make web`")
    # A roomier message burst, so that tests can fill a history page quickly.
    web_settings = settings.model_copy(update={"web_client_dir": DIST, "im_message_burst": 500})
    async with start_hub(web_settings, store) as harness:
        yield harness


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()
