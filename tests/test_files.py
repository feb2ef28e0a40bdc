"""Files in chats over real HTTP, on the real database's GridFS."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from pymongo import monitoring

from server.files.rules import clean_name, image_type, links_in, sign, verify, without_links
from server.files.service import FileService
from server.settings import Settings
from server.store.database import Store, utcnow
from tests.harness import HubHarness, watched_store

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(300)


async def upload(
    hub: HubHarness, token: str, name: str, data: bytes, *, status: int = 201
) -> dict[str, Any]:
    resp = await hub.request(
        "POST",
        f"/api/v1/files?name={name}",
        token=token,
        data=data,
        headers={"Content-Type": "image/png"},
    )
    assert resp.status == status, resp.body
    body: dict[str, Any] = resp.body
    return body


async def download(hub: HubHarness, token: str | None, path: str) -> tuple[int, bytes, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with hub.http.get(hub.base_url + path, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


async def group(hub: HubHarness, token: str, *members: str) -> str:
    resp = await hub.request(
        "POST", "/api/v1/im/chats", token=token, json={"title": "Files", "member_ids": members}
    )
    assert resp.status == 201, resp.body
    return str(resp.body["id"])


async def test_upload_send_and_download_by_members_only(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    _, carol = await hub.create_user("carol")
    chat_id = await group(hub, alice, bob_id)
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")

    stored = await upload(hub, alice, "../holiday.png", PNG)
    assert stored["name"] == "holiday.png" and stored["size"] == len(PNG)
    assert stored["image"] is True and stored["content_type"] == "image/png"
    assert stored["chat_id"] is None
    path = f"/api/v1/files/{stored['id']}"
    # Not sent yet: the uploader's alone.
    assert (await download(hub, bob, path))[0] == 403

    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"chat_id": chat_id, "text": "", "file_ids": [stored["id"]]},
    )
    assert resp.status == 201, resp.body
    [message] = resp.body["messages"]
    assert message["text"] == "" and [f["id"] for f in message["files"]] == [stored["id"]]

    def arrived() -> bool:
        return any(e["data"]["message"]["files"] for e in bob_client.of_type("im.message"))

    await bob_client.wait_until(arrived)
    status, data, headers = await download(hub, bob, path)
    assert status == 200 and data == PNG
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Disposition"].startswith("inline;")
    assert headers["X-Content-Type-Options"] == "nosniff"
    history = await hub.request("GET", f"/api/v1/im/chats/{chat_id}/messages", token=bob)
    assert history.body[-1]["files"][0]["name"] == "holiday.png"

    # Carol is not in the chat; nobody without a session gets anything.
    assert (await download(hub, carol, path))[0] == 403
    assert (await download(hub, None, path))[0] == 401
    # Someone else's file cannot be sent by bob, nor files to several people at once.
    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=bob,
        json={"chat_id": chat_id, "text": "mine now", "file_ids": [stored["id"]]},
    )
    assert resp.status == 403, resp.body
    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"to": [bob_id], "text": "x", "file_ids": [stored["id"]]},
    )
    assert resp.status == 422, resp.body
    assert alice_id


async def test_content_is_typed_from_its_bytes_not_the_claim(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    page = b"<html><script>alert(1)</script></html>"
    stored = await upload(hub, alice, "pic.png", page)
    assert stored["image"] is False and stored["content_type"] == "application/octet-stream"
    status, data, headers = await download(hub, alice, f"/api/v1/files/{stored['id']}")
    assert status == 200 and data == page
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert "sandbox" in headers["Content-Security-Policy"]


async def test_too_large_is_refused_and_nothing_kept(hub: HubHarness) -> None:
    hub.services.settings.file_max_bytes = 100_000
    _, alice = await hub.create_user("alice")
    # Announced too large: refused before the body is read.
    resp = await hub.request("POST", "/api/v1/files?name=big.bin", token=alice, data=b"x" * 100_001)
    assert resp.status == 413, resp.body
    assert resp.content_type == "application/problem+json"
    assert resp.body["type"].endswith("file-too-large")

    # Not announced (chunked): refused once the limit is passed.
    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 30_000

    async with hub.http.post(
        hub.base_url + "/api/v1/files?name=big.bin",
        data=body(),
        headers={"Authorization": f"Bearer {alice}"},
    ) as chunked:
        assert chunked.status == 413
    db = hub.services.store
    assert await db["files.files"].count_documents({}) == 0
    assert await db["files.chunks"].count_documents({}) == 0
    # Exactly the limit is fine.
    await upload(hub, alice, "ok.bin", b"z" * 100_000)


async def test_deleting_the_message_deletes_its_file(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    chat_id = await group(hub, alice, bob_id)
    stored = await upload(hub, alice, "notes.txt", os.urandom(600_000))  # three chunks
    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"chat_id": chat_id, "text": "see attached", "file_ids": [stored["id"]]},
    )
    [message] = resp.body["messages"]
    path = f"/api/v1/files/{stored['id']}"
    assert (await download(hub, bob, path))[0] == 200
    db = hub.services.store
    assert await db["files.chunks"].count_documents({"files_id": stored["id"]}) == 3

    resp = await hub.request("DELETE", f"/api/v1/im/messages/{message['id']}", token=alice)
    assert resp.status == 204
    assert (await download(hub, bob, path))[0] == 404
    assert (await download(hub, alice, path))[0] == 404
    assert await db["files.chunks"].count_documents({"files_id": stored["id"]}) == 0
    history = await hub.request("GET", f"/api/v1/im/chats/{chat_id}/messages", token=bob)
    assert history.body[-1]["deleted"] and history.body[-1]["files"] == []


async def test_uploads_at_once_are_limited_per_user(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    release = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"first part"
        await release.wait()
        yield b" and the rest"

    async def post(token: str) -> int:
        async with hub.http.post(
            hub.base_url + "/api/v1/files?name=slow.txt",
            data=slow(),
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            return resp.status

    under_way = [asyncio.create_task(post(alice)) for _ in range(4)]
    files = hub.services.im.files
    for _ in range(200):
        if sum(files._uploading.values()) == 4:
            break
        await asyncio.sleep(0.02)
    resp = await hub.request("POST", "/api/v1/files?name=more.txt", token=alice, data=b"x")
    assert resp.status == 429, resp.body
    # Someone else is not held up by it.
    assert (
        await hub.request("POST", "/api/v1/files?name=b.txt", token=bob, data=b"y")
    ).status == 201
    release.set()
    assert await asyncio.gather(*under_way) == [201] * 4
    assert (
        await hub.request("POST", "/api/v1/files?name=c.txt", token=alice, data=b"z")
    ).status == 201


async def test_uploads_never_sent_are_pruned_after_a_day(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    chat_id = await group(hub, alice, bob_id)
    unsent = await upload(hub, alice, "draft.bin", b"d" * 1000)
    fresh = await upload(hub, alice, "fresh.bin", b"f" * 1000)
    sent = await upload(hub, alice, "sent.bin", b"s" * 1000)
    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"chat_id": chat_id, "file_ids": [sent["id"]]},
    )
    assert resp.status == 201, resp.body
    db = hub.services.store
    yesterday = utcnow() - timedelta(hours=25)
    await db["files.files"].update_many(
        {"_id": {"$in": [unsent["id"], sent["id"]]}}, {"$set": {"uploadDate": yesterday}}
    )
    assert await hub.services.im.files.prune() == 1
    for gone in (unsent,):
        assert (await download(hub, alice, f"/api/v1/files/{gone['id']}"))[0] == 404
        assert await db["files.chunks"].count_documents({"files_id": gone["id"]}) == 0
    for kept in (fresh, sent):
        assert (await download(hub, alice, f"/api/v1/files/{kept['id']}"))[0] == 200


def test_rules() -> None:
    assert image_type(PNG[:16]) == "image/png"
    assert image_type(b"\xff\xd8\xff\xe0" + b"\0" * 12) == "image/jpeg"
    assert image_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert image_type(b"<svg xmlns='http://www.w3.org/2000/svg'>") is None
    assert clean_name("C:\\docs\\a\x00b\u202e.txt") == "ab.txt"
    assert clean_name("../..") == "file" and clean_name("") == "file"
    secret = b"k" * 32
    signature = sign(secret, "0" * 24)
    assert verify(secret, "0" * 24, signature) and not verify(b"j" * 32, "0" * 24, signature)
    assert not verify(secret, "0" * 24, "é" * len(signature))  # any text, no error
    url = f"https://hub.example/files/{'0' * 24}/{signature}/a%20b.png"
    text = f"look {url} here, and https://elsewhere.example/files/{'0' * 24}/{signature}/x"
    assert links_in(text, "https://hub.example/") == [(url, "0" * 24, signature)]
    assert without_links(url, [url]) == ""


class _Writes(monitoring.CommandListener):
    """The writes sent, in order: (command, collection, whether it asked for the journal)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("insert", "update"):
            concern = event.command.get("writeConcern", {})
            collection = str(event.command[event.command_name])
            self.seen.append((event.command_name, collection, bool(concern.get("j"))))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_an_upload_is_flushed_once_after_its_chunks(settings: Settings, store: Store) -> None:
    """Where every write asks for the journal (the embedded database's URL), an upload's
    chunks and file document go without a flush each; the journaled update of its metadata
    after them flushes the log through them before the upload is answered."""
    writes = _Writes()
    async with watched_store(store, writes, journal=True) as journaled:
        files = FileService(journaled, settings)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield os.urandom(300_000)

        stored = await files.upload("u1", "big.bin", body())
    assert stored.size == 900_000
    gridfs = [w for w in writes.seen if w[1].startswith("files.")]
    assert [w for w in gridfs if w[0] == "insert"], writes.seen
    last = max(i for i, w in enumerate(writes.seen) if w[0] == "insert")
    assert all(not journal for _c, _n, journal in writes.seen[: last + 1]), writes.seen
    assert writes.seen[last + 1 :] == [("update", "files.files", True)], writes.seen
