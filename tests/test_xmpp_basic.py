"""XMPP with a real client (slixmpp) over TLS: login mechanisms, roster, chat with the web."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from scramp import ScramMechanism
from slixmpp import JID

from server.xmpp.sasl import ITERATIONS, SCRAM_MECHANISMS
from tests.harness import DEFAULT_PASSWORD, HubHarness
from tests.xmpp_client import xmpp_login


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
async def test_login_with_each_mechanism_over_starttls(hub: HubHarness, mechanism: str) -> None:
    alice_id, _ = await hub.create_user("alice")
    client = await xmpp_login(hub, "alice", mechanism=mechanism)
    xmpp = hub.services.xmpp
    assert xmpp is not None
    assert str(client.boundjid) == f"alice@{xmpp.domain}/test"
    [session] = xmpp.sessions_of(alice_id)
    assert session.mechanism == mechanism and session.tls


async def test_direct_tls_port(hub: HubHarness) -> None:
    await hub.create_user("alice")
    client = await xmpp_login(hub, "alice", direct_tls=True)
    assert client.boundjid.resource == "test"


async def test_wrong_password_fails(hub: HubHarness) -> None:
    await hub.create_user("alice")
    with pytest.raises(ConnectionError):
        await xmpp_login(hub, "alice", password="wrong password")


async def test_chat_with_a_web_user_both_ways(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    _, bob_token = await hub.create_user("bob")
    web = await hub.connect(bob_token)
    await web.wait_for("snapshot")
    jabber = await xmpp_login(hub, "alice")
    domain = hub.services.xmpp.domain  # type: ignore[union-attr]
    jabber.send_message(mto=JID(f"bob@{domain}"), mbody="hello from pidgin", mtype="chat")
    await web.wait_until(
        lambda: any(
            e["data"]["message"]["text"] == "hello from pidgin" for e in web.of_type("im.message")
        )
    )
    [event] = web.of_type("im.message")
    chat_id = event["data"]["message"]["chat_id"]
    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=bob_token,
        json={"chat_id": chat_id, "text": "hi from the web"},
    )
    assert resp.status == 201
    await jabber.wait_for_condition(lambda: "hi from the web" in jabber.bodies())
    history = await hub.request("GET", f"/api/v1/im/chats/{chat_id}/messages", token=bob_token)
    assert [m["text"] for m in history.body] == ["hello from pidgin", "hi from the web"]
    assert history.body[0]["author_id"] == alice_id


async def test_scram_verifiers_of_an_older_count_still_work_and_are_renewed(
    hub: HubHarness,
) -> None:
    """Verifiers carry their iteration count: those of another count (an older default) keep
    working and are derived again, at today's count, the next time the password is seen."""
    alice_id, _ = await hub.create_user("alice")
    users = hub.services.store.users
    fresh = await users.find_one({"_id": alice_id})
    assert fresh is not None
    assert {v["iterations"] for v in fresh["scram"].values()} == {ITERATIONS}
    older: dict[str, Any] = {}
    for name in SCRAM_MECHANISMS:
        salt, stored_key, server_key, count = ScramMechanism(name).make_auth_info(
            DEFAULT_PASSWORD, iteration_count=20_000
        )
        older[name.replace("-", "_")] = {
            "salt": base64.b64encode(salt).decode(),
            "stored_key": base64.b64encode(stored_key).decode(),
            "server_key": base64.b64encode(server_key).decode(),
            "iterations": count,
        }
    await users.update_one({"_id": alice_id}, {"$set": {"scram": older}})
    for mechanism in SCRAM_MECHANISMS:
        client = await xmpp_login(hub, "alice", mechanism=mechanism, resource=mechanism)
        assert client.boundjid.resource == mechanism
    with pytest.raises(ConnectionError):
        await xmpp_login(hub, "alice", password="not the password", mechanism="SCRAM-SHA-1")
    await hub.login("alice")  # the password, seen on the web
    renewed = await users.find_one({"_id": alice_id})
    assert renewed is not None
    assert {v["iterations"] for v in renewed["scram"].values()} == {ITERATIONS}
    client = await xmpp_login(hub, "alice", mechanism="SCRAM-SHA-1", resource="after")
    assert client.boundjid.resource == "after"
