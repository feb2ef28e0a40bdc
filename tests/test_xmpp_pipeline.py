"""XMPP sessions pipeline their messages (server/xmpp/pipeline.py): a burst is read, checked
and handed to the write path without waiting for each store, and still comes out in order:
in the history (seq order = send order), on the web, at the recipient's and the sender's other
Jabber sessions. Errors answer the stanza they concern, in their place. Past the cap of
unfinished stanzas the session stops reading; what it accepted is stored even when the client
leaves."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pymongo import MongoClient
from slixmpp import JID

from server.settings import Settings
from server.store.database import Store
from server.xmpp.session import C2SSession
from tests.harness import HubHarness, start_hub
from tests.xmpp_client import XmppClient, xmpp_login

LIMIT = 4  # xmpp_max_stanzas_in_flight of the hub below


@pytest.fixture
async def fast_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    """The messenger's and the reader's rate limits out of the way: the pipeline is the limit."""
    fast = settings.model_copy(
        update={
            "im_messages_per_second": 1_000_000.0,
            "im_message_burst": 1_000_000,
            "xmpp_read_bytes_per_second": 100_000_000.0,
            "xmpp_read_burst_bytes": 100_000_000,
            "xmpp_max_stanzas_in_flight": LIMIT,
        }
    )
    async with start_hub(fast, store) as harness:
        yield harness


@contextmanager
def slow_inserts(mongo_url: str, block_ms: int) -> Iterator[None]:
    """Every insert waits ``block_ms`` in the database (SecantusDB's ``failCommand``)."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_url)
    data = {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": block_ms}
    client.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": data})
    try:
        yield
    finally:
        client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        client.close()


def condition(error: Any) -> str:
    """The defined condition of an error stanza (slixmpp knows only some of RFC 6120's)."""
    found = error.xml.find("{jabber:client}error")
    return str(found[0].tag.rpartition("}")[2]) if found is not None and len(found) else ""


def domain(hub: HubHarness) -> str:
    assert hub.services.xmpp is not None
    return hub.services.xmpp.domain


def session_of(hub: HubHarness, user_id: str, resource: str) -> C2SSession:
    assert hub.services.xmpp is not None
    [session] = [
        s
        for s in hub.services.xmpp.sessions_of(user_id)
        if s.jid is not None and s.jid.resource == resource
    ]
    return session


def burst(client: XmppClient, to: str, texts: list[str], prefix: str = "m") -> None:
    """Everything at once: slixmpp writes the stanzas out back to back."""
    for n, text in enumerate(texts):
        message = client.make_message(mto=JID(to), mbody=text, mtype="chat")
        message["id"] = f"{prefix}{n}"
        message.send()


async def history(hub: HubHarness, token: str, chat_id: str) -> list[str]:
    """The dialog's texts, oldest first, paged through the REST API."""
    texts: list[str] = []
    before: str | None = None
    while True:
        query = f"?limit=100&before={before}" if before else "?limit=100"
        page = await hub.request("GET", f"/api/v1/im/chats/{chat_id}/messages{query}", token=token)
        assert page.status == 200, page.body
        if not page.body:
            return texts
        texts = [m["text"] for m in page.body] + texts
        before = page.body[0]["id"]


async def test_a_burst_of_500_is_stored_and_delivered_in_order_everywhere(
    fast_hub: HubHarness,
) -> None:
    hub = fast_hub
    alice_id, alice_token = await hub.create_user("alice")
    _, bob_token = await hub.create_user("bob")
    d = domain(hub)
    web = await hub.connect(bob_token)
    await web.wait_for("snapshot")
    bob = await xmpp_login(hub, "bob")
    laptop = await xmpp_login(hub, "alice", resource="laptop")
    phone = await xmpp_login(hub, "alice", resource="phone", plugins=("xep_0280",))
    carbons: list[Any] = []
    phone.add_event_handler("carbon_sent", carbons.append)
    await phone.plugin["xep_0280"].enable()

    texts = [f"line {n:03d}" for n in range(500)]
    burst(laptop, f"bob@{d}", texts)

    await bob.wait_for_condition(lambda: len(bob.bodies()) >= 500, timeout=180)
    await web.wait_for("im.message", 500, timeout=60)
    await phone.wait_for_condition(lambda: len(carbons) >= 500, timeout=60)
    assert bob.bodies() == texts  # the other user's Jabber session
    assert [str(c["carbon_sent"]["body"]) for c in carbons] == texts  # the sender's other one
    events = web.of_type("im.message")
    assert [e["data"]["message"]["text"] for e in events] == texts  # the web client
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + 500))  # gap-free, in send order
    chat_id = events[0]["data"]["message"]["chat_id"]
    assert await history(hub, alice_token, chat_id) == texts  # the one history
    # ... and the session did not wait for each store before reading the next message
    assert 1 < session_of(hub, alice_id, "laptop").pipeline.peak <= LIMIT
    assert [m for m in laptop.messages if m["type"] == "error"] == []  # no error came back


async def test_an_invalid_stanza_in_a_burst_gets_its_own_error_only(
    fast_hub: HubHarness,
) -> None:
    hub = fast_hub
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    alice = await xmpp_login(hub, "alice")
    bob = await xmpp_login(hub, "bob")
    errors: list[Any] = []
    alice.add_event_handler("message_error", errors.append)
    limit = hub.services.settings.im_max_message_chars
    texts = [f"ok {n}" for n in range(30)]
    texts[11] = "x" * (limit + 1)  # refused by the messenger: too long
    for n, text in enumerate(texts):
        to = f"nobody@{d}" if n == 20 else f"bob@{d}"  # refused by the checks: no such user
        message = alice.make_message(mto=JID(to), mbody=text, mtype="chat")
        message["id"] = f"m{n}"
        message.send()
    expected = [t for n, t in enumerate(texts) if n not in (11, 20)]
    await bob.wait_for_condition(lambda: len(bob.bodies()) >= len(expected), timeout=60)
    await alice.wait_for_condition(lambda: len(errors) >= 2)
    await asyncio.sleep(0.5)  # nothing else comes
    assert bob.bodies() == expected
    assert [(m["id"], condition(m)) for m in errors] == [
        ("m11", "policy-violation"),
        ("m20", "service-unavailable"),
    ]


async def test_a_flood_stops_reading_at_the_cap_and_loses_nothing_accepted(
    fast_hub: HubHarness, settings: Settings
) -> None:
    hub = fast_hub
    alice_id, alice_token = await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    alice = await xmpp_login(hub, "alice")
    bob = await xmpp_login(hub, "bob")
    # the dialog exists already, so the stores below are the flood's own
    bob.send_message(mto=JID(f"alice@{d}"), mbody="hello", mtype="chat")
    await alice.wait_for_condition(lambda: alice.bodies() == ["hello"])
    session = session_of(hub, alice_id, "test")
    assert settings.mongodb_url is not None
    # 2.2 MB: far more than the socket's and the reader's buffers
    texts = [f"flood {n:04d} " + "x" * 1000 for n in range(2000)]
    with slow_inserts(settings.mongodb_url.get_secret_value(), 100):
        burst(alice, f"bob@{d}", texts)
        deadline = time.monotonic() + 20
        while len(session.pipeline) < LIMIT:
            assert time.monotonic() < deadline, "the pipeline never filled"
            await asyncio.sleep(0.01)
        # Full: the session reads no further. The flood waits in the socket buffers, not
        # in the hub's memory, for as long as the stores are slow.
        for _ in range(100):
            assert len(session.pipeline) <= LIMIT
            assert len(session.reader._buffer) <= 512 * 1024  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        assert session.pipeline.peak == LIMIT
        # Gone at once (a reset: what the kernel still holds is dropped, not delivered),
        # with most of the flood unsent or unread.
        assert alice.transport is not None
        sock = alice.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        alice.abort()

    # It finishes what it read before it noticed (Prosody too handles what it has read).
    assert hub.services.xmpp is not None
    deadline = time.monotonic() + 60
    while hub.services.xmpp.sessions_of(alice_id):
        assert time.monotonic() < deadline, "the session did not end"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # the last deliveries
    got = bob.bodies()
    # What was accepted (read from the socket, the kernel's buffers included) was stored and
    # delivered, in order, with no gap: a prefix of what was sent
    assert got == texts[: len(got)] and len(got) >= LIMIT
    [dialog] = (await hub.request("GET", "/api/v1/im/dialogs", token=alice_token)).body
    assert await history(hub, alice_token, dialog["chat"]["id"]) == ["hello", *got]
