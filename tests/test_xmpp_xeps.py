"""Issue 17, second part: the XEPs of the IM compliance suites, each driven by slixmpp."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from server.im.blocking import is_blocked, normalize
from server.im.rules import private_pair_key
from server.xmpp.modules.last_activity import idle_seconds
from tests.harness import HubHarness
from tests.test_xmpp_jabber import send_raw_message
from tests.test_xmpp_muc import create_group, history, join, muc_login, post, record_stanzas
from tests.xmpp_client import XmppClient, xmpp_login


def domain(hub: HubHarness) -> str:
    xmpp = hub.services.xmpp
    assert xmpp is not None
    return xmpp.domain


async def server_features(client: XmppClient, jid: str) -> set[str]:
    info = await client.plugin["xep_0030"].get_info(jid=JID(jid), timeout=10)
    return set(info["disco_info"]["features"])


# XEP-0202 entity time --------------------------------------------------------------------------


async def test_entity_time_is_the_servers_clock(hub: HubHarness) -> None:
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    client = await xmpp_login(hub, "alice", plugins=("xep_0202",))
    assert "urn:xmpp:time" in await server_features(client, d)
    before = datetime.now(UTC)
    answer = await client.plugin["xep_0202"].get_entity_time(JID(d), timeout=10)
    # (read raw: slixmpp's getter appends a second "Z" to XEP-0082's "...Z")
    payload = answer.xml.find("{urn:xmpp:time}time")
    assert payload is not None
    utc = payload.findtext("{urn:xmpp:time}utc") or ""
    assert utc.endswith("Z"), utc
    moment = datetime.fromisoformat(utc.replace("Z", "+00:00"))
    assert abs((moment - before).total_seconds()) < 5
    assert payload.findtext("{urn:xmpp:time}tzo") == "+00:00"
    # a user's bare JID is no clock
    with pytest.raises(IqError) as refused:
        await client.plugin["xep_0202"].get_entity_time(JID(f"bob@{d}"), timeout=10)
    assert refused.value.condition == "service-unavailable"


# XEP-0012 last activity ------------------------------------------------------------------------


def test_idle_seconds_rule() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert idle_seconds("online", None, now) == 0
    assert idle_seconds("dnd", now - timedelta(hours=1), now) == 0
    assert idle_seconds("offline", now - timedelta(seconds=90), now) == 90
    assert idle_seconds("offline", datetime(2026, 1, 1, 11, 59), now) == 60  # naive is UTC
    assert idle_seconds("offline", now + timedelta(seconds=5), now) == 0  # clock skew
    assert idle_seconds("offline", None, now) is None


async def last_seconds(client: XmppClient, jid: str) -> int:
    answer = await client.plugin["xep_0012"].get_last_activity(JID(jid), timeout=10)
    return int(answer["last_activity"]["seconds"])


async def test_last_activity_of_contacts_and_server_uptime(hub: HubHarness) -> None:
    await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    carol_id, _ = await hub.create_user("carol")
    await hub.create_user("ext", external=True)  # shares no workgroup: alice cannot see them
    await hub.create_user("dave")  # never seen online
    d = domain(hub)
    # carol was last seen two minutes ago (as the presence service stored it when she left)
    await hub.services.store.users.update_one(
        {"_id": carol_id}, {"$set": {"last_seen": datetime.now(UTC) - timedelta(seconds=120)}}
    )
    web = await hub.connect(bob)
    web.keep_alive()
    await web.wait_for("snapshot")
    client = await xmpp_login(hub, "alice", plugins=("xep_0012",))
    assert "jabber:iq:last" in await server_features(client, d)
    assert "jabber:iq:last" in await server_features(client, f"bob@{d}")

    assert 0 <= await last_seconds(client, d) < 600  # the server's uptime
    assert await last_seconds(client, f"bob@{d}") == 0  # online on the web
    assert await last_seconds(client, f"bob@{d}/portal") == 0
    assert 115 <= await last_seconds(client, f"carol@{d}") <= 180
    with pytest.raises(IqError) as never:
        await last_seconds(client, f"dave@{d}")
    assert never.value.condition == "item-not-found"
    # someone alice may not see answers as a login nobody has: nothing leaks
    for hidden in (f"ext@{d}", f"nobody@{d}"):
        with pytest.raises(IqError) as refused:
            await last_seconds(client, hidden)
        assert refused.value.condition == "service-unavailable"


# XEP-0352 client state indication --------------------------------------------------------------


CHATSTATES = "{http://jabber.org/protocol/chatstates}"


async def test_inactive_client_gets_messages_at_once_but_no_chat_states(hub: HubHarness) -> None:
    await hub.create_user("alice")
    bob_id, bob_token = await hub.create_user("bob")
    d = domain(hub)
    alice = await xmpp_login(hub, "alice")
    bob = await xmpp_login(hub, "bob")
    seen = record_stanzas(alice)
    await alice.wait_for_condition(
        lambda: any(p["from"].bare == f"bob@{d}" for p in alice.presences)
    )

    def states() -> list[str]:
        return [
            part.tag.rpartition("}")[2]
            for stanza in seen
            if stanza.xml.find("{jabber:client}body") is None
            for part in stanza.xml
            if part.tag.startswith(CHATSTATES)
        ]

    # the dialog exists (web typing needs one)
    send_raw_message(bob, f"alice@{d}", "m0", body="hello")
    await alice.wait_for_condition(lambda: "hello" in alice.bodies())
    alice.send_raw("<inactive xmlns='urn:xmpp:csi:0'/>")
    await asyncio.sleep(0.2)
    before = len(alice.presences)
    for state in ("composing", "paused", "gone"):
        send_raw_message(bob, f"alice@{d}", f"s-{state}", f"<{state} xmlns='{CHATSTATES[1:-1]}'/>")
    await hub.request("PUT", "/api/v1/presence/me", token=bob_token, json={"status": "away"})
    send_raw_message(bob, f"alice@{d}", "m1", body="wake up")
    await alice.wait_for_condition(lambda: "wake up" in alice.bodies())  # at once
    await hub.request("PUT", "/api/v1/presence/me", token=bob_token, json={"status": "dnd"})
    chat = await hub.services.store["chats"].find_one({"kind": "private"})
    assert chat is not None
    assert await hub.services.im.typing(bob_id, str(chat["_id"]))  # typing on the web
    await asyncio.sleep(0.5)
    assert states() == []  # dropped, not held
    assert len(alice.presences) == before  # held

    alice.send_raw("<active xmlns='urn:xmpp:csi:0'/>")
    await alice.wait_for_condition(lambda: len(alice.presences) > before)
    await asyncio.sleep(0.3)
    shows = [p["show"] for p in alice.presences[before:] if p["from"].bare == f"bob@{d}"]
    assert shows == ["dnd"]  # the latest only
    assert states() == []  # nothing dropped comes back
    # active again: chat states flow
    send_raw_message(bob, f"alice@{d}", "s-again", f"<paused xmlns='{CHATSTATES[1:-1]}'/>")
    await alice.wait_for_condition(lambda: states() == ["paused"])


# XEP-0191 blocking command ---------------------------------------------------------------------


def test_blocklist_rules() -> None:
    assert normalize(" Bob@Example.COM. ") == "bob@example.com"
    assert normalize("bob@example.com/Laptop") == "bob@example.com/Laptop"
    assert normalize("example.com") == "example.com"
    for bad in ("", "@example.com", "bob@", "bob@example.com/", "a b@example.com", "x\x00y"):
        assert normalize(bad) is None, bad
    items = {"bob@example.com", "carol@example.com/phone", "spam.example"}
    assert is_blocked(items, "bob@example.com")
    assert is_blocked(items, "BOB@example.com/any")  # a bare item: every resource
    assert is_blocked(items, "carol@example.com/phone")
    assert not is_blocked(items, "carol@example.com/laptop")  # a full item: that one only
    assert not is_blocked(items, "carol@example.com")
    assert is_blocked(items, "anyone@spam.example/x")  # a domain item: everyone there
    assert not is_blocked(items, "dave@example.com")
    assert not is_blocked(items, "not an address")


BLOCKING_ERRORS = "{urn:xmpp:blocking:errors}"


async def test_blocking_command_stops_delivery_and_is_pushed(hub: HubHarness) -> None:
    alice_id, alice_token = await hub.create_user("alice")
    bob_id, bob_token = await hub.create_user("bob")
    await hub.create_user("carol")
    d = domain(hub)
    a1 = await xmpp_login(hub, "alice", resource="one", plugins=("xep_0191",))
    a2 = await xmpp_login(hub, "alice", resource="two", plugins=("xep_0191",))
    bob = await xmpp_login(hub, "bob")
    carol = await xmpp_login(hub, "carol")
    assert "urn:xmpp:blocking" in await server_features(a1, d)
    assert await a1.plugin["xep_0191"].get_blocked_jids(timeout=10) == set()
    assert await a2.plugin["xep_0191"].get_blocked_jids(timeout=10) == set()
    pushes: list[str] = []
    a2.add_event_handler("blocked", lambda iq: pushes.extend(str(i["jid"]) for i in iq["block"]))
    a2.add_event_handler(
        "unblocked", lambda iq: pushes.extend(f"-{i['jid']}" for i in iq["unblock"])
    )

    def bob_presences(client: XmppClient) -> list[str]:
        return [str(p["type"]) for p in client.presences if p["from"].bare == f"bob@{d}"]

    await a1.wait_for_condition(lambda: bob_presences(a1)[-1:] == ["available"])
    await a1.plugin["xep_0191"].block(JID(f"Bob@{d}"), timeout=10)
    await a2.wait_for_condition(lambda: pushes == [f"bob@{d}"])  # the other resource is told
    stored = await hub.services.store["blocklists"].find_one({"_id": alice_id})
    assert stored is not None and stored["jids"] == [f"bob@{d}"]
    assert await a2.plugin["xep_0191"].get_blocked_jids(timeout=10) == {JID(f"bob@{d}")}
    # blocked: shown offline at once, and nothing of bob's reaches alice's clients
    await a1.wait_for_condition(lambda: bob_presences(a1)[-1:] == ["unavailable"])
    presences_then = len(bob_presences(a1))
    send_raw_message(bob, f"alice@{d}", "b1", body="are you there?")
    send_raw_message(bob, f"alice@{d}", "b2", f"<composing xmlns='{CHATSTATES[1:-1]}'/>")
    await hub.request("PUT", "/api/v1/presence/me", token=bob_token, json={"status": "dnd"})
    send_raw_message(carol, f"alice@{d}", "c1", body="from carol")
    for client in (a1, a2):
        await client.wait_for_condition(lambda c=client: "from carol" in c.bodies())  # type: ignore[misc]
    await asyncio.sleep(0.5)
    for client in (a1, a2):
        assert "are you there?" not in client.bodies()
        assert not any(m["from"].bare == f"bob@{d}" for m in client.messages)
    assert len(bob_presences(a1)) == presences_then
    # ... but the dialog has it: the web messenger shows it (the blocklist is Jabber's)
    pair = private_pair_key(alice_id, bob_id)
    chat = await hub.services.store["chats"].find_one({"pair_key": pair})
    assert chat is not None
    history = await hub.request(
        "GET", f"/api/v1/im/chats/{chat['_id']}/messages", token=alice_token
    )
    assert "are you there?" in [m["text"] for m in history.body], history.body
    # writing to a blocked address is refused with <blocked/>
    errors: list[Any] = []
    a1.add_event_handler("message_error", errors.append)
    send_raw_message(a1, f"bob@{d}", "a1", body="never mind")
    await a1.wait_for_condition(lambda: len(errors) == 1)
    assert errors[0]["error"]["condition"] == "not-acceptable"
    assert errors[0].xml.find(f"{{jabber:client}}error/{BLOCKING_ERRORS}blocked") is not None
    # nor as offline messages on the next login
    a1.disconnect()
    a2.disconnect()
    await asyncio.gather(a1.gone.wait(), a2.gone.wait())
    send_raw_message(bob, f"alice@{d}", "b3", body="still ignoring me?")
    send_raw_message(carol, f"alice@{d}", "c2", body="carol again")
    await asyncio.sleep(0.5)
    a3 = await xmpp_login(hub, "alice", resource="three", plugins=("xep_0191",))
    await a3.wait_for_condition(lambda: "carol again" in a3.bodies())
    await asyncio.sleep(0.3)
    assert "still ignoring me?" not in a3.bodies()
    assert f"bob@{d}" not in [p["from"].bare for p in a3.presences]
    # unblocked (all): bob's status shows again, his messages arrive
    await a3.plugin["xep_0191"].get_blocked(timeout=10)
    unblock_all = a3.make_iq_set()
    unblock_all.enable("unblock")  # no items: everyone (slixmpp's unblock() needs some)
    await unblock_all.send(timeout=10)  # type: ignore[no-untyped-call]
    assert await a3.plugin["xep_0191"].get_blocked_jids(timeout=10) == set()
    await a3.wait_for_condition(lambda: bob_presences(a3)[-1:] == ["dnd"])  # (slixmpp's type)
    send_raw_message(bob, f"alice@{d}", "b4", body="hello again")
    await a3.wait_for_condition(lambda: "hello again" in a3.bodies())


async def test_iq_to_a_full_jid_that_blocked_the_sender_is_service_unavailable(
    hub: HubHarness,
) -> None:
    """XEP-0191 section 3.4: the blocked party's iq to a full JID of the blocking user is
    answered as for a resource that is not there, and never reaches the blocking client."""
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    alice = await xmpp_login(hub, "alice", resource="one", plugins=("xep_0191",))
    bob = await xmpp_login(hub, "bob")
    seen: list[str] = []
    alice.register_handler(
        Callback(
            "pings seen",
            MatchXPath("{jabber:client}iq/{urn:xmpp:ping}ping"),
            lambda iq: seen.append(str(iq["from"])),
        )
    )
    await bob.plugin["xep_0199"].send_ping(JID(f"alice@{d}/one"), timeout=10)  # routed: answered
    await alice.wait_for_condition(lambda: len(seen) == 1)
    await alice.plugin["xep_0191"].block(JID(f"bob@{d}"), timeout=10)
    with pytest.raises(IqError) as refused:
        await bob.plugin["xep_0199"].send_ping(JID(f"alice@{d}/one"), timeout=10)
    assert refused.value.iq["error"]["condition"] == "service-unavailable"
    await asyncio.sleep(0.3)
    assert len(seen) == 1


# XEP-0045 private messages and XEP-0313 for rooms ------------------------------------------------

MUC_USER_X = "{http://jabber.org/protocol/muc#user}x"
MAM = "urn:xmpp:mam:2"


async def test_private_messages_between_room_occupants(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    _, carol = await hub.create_user("carol")
    await hub.create_user("dave")
    chat = await create_group(hub, carol, "Plans", [alice_id, bob_id])
    d = domain(hub)
    room = JID(f"{chat['id']}@conference.{d}")
    alice = await muc_login(hub, "alice")
    bob = await muc_login(hub, "bob")
    dave = await muc_login(hub, "dave")
    await join(alice, room, "al")
    await join(bob, room, "bobby")
    bob_seen = record_stanzas(bob)
    alice_seen = record_stanzas(alice)

    send_raw_message(alice, f"{room}/bobby", "pm1", body="just between us")
    await bob.wait_for_condition(lambda: "just between us" in bob.bodies())
    [pm] = [m for m in bob_seen if m.xml.findtext("{jabber:client}body") == "just between us"]
    assert str(pm["from"]) == f"{room}/al"  # from the sender's occupant JID
    assert str(pm["to"]) == f"bob@{d}/test"
    assert pm["type"] == "chat" and pm["id"] == "pm1"
    assert pm.xml.find(MUC_USER_X) is not None  # a MUC private message (XEP-0045 7.5)
    send_raw_message(bob, f"{room}/al", "pm2", body="sure")
    await alice.wait_for_condition(lambda: "sure" in alice.bodies())
    [reply] = [m for m in alice_seen if m.xml.findtext("{jabber:client}body") == "sure"]
    assert str(reply["from"]) == f"{room}/bobby"
    # not stored: neither in the room's history nor as a dialog
    assert "just between us" not in [m["text"] for m in await history(hub, carol, chat["id"])]
    assert await hub.services.store["messages"].count_documents({"text": "just between us"}) == 0

    errors: list[Any] = []
    alice.add_event_handler("message_error", errors.append)
    send_raw_message(alice, f"{room}/nobody", "pm3", body="hello?")
    await alice.wait_for_condition(lambda: len(errors) == 1)
    assert errors[0]["error"]["condition"] == "item-not-found"
    # someone not in the room cannot whisper to its occupants
    dave_errors: list[Any] = []
    dave.add_event_handler("message_error", dave_errors.append)
    send_raw_message(dave, f"{room}/bobby", "pm4", body="psst")
    await dave.wait_for_condition(lambda: len(dave_errors) == 1)
    assert dave_errors[0]["error"]["condition"] == "not-acceptable"
    await asyncio.sleep(0.3)
    assert "psst" not in bob.bodies()


async def mam_query(
    client: XmppClient, to: str, ident: str, rsm: str = ""
) -> tuple[list[Any], Any]:
    """A MAM query (raw: the fields that matter here); returns (results, the iq result)."""
    results: list[Any] = []
    client.register_handler(
        Callback(
            f"mam {ident}",
            MatchXPath(f"{{jabber:client}}message/{{{MAM}}}result"),
            lambda m: results.append(m) if m.xml[0].get("queryid") == ident else None,
        )
    )
    iq = client.make_iq_set(ito=JID(to))
    iq.xml.append(
        ET.fromstring(
            f"<query xmlns='{MAM}' queryid='{ident}'>"
            f"<set xmlns='http://jabber.org/protocol/rsm'>{rsm}</set></query>"
        )
    )
    answer = await iq.send(timeout=10)  # type: ignore[no-untyped-call]
    return results, answer


def forwarded_body(result: Any) -> str:
    body: str = result.xml.findtext(
        f"{{{MAM}}}result/{{urn:xmpp:forward:0}}forwarded/{{jabber:client}}message/"
        "{jabber:client}body"
    )
    return body


async def test_room_archive_is_the_group_chats_history(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    _, carol = await hub.create_user("carol")
    await hub.create_user("dave")
    dave = await muc_login(hub, "dave")
    chat = await create_group(hub, carol, "Plans", [alice_id])
    for text in ("first", "second", "third"):
        await post(hub, carol, chat["id"], text)
    d = domain(hub)
    room = f"{chat['id']}@conference.{d}"
    alice = await muc_login(hub, "alice")
    info = await alice.plugin["xep_0030"].get_info(jid=JID(room), timeout=10)
    assert MAM in info["disco_info"]["features"]
    # the newest two, then the page before them (RSM), without joining the room
    results, answer = await mam_query(alice, room, "q1", "<max>2</max><before/>")
    assert [forwarded_body(r) for r in results] == ["second", "third"]
    assert {str(r["from"]) for r in results} == {room}
    inner = results[0].xml.find(".//{jabber:client}message")
    assert inner is not None and inner.get("from") == f"{room}/carol"
    assert inner.get("type") == "groupchat"
    fin = answer.xml.find(f"{{{MAM}}}fin")
    assert fin is not None and fin.get("complete") == "false"
    first = fin.findtext(
        "{http://jabber.org/protocol/rsm}set/{http://jabber.org/protocol/rsm}first"
    )
    older, answer = await mam_query(alice, room, "q2", f"<max>2</max><before>{first}</before>")
    assert [forwarded_body(r) for r in older] == ["first"]
    assert answer.xml.find(f"{{{MAM}}}fin").get("complete") == "true"
    # what the web deletes is gone from the archive too (one history)
    doomed = (await history(hub, carol, chat["id"]))[-1]
    resp = await hub.request("DELETE", f"/api/v1/im/messages/{doomed['id']}", token=carol)
    assert resp.status < 300, resp.body
    results, _ = await mam_query(alice, room, "q3")
    assert [forwarded_body(r) for r in results] == ["first", "second"]
    # one's own archive does not mix the room in; non-members read nothing
    own, _ = await mam_query(alice, f"alice@{d}", "q4")
    assert own == []
    with pytest.raises(IqError) as refused:
        await mam_query(dave, room, "q5")
    assert refused.value.condition == "forbidden"


# XEP-0054 vCard writes -------------------------------------------------------------------------

VCARD = "vcard-temp"


async def set_vcard(client: XmppClient, inner: str) -> Any:
    iq = client.make_iq_set()
    iq.xml.append(ET.fromstring(f"<vCard xmlns='{VCARD}'>{inner}</vCard>"))
    return await iq.send(timeout=10)  # type: ignore[no-untyped-call]


def photos(client: XmppClient, jid: str) -> list[str]:
    """The XEP-0153 hashes in a contact's presence so far ("" for an empty <photo/>)."""
    found = []
    for presence in client.presences:
        photo = presence.xml.find("{vcard-temp:x:update}x/{vcard-temp:x:update}photo")
        if presence["from"].bare == jid and photo is not None:
            found.append(photo.text or "")
    return found


async def test_vcard_set_changes_the_users_own_profile_and_picture(hub: HubHarness) -> None:
    alice_id, alice_token = await hub.create_user("alice", first_name="Alice")
    await hub.create_user("bob")
    d = domain(hub)
    alice = await xmpp_login(hub, "alice")
    bob = await xmpp_login(hub, "bob", plugins=("xep_0054",))
    picture = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    encoded = base64.b64encode(picture).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # as clients do
    await set_vcard(
        alice,
        "<FN>ignored</FN><N><FAMILY>Liddell</FAMILY><GIVEN>Alicia</GIVEN></N>"
        "<NICKNAME>not-my-login</NICKNAME><TITLE>Explorer</TITLE>"
        "<TEL><CELL/><NUMBER>+1 555 0100</NUMBER></TEL>"
        "<EMAIL><USERID>elsewhere@example.test</USERID></EMAIL>"
        f"<PHOTO><TYPE>image/png</TYPE><BINVAL>{wrapped}</BINVAL></PHOTO>",
    )
    me = await hub.request("GET", "/api/v1/users/me", token=alice_token)
    assert me.body["first_name"] == "Alicia" and me.body["last_name"] == "Liddell"
    assert me.body["position"] == "Explorer"
    assert me.body["phones"] == [{"type": "mobile", "number": "+1 555 0100"}]
    assert me.body["login"] == "alice" and me.body["email"] == "alice@example.test"  # portal's
    # a colleague's client reads it back, picture included
    card = (await bob.plugin["xep_0054"].get_vcard(JID(f"alice@{d}"), timeout=10))["vcard_temp"]
    assert str(card["FN"]) == "Alicia Liddell"
    photo = card.xml.find(f"{{{VCARD}}}PHOTO")
    assert photo is not None and photo.findtext(f"{{{VCARD}}}TYPE") == "image/png"
    assert base64.b64decode(photo.findtext(f"{{{VCARD}}}BINVAL") or "") == picture
    sha1 = hashlib.sha1(picture).hexdigest()
    user = await hub.services.directory.cached_user(alice_id)
    assert user is not None and user["avatar_sha1"] == sha1
    # XEP-0153: colleagues online hear of the new picture, newcomers see it in presence
    await bob.wait_for_condition(lambda: photos(bob, f"alice@{d}")[-1:] == [sha1])
    await hub.create_user("carol")
    carol = await xmpp_login(hub, "carol")
    await carol.wait_for_condition(lambda: photos(carol, f"alice@{d}") == [sha1])
    # a picture alone leaves the name as it is; an empty PHOTO removes the picture
    await set_vcard(alice, "<PHOTO/>")
    me = await hub.request("GET", "/api/v1/users/me", token=alice_token)
    assert me.body["first_name"] == "Alicia"
    card = (await bob.plugin["xep_0054"].get_vcard(JID(f"alice@{d}"), timeout=10))["vcard_temp"]
    assert card.xml.find(f"{{{VCARD}}}PHOTO") is None
    await bob.wait_for_condition(lambda: photos(bob, f"alice@{d}")[-1:] == [""])  # "none"
    # bad input: clear errors, nothing changed
    for inner, condition in (
        ("<PHOTO><TYPE>image/png</TYPE><BINVAL>not base64!</BINVAL></PHOTO>", "bad-request"),
        ("<PHOTO><TYPE>text/html</TYPE><BINVAL>AAAA</BINVAL></PHOTO>", "bad-request"),
        (
            f"<PHOTO><TYPE>image/png</TYPE><BINVAL>{'A' * 100_000}</BINVAL></PHOTO>",
            "not-acceptable",
        ),
        ("<N><GIVEN>" + "x" * 500 + "</GIVEN></N>", "bad-request"),
        ("<TEL><NUMBER>call me maybe</NUMBER></TEL>", "bad-request"),
    ):
        with pytest.raises(IqError) as refused:
            await set_vcard(alice, inner)
        assert refused.value.condition == condition, inner
    me = await hub.request("GET", "/api/v1/users/me", token=alice_token)
    assert me.body["first_name"] == "Alicia"
    assert me.body["phones"] == [{"type": "mobile", "number": "+1 555 0100"}]
    # nobody writes another's vCard
    iq = bob.make_iq_set(ito=JID(f"alice@{d}"))
    iq.xml.append(ET.fromstring(f"<vCard xmlns='{VCARD}'><TITLE>Boss</TITLE></vCard>"))
    with pytest.raises(IqError) as refused:
        await iq.send(timeout=10)  # type: ignore[no-untyped-call]
    assert refused.value.condition == "forbidden"


# XEP-0049 private storage (XEP-0048 bookmarks) -------------------------------------------------

PRIVATE = "jabber:iq:private"
BOOKMARKS = (
    "<storage xmlns='storage:bookmarks'>"
    "<conference jid='plans@conference.example' name='Plans &amp; more' autojoin='true'>"
    "<nick>al</nick></conference></storage>"
)


async def private_iq(client: XmppClient, kind: str, inner: str, to: str = "") -> Any:
    iq = client.make_iq_set() if kind == "set" else client.make_iq_get()
    if to:
        iq["to"] = to
    iq.xml.append(ET.fromstring(f"<query xmlns='{PRIVATE}'>{inner}</query>"))
    return await iq.send(timeout=10)  # type: ignore[no-untyped-call]


async def test_private_storage_keeps_bookmarks_for_every_client(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    laptop = await xmpp_login(hub, "alice", resource="laptop")
    await private_iq(laptop, "set", BOOKMARKS)
    stored = await hub.services.store["private_storage"].find_one({"user_id": alice_id})
    assert stored is not None and stored["key"] == "{storage:bookmarks}storage"
    # another client of alice's finds them
    phone = await xmpp_login(hub, "alice", resource="phone")
    answer = await private_iq(phone, "get", "<storage xmlns='storage:bookmarks'/>")
    room = answer.xml.find(
        f"{{{PRIVATE}}}query/{{storage:bookmarks}}storage/{{storage:bookmarks}}conference"
    )
    assert room is not None, answer
    assert room.get("jid") == "plans@conference.example" and room.get("name") == "Plans & more"
    assert room.get("autojoin") == "true" and room.findtext("{storage:bookmarks}nick") == "al"
    # replaced, not merged
    await private_iq(phone, "set", "<storage xmlns='storage:bookmarks'/>")
    answer = await private_iq(laptop, "get", "<storage xmlns='storage:bookmarks'/>")
    assert answer.xml.find(".//{storage:bookmarks}conference") is None
    # someone else's storage: their own (empty), never alice's
    bob = await xmpp_login(hub, "bob")
    await private_iq(laptop, "set", BOOKMARKS)
    answer = await private_iq(bob, "get", "<storage xmlns='storage:bookmarks'/>")
    assert answer.xml.find(".//{storage:bookmarks}conference") is None
    for kind in ("get", "set"):
        with pytest.raises(IqError) as refused:
            await private_iq(bob, kind, BOOKMARKS, to=f"alice@{d}")
        assert refused.value.condition == "forbidden"
    # the roster delimiter is the server's
    answer = await private_iq(bob, "get", "<roster xmlns='roster:delimiter'/>")
    assert answer.xml.findtext(f"{{{PRIVATE}}}query/{{roster:delimiter}}roster") == "/"
    for inner, condition in (
        ("<roster xmlns='roster:delimiter'>::</roster>", "not-allowed"),
        ("<a xmlns='x:a'/><b xmlns='x:b'/>", "not-acceptable"),
        ("<message xmlns='jabber:client'/>", "not-acceptable"),
        (f"<big xmlns='x:big'>{'x' * 70_000}</big>", "resource-constraint"),
    ):
        with pytest.raises(IqError) as refused:
            await private_iq(bob, "set", inner)
        assert refused.value.condition == condition, inner


async def test_writes_from_clients_are_rate_limited_per_user(hub: HubHarness) -> None:
    """vCard, blocklist and private storage writes may fan out to every colleague: a client in
    a loop gets resource-constraint (wait) past 10 at once, whatever resource it uses."""
    await hub.create_user("mallory")
    await hub.create_user("alice")
    one = await xmpp_login(hub, "mallory", resource="one")
    two = await xmpp_login(hub, "mallory", resource="two", plugins=("xep_0191",))
    for n in range(5):
        await private_iq(one, "set", f"<s xmlns='x:s'>{n}</s>")
        await set_vcard(two, f"<TITLE>title {n}</TITLE>")
    with pytest.raises(IqError) as refused:
        await two.plugin["xep_0191"].block(JID("spam.example"), timeout=10)
    assert refused.value.condition == "resource-constraint"
    assert refused.value.iq["error"]["type"] == "wait"
    # nobody else pays for it
    alice = await xmpp_login(hub, "alice")
    await private_iq(alice, "set", "<s xmlns='x:s'>fine</s>")


async def test_blocking_holds_across_nodes(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    """The blocklist is stored once and cached per node: a block made through one node is
    pushed to the user's clients on the other, whose delivery stops at once too."""
    one, two = two_nodes
    await one.create_user("alice")
    await one.create_user("bob")
    d = domain(one)
    here = await xmpp_login(one, "alice", resource="here", plugins=("xep_0191",))
    there = await xmpp_login(two, "alice", resource="there", plugins=("xep_0191",))
    bob = await xmpp_login(two, "bob")
    assert await there.plugin["xep_0191"].get_blocked_jids(timeout=10) == set()  # cached there
    send_raw_message(bob, f"alice@{d}", "b0", body="before")
    await there.wait_for_condition(lambda: "before" in there.bodies())
    pushes: list[str] = []
    there.add_event_handler("blocked", lambda iq: pushes.extend(str(i["jid"]) for i in iq["block"]))
    await here.plugin["xep_0191"].block(JID(f"bob@{d}"), timeout=10)
    await there.wait_for_condition(lambda: pushes == [f"bob@{d}"])
    send_raw_message(bob, f"alice@{d}", "b1", body="after")
    await asyncio.sleep(1.0)
    assert "after" not in there.bodies() and "after" not in here.bodies()
