"""Files in the messenger, in real browsers: the paperclip and drag and drop, upload
progress, an image preview on the other side, a download, the size limit."""

from __future__ import annotations

import asyncio
import struct
import zlib

from playwright.async_api import Browser, FilePayload, Route, expect

from tests.e2e.browser import log_in, new_context, open_dialog_from_directory, send
from tests.harness import HubHarness


def png(width: int, height: int) -> bytes:
    """A real, decodable PNG (solid colour), so the preview has pixels to show."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\xd0\x30\x30" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def test_files_are_sent_with_progress_and_shown_to_the_other_side(
    web_hub: HubHarness, browser: Browser
) -> None:
    await web_hub.create_user("alice", first_name="Alice", last_name="Archer")
    await web_hub.create_user("bob", first_name="Bob", last_name="Baker")
    alice = await (await new_context(browser)).new_page()
    bob = await (await new_context(browser)).new_page()
    await log_in(alice, web_hub, "alice")
    await log_in(bob, web_hub, "bob")
    await open_dialog_from_directory(alice, "Bob Baker")
    await send(alice, "Photos from the site")
    await bob.locator('[data-testid=dialog][data-title="Alice Archer"]').click()

    # The paperclip: a file chooser; the upload shows its progress while it is under way
    # (held here until the progress row has been seen).
    seen_progress = asyncio.Event()

    async def hold(route: Route) -> None:
        await asyncio.wait_for(seen_progress.wait(), 15)
        await route.continue_()

    await alice.route("**/api/v1/files?*", hold)
    photo = png(64, 48)
    async with alice.expect_file_chooser() as chooser_info:
        await alice.get_by_test_id("attach").click()
    chooser = await chooser_info.value
    site: FilePayload = {"name": "site.png", "mimeType": "image/png", "buffer": photo}
    await chooser.set_files(files=[site])
    progress = alice.get_by_test_id("upload-progress")
    await expect(progress).to_contain_text("site.png")
    seen_progress.set()
    await expect(progress).to_have_count(0)
    await alice.unroute("**/api/v1/files?*")

    # Bob sees the picture itself (decoded: it has its pixels), live.
    preview = bob.get_by_test_id("file-preview")
    await expect(preview).to_be_visible()
    await expect(preview).to_have_js_property("naturalWidth", 64)
    await expect(alice.get_by_test_id("file-preview")).to_be_visible()

    # Dropping a file on the conversation sends it too; Bob gets a download, not a preview.
    drop = await alice.evaluate_handle(
        """() => {
            const data = new DataTransfer();
            data.items.add(new File(["minutes of the meeting"], "notes.txt", {type: "text/plain"}));
            return data;
        }"""
    )
    await alice.dispatch_event("[data-testid=chat]", "dragover", {"dataTransfer": drop})
    await alice.dispatch_event("[data-testid=chat]", "drop", {"dataTransfer": drop})
    notes = bob.locator('[data-testid=message-file][data-name="notes.txt"]')
    await expect(notes.get_by_test_id("file-download")).to_contain_text("notes.txt")
    await expect(notes.get_by_test_id("file-preview")).to_have_count(0)
    async with bob.expect_download() as download_info:
        await notes.get_by_test_id("file-download").click()
    download = await download_info.value
    assert download.suggested_filename == "notes.txt"
    path = await download.path()
    assert path.read_bytes() == b"minutes of the meeting"

    # Above the limit: refused with a clear word, nothing sent.
    web_hub.services.settings.file_max_bytes = 1000
    async with alice.expect_file_chooser() as chooser_info:
        await alice.get_by_test_id("attach").click()
    chooser = await chooser_info.value
    big: FilePayload = {
        "name": "big.bin",
        "mimeType": "application/octet-stream",
        "buffer": b"x" * 5000,
    }
    await chooser.set_files(files=[big])
    await expect(alice.get_by_test_id("toast")).to_contain_text("big.bin not sent")
    await expect(alice.get_by_test_id("toast")).to_contain_text("at most 1000 bytes")
    await expect(bob.get_by_test_id("message-file")).to_have_count(2)
