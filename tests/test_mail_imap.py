"""IMAP collection against a real Dovecot: replies appended to the mailbox land on records;
oversize mail is skipped without blocking; delivered mail is moved or deleted; a server that
drops the connection during IDLE is reconnected to, and nothing is missed."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aioimaplib
import pytest

from server.settings import Settings
from server.store.database import Store
from server.store.embedded import free_loopback_port
from tests.conftest import require_binary
from tests.harness import HubHarness, start_hub

RECIPE = Path(__file__).parent / "dovecot" / "dovecot-test.conf"
LOGIN, PASSWORD = "crm", "imap-secret"


@dataclass
class Dovecot:
    port: int
    conf: Path
    doveadm: str

    def kick(self) -> None:
        subprocess.run([self.doveadm, "-c", str(self.conf), "kick", LOGIN], check=True)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    binary = require_binary("dovecot", "dovecot-imapd")
    doveadm = require_binary("doveadm", "dovecot-core")
    base = Path(tempfile.mkdtemp(prefix="dovecot-"))
    base.chmod(0o755)  # the mail user must reach its home below
    port = free_loopback_port()
    conf = RECIPE.read_text().replace("@DIR@", str(base)).replace("@PORT@", str(port))
    if os.geteuid() != 0:  # run mail as ourselves (the recipe's notes)
        me = pwd.getpwuid(os.geteuid())
        conf = conf.replace("uid=dovecot gid=dovecot", f"uid={me.pw_uid} gid={me.pw_gid}")
        conf = conf.replace("first_valid_uid = 0\n", "")
    (base / "dovecot.conf").write_text(conf)
    (base / "passwd").write_text(f"{LOGIN}:{{PLAIN}}{PASSWORD}:::::\n")
    (base / "mail").mkdir()
    if os.geteuid() == 0:
        shutil.chown(base / "mail", "dovecot", "dovecot")
    subprocess.run([binary, "-c", str(base / "dovecot.conf")], check=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError((base / "dovecot.log").read_text()) from None
            time.sleep(0.1)
    yield Dovecot(port, base / "dovecot.conf", doveadm)
    subprocess.run([doveadm, "-c", str(base / "dovecot.conf"), "stop"], check=False)
    shutil.rmtree(base, ignore_errors=True)


async def imap(server: Dovecot) -> aioimaplib.IMAP4:
    client = aioimaplib.IMAP4("127.0.0.1", server.port, timeout=10)
    await client.wait_hello_from_server()
    assert (await client.login(LOGIN, PASSWORD)).result == "OK"
    return client


async def append(server: Dovecot, raw: bytes) -> None:
    client = await imap(server)
    response = await client.append(raw, mailbox="INBOX")
    assert response.result == "OK", response
    await client.logout()


async def count(server: Dovecot, folder: str) -> int:
    client = await imap(server)
    try:
        response = await client.select(folder)
        if response.result != "OK":
            return 0
        for line in response.lines:
            text = line.decode() if isinstance(line, bytes | bytearray) else str(line)
            if text.endswith("EXISTS"):
                return int(text.split()[0])
        return 0
    finally:
        await client.logout()


def message(sender: str, subject: str, text: str = "Hello", size: int = 0) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "crm@portal.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
    msg.set_content(text + ("\n" + "x" * 76) * (size // 77))
    return msg.as_bytes()


@pytest.fixture
async def hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    configured = settings.model_copy(
        update={"domain": "portal.test", "mail_max_message_bytes": 200 * 1024}
    )
    async with start_hub(configured, store) as harness:
        yield harness


async def add_mailbox(hub: HubHarness, server: Dovecot, **options: Any) -> tuple[str, str]:
    _, root = await hub.create_user("root", admin=True)
    body = {
        "name": "CRM inbox",
        "host": "127.0.0.1",
        "port": server.port,
        "security": "none",
        "login": LOGIN,
        "password": PASSWORD,
        "poll_seconds": 5,
        **options,
    }
    tested = await hub.request("POST", "/api/v1/mail/mailboxes/test", token=root, json=body)
    assert tested.status == 200 and tested.body["ok"], tested.body
    assert "IDLE" in tested.body["capabilities"]
    created = await hub.request("POST", "/api/v1/mail/mailboxes", token=root, json=body)
    assert created.status == 201, created.body
    return root, created.body["id"]


async def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def test_a_reply_appended_to_the_mailbox_lands_on_the_contact_live(
    hub: HubHarness, dovecot: Dovecot
) -> None:
    mary_id, mary = await hub.create_user("mary")
    contact = await hub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={"first_name": "Carl", "emails": [{"value": "carl@client.test"}]},
    )
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    await add_mailbox(hub, dovecot)
    await append(dovecot, message("Carl <carl@client.test>", "Re: our call"))
    await client.wait_until(
        lambda: client.crm_counters().get("contact", {}).get("incoming") == 1, timeout=20
    )
    store = hub.services.store
    activity = await store["crm_activities"].find_one({"owner_id": contact.body["id"]})
    assert activity is not None and activity["mail"]["match"] == "sender"

    async def moved() -> bool:
        return await count(dovecot, "INBOX") == 0 and await count(dovecot, "Processed") == 1

    await wait_for(moved)  # seen and moved only after the activity was committed
    assert mary_id


async def test_oversize_mail_is_skipped_without_blocking_and_delete_after_delivery(
    hub: HubHarness, dovecot: Dovecot
) -> None:
    await append(dovecot, message("big@client.test", "huge", size=300 * 1024))
    await append(dovecot, message("small@client.test", "small one"))
    root, _box = await add_mailbox(hub, dovecot, delete_after_delivery=True)
    store = hub.services.store

    async def small_delivered() -> bool:
        return await store["crm_records"].count_documents({"type": "lead"}) == 1

    await wait_for(small_delivered)
    listed = await hub.request("GET", "/api/v1/mail/mailboxes", token=root)
    (box,) = listed.body["mailboxes"]
    assert len(box["skipped"]) == 1 and box["skipped"][0]["size"] > 200 * 1024
    assert "limit" in box["skipped"][0]["reason"]

    async def deleted() -> bool:  # the delivered one is gone; the skipped one stays
        return await count(dovecot, "INBOX") == 1

    await wait_for(deleted)
    assert await count(dovecot, "Processed") == 0


async def test_a_server_dropping_the_connection_during_idle_is_reconnected_to(
    hub: HubHarness, dovecot: Dovecot
) -> None:
    _root, box_id = await add_mailbox(hub, dovecot)
    store = hub.services.store

    async def idling() -> bool:
        box = await store["mail_mailboxes"].find_one({"_id": box_id})
        return bool(box and box.get("state", {}).get("idle"))

    await wait_for(idling)
    dovecot.kick()  # the server says BYE to the idling session
    await append(dovecot, message("after@client.test", "after the kick"))

    async def delivered() -> bool:
        return await store["crm_records"].count_documents({"type": "lead"}) == 1

    await wait_for(delivered, timeout=40)
    assert await store["mail_raw"].count_documents({}) == 1
