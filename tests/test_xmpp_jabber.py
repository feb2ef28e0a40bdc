"""Issue 17: what Jabber clients nobody here wrote expect from the wire, checked on raw
streams (the real clients are driven in test_xmpp_terminal.py)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError

from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub
from tests.test_xmpp_hostile import RawXmpp, domain_of
from tests.test_xmpp_muc import create_group, join, muc_login, record_stanzas, send_groupchat
from tests.xmpp_client import XmppClient, xmpp_login

# A stream-level element written with a default namespace instead of the stream: prefix.
_UNPREFIXED = re.compile(rb"<(?:features|error)[^>]*etherx")


async def test_stream_level_elements_carry_the_stream_prefix(hub: HubHarness) -> None:
    """RFC 6120's examples write <stream:features> and <stream:error>; loudmouth (mcabber),
    Miranda and S22.Xmpp match those names literally and wait for ever on an equivalent
    <features xmlns="http://etherx.jabber.org/streams">."""
    await hub.create_user("mallory")
    raw = await RawXmpp.connect(hub)
    await raw.login("mallory")  # features before TLS, before SASL and before bind
    raw.send("<message><body></message>")
    await raw.expect_stream_error("not-well-formed")
    data = bytes(raw.recorder.data)
    assert data.count(b"<stream:features>") == 3, data
    assert data.count(b"</stream:features>") == 3, data
    assert b"<stream:error>" in data and b"</stream:error></stream:stream>" in data, data
    assert _UNPREFIXED.search(data) is None, data


# message ids ----------------------------------------------------------------------------------

SID = "{urn:xmpp:sid:0}"


def send_chat(client: XmppClient, to: str, body: str, ident: str, origin_id: str = "") -> None:
    message = client.make_message(mto=JID(to), mbody=body, mtype="chat")
    message["id"] = ident
    if origin_id:
        message.xml.append(ET.Element(f"{SID}origin-id", {"id": origin_id}))
    message.send()


def ids_of(stanza: Any) -> tuple[str, str | None, str | None]:
    """(id, origin-id, stanza-id) of a message stanza (slixmpp's or an ElementTree one)."""
    xml = stanza if isinstance(stanza, ET.Element) else stanza.xml
    origin = xml.find(f"{SID}origin-id")
    stanza_id = xml.find(f"{SID}stanza-id")
    return (
        xml.get("id", ""),
        origin.get("id") if origin is not None else None,
        stanza_id.get("id") if stanza_id is not None else None,
    )


async def test_message_ids_are_kept_and_reused_ids_on_a_new_stream_are_not_dropped(
    hub: HubHarness,
) -> None:
    """Clients that count ids from 1 at each start reuse them on the next stream (RFC 6120
    asks ids to be unique within one stream only): nothing may be dropped as a duplicate.
    The recipient, the sender's other resources (carbons) and the archive (MAM) all see the
    id and origin-id the client sent; the server adds its XEP-0359 stanza-id."""
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain_of(hub)
    bob = await xmpp_login(hub, "bob")
    laptop = await xmpp_login(hub, "alice", resource="laptop")
    phone = await xmpp_login(hub, "alice", resource="phone", plugins=("xep_0280",))
    carbons: list[Any] = []
    phone.add_event_handler("carbon_sent", carbons.append)
    await phone.plugin["xep_0280"].enable()

    send_chat(laptop, f"bob@{d}", "one", "1", origin_id="origin-one")
    send_chat(laptop, f"bob@{d}", "two", "2")
    # The same stanza again on the same stream (a resend): stored and delivered once.
    send_chat(laptop, f"bob@{d}", "two", "2")
    send_chat(laptop, f"bob@{d}", "after", "3")
    await bob.wait_for_condition(lambda: "after" in bob.bodies())
    assert bob.bodies() == ["one", "two", "after"]
    first, second = bob.messages[0], bob.messages[1]
    assert ids_of(first)[:2] == ("1", "origin-one")
    assert ids_of(second)[:2] == ("2", None)
    assert ids_of(first)[2] and ids_of(second)[2] and ids_of(first)[2] != ids_of(second)[2]
    assert first.xml.find(f"{SID}stanza-id").get("by") == f"bob@{d}"
    await phone.wait_for_condition(lambda: len(carbons) == 3)
    copies = [c["carbon_sent"] for c in carbons]
    assert [ids_of(c)[:2] for c in copies] == [("1", "origin-one"), ("2", None), ("3", None)]

    # The laptop restarts and counts from 1 again: new messages, none lost, ids kept.
    laptop.disconnect()
    await laptop.gone.wait()
    laptop = await xmpp_login(hub, "alice", resource="laptop", plugins=("xep_0313",))
    send_chat(laptop, f"bob@{d}", "one again", "1")
    send_chat(laptop, f"bob@{d}", "two", "2")  # even the same text: a new stream, a new message
    send_chat(laptop, f"bob@{d}", "done", "3")
    await bob.wait_for_condition(lambda: "done" in bob.bodies())
    assert bob.bodies() == ["one", "two", "after", "one again", "two", "done"]
    assert [ids_of(m)[0] for m in bob.messages] == ["1", "2", "3", "1", "2", "3"]

    # A copy resent on a new stream with its origin-id (unique for good) is recognised.
    send_chat(laptop, f"bob@{d}", "one", "77", origin_id="origin-one")
    send_chat(laptop, f"bob@{d}", "last", "4")
    await bob.wait_for_condition(lambda: "last" in bob.bodies())
    assert bob.bodies().count("one") == 1

    # The archive gives back the ids the client sent.
    archive = await laptop.plugin["xep_0313"].retrieve(with_jid=JID(f"bob@{d}"), timeout=10)
    found = [m["mam_result"]["forwarded"]["stanza"] for m in archive["mam"]["results"]]
    assert [str(m["body"]) for m in found] == bob.bodies()
    assert [ids_of(m)[:2] for m in found] == [
        ("1", "origin-one"),
        ("2", None),
        ("3", None),
        ("1", None),
        ("2", None),
        ("3", None),
        ("4", None),
    ]
    assert [ids_of(m)[2] for m in found] == [ids_of(m)[2] for m in bob.messages]


async def test_offline_delivery_carries_the_author_clients_ids(hub: HubHarness) -> None:
    """A message that waited for its recipient's first Jabber session (read back from the
    history, not from a live event) still carries the id, origin-id and thread the author's
    client sent, beside the server's stanza-id and the delay stamp."""
    await hub.create_user("alice")
    _, bob_token = await hub.create_user("bob")
    d = domain_of(hub)
    web = await hub.connect(bob_token)
    await web.wait_for("snapshot")
    alice = await xmpp_login(hub, "alice")
    send_raw_message(
        alice,
        f"bob@{d}",
        "off-1",
        "<origin-id xmlns='urn:xmpp:sid:0' id='off-origin'/>",
        "<thread xmlns='jabber:client'>off-thread</thread>",
        body="while you were away",
    )
    [stored] = await web.wait_for("im.message")
    bob = await xmpp_login(hub, "bob")
    await bob.wait_for_condition(lambda: bob.bodies() == ["while you were away"])
    [message] = bob.messages
    assert ids_of(message) == ("off-1", "off-origin", stored["data"]["message"]["id"])
    assert message.xml.findtext("{jabber:client}thread") == "off-thread"
    assert message.xml.find("{urn:xmpp:delay}delay") is not None


async def test_room_messages_carry_the_author_clients_ids(hub: HubHarness) -> None:
    """The reflection of a room message, what the other occupants get and the room history
    carry the id and origin-id the author's client sent (Profanity showed every own room line
    twice when they did not), and the room's stanza-id."""
    alice_id, alice_token = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    carol_id, _ = await hub.create_user("carol")
    chat = await create_group(hub, alice_token, "Ids", [bob_id, carol_id])
    room = JID(f"{chat['id']}@conference.{domain_of(hub)}")
    alice = await muc_login(hub, "alice")
    bob = await muc_login(hub, "bob")
    alice_seen = record_stanzas(alice)
    bob_seen = record_stanzas(bob)
    await join(alice, room, "Alice")
    await join(bob, room, "Bob")
    origin = "<origin-id xmlns='urn:xmpp:sid:0' id='room-origin-1'/>"
    send_groupchat(alice, room, "hello room", "1", origin)

    def got(seen: list[Any]) -> list[Any]:
        return [s for s in seen if s["type"] == "groupchat" and str(s["body"]) == "hello room"]

    await alice.wait_for_condition(lambda: len(got(alice_seen)) == 1)
    await bob.wait_for_condition(lambda: len(got(bob_seen)) == 1)
    [reflection], [copy] = got(alice_seen), got(bob_seen)
    assert ids_of(reflection)[:2] == ids_of(copy)[:2] == ("1", "room-origin-1")
    assert ids_of(reflection)[2] and ids_of(reflection)[2] == ids_of(copy)[2]

    # A later joiner's history has them too.
    carol = await muc_login(hub, "carol")
    _, _, _, backlog = await join(carol, room, "Carol")
    [old] = [m for m in backlog if str(m["body"]) == "hello room"]
    assert ids_of(old) == ids_of(copy)
    assert alice_id


# what rides along with messages ---------------------------------------------------------------

CHATSTATES = "{http://jabber.org/protocol/chatstates}"
RECEIPTS = "{urn:xmpp:receipts}"
CONFERENCE = "{jabber:x:conference}"
CAPS = "{http://jabber.org/protocol/caps}"


def send_raw_message(client: XmppClient, to: str, ident: str, *extra: str, body: str = "") -> None:
    message = client.make_message(mto=JID(to), mbody=body or None, mtype="chat")
    message["id"] = ident
    for xml in extra:
        message.xml.append(ET.fromstring(xml))
    message.send()


async def test_receipts_threads_subjects_chat_states_and_invitations_are_relayed(
    hub: HubHarness,
) -> None:
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain_of(hub)
    alice = await xmpp_login(hub, "alice")
    bob = await xmpp_login(hub, "bob")
    alice_seen = record_stanzas(alice)
    bob_seen = record_stanzas(bob)

    send_raw_message(
        alice,
        f"bob@{d}",
        "m1",
        "<thread xmlns='jabber:client' parent='t0'>t1</thread>",
        "<subject xmlns='jabber:client'>Lunch</subject>",
        f"<request xmlns='{RECEIPTS[1:-1]}'/>",
        body="where shall we eat?",
    )
    await bob.wait_for_condition(lambda: "where shall we eat?" in bob.bodies())
    [got] = [m for m in bob.messages if str(m["body"]) == "where shall we eat?"]
    assert got.xml.findtext("{jabber:client}thread") == "t1"
    assert got.xml.find("{jabber:client}thread").get("parent") == "t0"
    assert got.xml.findtext("{jabber:client}subject") == "Lunch"
    assert got.xml.find(f"{RECEIPTS}request") is not None
    assert got.xml.find(f"{CHATSTATES}active") is not None
    assert got["id"] == "m1"

    # Bob's client acknowledges: the receipt reaches Alice, naming the id she used.
    send_raw_message(bob, f"alice@{d}", "r1", f"<received xmlns='{RECEIPTS[1:-1]}' id='m1'/>")

    def receipts() -> list[Any]:
        return [s for s in alice_seen if s.xml.find(f"{RECEIPTS}received") is not None]

    await alice.wait_for_condition(lambda: len(receipts()) == 1)
    assert receipts()[0].xml.find(f"{RECEIPTS}received").get("id") == "m1"
    assert receipts()[0]["from"].bare == f"bob@{d}"

    # Every chat state, each once.
    for state in ("composing", "paused", "inactive", "gone", "active"):
        send_raw_message(alice, f"bob@{d}", f"s-{state}", f"<{state} xmlns='{CHATSTATES[1:-1]}'/>")

    def states() -> list[str]:
        return [
            child.tag.rpartition("}")[2]
            for s in bob_seen
            if s.xml.find("{jabber:client}body") is None
            for child in s.xml
            if child.tag.startswith(CHATSTATES)
        ]

    await bob.wait_for_condition(lambda: len(states()) >= 5)
    assert sorted(states()) == sorted(["composing", "paused", "inactive", "gone", "active"])

    # A direct room invitation (XEP-0249).
    room = f"team@conference.{d}"
    send_raw_message(
        alice, f"bob@{d}", "inv1", f"<x xmlns='{CONFERENCE[1:-1]}' jid='{room}' reason='standup'/>"
    )

    def invitations() -> list[Any]:
        return [s for s in bob_seen if s.xml.find(f"{CONFERENCE}x") is not None]

    await bob.wait_for_condition(lambda: len(invitations()) == 1)
    invite = invitations()[0].xml.find(f"{CONFERENCE}x")
    assert invite is not None and invite.get("jid") == room and invite.get("reason") == "standup"
    assert invitations()[0]["from"].bare == f"alice@{d}"


async def test_contacts_presence_has_caps_that_promise_chat_states(hub: HubHarness) -> None:
    """libpurple (Pidgin, finch) sends <composing/> only to contacts whose XEP-0115 caps list
    chat states: a colleague's web resource carries caps, and disco#info on it answers (their
    Jabber clients' own caps are relayed as sent: test_xmpp_resources)."""
    await hub.create_user("alice")
    _, bob_token = await hub.create_user("bob")
    d = domain_of(hub)
    web = await hub.connect(bob_token)
    web.keep_alive()
    alice = await xmpp_login(hub, "alice", plugins=("xep_0030",))
    await alice.wait_for_condition(
        lambda: any(
            str(p["from"]) == f"bob@{d}/portal" and p["type"] != "unavailable"
            for p in alice.presences
        )
    )
    [presence] = [p for p in alice.presences if str(p["from"]) == f"bob@{d}/portal"][-1:]
    caps = presence.xml.find(f"{CAPS}c")
    assert caps is not None, str(presence)
    node = f"{caps.get('node')}#{caps.get('ver')}"
    info = await alice.plugin["xep_0030"].get_info(jid=presence["from"], node=node, timeout=10)
    features = info["disco_info"]["features"]
    assert "http://jabber.org/protocol/chatstates" in features
    identities = info["disco_info"]["identities"]
    assert [identity[0] for identity in identities] == ["client"]


# RFC 6121 presence and addressing -------------------------------------------------------------


def presences_from(client: XmppClient, jid: str) -> list[Any]:
    return [p for p in client.presences if str(p["from"]) == jid]


async def test_own_resources_see_each_other_and_the_sender_gets_its_presence_back(
    hub: HubHarness,
) -> None:
    """RFC 6121 4.2.2 and 4.4.2: a new resource is told of the user's other available
    resources, every resource (the sender included) gets the user's presence broadcasts, and
    a resource going away is announced to the others."""
    await hub.create_user("alice")
    d = domain_of(hub)
    laptop = await xmpp_login(hub, "alice", resource="laptop")
    await laptop.wait_for_condition(lambda: bool(presences_from(laptop, f"alice@{d}/laptop")))
    phone = await xmpp_login(hub, "alice", resource="phone")
    await phone.wait_for_condition(
        lambda: (
            bool(presences_from(phone, f"alice@{d}/laptop"))
            and bool(presences_from(phone, f"alice@{d}/phone"))
        )
    )
    await laptop.wait_for_condition(lambda: bool(presences_from(laptop, f"alice@{d}/phone")))
    phone.send_presence(pshow="away")
    await laptop.wait_for_condition(
        lambda: any(p["show"] == "away" for p in presences_from(laptop, f"alice@{d}/phone"))
    )
    await phone.wait_for_condition(
        lambda: any(p["show"] == "away" for p in presences_from(phone, f"alice@{d}/phone"))
    )
    phone.disconnect()
    await laptop.wait_for_condition(
        lambda: presences_from(laptop, f"alice@{d}/phone")[-1]["type"] == "unavailable"
    )


async def test_full_jids_address_one_resource_and_iq_to_absent_ones_fail(hub: HubHarness) -> None:
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain_of(hub)
    alice = await xmpp_login(hub, "alice", plugins=("xep_0199",))
    desk = await xmpp_login(hub, "bob", resource="desk", plugins=("xep_0199",))
    mobile = await xmpp_login(hub, "bob", resource="mobile", plugins=("xep_0199",))

    alice.send_message(mto=JID(f"bob@{d}/mobile"), mbody="only to the mobile", mtype="chat")
    await mobile.wait_for_condition(lambda: "only to the mobile" in mobile.bodies())
    # Without ids, two alike messages are two messages (nothing to call them duplicates by).
    for _ in range(2):
        unnamed = alice.make_message(mto=JID(f"bob@{d}/mobile"), mbody="ok", mtype="chat")
        del unnamed["id"]
        unnamed.send()
    await mobile.wait_for_condition(lambda: mobile.bodies().count("ok") == 2)
    # A resource that is not online: every resource gets it (as to the bare JID).
    alice.send_message(mto=JID(f"bob@{d}/tablet"), mbody="to an absent tablet", mtype="chat")
    for client in (desk, mobile):
        await client.wait_for_condition(lambda c=client: "to an absent tablet" in c.bodies())  # type: ignore[misc]
    assert "only to the mobile" not in desk.bodies()

    # iq: an online resource answers itself; an absent one or an unknown user is
    # service-unavailable (a ping must not "succeed").
    await alice.plugin["xep_0199"].send_ping(JID(f"bob@{d}/desk"), timeout=10)
    for absent in (f"bob@{d}/tablet", f"nobody@{d}/x", f"alice@{d}/elsewhere"):
        with pytest.raises(IqError) as refused:
            await alice.plugin["xep_0199"].send_ping(JID(absent), timeout=10)
        assert refused.value.condition == "service-unavailable", absent
    # The server itself and one's own bare JID still answer.
    await alice.plugin["xep_0199"].send_ping(JID(d), timeout=10)


# roster groups ---------------------------------------------------------------------------------


async def test_a_slash_in_a_department_name_is_no_group_level(hub: HubHarness) -> None:
    """ "/" is the nested-group delimiter (XEP-0083): a department named "Team A/B" must not
    become two levels; its slash is shown as a look-alike DIVISION SLASH."""
    _, admin = await hub.create_user("root", admin=True)
    top = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Acme"})
    team = await hub.request(
        "POST",
        "/api/v1/departments",
        token=admin,
        json={"name": "Team A/B", "parent_id": top.body["id"]},
    )
    assert team.status == 201, team.body
    await hub.create_user("alice", department_id=top.body["id"])
    await hub.create_user("bob", department_id=team.body["id"])
    client = await xmpp_login(hub, "alice")
    groups = client.client_roster[JID(f"bob@{domain_of(hub)}")]["groups"]
    assert groups == ["Acme/Team A\u2215B"]
    assert groups[0].split("/") == ["Acme", "Team A\u2215B"]


# the login timeout and certificate prompts ------------------------------------------------------

AUTH_TIMEOUT = 2.0
TLS_PROMPT = 5.0


@pytest.fixture
async def prompt_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    tuned = settings.model_copy(
        update={
            "xmpp_auth_timeout_seconds": AUTH_TIMEOUT,
            "xmpp_tls_prompt_seconds": TLS_PROMPT,
        }
    )
    async with start_hub(tuned, store) as harness:
        yield harness


async def test_the_login_timeout_waits_while_the_user_checks_the_certificate(
    prompt_hub: HubHarness,
) -> None:
    """Clients ask their user to accept an unknown certificate right after the TLS handshake
    and say nothing meanwhile: the login timeout must not cut a careful user comparing
    fingerprints, yet a connection silent for ever still ends."""
    await prompt_hub.create_user("alice")
    careful = await RawXmpp.connect(prompt_hub)
    await careful.open_stream()
    await careful.starttls()
    await asyncio.sleep(AUTH_TIMEOUT + 1.5)  # reading the fingerprint
    assert not careful.recorder.lost.is_set(), careful.transcript()
    assert await careful.login("alice")

    started = time.monotonic()
    silent = await RawXmpp.connect(prompt_hub)
    await silent.open_stream()
    await silent.starttls()
    await silent.expect_stream_error("connection-timeout", timeout=TLS_PROMPT + 10)
    elapsed = time.monotonic() - started
    assert TLS_PROMPT * 0.9 <= elapsed < TLS_PROMPT + 3, elapsed


async def test_account_settings_give_both_fingerprints(hub: HubHarness) -> None:
    """Profanity shows a SHA-1 fingerprint, most others SHA-256: the profile page gives both,
    each of the certificate the listener really presents."""
    _, token = await hub.create_user("alice")
    xmpp = hub.services.xmpp
    assert xmpp is not None
    account = await hub.request("GET", "/api/v1/xmpp/account", token=token)
    assert account.status == 200, account.body
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed
    _, writer = await asyncio.open_connection("127.0.0.1", xmpp.ports["tls"], ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()

    def colons(digest: str) -> str:
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()

    assert account.body["fingerprint"] == colons(hashlib.sha256(der).hexdigest())
    assert account.body["fingerprint_sha1"] == colons(hashlib.sha1(der).hexdigest())
