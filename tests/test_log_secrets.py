"""No secret and no message body in the logs, at any level (issue 13, item 8).

`portalhub serve` runs as a real process at PORTALHUB_LOG_LEVEL=DEBUG, in both log formats,
and is used the way people use it: logins over REST, a user created with a password, a
Socket.IO connection, messages over REST and over XMPP (SCRAM), a mail received over SMTP.
Its whole output is then searched for each secret and each text it saw.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import sys
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import slixmpp
import socketio

from server.store.database import Store
from tests.ports import listener_port
from tests.xmpp_client import XmppClient

pytestmark = pytest.mark.slow

ALICE_PASSWORD = "alice-Pa55word-" + uuid.uuid4().hex[:8]
BOB_PASSWORD = "bob-Pa55word-" + uuid.uuid4().hex[:8]


def texts() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        "rest message": f"the quarterly numbers are {tag}-rest",
        "xmpp message": f"meet me at the usual place {tag}-xmpp",
        "mail body": f"please send the signed contract {tag}-mail",
        "mail subject": f"Contract {tag}-subject",
        "typing chat": f"{tag}-never-a-chat",
    }


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_debug_logs_hold_no_secrets_and_no_bodies(
    mongo_url: str, tmp_path: Path, log_format: str
) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    http_port, xmpp_port, smtp_port = (listener_port() for _ in range(3))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTALHUB_")}
    env.update(
        PORTALHUB_MONGODB_URL=mongo_url,
        PORTALHUB_MONGODB_DATABASE=database,
        PORTALHUB_DATA_DIR=str(tmp_path / "var"),
        PORTALHUB_HTTP_PORT=str(http_port),
        PORTALHUB_XMPP_PORT=str(xmpp_port),
        PORTALHUB_XMPP_TLS_PORT=str(listener_port()),
        PORTALHUB_SMTP_PORT=str(smtp_port),
        PORTALHUB_LOG_LEVEL="DEBUG",
        PORTALHUB_LOG_FORMAT=log_format,
    )
    said = texts()
    secrets: dict[str, str] = {"alice's password": ALICE_PASSWORD, "bob's password": BOB_PASSWORD}
    # a CLI command at DEBUG: it writes the password hash and SCRAM keys
    cli = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "server", "user", "add", "alice", "--email", "a@example.test"),
        *("--admin", "--password-stdin"),
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    cli_out, _ = await asyncio.wait_for(cli.communicate((ALICE_PASSWORD + "\n").encode()), 120)
    assert cli.returncode == 0, cli_out
    log_file = tmp_path / "hub.log"
    with open(log_file, "wb") as out:
        hub = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "serve", env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{http_port}"
    store = Store(mongo_url, database)
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert hub.returncode is None, log_file.read_text()[-3000:]
                try:
                    async with http.get(base + "/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(ready, 60, "the hub to be ready")

            async def call(method: str, path: str, token: str | None, body: Any = None) -> Any:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.request(method, base + path, json=body, headers=headers) as resp:
                    assert resp.status < 300, (path, resp.status, await resp.text())
                    return await resp.json() if resp.status != 204 else None

            login = {"login": "alice", "password": ALICE_PASSWORD}
            alice = (await call("POST", "/api/v1/auth/login", None, login))["token"]
            bob_user = await call(
                "POST",
                "/api/v1/users",
                alice,
                {"login": "bob", "email": "b@example.test", "password": BOB_PASSWORD},
            )
            login = {"login": "bob", "password": BOB_PASSWORD}
            bob = (await call("POST", "/api/v1/auth/login", None, login))["token"]
            secrets.update({"alice's token": alice, "bob's token": bob})

            # bob is online over Socket.IO and gets alice's message live
            sio = socketio.AsyncClient(reconnection=False)
            received: list[Any] = []
            sio.on("im.message", received.append)
            await sio.connect(base, auth={"token": bob}, transports=["websocket"])
            try:
                sent = await call(
                    "POST",
                    "/api/v1/im/messages",
                    alice,
                    {"to": [bob_user["id"]], "text": said["rest message"]},
                )
                chat_id = sent["messages"][0]["chat_id"]

                async def delivered() -> bool:
                    return any(said["rest message"] in json.dumps(e) for e in received)

                await wait_until(delivered, 10, "the message over Socket.IO")
                await sio.call("im.typing", {"chat_id": said["typing chat"]}, timeout=5)
            finally:
                await sio.disconnect()

            # bob answers from a Jabber client, logging in with SCRAM-SHA-256
            xmpp = XmppClient("bob@localhost/desk", BOB_PASSWORD, mechanism="SCRAM-SHA-256")
            xmpp.enable_plaintext = False
            xmpp.connect("127.0.0.1", xmpp_port)
            await asyncio.wait_for(xmpp.session_ready.wait(), 20)
            xmpp.send_message(
                mto=slixmpp.JID("alice@localhost"), mbody=said["xmpp message"], mtype="chat"
            )

            async def answered() -> bool:
                page = await call("GET", f"/api/v1/im/chats/{chat_id}/messages", alice)
                return said["xmpp message"] in json.dumps(page)

            await wait_until(answered, 15, "the Jabber message")
            xmpp.disconnect()

            # a customer's mail to the CRM
            mail = EmailMessage()
            mail["From"] = "client@example.test"
            mail["To"] = "crm@localhost"
            mail["Subject"] = said["mail subject"]
            mail.set_content(said["mail body"])
            await aiosmtplib.send(mail, hostname="127.0.0.1", port=smtp_port)

            async def mail_done() -> bool:
                raw = store["mail_raw"]
                return await raw.count_documents({"status": {"$ne": "pending"}}) >= 1

            await wait_until(mail_done, 30, "the mail to reach its outcome")
            # a failed login too: what was typed must not show up either
            async with http.post(
                base + "/api/v1/auth/login",
                json={"login": "bob", "password": "wrong-" + BOB_PASSWORD},
            ) as resp:
                assert resp.status == 401

        for name in ("alice", "bob"):
            user = await store.users.find_one({"login": name})
            assert user is not None
            secrets[f"{name}'s argon2 hash"] = user["password_hash"]
            for mechanism, keys in user["scram"].items():
                for key in ("stored_key", "server_key", "salt"):
                    secrets[f"{name}'s {mechanism} {key}"] = keys[key]
                    # the same key as it would show up elsewhere, in hex
                    secrets[f"{name}'s {mechanism} {key} (hex)"] = base64.b64decode(keys[key]).hex()
        for name in ("alice's token", "bob's token"):
            secrets[f"{name} hash"] = hashlib.sha256(secrets[name].encode()).hexdigest()
    finally:
        if hub.returncode is None:
            hub.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(hub.wait(), 60)
            except TimeoutError:
                hub.kill()
                await hub.wait()
        await store.client.drop_database(database)
        await store.close()

    logged = log_file.read_text() + cli_out.decode()
    # the run did log at DEBUG: the hub's own trace lines are there
    assert "event stored" in logged and "DEBUG" in logged, logged[-2000:]
    for name, value in {**secrets, **said}.items():
        for shown in {value, json.dumps(value)[1:-1]}:
            assert shown not in logged, f"{name} is in the log"
