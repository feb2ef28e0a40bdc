"""Issue 17: personal eventing (XEP-0163 PEP) with XEP-0402 bookmarks, kept in step with
XEP-0048 bookmarks in private storage; driven by slixmpp against a real hub."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError

from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub
from tests.test_xmpp_muc import record_stanzas
from tests.xmpp_client import XmppClient, xmpp_login

PUBSUB = "http://jabber.org/protocol/pubsub"
OWNER = f"{PUBSUB}#owner"
EVENT = f"{PUBSUB}#event"
ERRORS = f"{PUBSUB}#errors"
PRIVATE = "jabber:iq:private"
NICK = "http://jabber.org/protocol/nick"
BOOKMARKS = "urn:xmpp:bookmarks:1"
SECRET = "urn:example:secret"


def domain(hub: HubHarness) -> str:
    xmpp = hub.services.xmpp
    assert xmpp is not None
    return xmpp.domain


async def iq(client: XmppClient, kind: str, inner: str, to: str = "") -> Any:
    stanza = client.make_iq_set() if kind == "set" else client.make_iq_get()
    if to:
        stanza["to"] = to
    stanza.xml.append(ET.fromstring(inner))
    return await stanza.send(timeout=10)  # type: ignore[no-untyped-call]


def options(form_type: str, **fields: str) -> str:
    values = "".join(
        f"<field var='pubsub#{name}'><value>{value}</value></field>"
        for name, value in fields.items()
    )
    return (
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
        f"<value>{PUBSUB}#{form_type}</value></field>{values}</x>"
    )


async def publish(
    client: XmppClient, node: str, payload: str, item_id: str = "", **opts: str
) -> Any:
    ident = f" id='{item_id}'" if item_id else ""
    extra = f"<publish-options>{options('publish-options', **opts)}</publish-options>"
    inner = (
        f"<pubsub xmlns='{PUBSUB}'><publish node='{node}'><item{ident}>{payload}</item>"
        f"</publish>{extra if opts else ''}</pubsub>"
    )
    return await iq(client, "set", inner)


async def items(client: XmppClient, owner: str, node: str, extra: str = "", attrs: str = "") -> Any:
    inner = f"<pubsub xmlns='{PUBSUB}'><items node='{node}' {attrs}>{extra}</items></pubsub>"
    return await iq(client, "get", inner, to=owner)


def item_ids(answer: Any) -> list[str]:
    return [i.get("id", "") for i in answer.xml.iter(f"{{{PUBSUB}}}item")]


def nick_of(item: ET.Element) -> str:
    return item.findtext(f"{{{NICK}}}nick") or ""


async def refused(coro: Any) -> tuple[str, str]:
    """The (condition, pubsub#errors condition) of a refused request."""
    with pytest.raises(IqError) as caught:
        await coro
    error = caught.value.iq.xml.find("{jabber:client}error")
    assert error is not None
    app = [c.tag.rpartition("}")[2] for c in error if c.tag.startswith(f"{{{ERRORS}}}")]
    return str(caught.value.condition), (app[0] if app else "")


def events(stanzas: list[Any], node: str) -> list[ET.Element]:
    """The pubsub#event items (or retracts) of ``node`` among the recorded messages."""
    found: list[ET.Element] = []
    for stanza in stanzas:
        for group in stanza.xml.findall(f"{{{EVENT}}}event/{{{EVENT}}}items"):
            if group.get("node") == node:
                assert stanza["type"] == "headline"
                found.extend(group)
    return found


async def notify_login(hub: HubHarness, login: str, resource: str, *nodes: str) -> XmppClient:
    """A client whose entity caps announce ``<node>+notify`` for ``nodes`` (none: no caps
    interest at all), online with that presence."""
    client = await xmpp_login(
        hub,
        login,
        resource=resource,
        send_presence=False,
        plugins=("xep_0115", "xep_0163", "xep_0060"),
    )
    for node in nodes:
        client.plugin["xep_0030"].add_feature(f"{node}+notify")
    await client.plugin["xep_0115"].update_caps(broadcast=False)
    client.send_presence()
    await caps_known(hub, client)
    return client


async def caps_known(hub: HubHarness, client: XmppClient) -> None:
    """Wait until the hub learnt the client's features from its caps (it asks the client):
    from then on its notifications do not depend on who is faster."""
    from server.xmpp.modules.entity_caps import caps_of

    xmpp = hub.services.xmpp
    assert xmpp is not None
    full = str(client.boundjid)
    for _ in range(500):
        sessions = [s for r in list(xmpp.sessions.values()) for s in r.values()]
        if any(str(s.jid) == full and caps_of(xmpp).features_of(s) for s in sessions):
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the hub never learnt the caps of {full}")


# rules -----------------------------------------------------------------------------------------


# (the new modules are imported where used: the protocol tests below run, and fail, against a
# hub without them)


def test_node_configuration_rules() -> None:
    from server.directory import pep_rules as rules

    assert rules.normalize({"pubsub#access_model": ["whitelist"], "pubsub#title": ["x"]}) == {
        rules.ACCESS: "whitelist"
    }
    assert rules.normalize({"pubsub#max_items": ["max"], "pubsub#persist_items": ["1"]}) == {
        rules.MAX_ITEMS: "max",
        rules.PERSIST: "true",
    }
    for bad in (
        {"pubsub#access_model": ["authorize"]},
        {"pubsub#max_items": ["0"]},
        {"pubsub#max_items": ["²"]},
        {"pubsub#max_items": [str(rules.MAX_ITEMS_PER_NODE + 1)]},
        {"pubsub#persist_items": ["yes"]},
    ):
        with pytest.raises(rules.ConfigError):
            rules.normalize(bad)
    bookmarks = rules.initial_config(BOOKMARKS, {})
    assert bookmarks[rules.ACCESS] == "whitelist" and bookmarks[rules.MAX_ITEMS] == "max"
    assert rules.initial_config(NICK, {})[rules.ACCESS] == "presence"
    assert rules.conflicts(bookmarks, {rules.ACCESS: "whitelist"}) == []
    assert rules.conflicts(bookmarks, {rules.MAX_ITEMS: str(rules.MAX_ITEMS_PER_NODE)}) == []
    assert rules.conflicts(bookmarks, {rules.ACCESS: "open"}) == [rules.ACCESS]
    assert rules.kept_items({rules.PERSIST: "false", rules.MAX_ITEMS: "max"}) == 1
    assert rules.kept_items({rules.MAX_ITEMS: "max"}) == rules.MAX_ITEMS_PER_NODE
    assert rules.may_read("whitelist", is_owner=True, sees_owner=False)
    assert not rules.may_read("whitelist", is_owner=False, sees_owner=True)
    assert rules.may_read("presence", is_owner=False, sees_owner=True)
    assert not rules.may_read("open", is_owner=False, sees_owner=False)


def test_bookmark_conversions() -> None:
    from server.xmpp.modules.bookmarks import from_legacy, to_legacy

    legacy = ET.fromstring(
        "<storage xmlns='storage:bookmarks'>"
        "<conference jid='a@conference.example' name='A' autojoin='1'><nick>al</nick>"
        "<password>pw</password></conference>"
        "<conference jid='b@conference.example'/>"
        "<conference jid='a@conference.example' name='again'/>"
        "<url name='site' url='https://example.com/'/></storage>"
    )
    rooms = from_legacy(legacy)
    assert list(rooms) == ["a@conference.example", "b@conference.example"]
    a = rooms["a@conference.example"]
    assert a.get("autojoin") == "true" and a.get("name") == "A"
    assert a.findtext(f"{{{BOOKMARKS}}}nick") == "al"
    assert a.findtext(f"{{{BOOKMARKS}}}password") == "pw"
    back = to_legacy(list(rooms.items()), legacy)
    confs = back.findall("{storage:bookmarks}conference")
    assert [c.get("jid") for c in confs] == ["a@conference.example", "b@conference.example"]
    assert confs[0].get("autojoin") == "true" and confs[1].get("autojoin") == "false"
    assert confs[0].findtext("{storage:bookmarks}nick") == "al"
    assert back.find("{storage:bookmarks}url") is not None


def test_caps_verification_string() -> None:
    """XEP-0115 5.2 and 5.3, the specification's own examples."""
    from server.xmpp.modules.entity_caps import verification_string, verifies

    simple = ET.fromstring(
        "<query xmlns='http://jabber.org/protocol/disco#info'>"
        "<identity category='client' name='Exodus 0.9.1' type='pc'/>"
        "<feature var='http://jabber.org/protocol/caps'/>"
        "<feature var='http://jabber.org/protocol/disco#info'/>"
        "<feature var='http://jabber.org/protocol/disco#items'/>"
        "<feature var='http://jabber.org/protocol/muc'/></query>"
    )
    assert verifies(simple, "sha-1", "QgayPKawpkPSDYmwT/WM94uAlu0=")
    assert not verifies(simple, "sha-1", "QgayPKawpkPSDYmwT/WM94uAlu1=")
    assert not verifies(simple, "md5", "QgayPKawpkPSDYmwT/WM94uAlu0=")
    complex_ = ET.fromstring(
        "<query xmlns='http://jabber.org/protocol/disco#info'>"
        "<identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>"
        "<identity xml:lang='el' category='client' name='\u03a8 0.11' type='pc'/>"
        "<feature var='http://jabber.org/protocol/caps'/>"
        "<feature var='http://jabber.org/protocol/disco#info'/>"
        "<feature var='http://jabber.org/protocol/disco#items'/>"
        "<feature var='http://jabber.org/protocol/muc'/>"
        "<x xmlns='jabber:x:data' type='result'>"
        "<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value>"
        "</field><field var='ip_version'><value>ipv4</value><value>ipv6</value></field>"
        "<field var='os'><value>Mac</value></field>"
        "<field var='os_version'><value>10.5.1</value></field>"
        "<field var='software'><value>Psi</value></field>"
        "<field var='software_version'><value>0.11</value></field></x></query>"
    )
    assert verification_string(complex_).startswith("client/pc/el/\u03a8 0.11<client/pc/en/")
    assert verifies(complex_, "sha-1", "q07IKJEyjvHSyhy//CH0CxmKi8w=")


# the service -----------------------------------------------------------------------------------


async def test_publish_retrieve_retract_and_delete(hub: HubHarness) -> None:
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    alice = await xmpp_login(hub, "alice")
    bob = await xmpp_login(hub, "bob")
    # the account is a PEP service (XEP-0163 section 9)
    info = await alice.plugin["xep_0030"].get_info(jid=JID(f"bob@{d}"), timeout=10)
    assert ("pubsub", "pep", None, None) in info["disco_info"]["identities"]
    features = set(info["disco_info"]["features"])
    for name in ("publish", "publish-options", "retrieve-items", "access-whitelist"):
        assert f"{PUBSUB}#{name}" in features
    assert f"{BOOKMARKS}#compat" in features
    nick = f"<nick xmlns='{NICK}'>Al</nick>"
    answer = await publish(alice, NICK, nick, "one")
    assert item_ids(answer) == ["one"]
    answer = await publish(alice, NICK, f"<nick xmlns='{NICK}'>Alice</nick>")
    made = item_ids(answer)
    assert len(made) == 1 and made[0] not in ("", "one")  # an id made by the server
    await publish(alice, NICK, f"<nick xmlns='{NICK}'>A.</nick>", "three")
    # a colleague reads them (access model presence: everyone is a contact here)
    answer = await items(bob, f"alice@{d}", NICK)
    assert item_ids(answer) == ["one", made[0], "three"]
    answer = await items(bob, f"alice@{d}", NICK, attrs="max_items='1'")
    found = list(answer.xml.iter(f"{{{PUBSUB}}}item"))
    assert [i.get("id") for i in found] == ["three"] and nick_of(found[0]) == "A."
    answer = await items(bob, f"alice@{d}", NICK, extra="<item id='one'/>")
    assert item_ids(answer) == ["one"]
    # the same id replaces the item
    await publish(alice, NICK, f"<nick xmlns='{NICK}'>Al again</nick>", "one")
    answer = await items(alice, "", NICK)
    assert item_ids(answer) == [made[0], "three", "one"]
    # only the owner publishes, retracts, deletes
    inner = (
        f"<pubsub xmlns='{PUBSUB}'><publish node='{NICK}'><item>{nick}</item></publish></pubsub>"
    )
    assert (await refused(iq(bob, "set", inner, to=f"alice@{d}")))[0] == "forbidden"
    retract = (
        f"<pubsub xmlns='{PUBSUB}'><retract node='{NICK}'><item id='three'/></retract></pubsub>"
    )
    assert (await refused(iq(bob, "set", retract, to=f"alice@{d}")))[0] == "forbidden"
    await iq(alice, "set", retract)
    assert item_ids(await items(bob, f"alice@{d}", NICK)) == [made[0], "one"]
    assert (await refused(iq(alice, "set", retract)))[0] == "item-not-found"
    delete = f"<pubsub xmlns='{OWNER}'><delete node='{NICK}'/></pubsub>"
    assert (await refused(iq(bob, "set", delete, to=f"alice@{d}")))[0] == "forbidden"
    await iq(alice, "set", delete)
    assert (await refused(items(bob, f"alice@{d}", NICK)))[0] == "item-not-found"
    assert (await refused(items(bob, f"nobody@{d}", NICK)))[0] == "item-not-found"
    # bad requests, with XEP-0060's own conditions
    empty = f"<pubsub xmlns='{PUBSUB}'><publish node='{NICK}'><item id='x'/></publish></pubsub>"
    assert await refused(iq(bob, "set", empty)) == ("bad-request", "payload-required")
    no_node = f"<pubsub xmlns='{PUBSUB}'><publish><item>{nick}</item></publish></pubsub>"
    assert await refused(iq(bob, "set", no_node)) == ("bad-request", "nodeid-required")


async def test_whitelist_nodes_and_publish_options(hub: HubHarness) -> None:
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    alice = await xmpp_login(hub, "alice")
    bob = await xmpp_login(hub, "bob")
    secret = "<secret xmlns='urn:example:secret'>only mine</secret>"
    await publish(alice, "urn:example:secret", secret, "s", access_model="whitelist")
    answer = await items(alice, f"alice@{d}", "urn:example:secret")
    assert item_ids(answer) == ["s"]
    # XEP-0060 6.5.9.5: not on the whitelist
    assert await refused(items(bob, f"alice@{d}", "urn:example:secret")) == (
        "not-allowed",
        "closed-node",
    )
    # publish-options that the node's configuration does not match (XEP-0060 7.1.5)
    assert await refused(
        publish(alice, "urn:example:secret", secret, "t", access_model="presence")
    ) == ("conflict", "precondition-not-met")
    assert item_ids(await items(alice, "", "urn:example:secret")) == ["s"]  # nothing stored
    # matching ones are fine; the configuration is read and changed by the owner
    await publish(alice, "urn:example:secret", secret, "t", access_model="whitelist")
    get = f"<pubsub xmlns='{OWNER}'><configure node='urn:example:secret'/></pubsub>"
    form = (await iq(alice, "get", get)).xml.find(f".//{{{OWNER}}}configure/{{jabber:x:data}}x")
    assert form is not None
    values = {
        f.get("var"): f.findtext("{jabber:x:data}value")
        for f in form.findall("{jabber:x:data}field")
    }
    assert values["pubsub#access_model"] == "whitelist"
    change = options("node_config", access_model="presence", max_items="1")
    await iq(
        alice,
        "set",
        f"<pubsub xmlns='{OWNER}'><configure node='{SECRET}'>{change}</configure></pubsub>",
    )
    assert item_ids(await items(bob, f"alice@{d}", "urn:example:secret")) == ["t"]
    bad = options("node_config", max_items="many")
    assert (
        await refused(
            iq(
                alice,
                "set",
                f"<pubsub xmlns='{OWNER}'><configure node='urn:example:secret'>{bad}"
                "</configure></pubsub>",
            )
        )
    )[0] == "not-acceptable"
    # XEP-0402 bookmarks are whitelisted whatever the first publish asked
    room = f"<conference xmlns='{BOOKMARKS}' name='Plans'><nick>al</nick></conference>"
    await publish(alice, BOOKMARKS, room, "plans@conference.example")
    assert await refused(items(bob, f"alice@{d}", BOOKMARKS)) == ("not-allowed", "closed-node")


async def test_notifications_follow_caps_and_last_items_come_with_presence(
    hub: HubHarness,
) -> None:
    for login in ("alice", "bob", "carol", "dave"):
        await hub.create_user(login)
    d = domain(hub)
    alice = await xmpp_login(hub, "alice", resource="desk")
    alice_phone = await notify_login(hub, "alice", "phone", NICK)
    bob = await notify_login(hub, "bob", "pc", NICK, SECRET)
    carol = await notify_login(hub, "carol", "pc")  # no interest announced
    seen = {c: record_stanzas(c) for c in (alice, alice_phone, bob, carol)}
    await publish(alice, NICK, f"<nick xmlns='{NICK}'>Al</nick>", "current")
    await bob.wait_for_condition(lambda: len(events(seen[bob], NICK)) == 1)
    item = events(seen[bob], NICK)[0]
    assert item.get("id") == "current" and nick_of(item) == "Al"
    assert [m["from"].bare for m in seen[bob] if m["type"] == "headline"] == [f"alice@{d}"]
    await alice_phone.wait_for_condition(lambda: len(events(seen[alice_phone], NICK)) == 1)
    await alice.wait_for_condition(lambda: len(events(seen[alice], NICK)) == 1)
    # a retraction with notify
    await publish(alice, NICK, f"<nick xmlns='{NICK}'>gone soon</nick>", "old")
    await bob.wait_for_condition(lambda: len(events(seen[bob], NICK)) == 2)
    retract = (
        f"<pubsub xmlns='{PUBSUB}'><retract node='{NICK}' notify='true'>"
        "<item id='old'/></retract></pubsub>"
    )
    await iq(alice, "set", retract)
    await bob.wait_for_condition(
        lambda: [e.tag for e in events(seen[bob], NICK)][-1] == f"{{{EVENT}}}retract"
    )
    # a whitelisted node's items reach the owner's resources only, even those who ask
    secret = f"<secret xmlns='{SECRET}'>mine</secret>"
    await publish(alice, SECRET, secret, "s", access_model="whitelist")
    await alice_phone.wait_for_condition(lambda: len(events(seen[alice_phone], SECRET)) == 1)
    await asyncio.sleep(1.0)
    assert not events(seen[bob], SECRET)
    assert not events(seen[carol], NICK)  # never asked
    assert len(events(seen[bob], NICK)) == 3
    # dave comes online interested: the last item of alice's node, at once
    dave = await xmpp_login(
        hub,
        "dave",
        send_presence=False,
        plugins=("xep_0115", "xep_0163", "xep_0060"),
    )
    dave_seen = record_stanzas(dave)
    dave.plugin["xep_0030"].add_feature(f"{NICK}+notify")
    dave.plugin["xep_0030"].add_feature(f"{SECRET}+notify")
    await dave.plugin["xep_0115"].update_caps(broadcast=False)
    dave.send_presence()
    await dave.wait_for_condition(lambda: len(events(dave_seen, NICK)) == 1)
    last = events(dave_seen, NICK)[0]
    assert last.get("id") == "current" and nick_of(last) == "Al"
    assert not events(dave_seen, SECRET)
    # carol, who never asked, gets no last item either
    await asyncio.sleep(0.5)
    assert not events(seen[carol], NICK)


async def test_notifications_reach_clients_on_other_nodes(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    """A publish through one node reaches the owner's and the contacts' clients on the other
    (the service's event goes through the bus to every node)."""
    one, two = two_nodes
    await one.create_user("alice")
    await one.create_user("bob")
    alice = await xmpp_login(one, "alice", resource="here")
    alice_there = await xmpp_login(two, "alice", resource="there")
    bob = await notify_login(two, "bob", "pc", NICK)
    seen = {c: record_stanzas(c) for c in (alice_there, bob)}
    await publish(alice, NICK, f"<nick xmlns='{NICK}'>Al</nick>", "current")
    await alice_there.wait_for_condition(lambda: len(events(seen[alice_there], NICK)) == 1)
    await bob.wait_for_condition(lambda: len(events(seen[bob], NICK)) == 1)
    assert nick_of(events(seen[bob], NICK)[0]) == "Al"


async def test_bookmarks_are_one_set_through_pep_and_private_storage(
    settings: Settings, store: Store
) -> None:
    async with start_hub(settings, store) as hub:
        await hub.create_user("alice")
        d = domain(hub)
        conversations = await xmpp_login(hub, "alice", resource="conversations")
        pidgin = await xmpp_login(hub, "alice", resource="pidgin")
        # XEP-0402 through PEP ...
        room = (
            f"<conference xmlns='{BOOKMARKS}' name='Plans' autojoin='true'>"
            "<nick>al</nick></conference>"
        )
        await publish(
            conversations,
            BOOKMARKS,
            room,
            "plans@conference.example",
            access_model="whitelist",
            max_items="max",
            persist_items="true",
        )
        # ... read through private storage (XEP-0048)
        query = f"<query xmlns='{PRIVATE}'><storage xmlns='storage:bookmarks'/></query>"
        answer = await iq(pidgin, "get", query)
        confs = answer.xml.findall(".//{storage:bookmarks}conference")
        assert [(c.get("jid"), c.get("name"), c.get("autojoin")) for c in confs] == [
            ("plans@conference.example", "Plans", "true")
        ]
        assert confs[0].findtext("{storage:bookmarks}nick") == "al"
        # XEP-0048 written through private storage (one room more, a URL) ...
        write = (
            f"<query xmlns='{PRIVATE}'><storage xmlns='storage:bookmarks'>"
            "<conference jid='plans@conference.example' name='Plans' autojoin='true'>"
            "<nick>al</nick></conference>"
            "<conference jid='news@conference.example' name='News' autojoin='false'/>"
            "<url name='wiki' url='https://wiki.example/'/></storage></query>"
        )
        await iq(pidgin, "set", write)
        # ... is read through PEP, and the URL stays with private storage
        answer = await items(conversations, "", BOOKMARKS)
        assert item_ids(answer) == ["plans@conference.example", "news@conference.example"]
        news = answer.xml.find(f".//{{{PUBSUB}}}item[@id='news@conference.example']")
        assert news is not None
        conference = news.find(f"{{{BOOKMARKS}}}conference")
        assert conference is not None and conference.get("name") == "News"
        assert conference.get("autojoin") is None
        answer = await iq(pidgin, "get", query)
        assert answer.xml.find(".//{storage:bookmarks}url") is not None
        # a room removed in private storage is retracted from PEP
        await iq(
            pidgin,
            "set",
            f"<query xmlns='{PRIVATE}'><storage xmlns='storage:bookmarks'>"
            "<conference jid='news@conference.example' name='News'/></storage></query>",
        )
        answer = await items(conversations, "", BOOKMARKS)
        assert item_ids(answer) == ["news@conference.example"]
        # retracted through PEP: gone from private storage
        retract = (
            f"<pubsub xmlns='{PUBSUB}'><retract node='{BOOKMARKS}'>"
            "<item id='news@conference.example'/></retract></pubsub>"
        )
        await iq(conversations, "set", retract)
        answer = await iq(pidgin, "get", query)
        assert answer.xml.find(".//{storage:bookmarks}conference") is None
        await publish(conversations, BOOKMARKS, room, "plans@conference.example")
    # the hub restarts: PEP items are in the database
    async with start_hub(settings, store) as hub:
        client = await xmpp_login(hub, "alice", resource="again")
        answer = await items(client, f"alice@{d}", BOOKMARKS)
        assert item_ids(answer) == ["plans@conference.example"]
        answer = await iq(client, "get", query)
        confs = answer.xml.findall(".//{storage:bookmarks}conference")
        assert [c.get("jid") for c in confs] == ["plans@conference.example"]


async def test_bookmarks_kept_in_private_storage_before_pep_are_found_through_pep(
    hub: HubHarness,
) -> None:
    """Bookmarks stored by XEP-0048 clients before PEP existed (straight in private storage)
    are there when a XEP-0402 client first looks."""
    alice_id, _ = await hub.create_user("alice")
    storage = hub.services.xmpp.private_storage if hub.services.xmpp else None
    assert storage is not None
    await storage.put(
        alice_id,
        "{storage:bookmarks}storage",
        "<storage xmlns='storage:bookmarks'><conference jid='old@conference.example' "
        "name='Old' autojoin='true'/></storage>",
    )
    client = await xmpp_login(hub, "alice")
    answer = await items(client, "", BOOKMARKS)
    assert item_ids(answer) == ["old@conference.example"]


async def test_a_deactivated_users_nodes_are_read_by_nobody(hub: HubHarness) -> None:
    _, admin = await hub.create_user("admin", admin=True)
    carol_id, _ = await hub.create_user("carol")
    await hub.create_user("bob")
    d = domain(hub)
    carol = await xmpp_login(hub, "carol")
    bob = await xmpp_login(hub, "bob")
    await publish(carol, NICK, f"<nick xmlns='{NICK}'>C</nick>", "current")
    assert item_ids(await items(bob, f"carol@{d}", NICK)) == ["current"]
    gone = await hub.request("DELETE", f"/api/v1/users/{carol_id}", token=admin)
    assert gone.status in (200, 204), gone.body
    conditions: list[tuple[str, str]] = []
    for _ in range(50):  # the directory's caches hear of it through the bus
        try:
            await items(bob, f"carol@{d}", NICK)
        except IqError as exc:
            conditions.append((str(exc.condition), ""))
            break
        await asyncio.sleep(0.1)
    assert conditions == [("item-not-found", "")]


async def test_xep0048_published_to_pep_is_the_same_list(hub: HubHarness) -> None:
    """Older Gajim and Conversations publish XEP-0048 bookmarks to PEP (storage:bookmarks)."""
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain(hub)
    gajim = await xmpp_login(hub, "alice", resource="gajim")
    legacy = (
        "<storage xmlns='storage:bookmarks'><conference jid='a@conference.example' name='A' "
        "autojoin='true'><nick>al</nick></conference></storage>"
    )
    await publish(gajim, "storage:bookmarks", legacy, "current", access_model="whitelist")
    answer = await items(gajim, "", BOOKMARKS)
    assert item_ids(answer) == ["a@conference.example"]
    await publish(gajim, BOOKMARKS, f"<conference xmlns='{BOOKMARKS}' name='B'/>", "b@c.example")
    answer = await items(gajim, "", "storage:bookmarks")
    assert item_ids(answer) == ["current"]
    confs = answer.xml.findall(".//{storage:bookmarks}conference")
    assert [c.get("jid") for c in confs] == ["a@conference.example", "b@c.example"]
    query = f"<query xmlns='{PRIVATE}'><storage xmlns='storage:bookmarks'/></query>"
    confs = (await iq(gajim, "get", query)).xml.findall(".//{storage:bookmarks}conference")
    assert [c.get("jid") for c in confs] == ["a@conference.example", "b@c.example"]
    bob = await xmpp_login(hub, "bob")
    assert await refused(items(bob, f"alice@{d}", "storage:bookmarks")) == (
        "not-allowed",
        "closed-node",
    )


async def test_pep_limits(hub: HubHarness) -> None:
    from server.directory import pep_rules as rules

    alice_id, _ = await hub.create_user("alice")
    await hub.create_user("bob")
    xmpp = hub.services.xmpp
    pep = getattr(xmpp, "pep", None)
    assert pep is not None, "no PEP service"
    alice = await xmpp_login(hub, "alice")
    big = f"<nick xmlns='{NICK}'>{'x' * (rules.MAX_ITEM_CHARS + 10)}</nick>"
    assert await refused(publish(alice, NICK, big, "big")) == ("not-acceptable", "payload-too-big")
    # nodes per user: the service's limit
    for n in range(rules.MAX_NODES_PER_USER):
        await pep.publish(alice_id, f"urn:example:n{n}", "n", "<n xmlns='x:n'/>", {})
    assert (await refused(publish(alice, "urn:example:one-more", "<n xmlns='x:n'/>")))[0] == (
        "not-allowed"
    )
    # items per node: the oldest go past max_items
    bob = await xmpp_login(hub, "bob")
    for n in range(3):
        await publish(bob, "urn:example:few", f"<n xmlns='x:n'>{n}</n>", f"i{n}", max_items="2")
    assert item_ids(await items(bob, "", "urn:example:few")) == ["i1", "i2"]
    # writes are rate limited like every write of a client's (burst of 10 per user)
    with pytest.raises(IqError) as caught:
        for n in range(12):
            await publish(bob, "urn:example:few", f"<n xmlns='x:n'>{n}</n>", f"r{n}")
    assert caught.value.condition == "resource-constraint"
