"""Contacts' resources (RFC 6121 4.2-4.4, issue 17): a colleague's Jabber clients are shown to
Jabber users each under its own full JID, with its own show, status, priority and caps, and
their web messenger (all tabs together) as one more resource, ``…/portal``, while it is open;
each going away is announced on its own. On one node and across two."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError

from server.presence.redis_store import RedisPresenceStore
from server.presence.rules import (
    MAX_STATUS_TEXT,
    WEB,
    Manual,
    Shown,
    Source,
    own_status,
    resources_seen,
    shown_from,
)
from tests.harness import HubHarness, SocketClient
from tests.redis_server import RedisServer
from tests.test_xmpp_hostile import domain_of
from tests.xmpp_client import XmppClient, xmpp_login

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CAPS = "{http://jabber.org/protocol/caps}"

# pure rules ------------------------------------------------------------------------------------


def tab(source_id: str, active: bool = True) -> Source:
    return Source(source_id, "socketio", active, 0.0)


def jabber(source_id: str, resource: str, shown: Shown, active: bool = True) -> Source:
    return Source(source_id, "xmpp", active, 0.0, shown.show == "dnd", resource, shown)


def test_each_jabber_resource_shows_itself_and_the_tabs_are_one_web_resource() -> None:
    sources = [
        tab("t1", active=False),
        tab("t2", active=False),
        jabber("x1", "laptop", Shown("away", "lunch", 5)),
        jabber("x2", "phone", Shown("dnd", "", -1)),
    ]
    seen = resources_seen(sources, Manual(), NOW)
    assert seen == {
        WEB: Shown("away"),  # both tabs idle
        "laptop": Shown("away", "lunch", 5),
        "phone": Shown("dnd", "", -1),
    }
    # The merged status (the web's view) is as before: a dnd device wins.
    assert own_status(sources, Manual(), NOW) == "dnd"
    # One active tab makes the web resource available.
    assert resources_seen([*sources, tab("t3")], Manual(), NOW)[WEB] == Shown()


def test_the_web_resource_exists_only_while_a_tab_is_open() -> None:
    only_jabber = [jabber("x1", "laptop", Shown())]
    assert resources_seen(only_jabber, Manual(), NOW) == {"laptop": Shown()}
    assert resources_seen([], Manual(), NOW) == {}


def test_a_manual_status_shows_on_every_resource_and_invisible_shows_nothing() -> None:
    sources = [tab("t1"), jabber("x1", "laptop", Shown("xa", "reading", 3))]
    dnd = Manual("dnd", NOW + timedelta(hours=1))
    assert resources_seen(sources, dnd, NOW) == {
        WEB: Shown("dnd"),
        "laptop": Shown("dnd", "reading", 3),  # the person's word; the client's text stays
    }
    lapsed = Manual("dnd", NOW - timedelta(minutes=1))
    assert resources_seen(sources, lapsed, NOW) == {
        WEB: Shown(),
        "laptop": Shown("xa", "reading", 3),
    }
    assert resources_seen(sources, Manual(invisible=True), NOW) == {}


def test_what_a_client_shows_is_bounded() -> None:
    assert shown_from("away", "out", "7") == Shown("away", "out", 7)
    assert shown_from("busy", None, None) == Shown()  # unknown <show/>: available
    assert shown_from(None, None, "-128") == Shown(priority=-128)
    for bad in ("128", "-129", "x", "1.5", "\u0661", "99999999999", ""):
        assert shown_from(None, None, bad).priority == 0, bad
    assert len(shown_from(None, "y" * 10_000, None).status) == MAX_STATUS_TEXT
    assert shown_from(" dnd ", None, " 3 ") == Shown("dnd", "", 3)


async def test_the_redis_store_keeps_a_resource_and_what_it_shows(
    redis_server: RedisServer,
) -> None:
    one = RedisPresenceStore(redis_server.url, ttl_seconds=30.0)
    two = RedisPresenceStore(redis_server.url, ttl_seconds=30.0)
    try:
        shown = Shown("xa", "on leave \u2014 back Monday", -5, "sha-1 http://x.example/c abc=")
        await one.put("bob", jabber("s1", "laptop", shown))
        await one.put("bob", tab("t1"))
        got = {s.id: s for s in await two.sources("bob")}
        assert (got["s1"].resource, got["s1"].shown) == ("laptop", shown)
        assert (got["t1"].resource, got["t1"].shown) == ("", Shown())
    finally:
        await one.close()
        await two.close()


# against the hub -------------------------------------------------------------------------------


def from_resource(client: XmppClient, jid: str) -> list[Any]:
    return [p for p in client.presences if str(p["from"]) == jid]


def available(client: XmppClient, jid: str) -> bool:
    got = from_resource(client, jid)
    return bool(got) and got[-1]["type"] != "unavailable"


def gone(client: XmppClient, jid: str) -> bool:
    got = from_resource(client, jid)
    return bool(got) and got[-1]["type"] == "unavailable"


async def jabber_client(hub: HubHarness, login: str, resource: str, **presence: Any) -> XmppClient:
    client = await xmpp_login(hub, login, resource=resource, send_presence=False)
    client.send_presence(**presence)
    return client


async def web_tab(hub: HubHarness, token: str) -> SocketClient:
    tab = await hub.connect(token)
    tab.keep_alive()
    await tab.wait_for("snapshot")
    return tab


async def test_a_colleague_s_resources_and_web_are_each_shown_and_go_each_alone(
    hub: HubHarness,
) -> None:
    await hub.create_user("alice")
    _, bob_token = await hub.create_user("bob")
    d = domain_of(hub)
    early = await xmpp_login(hub, "alice", resource="early")  # online before bob
    web = await web_tab(hub, bob_token)
    desk = await jabber_client(hub, "bob", "desk", pshow="away", pstatus="lunch", ppriority=5)
    mobile = await jabber_client(hub, "bob", "mobile", pshow="dnd")
    late = await xmpp_login(hub, "alice", resource="late")  # logs in while bob is online

    for alice in (early, late):
        await alice.wait_for_condition(
            lambda a=alice: all(  # type: ignore[misc]
                available(a, f"bob@{d}/{r}") for r in ("desk", "mobile", "portal")
            )
        )
        [desk_seen] = from_resource(alice, f"bob@{d}/desk")[-1:]
        assert (desk_seen["show"], desk_seen["status"], desk_seen["priority"]) == (
            "away",
            "lunch",
            5,
        )
        assert from_resource(alice, f"bob@{d}/mobile")[-1]["show"] == "dnd"
        assert from_resource(alice, f"bob@{d}/portal")[-1]["show"] in ("", "chat")
        # Nothing is shown from a merged, made-up resource other than these.
        shown = {str(p["from"]) for p in alice.presences if p["from"].bare == f"bob@{d}"}
        assert shown == {f"bob@{d}/{r}" for r in ("desk", "mobile", "portal")}

    # A change of one resource is shown for that one.
    mobile.send_presence(pstatus="back")
    await late.wait_for_condition(
        lambda: from_resource(late, f"bob@{d}/mobile")[-1]["status"] == "back"
    )

    # One resource going away: its own unavailable, and nothing from the others.
    counts = {r: len(from_resource(late, f"bob@{d}/{r}")) for r in ("mobile", "portal")}
    desk.disconnect()
    for alice in (early, late):
        await alice.wait_for_condition(lambda a=alice: gone(a, f"bob@{d}/desk"))  # type: ignore[misc]
    await asyncio.sleep(0.5)
    assert {r: len(from_resource(late, f"bob@{d}/{r}")) for r in counts} == counts
    assert available(late, f"bob@{d}/mobile") and available(late, f"bob@{d}/portal")

    # An iq to the resource that went is refused (RFC 6121 8.5.3.1), to one still there routed.
    with pytest.raises(IqError) as refused:
        await late.plugin["xep_0199"].send_ping(JID(f"bob@{d}/desk"), timeout=10)
    assert refused.value.condition == "service-unavailable"
    await late.plugin["xep_0199"].send_ping(JID(f"bob@{d}/mobile"), timeout=10)

    # The web closing: its resource goes (after the grace period), the Jabber one stays.
    await web.close()
    await late.wait_for_condition(lambda: gone(late, f"bob@{d}/portal"))
    assert available(late, f"bob@{d}/mobile")

    # A message to the bare JID still reaches every resource online.
    late.send_message(mto=JID(f"bob@{d}"), mbody="to all of bob", mtype="chat")
    await mobile.wait_for_condition(lambda: "to all of bob" in mobile.bodies())


async def test_a_resource_relays_its_own_caps_and_the_web_has_the_hub_s(hub: HubHarness) -> None:
    await hub.create_user("alice")
    _, bob_token = await hub.create_user("bob")
    d = domain_of(hub)
    bob = await xmpp_login(hub, "bob", resource="gajim", send_presence=False)
    bob.send_raw(
        "<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1'"
        " node='https://gajim.org' ver='q07IKJEyjvHSyhy//CH0CxmKi8w='/></presence>"
    )
    await web_tab(hub, bob_token)
    alice = await xmpp_login(hub, "alice")
    await alice.wait_for_condition(
        lambda: available(alice, f"bob@{d}/gajim") and available(alice, f"bob@{d}/portal")
    )
    own = from_resource(alice, f"bob@{d}/gajim")[-1].xml.find(f"{CAPS}c")
    assert own is not None
    assert (own.get("hash"), own.get("node"), own.get("ver")) == (
        "sha-1",
        "https://gajim.org",
        "q07IKJEyjvHSyhy//CH0CxmKi8w=",
    )
    web = from_resource(alice, f"bob@{d}/portal")[-1].xml.find(f"{CAPS}c")
    assert web is not None and web.get("node", "").endswith("/contact")


async def test_a_client_cannot_take_the_web_s_resource_name(hub: HubHarness) -> None:
    await hub.create_user("bob")
    client = await xmpp_login(hub, "bob", resource="portal")
    assert client.boundjid.resource != "portal"
    assert client.boundjid.resource.startswith("portal-")


async def test_blocking_a_colleague_hides_each_of_their_resources(hub: HubHarness) -> None:
    await hub.create_user("alice")
    _, bob_token = await hub.create_user("bob")
    d = domain_of(hub)
    await web_tab(hub, bob_token)
    await jabber_client(hub, "bob", "desk")
    alice = await xmpp_login(hub, "alice", plugins=("xep_0191",))
    await alice.wait_for_condition(
        lambda: available(alice, f"bob@{d}/desk") and available(alice, f"bob@{d}/portal")
    )
    await alice.plugin["xep_0191"].block(JID(f"bob@{d}"), timeout=10)
    await alice.wait_for_condition(
        lambda: gone(alice, f"bob@{d}/desk") and gone(alice, f"bob@{d}/portal")
    )
    await alice.plugin["xep_0191"].unblock(JID(f"bob@{d}"), timeout=10)
    await alice.wait_for_condition(
        lambda: available(alice, f"bob@{d}/desk") and available(alice, f"bob@{d}/portal")
    )


# two nodes -------------------------------------------------------------------------------------


async def test_resources_on_another_node_are_shown_and_go_alone(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    await one.create_user("alice")
    _, bob_token = await one.create_user("bob")
    d = domain_of(one)
    early = await xmpp_login(one, "alice", resource="early")
    await jabber_client(one, "bob", "desk", pshow="away")
    mobile = await jabber_client(two, "bob", "mobile", pshow="dnd", pstatus="on the road")
    await web_tab(two, bob_token)
    late = await xmpp_login(one, "alice", resource="late")
    for alice in (early, late):
        await alice.wait_for_condition(
            lambda a=alice: all(  # type: ignore[misc]
                available(a, f"bob@{d}/{r}") for r in ("desk", "mobile", "portal")
            )
        )
        seen = from_resource(alice, f"bob@{d}/mobile")[-1]
        assert (seen["show"], seen["status"]) == ("dnd", "on the road")
    mobile.disconnect()
    await late.wait_for_condition(lambda: gone(late, f"bob@{d}/mobile"))
    await asyncio.sleep(0.5)
    assert available(late, f"bob@{d}/desk") and available(late, f"bob@{d}/portal")


async def test_a_message_to_one_resource_is_carbon_copied_to_the_others(hub: HubHarness) -> None:
    """XEP-0280 6: the user's other clients with carbons enabled get a <received/> copy of a
    message addressed to one of them (as Prosody does), the addressed one the message."""
    await hub.create_user("alice")
    await hub.create_user("bob")
    d = domain_of(hub)
    one = await xmpp_login(hub, "alice", resource="one", plugins=("xep_0280",))
    two = await xmpp_login(hub, "alice", resource="two", plugins=("xep_0280",))
    copies: list[Any] = []
    one.add_event_handler("carbon_received", copies.append)
    for client in (one, two):
        await client.plugin["xep_0280"].enable(timeout=10)
    bob = await xmpp_login(hub, "bob")
    bob.send_message(mto=JID(f"alice@{d}/two"), mbody="for two", mtype="chat")
    await two.wait_for_condition(lambda: "for two" in two.bodies())
    await one.wait_for_condition(lambda: bool(copies))
    inner = copies[0]["carbon_received"]
    assert inner["body"] == "for two" and str(inner["to"]) == f"alice@{d}/two"
    assert "for two" not in one.bodies()
