"""Full-JID addressing across nodes (issue 17): an iq to a colleague's Jabber resource whose
session lives on another hub node reaches that client, and its answer comes back to the
asker's full JID with the original id, as on one server; a resource that went away, or a
user who blocked the sender, gets the same ``service-unavailable`` as on one node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError

from server.xmpp.relay import RELAY_BURST, on_arrival
from tests.harness import HubHarness
from tests.test_xmpp_hostile import domain_of
from tests.test_xmpp_resources import available
from tests.xmpp_client import XmppClient, xmpp_login

INFO = "http://jabber.org/protocol/disco#info"
VERSION = "jabber:iq:version"


def test_a_relayed_stanza_is_delivered_or_refused_as_on_one_node() -> None:
    assert on_arrival("get", present=True, blocked=False) == "deliver"
    assert on_arrival("result", present=True, blocked=False) == "deliver"
    for kind in ("get", "set"):
        assert on_arrival(kind, present=False, blocked=False) == "bounce"
        assert on_arrival(kind, present=True, blocked=True) == "bounce"
    for kind in ("result", "error"):  # never answer an answer
        assert on_arrival(kind, present=False, blocked=False) == "drop"
        assert on_arrival(kind, present=True, blocked=True) == "drop"


async def ask(client: XmppClient, to: str, ns: str, ident: str) -> Any:
    iq = client.make_iq_get(queryxmlns=ns, ito=JID(to))
    iq["id"] = ident
    return await iq.send(timeout=10)  # type: ignore[no-untyped-call]


async def colleagues(
    one: HubHarness, two: HubHarness, resource: str = "res"
) -> tuple[XmppClient, XmppClient, list[str], str]:
    await one.create_user("alice")
    await one.create_user("bob")
    d = domain_of(one)
    alice = await xmpp_login(one, "alice", resource="desk")
    bob = await xmpp_login(two, "bob", resource=resource, plugins=("xep_0092", "xep_0191"))
    asked: list[str] = []  # the iq requests bob's client got, by id

    def seen(stanza: Any) -> Any:
        if stanza.name == "iq" and stanza["type"] in ("get", "set"):
            asked.append(stanza["id"])
        return stanza

    bob.add_filter("in", seen)
    await alice.wait_for_condition(lambda: available(alice, f"bob@{d}/{resource}"))
    await bob.wait_for_condition(lambda: available(bob, f"alice@{d}/desk"))
    return alice, bob, asked, d


async def test_an_iq_to_a_resource_on_another_node_and_its_answer_are_routed(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    alice, bob, asked, d = await colleagues(one, two)

    info = await ask(alice, f"bob@{d}/res", INFO, "caps-1")
    assert info["id"] == "caps-1" and info["type"] == "result"
    assert info["from"] == JID(f"bob@{d}/res")
    assert info["to"] == JID(f"alice@{d}/desk")
    assert VERSION in info["disco_info"]["features"]  # bob's client's

    version = await ask(alice, f"bob@{d}/res", VERSION, "ver-1")
    assert version["id"] == "ver-1"
    assert version["software_version"]["name"] == "Slixmpp"
    assert "caps-1" in asked and "ver-1" in asked

    # The other way round: bob's client on node 2 asks alice's on node 1.
    back = await ask(bob, f"alice@{d}/desk", INFO, "caps-2")
    assert back["id"] == "caps-2" and back["from"] == JID(f"alice@{d}/desk")

    # An error from the other client comes back as it was sent.
    with pytest.raises(IqError) as refused:
        await ask(alice, f"bob@{d}/res", "urn:example:nothing", "odd-1")
    assert refused.value.iq["id"] == "odd-1"
    assert refused.value.condition == "feature-not-implemented"  # slixmpp's, not the hub's
    assert refused.value.iq["from"] == JID(f"bob@{d}/res")


async def test_an_iq_to_a_resource_gone_from_another_node_is_service_unavailable(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    alice, bob, _, d = await colleagues(one, two)
    await ask(alice, f"bob@{d}/res", INFO, "there")  # routed while it is there

    # Gone with the presence store not yet knowing (the moment a session ends on node 2):
    # node 1 relays, node 2 finds no session and refuses.
    two_xmpp = two.services.xmpp
    assert two_xmpp is not None
    bob_id = next(iter(two_xmpp.sessions))
    await two.services.presence.connected(
        bob_id, f"{two_xmpp.node_tag}.ghost", "xmpp", resource="ghost"
    )
    with pytest.raises(IqError) as ghost:
        await ask(alice, f"bob@{d}/ghost", INFO, "ghost-1")
    assert ghost.value.condition == "service-unavailable"
    assert ghost.value.iq["id"] == "ghost-1"
    assert ghost.value.iq["from"] == JID(f"bob@{d}/ghost")

    # Gone for good: the same answer.
    bob.disconnect()
    await alice.wait_for_condition(
        lambda: (
            not available(alice, f"bob@{d}/res")
            and any(str(p["from"]) == f"bob@{d}/res" for p in alice.presences)
        )
    )
    with pytest.raises(IqError) as gone:
        await ask(alice, f"bob@{d}/res", INFO, "gone-1")
    assert gone.value.condition == "service-unavailable"


async def test_a_blocked_sender_s_iq_is_not_delivered_on_another_node(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    await one.create_user("carol")
    alice, bob, asked, d = await colleagues(one, two)
    carol = await xmpp_login(one, "carol", resource="phone")
    await carol.wait_for_condition(lambda: available(carol, f"bob@{d}/res"))
    await ask(alice, f"bob@{d}/res", VERSION, "before")
    assert "before" in asked

    await bob.plugin["xep_0191"].block(JID(f"alice@{d}"), timeout=10)
    with pytest.raises(IqError) as refused:
        await ask(alice, f"bob@{d}/res", VERSION, "after")
    assert refused.value.condition == "service-unavailable"  # as if bob/res were not there
    # Not blocked: carol, on alice's node, still reaches bob's client.
    await ask(carol, f"bob@{d}/res", VERSION, "carol-1")
    await asyncio.sleep(0.3)
    assert "after" not in asked and "carol-1" in asked


async def test_relayed_requests_are_capped_per_session(
    two_nodes: tuple[HubHarness, HubHarness],
) -> None:
    one, two = two_nodes
    alice, _, asked, d = await colleagues(one, two)
    answers = await asyncio.gather(
        *(ask(alice, f"bob@{d}/res", VERSION, f"flood-{n}") for n in range(RELAY_BURST + 100)),
        return_exceptions=True,
    )
    refused = [a for a in answers if isinstance(a, IqError)]
    assert refused and {a.condition for a in refused} == {"resource-constraint"}
    assert len(answers) - len(refused) >= RELAY_BURST  # the burst went through, answered
    # Refused on node 1: bob's client got exactly the ones answered.
    assert len([a for a in asked if a.startswith("flood-")]) == len(answers) - len(refused)
