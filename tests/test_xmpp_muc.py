"""Group chats as MUC rooms (XEP-0045), with real slixmpp clients over TLS and a web user."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError, PresenceError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.harness import HubHarness
from tests.xmpp_client import XmppClient, xmpp_login

MUC_USER = "{http://jabber.org/protocol/muc#user}"
SID = "{urn:xmpp:sid:0}"
CORRECT = "{urn:xmpp:message-correct:0}"
RETRACT = "{urn:xmpp:message-retract:1}"
COMPOSING = "{http://jabber.org/protocol/chatstates}composing"
PAUSED = "{http://jabber.org/protocol/chatstates}paused"


def domain_of(hub: HubHarness) -> str:
    xmpp = hub.services.xmpp
    assert xmpp is not None
    return xmpp.domain


async def muc_login(hub: HubHarness, login: str) -> XmppClient:
    """A client with MUC; presence from rooms (which slixmpp keeps from its ``presence``
    event) is recorded in ``client.presences`` too."""
    client = await xmpp_login(hub, login, plugins=("xep_0045",))

    def from_room(presence: Any) -> None:
        if presence["from"].domain.startswith("conference."):
            client.presences.append(presence)

    client.register_handler(
        Callback("room presence", MatchXPath("{jabber:client}presence"), from_room)
    )
    return client


def record_stanzas(client: XmppClient, tag: str = "message") -> list[Any]:
    """Every stanza of a kind, body or not (the client's own lists keep only some)."""
    seen: list[Any] = []
    client.register_handler(
        Callback(f"all {tag}", MatchXPath(f"{{jabber:client}}{tag}"), seen.append)
    )
    return seen


async def create_group(
    hub: HubHarness, token: str, title: str, member_ids: list[str]
) -> dict[str, Any]:
    resp = await hub.request(
        "POST", "/api/v1/im/chats", token=token, json={"title": title, "member_ids": member_ids}
    )
    assert resp.status == 201, resp.body
    chat: dict[str, Any] = resp.body
    return chat


async def post(hub: HubHarness, token: str, chat_id: str, text: str) -> str:
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=token, json={"chat_id": chat_id, "text": text}
    )
    assert resp.status == 201, resp.body
    message_id: str = resp.body["messages"][0]["id"]
    return message_id


async def history(hub: HubHarness, token: str, chat_id: str) -> list[dict[str, Any]]:
    resp = await hub.request("GET", f"/api/v1/im/chats/{chat_id}/messages", token=token)
    assert resp.status == 200, resp.body
    messages: list[dict[str, Any]] = resp.body
    return messages


def status_codes(stanza: Any) -> set[int]:
    return {int(s.get("code")) for s in stanza.xml.iter(f"{MUC_USER}status")}


def muc_item(stanza: Any) -> dict[str, str]:
    item = stanza.xml.find(f"{MUC_USER}x/{MUC_USER}item")
    assert item is not None, str(stanza)
    return dict(item.attrib)


def presences_from(client: XmppClient, jid: str, kind: str | None = None) -> list[Any]:
    return [
        p for p in client.presences if str(p["from"]) == jid and (kind is None or p["type"] == kind)
    ]


async def join(
    client: XmppClient, room: JID, nick: str, **options: Any
) -> tuple[Any, Any, list[Any], list[Any]]:
    """Join; the occupants returned are the others (slixmpp lists the self-presence too)."""
    muc = client.plugin["xep_0045"]
    own, subject, occupants, backlog = await muc.join_muc_wait(room, nick, timeout=10, **options)
    return own, subject, [p for p in occupants if 110 not in status_codes(p)], backlog


def send_groupchat(client: XmppClient, room: JID, body: str, ident: str, *extra: str) -> None:
    message = client.make_message(mto=room, mbody=body, mtype="groupchat")
    message["id"] = ident
    for xml in extra:
        message.xml.append(ET.fromstring(xml))
    message.send()


async def test_members_join_with_history_and_talk_with_the_web(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    _, carol = await hub.create_user("carol")
    web = await hub.connect(carol)
    await web.wait_for("snapshot")
    chat = await create_group(hub, carol, "Plans", [alice_id, bob_id])
    for text in ("first", "second", "third"):
        await post(hub, carol, chat["id"], text)
    domain = domain_of(hub)
    room = JID(f"{chat['id']}@conference.{domain}")

    alice = await muc_login(hub, "alice")
    own, subject, occupants, backlog = await join(alice, room, "alice", maxstanzas=2)
    assert [str(m["body"]) for m in backlog] == ["second", "third"]
    assert {str(m["from"]) for m in backlog} == {f"{room}/carol"}
    assert all(m["type"] == "groupchat" and m["delay"]["stamp"] for m in backlog)
    assert str(subject["subject"]) == "Plans"
    assert occupants == []
    assert str(own["from"]) == f"{room}/alice"
    assert status_codes(own) >= {110, 100}
    assert muc_item(own) == {
        "affiliation": "member",
        "role": "participant",
        "jid": f"alice@{domain}/test",
    }

    bob = await muc_login(hub, "bob")
    _, _, occupants, backlog = await join(bob, room, "Bobby")
    assert [str(m["body"]) for m in backlog] == ["first", "second", "third"]  # 20 by default
    assert [str(p["from"]) for p in occupants] == [f"{room}/alice"]
    assert muc_item(occupants[0])["jid"] == f"alice@{domain}/test"
    await alice.wait_for_condition(lambda: bool(presences_from(alice, f"{room}/Bobby")))
    [arrival] = presences_from(alice, f"{room}/Bobby")
    assert muc_item(arrival)["jid"] == f"bob@{domain}/test"
    assert 110 not in status_codes(arrival)

    # the member list (read-only: members are managed in the portal)
    muc = alice.plugin["xep_0045"]
    owners = await muc.get_affiliation_list(room, "owner", timeout=10)
    members = await muc.get_affiliation_list(room, "member", timeout=10)
    assert [str(j) for j in owners] == [f"carol@{domain}"]
    assert sorted(str(j) for j in members) == [f"alice@{domain}", f"bob@{domain}"]
    with pytest.raises(IqError) as refused:
        await muc.set_affiliation(room, "member", jid=JID(f"dave@{domain}"), timeout=10)
    assert refused.value.condition == "forbidden"

    # web -> XMPP: a groupchat message from the author's nick, with the portal's id
    message_id = await post(hub, carol, chat["id"], "hello room")
    await alice.wait_for_condition(lambda: "hello room" in alice.bodies())
    [live] = [m for m in alice.messages if str(m["body"]) == "hello room"]
    assert live["type"] == "groupchat" and str(live["from"]) == f"{room}/carol"
    assert live["id"] == message_id and live.xml.find("{urn:xmpp:delay}delay") is None
    stanza_id = live.xml.find(f"{SID}stanza-id")
    assert stanza_id is not None and stanza_id.attrib == {"id": message_id, "by": str(room)}

    # XMPP -> web: a portal message by bob; every occupant gets it, bob's echo keeps his id
    send_groupchat(bob, room, "hi from bob", "bob-1")
    await web.wait_until(
        lambda: any(
            e["data"]["message"]["text"] == "hi from bob" for e in web.of_type("im.message")
        )
    )
    event = web.of_type("im.message")[-1]["data"]["message"]
    assert event["author_id"] == bob_id and event["chat_id"] == chat["id"]
    await alice.wait_for_condition(lambda: "hi from bob" in alice.bodies())
    [seen] = [m for m in alice.messages if str(m["body"]) == "hi from bob"]
    # (others see the id bob's client gave it, as on other servers; the portal's is the
    # room's stanza-id)
    assert str(seen["from"]) == f"{room}/Bobby" and seen["id"] == "bob-1"
    seen_sid = seen.xml.find(f"{SID}stanza-id")
    assert seen_sid is not None and seen_sid.get("id") == event["id"]
    await bob.wait_for_condition(lambda: "hi from bob" in bob.bodies())
    [echo] = [m for m in bob.messages if str(m["body"]) == "hi from bob"]
    assert str(echo["from"]) == f"{room}/Bobby" and echo["id"] == "bob-1"

    # a resent stanza stores nothing new, but is echoed again
    send_groupchat(bob, room, "hi from bob", "bob-1")
    await bob.wait_for_condition(lambda: bob.bodies().count("hi from bob") == 2)
    texts = [m["text"] for m in await history(hub, carol, chat["id"])]
    assert texts == ["first", "second", "third", "hello room", "hi from bob"]
    await asyncio.sleep(0.2)
    assert alice.bodies().count("hi from bob") == 1


async def test_non_members_are_refused_and_disco_lists_members_rooms(hub: HubHarness) -> None:
    alice_id, alice_token = await hub.create_user("alice")
    await hub.create_user("eve")
    chat = await create_group(hub, alice_token, "Board", [])
    await create_group(hub, alice_token, "Other", [])
    domain = domain_of(hub)
    service = f"conference.{domain}"
    room = JID(f"{chat['id']}@{service}")

    eve = await muc_login(hub, "eve")
    with pytest.raises(PresenceError) as refused:
        await join(eve, room, "eve")
    assert refused.value.condition == "registration-required"
    with pytest.raises(PresenceError) as unknown:
        await join(eve, JID(f"newroom@{service}"), "eve")
    assert unknown.value.condition == "registration-required"
    # not joined: its groupchat message is refused, and nothing is stored
    eve_messages = record_stanzas(eve)
    send_groupchat(eve, room, "let me in", "eve-1")
    await eve.wait_for_condition(lambda: any(m["type"] == "error" for m in eve_messages))
    [error] = [m for m in eve_messages if m["type"] == "error"]
    assert error["error"]["condition"] == "not-acceptable"
    assert await history(hub, alice_token, chat["id"]) == []

    disco = eve.plugin["xep_0030"]
    server_items = await disco.get_items(jid=JID(domain), timeout=10)
    assert service in {str(item[0]) for item in server_items["disco_items"]["items"]}
    info = await disco.get_info(jid=JID(service), timeout=10)
    assert ("conference", "text") in {i[:2] for i in info["disco_info"]["identities"]}
    assert "http://jabber.org/protocol/muc" in info["disco_info"]["features"]
    eve_rooms = await disco.get_items(jid=JID(service), timeout=10)
    assert not eve_rooms["disco_items"]["items"]
    with pytest.raises(IqError) as hidden:
        await disco.get_info(jid=room, timeout=10)
    assert hidden.value.condition == "item-not-found"

    alice = await muc_login(hub, "alice")
    rooms = await alice.plugin["xep_0030"].get_items(jid=JID(service), timeout=10)
    listed = {str(jid): name for jid, _node, name in rooms["disco_items"]["items"]}
    assert listed[str(room)] == "Board" and len(listed) == 2
    room_info = await alice.plugin["xep_0030"].get_info(jid=room, timeout=10)
    features = set(room_info["disco_info"]["features"])
    assert {
        "http://jabber.org/protocol/muc",
        "muc_membersonly",
        "muc_persistent",
        "muc_nonanonymous",
        "muc_unsecured",
    } <= features
    [identity] = room_info["disco_info"]["identities"]
    assert identity[0] == "conference" and identity[1] == "text" and identity[3] == "Board"
    assert alice_id in chat["member_ids"]


async def test_nicks_are_ones_own(hub: HubHarness) -> None:
    alice_id, alice_token = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    await hub.create_user("carol")
    chat = await create_group(hub, alice_token, "Nicks", [bob_id])
    room = JID(f"{chat['id']}@conference.{domain_of(hub)}")
    alice = await muc_login(hub, "alice")
    await join(alice, room, "Al")
    bob = await muc_login(hub, "bob")
    for taken in ("al", "carol", "alice"):  # another occupant's nick, other users' logins
        with pytest.raises(PresenceError) as refused:
            await join(bob, room, taken)
        assert refused.value.condition == "conflict"
    _, _, occupants, _ = await join(bob, room, "B")
    assert [str(p["from"]) for p in occupants] == [f"{room}/Al"]

    # a web message by an occupant comes from the nick they joined with
    await post(hub, alice_token, chat["id"], "from the web")
    await bob.wait_for_condition(lambda: "from the web" in bob.bodies())
    [seen] = [m for m in bob.messages if str(m["body"]) == "from the web"]
    assert str(seen["from"]) == f"{room}/Al"
    assert alice_id in chat["member_ids"]


async def test_leaving_ending_the_session_and_removal(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    _, carol = await hub.create_user("carol")
    chat = await create_group(hub, carol, "Crew", [alice_id, bob_id])
    room = JID(f"{chat['id']}@conference.{domain_of(hub)}")
    alice = await muc_login(hub, "alice")
    await join(alice, room, "alice")
    bob = await muc_login(hub, "bob")
    await join(bob, room, "bob")
    bob_jid = f"{room}/bob"
    await bob.plugin["xep_0199"].send_ping(JID(bob_jid), timeout=10)  # XEP-0410: joined

    # leaving: bob gets his own unavailable presence, alice sees him go
    bob.send_presence(ptype="unavailable", pto=bob_jid)
    await alice.wait_for_condition(lambda: bool(presences_from(alice, bob_jid, "unavailable")))
    await bob.wait_for_condition(lambda: bool(presences_from(bob, bob_jid, "unavailable")))
    assert 110 in status_codes(presences_from(bob, bob_jid, "unavailable")[0])
    assert 110 not in status_codes(presences_from(alice, bob_jid, "unavailable")[0])
    with pytest.raises(IqError) as gone:
        await bob.plugin["xep_0199"].send_ping(JID(bob_jid), timeout=10)
    assert gone.value.condition == "not-acceptable"
    # and is no occupant any more: his messages are refused
    bob_messages = record_stanzas(bob)
    send_groupchat(bob, room, "still here?", "bob-x")
    await bob.wait_for_condition(lambda: any(m["type"] == "error" for m in bob_messages))
    assert all(m["text"] != "still here?" for m in await history(hub, carol, chat["id"]))

    # ending the session leaves every room
    await join(bob, room, "bob")
    await alice.wait_for_condition(lambda: len(presences_from(alice, bob_jid)) == 3)
    bob.disconnect()
    await alice.wait_for_condition(lambda: len(presences_from(alice, bob_jid, "unavailable")) == 2)

    # removal from the chat on the web: out of the room with status 321
    bob = await muc_login(hub, "bob")
    await join(bob, room, "bob")
    removed = await hub.request(
        "DELETE", f"/api/v1/im/chats/{chat['id']}/members/{alice_id}", token=carol
    )
    assert removed.status == 204
    alice_jid = f"{room}/alice"
    await alice.wait_for_condition(lambda: bool(presences_from(alice, alice_jid, "unavailable")))
    [own] = presences_from(alice, alice_jid, "unavailable")
    assert status_codes(own) == {110, 321}
    assert muc_item(own)["affiliation"] == "none"
    await bob.wait_for_condition(lambda: bool(presences_from(bob, alice_jid, "unavailable")))
    assert status_codes(presences_from(bob, alice_jid, "unavailable")[0]) == {321}
    with pytest.raises(PresenceError) as refused:
        await join(alice, room, "alice")
    assert refused.value.condition == "registration-required"


async def test_corrections_retractions_and_typing(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    _, carol = await hub.create_user("carol")
    web = await hub.connect(carol)
    await web.wait_for("snapshot")
    chat = await create_group(hub, carol, "Edits", [alice_id, bob_id])
    room = JID(f"{chat['id']}@conference.{domain_of(hub)}")
    alice = await muc_login(hub, "alice")
    alice_messages = record_stanzas(alice)
    await join(alice, room, "alice")
    bob = await muc_login(hub, "bob")
    bob_messages = record_stanzas(bob)
    await join(bob, room, "bob")

    # web edits and deletions reach occupants as corrections and retractions
    message_id = await post(hub, carol, chat["id"], "draft")
    edited = await hub.request(
        "PATCH", f"/api/v1/im/messages/{message_id}", token=carol, json={"text": "final"}
    )
    assert edited.status == 200
    await alice.wait_for_condition(lambda: "final" in alice.bodies())
    [fix] = [m for m in alice.messages if str(m["body"]) == "final"]
    replace = fix.xml.find(f"{CORRECT}replace")
    assert replace is not None and replace.get("id") == message_id
    assert str(fix["from"]) == f"{room}/carol"
    deleted = await hub.request("DELETE", f"/api/v1/im/messages/{message_id}", token=carol)
    assert deleted.status == 204
    await alice.wait_for_condition(
        lambda: any(m.xml.find(f"{RETRACT}retract") is not None for m in alice_messages)
    )
    [retraction] = [m for m in alice_messages if m.xml.find(f"{RETRACT}retract") is not None]
    assert retraction.xml.find(f"{RETRACT}retract").get("id") == message_id

    # an XMPP correction edits the portal message (no second message); so does a retraction
    send_groupchat(bob, room, "tpyo", "b-1")
    await alice.wait_for_condition(lambda: "tpyo" in alice.bodies())
    send_groupchat(bob, room, "typo", "b-2", f'<replace xmlns="{CORRECT[1:-1]}" id="b-1"/>')
    await web.wait_until(
        lambda: any(
            e["data"]["message"]["text"] == "typo" for e in web.of_type("im.message.updated")
        )
    )
    [stored] = [m for m in await history(hub, carol, chat["id"]) if not m["deleted"]]
    assert stored["text"] == "typo" and stored["edited_at"] and stored["author_id"] == bob_id
    await alice.wait_for_condition(lambda: "typo" in alice.bodies())
    [alice_fix] = [m for m in alice.messages if str(m["body"]) == "typo"]
    # (everyone saw bob's message under the id his client gave it)
    assert alice_fix.xml.find(f"{CORRECT}replace").get("id") == "b-1"
    await bob.wait_for_condition(lambda: "typo" in bob.bodies())
    [bob_fix] = [m for m in bob.messages if str(m["body"]) == "typo"]
    assert bob_fix.xml.find(f"{CORRECT}replace").get("id") == "b-1"
    send_groupchat(
        bob, room, "retracted", "b-3", f'<retract xmlns="{RETRACT[1:-1]}" id="{stored["id"]}"/>'
    )
    await web.wait_until(lambda: len(web.of_type("im.message.deleted")) == 2)
    await alice.wait_for_condition(
        lambda: any(
            m.xml.find(f"{RETRACT}retract") is not None
            and m.xml.find(f"{RETRACT}retract").get("id") == "b-1"
            for m in alice_messages
        )
    )
    assert all(m["deleted"] for m in await history(hub, carol, chat["id"]))

    # typing on the web shows as a chat state from the typer's nick, not to the typer
    assert (await web.call("im.typing", {"chat_id": chat["id"]}))["ok"] is True
    await alice.wait_for_condition(
        lambda: any(m.xml.find(COMPOSING) is not None for m in alice_messages)
    )
    [typing] = [m for m in alice_messages if m.xml.find(COMPOSING) is not None]
    assert str(typing["from"]) == f"{room}/carol" and typing["type"] == "groupchat"
    # and typing in XMPP reaches the web
    composing = bob.make_message(mto=room, mtype="groupchat")
    composing.xml.append(
        ET.fromstring('<composing xmlns="http://jabber.org/protocol/chatstates"/>')
    )
    composing.send()
    await web.wait_until(
        lambda: any(
            isinstance(e, dict) and e.get("user_id") == bob_id for e in web.of_type("im.typing")
        )
    )
    await asyncio.sleep(0.2)
    typers = {str(m["from"]) for m in bob_messages if m.xml.find(COMPOSING) is not None}
    assert typers == {f"{room}/carol"}  # not his own typing back


async def test_a_rename_in_the_portal_is_the_rooms_new_subject(hub: HubHarness) -> None:
    alice_id, alice_token = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    chat = await create_group(hub, alice_token, "Old name", [bob_id])
    room = JID(f"{chat['id']}@conference.{domain_of(hub)}")
    bob = await muc_login(hub, "bob")
    _, subject, _, _ = await join(bob, room, "bob")
    assert subject["subject"] == "Old name"
    seen = record_stanzas(bob)

    resp = await hub.request(
        "PATCH", f"/api/v1/im/chats/{chat['id']}", token=alice_token, json={"title": "New name"}
    )
    assert resp.status == 200, resp.body

    def subjects() -> list[Any]:
        return [m for m in seen if m.xml.find("{jabber:client}subject") is not None]

    await bob.wait_for_condition(lambda: bool(subjects()))
    [changed] = subjects()
    assert changed["type"] == "groupchat" and str(changed["from"]) == str(room)
    assert changed.xml.findtext("{jabber:client}subject") == "New name"
    assert changed.xml.find("{jabber:client}body") is None
    # Someone joining later gets the new subject too.
    carol_id, _ = await hub.create_user("carol")
    resp = await hub.request(
        "POST",
        f"/api/v1/im/chats/{chat['id']}/members",
        token=alice_token,
        json={"user_ids": [carol_id]},
    )
    assert resp.status in (200, 201, 204), resp.body
    carol = await muc_login(hub, "carol")
    _, subject, _, _ = await join(carol, room, "carol")
    assert subject["subject"] == "New name"
    assert alice_id


async def test_thread_subject_and_paused_reach_the_occupants(hub: HubHarness) -> None:
    """A room message's <thread> and <subject> (beside a body: the message's, not the room's)
    reach every occupant's copy, the author's reflection included; typing on the web ends in
    <paused/> for the occupants, as nothing says when it stops."""
    from server.xmpp.modules.typing import PAUSED_AFTER_SECONDS

    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    _, carol = await hub.create_user("carol")
    dave_id, _ = await hub.create_user("dave")
    web = await hub.connect(carol)
    await web.wait_for("snapshot")
    chat = await create_group(hub, carol, "Threads", [alice_id, bob_id, dave_id])
    room = JID(f"{chat['id']}@conference.{domain_of(hub)}")
    alice = await muc_login(hub, "alice")
    alice_messages = record_stanzas(alice)
    await join(alice, room, "alice")
    bob = await muc_login(hub, "bob")
    bob_messages = record_stanzas(bob)
    await join(bob, room, "bob")
    room_subjects: list[Any] = []
    alice.add_event_handler("groupchat_subject", room_subjects.append)

    send_groupchat(
        bob,
        room,
        "about the release",
        "b-1",
        '<subject xmlns="jabber:client">Release</subject>',
        '<thread xmlns="jabber:client" parent="t-0">t-1</thread>',
    )
    for client, seen in ((alice, alice_messages), (bob, bob_messages)):
        await client.wait_for_condition(
            lambda c=client: "about the release" in c.bodies()  # type: ignore[misc]
        )
        [copy] = [m for m in seen if str(m["body"]) == "about the release"]
        assert str(copy["subject"]) == "Release", str(copy)
        thread = copy.xml.find("{jabber:client}thread")
        assert thread is not None and thread.text == "t-1" and thread.get("parent") == "t-0"
        assert copy["id"] == "b-1"
    assert room_subjects == []  # not taken for a change of the room's subject
    # the room's history carries them too (a new occupant's backlog)
    dave = await muc_login(hub, "dave")
    _, _, _, backlog = await join(dave, room, "dave")
    [old] = [m for m in backlog if str(m["body"]) == "about the release"]
    assert str(old["subject"]) == "Release" and str(old["thread"]) == "t-1"

    states: list[tuple[str, float]] = []
    alice.register_handler(
        Callback(
            "room states",
            MatchXPath(f"{{jabber:client}}message/{COMPOSING}"),
            lambda m: states.append(("composing", time.monotonic())),
        )
    )
    alice.register_handler(
        Callback(
            "room pauses",
            MatchXPath(f"{{jabber:client}}message/{PAUSED}"),
            lambda m: states.append(("paused", time.monotonic())),
        )
    )
    assert (await web.call("im.typing", {"chat_id": chat["id"]}))["ok"] is True
    await alice.wait_for_condition(
        lambda: [s for s, _ in states] == ["composing", "paused"],
        timeout=PAUSED_AFTER_SECONDS + 5,
    )
    (_, typed), (_, paused) = states
    assert paused - typed >= PAUSED_AFTER_SECONDS - 1
    [pause] = [m for m in alice_messages if m.xml.find(PAUSED) is not None]
    assert str(pause["from"]) == f"{room}/carol" and pause["type"] == "groupchat"
