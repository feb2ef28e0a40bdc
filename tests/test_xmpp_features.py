"""XMPP features against the portal: roster, presence, offline delivery, carbons, MAM, pings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError

from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub
from tests.xmpp_client import XmppClient, xmpp_login


def domain(hub: HubHarness) -> str:
    xmpp = hub.services.xmpp
    assert xmpp is not None
    return xmpp.domain


async def send_web(hub: HubHarness, token: str, **body: Any) -> dict[str, Any]:
    resp = await hub.request("POST", "/api/v1/im/messages", token=token, json=body)
    assert resp.status == 201, resp.body
    message: dict[str, Any] = resp.body["messages"][0]
    return message


async def test_roster_is_the_company_grouped_by_department_with_pushes(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    top = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Acme"})
    sales = await hub.request(
        "POST",
        "/api/v1/departments",
        token=admin,
        json={"name": "Sales", "parent_id": top.body["id"]},
    )
    await hub.create_user("alice", department_id=sales.body["id"], first_name="Alice")
    await hub.create_user("bob", department_id=top.body["id"], first_name="Bob", last_name="B")
    client = await xmpp_login(hub, "alice")
    d = domain(hub)
    roster = client.client_roster
    assert roster[JID(f"bob@{d}")]["name"] == "Bob B"
    assert roster[JID(f"bob@{d}")]["groups"] == ["Acme"]
    assert roster[JID(f"bob@{d}")]["subscription"] == "both"
    assert JID(f"alice@{d}") not in list(roster.keys())

    # a new employee is pushed, with a nested group
    created = await hub.request(
        "POST",
        "/api/v1/users",
        token=admin,
        json={
            "login": "carol",
            "email": "carol@example.test",
            "first_name": "Carol",
            "department_id": sales.body["id"],
        },
    )
    assert created.status == 201
    await client.wait_for_condition(lambda: JID(f"carol@{d}") in list(roster.keys()))
    assert roster[JID(f"carol@{d}")]["groups"] == ["Acme/Sales"]
    # deactivated: removed from the roster
    await hub.request("DELETE", f"/api/v1/users/{created.body['id']}", token=admin)
    await client.wait_for_condition(lambda: JID(f"carol@{d}") not in list(roster.keys()))
    # the roster cannot be edited by the client
    with pytest.raises(IqError) as refused:
        pending = client.update_roster(JID(f"bob@{d}"), name="Bobby", timeout=5)
        assert pending is not None
        await pending
    assert refused.value.condition == "not-allowed"


async def test_presence_flows_between_web_and_jabber(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    web = await hub.connect(bob)
    web.keep_alive()
    await web.wait_for("snapshot")
    client = await xmpp_login(hub, "alice")
    d = domain(hub)

    def seen_by_web(status: str) -> bool:
        return any(
            c["user_id"] == alice_id and c["status"] == status
            for c in web.of_type("presence.changed")
        )

    def seen_by_jabber(show: str) -> bool:
        return any(
            p["from"].bare == f"bob@{d}"
            and (p["show"] or "available") == show
            and p["type"] != "unavailable"
            for p in client.presences
        )

    await web.wait_until(lambda: seen_by_web("online"))
    await client.wait_for_condition(lambda: seen_by_jabber("available"))  # initial presence
    client.send_presence(pshow="dnd")
    await web.wait_until(lambda: seen_by_web("dnd"))
    client.send_presence(pshow="away")
    await web.wait_until(lambda: seen_by_web("away"))

    resp = await hub.request("PUT", "/api/v1/presence/me", token=bob, json={"status": "dnd"})
    assert resp.status == 200
    await client.wait_for_condition(lambda: seen_by_jabber("dnd"))
    client.disconnect()
    await web.wait_until(lambda: seen_by_web("offline"))
    assert bob_id != alice_id


async def test_offline_messages_arrive_with_delay_once(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    await hub.create_user("bob")
    bob_doc = await hub.services.directory.user_by_login("bob")
    assert bob_doc is not None
    first = await send_web(hub, alice, to=[str(bob_doc["_id"])], text="while you were out")
    await send_web(hub, alice, chat_id=first["chat_id"], text="and this too")
    client = await xmpp_login(hub, "bob", plugins=("xep_0203",))
    await client.wait_for_condition(lambda: len(client.bodies()) == 2)
    assert client.bodies() == ["while you were out", "and this too"]
    stamps = [m["delay"]["stamp"] for m in client.messages]
    assert all(s is not None for s in stamps) and stamps == sorted(stamps)
    client.disconnect()
    await client.gone.wait()
    again = await xmpp_login(hub, "bob", resource="second")
    await asyncio.sleep(0.5)
    assert again.bodies() == []  # delivered once


async def test_carbons_reach_the_second_resource(hub: HubHarness) -> None:
    await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    d = domain(hub)
    laptop = await xmpp_login(hub, "alice", resource="laptop", plugins=("xep_0280",))
    phone = await xmpp_login(hub, "alice", resource="phone", plugins=("xep_0280",))
    carbons: list[Any] = []
    phone.add_event_handler("carbon_sent", carbons.append)
    await phone.plugin["xep_0280"].enable()
    web = await hub.connect(bob)
    await web.wait_for("snapshot")
    laptop.send_message(mto=JID(f"bob@{d}"), mbody="from the laptop", mtype="chat")
    await phone.wait_for_condition(lambda: len(carbons) == 1)
    assert carbons[0]["carbon_sent"]["body"] == "from the laptop"
    assert carbons[0]["carbon_sent"]["to"].bare == f"bob@{d}"
    # a message from the web reaches both resources
    chat_id = (await web.wait_for("im.message"))[0]["data"]["message"]["chat_id"]
    await send_web(hub, bob, chat_id=chat_id, text="to every device")
    for device in (laptop, phone):
        await device.wait_for_condition(lambda c=device: "to every device" in c.bodies())  # type: ignore[misc]
    assert bob_id


async def test_mam_returns_messages_written_on_the_web(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    d = domain(hub)
    first = await send_web(hub, alice, to=[bob_id], text="one")
    await send_web(hub, bob, chat_id=first["chat_id"], text="two")
    await send_web(hub, alice, chat_id=first["chat_id"], text="three")
    client = await xmpp_login(hub, "alice", plugins=("xep_0313", "xep_0059"))
    result = await client.plugin["xep_0313"].retrieve(with_jid=JID(f"bob@{d}"), timeout=10)
    bodies = [str(m["mam_result"]["forwarded"]["stanza"]["body"]) for m in result["mam"]["results"]]
    assert bodies == ["one", "two", "three"]
    senders = [
        m["mam_result"]["forwarded"]["stanza"]["from"].bare for m in result["mam"]["results"]
    ]
    assert senders == [f"alice@{d}", f"bob@{d}", f"alice@{d}"]
    paged = await client.plugin["xep_0313"].retrieve(
        with_jid=JID(f"bob@{d}"), rsm={"max": 2}, timeout=10
    )
    assert len(paged["mam"]["results"]) == 2
    assert str(paged["mam_fin"]["complete"]).lower() == "false"


@pytest.fixture
async def quick_ping_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    tuned = settings.model_copy(
        update={"xmpp_ping_interval_seconds": 0.5, "xmpp_ping_timeout_seconds": 1.0}
    )
    async with start_hub(tuned, store) as hub:
        yield hub


async def test_unanswered_pings_mark_the_user_offline(quick_ping_hub: HubHarness) -> None:
    hub = quick_ping_hub
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    web = await hub.connect(bob)
    web.keep_alive()
    await web.wait_for("snapshot")
    client = await xmpp_login(hub, "alice")

    def seen(status: str) -> bool:
        return any(
            c["user_id"] == alice_id and c["status"] == status
            for c in web.of_type("presence.changed")
        )

    await web.wait_until(lambda: seen("online"))
    await asyncio.sleep(1.5)  # pings answered by slixmpp: still online
    assert not seen("offline")
    # the client stops reading: its socket is frozen, nothing answers the pings any more
    transport: Any = client.transport
    transport.pause_reading()
    client.plugin["xep_0199"].disable_keepalive()  # type: ignore[no-untyped-call]
    await web.wait_until(lambda: seen("offline"), timeout=15)
    assert isinstance(client, XmppClient)


async def test_chat_states_and_markers_map_to_typing_and_read(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    d = domain(hub)
    client = await xmpp_login(hub, "alice", plugins=("xep_0085", "xep_0333"))
    web = await hub.connect(bob)
    await web.wait_for("snapshot")
    message = await send_web(hub, bob, to=[alice_id], text="are you there?")
    await client.wait_for_condition(lambda: "are you there?" in client.bodies())
    assert (await hub.request("GET", "/api/v1/im/counters", token=bob)).body["unread"] == 0

    typing = client.make_message(mto=JID(f"bob@{d}"), mtype="chat")
    typing["chat_state"] = "composing"
    typing.send()
    [event] = await web.wait_for("im.typing")
    assert event == {"chat_id": message["chat_id"], "user_id": alice_id}

    alice_unread = await hub.services.im.counters(alice_id)
    assert alice_unread.unread == 1
    client.plugin["xep_0333"].send_marker(JID(f"bob@{d}"), message["id"], "displayed")
    reads = await web.wait_for("im.read")
    assert reads[0] == {"chat_id": message["chat_id"], "user_id": alice_id, "up_to": message["id"]}
    assert (await hub.services.im.counters(alice_id)).unread == 0


async def test_web_typing_ends_in_paused_for_jabber_contacts(hub: HubHarness) -> None:
    """The web says when typing starts (im.typing, at most every 3 s while keys are pressed)
    and never when it stops: Jabber contacts get <composing/>, then <paused/> once no new
    typing came for as long as the web shows it, so their indicator does not stay on; a
    message ends the typing without a paused (it carries <active/>)."""
    import time

    from server.xmpp.modules.typing import PAUSED_AFTER_SECONDS

    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    d = domain(hub)
    client = await xmpp_login(hub, "alice", plugins=("xep_0085",))
    states: list[tuple[str, float]] = []
    client.add_event_handler(
        "chatstate", lambda m: states.append((str(m["chat_state"]), time.monotonic()))
    )
    web = await hub.connect(bob)
    await web.wait_for("snapshot")
    message = await send_web(hub, bob, to=[alice_id], text="hello")
    await client.wait_for_condition(lambda: "hello" in client.bodies())
    states.clear()
    assert (await web.call("im.typing", {"chat_id": message["chat_id"]}))["ok"] is True
    await client.wait_for_condition(lambda: [s for s, _ in states] == ["composing"])
    await client.wait_for_condition(
        lambda: [s for s, _ in states] == ["composing", "paused"],
        timeout=PAUSED_AFTER_SECONDS + 5,
    )
    (_, typed), (_, paused) = states
    assert paused - typed >= PAUSED_AFTER_SECONDS - 1  # not at once: after the web's window
    assert all(m["from"].bare == f"bob@{d}" for m in client.messages if m["chat_state"])
    # typing, then the message: no paused after it
    states.clear()
    await web.call("im.typing", {"chat_id": message["chat_id"]})
    await client.wait_for_condition(lambda: [s for s, _ in states] == ["composing"])
    await send_web(hub, bob, chat_id=message["chat_id"], text="done typing")
    await client.wait_for_condition(lambda: "done typing" in client.bodies())
    await asyncio.sleep(PAUSED_AFTER_SECONDS + 1)
    assert "paused" not in [s for s, _ in states], states
    # the node's last session gone: no timer left running (a drain does not wait for one)
    xmpp = hub.services.xmpp
    assert xmpp is not None
    states.clear()
    await web.call("im.typing", {"chat_id": message["chat_id"]})
    await client.wait_for_condition(lambda: [s for s, _ in states] == ["composing"])
    assert len(xmpp.bridge.pauses) == 1
    client.disconnect()
    await client.gone.wait()
    await web.wait_until(  # well before the timer would have ended by itself
        lambda: xmpp.session_count == 0 and len(xmpp.bridge.pauses) == 0,
        timeout=PAUSED_AFTER_SECONDS / 2,
    )


async def test_vcard_version_and_disco(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    dept = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Ops"})
    await hub.create_user("alice")
    await hub.create_user(
        "bob",
        first_name="Bob",
        last_name="Stone",
        position="Engineer",
        department_id=dept.body["id"],
        phones=[{"type": "mobile", "number": "+1 555 0101"}],
    )
    d = domain(hub)
    client = await xmpp_login(hub, "alice", plugins=("xep_0054", "xep_0092"))
    card = await client.plugin["xep_0054"].get_vcard(JID(f"bob@{d}"), timeout=10)
    vcard = card["vcard_temp"]
    assert vcard["FN"] == "Bob Stone" and vcard["TITLE"] == "Engineer"
    assert vcard["ORG"]["ORGUNIT"] == "Ops"
    version = await client.plugin["xep_0092"].get_version(JID(d), timeout=10)
    assert version["software_version"]["name"] == "Portal Hub"
    info = await client.plugin["xep_0030"].get_info(jid=JID(d), timeout=10)
    features = set(info["disco_info"]["features"])
    assert {
        "urn:xmpp:ping",
        "urn:xmpp:carbons:2",
        "urn:xmpp:mam:2",
        "vcard-temp",
        "jabber:iq:roster",
    } <= features
    account = await client.plugin["xep_0030"].get_info(jid=JID(f"alice@{d}"), timeout=10)
    assert "urn:xmpp:mam:2" in account["disco_info"]["features"]


async def test_client_state_indication_holds_presence_until_active(hub: HubHarness) -> None:
    await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    d = domain(hub)
    web = await hub.connect(bob)
    web.keep_alive()
    await web.wait_for("snapshot")
    client = await xmpp_login(hub, "alice")

    def shows() -> list[str]:
        return [
            p["show"] or "available"
            for p in client.presences
            if p["from"].bare == f"bob@{d}" and p["type"] != "unavailable"
        ]

    await client.wait_for_condition(lambda: shows() == ["available"])
    client.send_raw("<inactive xmlns='urn:xmpp:csi:0'/>")
    await asyncio.sleep(0.2)
    await hub.request("PUT", "/api/v1/presence/me", token=bob, json={"status": "away"})
    await hub.request("PUT", "/api/v1/presence/me", token=bob, json={"status": "dnd"})
    await asyncio.sleep(0.5)
    assert shows() == ["available"]  # held while inactive
    client.send_raw("<active xmlns='urn:xmpp:csi:0'/>")
    await client.wait_for_condition(lambda: shows() == ["available", "dnd"])  # the latest only
