"""A 250 is a promise: the hub and its database killed together right after it lose nothing.

Whole processes, as `make run` starts them: `portalhub serve` on the embedded database. Mail
goes in over SMTP; right after each 250 (and at a few delays after it, so that some kills hit
the pipeline in the middle of processing) the hub and its SecantusDB child get SIGKILL, and
the hub is started again on the same data directory. Each message must be processed exactly
once (one incoming activity per message, one lead per new sender, nothing lost or doubled),
and promptly after the restart: a lease left by the killed process must not hold a message
for minutes (RFC 5321 6.1: after the 250 the sending server has deleted its copy).
"""

from __future__ import annotations

import email.policy
import json
import os
import signal
import smtplib
import time
import urllib.request
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from server.store.credentials import read_credentials
from server.store.embedded import mongodb_url
from tests.test_process import Hub, alive, wait_for

pytestmark = pytest.mark.slow

# Seconds between the 250 and the kill: at once, and while the pipeline may be working on it.
DELAYS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.0, 0.15)
PROMPT_SECONDS = 30.0  # after the restart, for the killed process's message to be processed
BIG_ROUND = 6  # this one carries 9 MiB: stored in GridFS, not in the document
CONTACT = "carl@client.example"


@pytest.fixture
def mail_hub(tmp_path: Path) -> Iterator[Hub]:
    hub = Hub(tmp_path / "var")
    hub.env["PORTALHUB_DOMAIN"] = "portal.test"
    try:
        yield hub
    finally:
        hub.kill_all()


def api(hub: Hub, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
    request = urllib.request.Request(
        hub.url(path),
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


def database(hub: Hub) -> MongoClient[dict[str, Any]]:
    """The hub's own database, with the password the hub keeps beside it (issue 13)."""
    db_dir = hub.data_dir / "db"
    endpoint = json.loads((db_dir / "endpoint.json").read_text())
    credentials = read_credentials(db_dir)
    assert credentials is not None, "the hub keeps its database password in credentials.json"
    return MongoClient(
        mongodb_url(endpoint["host"], endpoint["port"]),
        tz_aware=True,
        **credentials.client_options(),
    )


def message(round_no: int) -> tuple[str, str, bytes]:
    """(sender, Message-ID, bytes): from the known contact, or from a new sender (a lead)."""
    sender = CONTACT if round_no % 2 == 0 else f"new{round_no}@stranger.example"
    msg = EmailMessage()
    msg["From"] = f"Sender {round_no} <{sender}>"
    msg["To"] = "crm@portal.test"
    msg["Subject"] = f"Order question {round_no}"
    msg["Message-ID"] = message_id = f"<crash-{round_no}-{uuid.uuid4().hex}@client.example>"
    msg.set_content(f"Please call me back about the order. (ref crash-{round_no})")
    if round_no == BIG_ROUND:
        msg.add_attachment(
            os.urandom(7 << 20), maintype="application", subtype="octet-stream", filename="x.bin"
        )
    return sender, message_id, msg.as_bytes(policy=email.policy.SMTP)  # CRLF, as on the wire


def send(hub: Hub, sender: str, raw: bytes) -> None:
    """Returns on the 250 to DATA (smtplib raises on anything else)."""
    port = int(hub.env["PORTALHUB_SMTP_PORT"])
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        refused = smtp.sendmail(sender, ["crm@portal.test"], raw)
        assert refused == {}
        # No QUIT before the kill: the test's clock stops at the 250.
        smtp.sock.close()  # type: ignore[union-attr]
        smtp.sock = None


def kill_together(hub: Hub, db_pid: int) -> None:
    assert hub.process is not None
    os.kill(db_pid, signal.SIGKILL)
    hub.process.send_signal(signal.SIGKILL)
    hub.process.wait(30)
    wait_for(lambda: not alive(db_pid), 20, "the database to die")


def outcome(client: MongoClient[dict[str, Any]], message_id: str) -> list[str]:
    return [
        str(d.get("status"))
        for d in client["portalhub"]["mail_raw"].find({"message_id": message_id})
    ]


def wait_processed(hub: Hub, message_id: str, timeout: float) -> None:
    with database(hub) as client:
        wait_for(
            lambda: outcome(client, message_id) == ["done"], timeout, f"{message_id} processed"
        )


def test_every_message_acknowledged_with_250_is_processed_once_after_kills(
    mail_hub: Hub,
) -> None:
    hub = mail_hub
    hub.start()
    token = api(hub, "POST", "/api/v1/auth/login", body={"login": "john", "password": "demo-pass"})[
        "token"
    ]
    contact = api(
        hub,
        "POST",
        "/api/v1/crm/contacts",
        token,
        {"first_name": "Carl", "last_name": "Client", "emails": [{"value": CONTACT}]},
    )
    sent: list[tuple[str, str]] = []
    for round_no, delay in enumerate(DELAYS):
        sender, message_id, raw = message(round_no)
        db_pid = hub.database_pid()
        send(hub, sender, raw)
        if delay:
            time.sleep(delay)
        kill_together(hub, db_pid)
        sent.append((sender, message_id))
        hub.start()
        # Taken up at once: no lease of the killed process holds it (nor is it lost).
        wait_processed(hub, message_id, PROMPT_SECONDS)

    with database(hub) as client:
        db = client["portalhub"]
        for sender, message_id in sent:
            assert outcome(client, message_id) == ["done"], message_id
            activities = list(db["crm_activities"].find({"mail.incoming_message_id": message_id}))
            assert len(activities) == 1, (message_id, activities)
            owner = db["crm_records"].find_one({"_id": activities[0]["owner_id"]})
            assert owner is not None
            if sender == CONTACT:
                assert owner["_id"] == contact["id"]
            else:
                assert owner["type"] == "lead"
                assert db["crm_records"].count_documents({"email_keys": sender}) == 1
        # and nothing else came of them (the demo's own activities have no mail)
        from_mail = db["crm_activities"].count_documents({"mail.raw_id": {"$exists": True}})
        assert from_mail == len(sent)
        assert db["mail_raw"].count_documents({}) == len(sent)
        big = db["mail_raw"].find_one({"message_id": sent[BIG_ROUND][1]})
        assert big is not None and "file_id" in big  # the GridFS path was taken
    hub.stop(signal.SIGTERM)


def test_mail_is_accepted_while_the_database_is_stopped_and_stored_once_it_is_back(
    mail_hub: Hub,
) -> None:
    """The 250 waits for the node's spool, not for the database: with the database process
    stopped (SIGSTOP: it answers nothing), messages still get their 250 at once, and once it
    runs again each is stored and processed exactly once."""
    hub = mail_hub
    hub.start()
    db_pid = hub.database_pid()
    spool = hub.data_dir / "mail-spool"
    sent: list[str] = []
    os.kill(db_pid, signal.SIGSTOP)
    try:
        for round_no in (0, 2, 4):  # from the contact's address, small
            sender, message_id, raw = message(round_no)
            began = time.monotonic()
            send(hub, sender, raw)
            # well inside the database client's timeouts: nothing waited for the database
            assert time.monotonic() - began < 10
            sent.append(message_id)
        assert sum(p.stat().st_size for p in spool.glob("*.seg")) > 0
    finally:
        os.kill(db_pid, signal.SIGCONT)
    for message_id in sent:
        wait_processed(hub, message_id, PROMPT_SECONDS)
    with database(hub) as client:
        db = client["portalhub"]
        for message_id in sent:
            assert db["mail_raw"].count_documents({"message_id": message_id}) == 1
            activities = db["crm_activities"].count_documents(
                {"mail.incoming_message_id": message_id}
            )
            assert activities == 1, message_id
    hub.stop(signal.SIGTERM)
