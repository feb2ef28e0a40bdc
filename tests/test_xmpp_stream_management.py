"""Stream management (XEP-0198) over the wire: acks, a dropped connection held and resumed,
unacknowledged messages given again exactly once (by resumption or as offline messages),
and a hub restart or another node answering a resume with a clean failure.

The Jabber side is a raw client (tests/test_xmpp_hostile.py's ``RawXmpp``), so the test says
exactly what it acknowledged and drops the TCP connection without ``</stream>``, as a phone
changing networks does; the other side is a colleague on the web (REST)."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

from server.settings import Settings
from server.store.database import Store
from server.xmpp.modules import stream_management
from server.xmpp.session import C2SSession
from tests.harness import HubHarness, start_hub
from tests.redis_server import RedisServer
from tests.test_xmpp_hostile import STREAM_NS, STREAMS_NS, Parsed, RawXmpp, domain_of, q
from tests.xmpp_client import xmpp_login

SM = "urn:xmpp:sm:3"
CLIENT = "jabber:client"
DELAY = "urn:xmpp:delay"
STANZAS = {q(CLIENT, "message"), q(CLIENT, "presence"), q(CLIENT, "iq")}


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def manager(hub: HubHarness) -> stream_management.StreamManagement:
    xmpp = hub.services.xmpp
    assert xmpp is not None and xmpp.stream_management is not None
    sm: stream_management.StreamManagement = xmpp.stream_management
    return sm


def session_of(hub: HubHarness, user_id: str) -> C2SSession:
    xmpp = hub.services.xmpp
    assert xmpp is not None
    [session] = xmpp.sessions_of(user_id)
    return session


def after_enabled(parsed: Parsed) -> list[ET.Element]:
    """What the server sent after <enabled/> on this stream."""
    tags = [el.tag for el in parsed.elements]
    start = tags.index(q(SM, "enabled")) if q(SM, "enabled") in tags else -1
    return parsed.elements[start + 1 :]


def answers(parsed: Parsed) -> list[str]:
    """The h of each <a/> the server sent."""
    return [str(el.get("h")) for el in parsed.elements if el.tag == q(SM, "a")]


def stanzas(elements: list[ET.Element]) -> list[ET.Element]:
    return [el for el in elements if el.tag in STANZAS]


def bodies(elements: list[ET.Element]) -> list[str]:
    return [
        str(el.findtext(q(CLIENT, "body")))
        for el in elements
        if el.tag == q(CLIENT, "message") and el.find(q(CLIENT, "body")) is not None
    ]


async def sm_login(hub: HubHarness, login: str, resource: str = "phone") -> tuple[RawXmpp, str]:
    """Log in, become available, enable stream management with resumption; the resume id."""
    raw = await RawXmpp.connect(hub)
    await raw.login(login, resource)
    raw.send("<presence/>")
    await raw.wait_for(lambda p: any(el.tag == q(CLIENT, "presence") for el in p.elements))
    raw.send(f"<enable xmlns='{SM}' resume='true'/>")
    enabled = await raw.wait_for_element(SM, "enabled")
    assert enabled.get("resume") == "true" and enabled.get("id"), raw.transcript()
    return raw, str(enabled.get("id"))


async def resume(hub: HubHarness, login: str, previd: str, h: int) -> RawXmpp:
    """A new connection that authenticates and asks to resume (no bind)."""
    raw = await RawXmpp.connect(hub)
    await raw.authenticate(login)
    features = await raw.open_stream()
    assert features.find(q(SM, "sm")) is not None
    raw.send(f"<resume xmlns='{SM}' previd='{previd}' h='{h}'/>")
    await raw.wait_for(
        lambda p: p.find(SM, "resumed") is not None or p.find(SM, "failed") is not None
    )
    return raw


def failed_with(raw: RawXmpp) -> str | None:
    found = raw.parsed().find(SM, "failed")
    if found is None:
        return None
    return found[0].tag.rpartition("}")[2]


async def bind_and_collect(raw: RawXmpp, count: int) -> list[ET.Element]:
    """After a failed resume: bind, become available, and wait for ``count`` messages."""
    raw.send(
        "<iq type='set' id='bind2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        "<resource>phone</resource></bind></iq>"
    )
    await raw.wait_for(lambda p: any(el.get("id") == "bind2" for el in p.elements))
    raw.send("<presence/>")
    await raw.wait_for(lambda p: len(bodies(p.elements)) >= count)
    await asyncio.sleep(0.5)  # and nothing more
    return [el for el in raw.parsed().elements if el.tag == q(CLIENT, "message")]


async def say(hub: HubHarness, token: str, to: str, text: str) -> None:
    """A message from a colleague on the web (stored when this returns)."""
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=token, json={"to": [to], "text": text}
    )
    assert resp.status == 201, resp.body


async def held(hub: HubHarness) -> None:
    await until(lambda: len(manager(hub).held) == 1)


async def gone(hub: HubHarness) -> None:
    """No session held or resumable any more (ended, its messages given back)."""
    await until(lambda: not manager(hub).held and not manager(hub).resumable)


def queued_messages(session: C2SSession) -> int:
    assert session.sm is not None
    return sum(1 for data in session.sm.queue if data.startswith(b"<message"))


# acks -----------------------------------------------------------------------------------------


async def test_acks_are_counted_requested_and_checked(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    raw = await RawXmpp.connect(hub)
    await raw.authenticate("alice")
    features = await raw.open_stream()
    # After authentication, next to bind; never in service discovery (a stream feature).
    assert features.find(q(SM, "sm")) is not None
    xmpp = hub.services.xmpp
    assert xmpp is not None and SM not in xmpp.features
    # Before a resource is bound: refused.
    raw.send(f"<enable xmlns='{SM}'/>")
    early = await raw.wait_for_element(SM, "failed")
    assert early.find(q("urn:ietf:params:xml:ns:xmpp-stanzas", "unexpected-request")) is not None
    raw.close()

    raw, _ = await sm_login(hub, "alice")
    raw.send(f"<r xmlns='{SM}'/>")
    await raw.wait_for(lambda p: answers(p) == ["0"])
    # Two stanzas handled: h is 2; their two answers wait for the client's ack.
    raw.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    raw.send("<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>")
    raw.send(f"<r xmlns='{SM}'/>")
    parsed = await raw.wait_for(lambda p: answers(p)[-1:] == ["2"])
    parsed = await raw.wait_for(lambda p: len(stanzas(after_enabled(p))) == 2)
    session = session_of(hub, alice_id)
    assert session.sm is not None and len(session.sm.queue) == 2
    # The server asked for an ack of them, once.
    sent = after_enabled(parsed)
    assert [el.tag for el in sent].count(q(SM, "r")) == 1
    raw.send(f"<a xmlns='{SM}' h='2'/>")
    await until(lambda: session.sm is not None and not session.sm.queue)
    # Acknowledged: a new stanza brings a new request.
    await say(hub, bob, alice_id, "hello")
    parsed = await raw.wait_for(lambda p: bodies(p.elements) == ["hello"])
    parsed = await raw.wait_for(lambda p: [el.tag for el in p.elements].count(q(SM, "r")) == 2)
    sent = after_enabled(parsed)
    assert len(session.sm.queue) == len(stanzas(sent)) - 2
    raw.send(f"<a xmlns='{SM}' h='{len(stanzas(sent))}'/>")
    await until(lambda: session.sm is not None and not session.sm.queue)
    # Enabling twice is refused.
    raw.send(f"<enable xmlns='{SM}' resume='true'/>")
    await raw.wait_for(lambda p: p.find(SM, "failed") is not None)
    # An ack of stanzas never sent ends the stream (XEP-0198 4).
    raw.send(f"<a xmlns='{SM}' h='{len(stanzas(sent)) + 5}'/>")
    ended = await raw.expect_stream_error("undefined-condition")
    error = ended.find(STREAM_NS, "error")
    assert error is not None
    too_high = error.find(q(SM, "handled-count-too-high"))
    assert too_high is not None and too_high.get("h") == str(len(stanzas(sent)) + 5)


async def test_resume_before_authentication_is_refused(hub: HubHarness) -> None:
    await hub.create_user("alice")
    _, previd = await sm_login(hub, "alice")
    raw = await RawXmpp.connect(hub, direct_tls=True)
    await raw.open_stream()
    raw.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    await raw.expect_stream_error("not-authorized")


# resumption ---------------------------------------------------------------------------------


async def test_a_dropped_connection_is_held_and_resumed_with_what_was_missed(
    hub: HubHarness,
) -> None:
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    raw, previd = await sm_login(hub, "alice")
    session = session_of(hub, alice_id)
    raw.close()  # the network is gone: no </stream>
    await held(hub)
    for text in ("one", "two", "three"):
        await say(hub, bob, alice_id, text)
    # Still bound and online for colleagues past the presence grace: no flap.
    await asyncio.sleep(0.6)
    assert session.hibernating and session.bound
    assert await hub.services.presence.seen_status(alice_id) != "offline"
    await until(lambda: queued_messages(session) == 3)
    h = len(stanzas(after_enabled(raw.parsed())))  # what reached the client before the drop

    again = await resume(hub, "alice", previd, h)
    resumed = again.parsed().find(SM, "resumed")
    assert resumed is not None, again.transcript()
    assert resumed.get("previd") == previd and resumed.get("h") == "0"
    await again.wait_for(lambda p: len(bodies(p.elements)) >= 3)
    await asyncio.sleep(0.5)
    # Exactly those, once, in order.
    assert bodies(again.parsed().elements) == ["one", "two", "three"]
    # The stream goes on as the same session: no second bind, acks carry on.
    assert session_of(hub, alice_id) is session and not session.hibernating
    assert not manager(hub).held
    again.send(f"<r xmlns='{SM}'/>")
    await again.wait_for(lambda p: p.find(SM, "a") is not None)
    again.send(f"<message to='bob@{domain_of(hub)}' type='chat'><body>back</body></message>")
    await until(lambda: session.sm is not None and session.sm.handled == 1)


async def test_a_real_client_resumes_after_its_connection_drops(hub: HubHarness) -> None:
    """slixmpp's XEP-0198 plugin: it acks as asked, and resumes on its next connection."""
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    client = await xmpp_login(hub, "alice", plugins=("xep_0198",))
    plugin = client.plugin["xep_0198"]
    await until(lambda: bool(plugin.sm_id))
    resumed = asyncio.Event()
    client.add_event_handler("session_resumed", lambda _event: resumed.set())
    await say(hub, bob, alice_id, "zero")
    await client.wait_for_condition(lambda: client.bodies() == ["zero"])
    session = session_of(hub, alice_id)
    await until(lambda: session.sm is not None and not session.sm.queue)  # it acknowledged
    client.gone.clear()
    assert client.transport is not None
    client.transport.abort()  # the network is gone
    await client.gone.wait()
    await held(hub)
    for text in ("one", "two", "three"):
        await say(hub, bob, alice_id, text)
    xmpp = hub.services.xmpp
    assert xmpp is not None
    client.connect("127.0.0.1", xmpp.ports["starttls"])
    await asyncio.wait_for(resumed.wait(), 15)
    await client.wait_for_condition(lambda: len(client.bodies()) >= 4)
    await asyncio.sleep(0.5)
    assert client.bodies() == ["zero", "one", "two", "three"]
    assert session_of(hub, alice_id) is session


async def test_acknowledged_stanzas_are_not_sent_again(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    raw, previd = await sm_login(hub, "alice")
    for text in ("seen", "unseen"):
        await say(hub, bob, alice_id, text)
    parsed = await raw.wait_for(lambda p: bodies(p.elements) == ["seen", "unseen"])
    received = stanzas(after_enabled(parsed))
    # The client acknowledges up to "seen" only, then loses the connection.
    upto_seen = next(
        i + 1 for i, el in enumerate(received) if el.findtext(q(CLIENT, "body")) == "seen"
    )
    raw.send(f"<a xmlns='{SM}' h='{upto_seen}'/>")
    session = session_of(hub, alice_id)
    await until(lambda: session.sm is not None and session.sm.acked == upto_seen)
    raw.close()
    await held(hub)
    again = await resume(hub, "alice", previd, upto_seen)
    assert again.parsed().find(SM, "resumed") is not None, again.transcript()
    await again.wait_for(lambda p: bodies(p.elements) == ["unseen"])
    await asyncio.sleep(0.5)
    assert bodies(again.parsed().elements) == ["unseen"]

    # Everything acknowledged this time: a resume sends nothing again.
    everything = len(stanzas(after_enabled(again.parsed())))
    assert everything >= 1
    again.send(f"<a xmlns='{SM}' h='{upto_seen + everything}'/>")
    await until(lambda: session.sm is not None and not session.sm.queue)
    again.close()
    await held(hub)
    third = await resume(hub, "alice", previd, upto_seen + everything)
    assert third.parsed().find(SM, "resumed") is not None, third.transcript()
    await asyncio.sleep(0.5)
    assert bodies(third.parsed().elements) == []


async def test_a_resume_while_the_old_connection_looks_open_takes_it_over(
    hub: HubHarness,
) -> None:
    """The client saw its connection die before the server did: the old one is dropped."""
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    raw, previd = await sm_login(hub, "alice")
    session = session_of(hub, alice_id)
    again = await resume(hub, "alice", previd, len(stanzas(after_enabled(raw.parsed()))))
    assert again.parsed().find(SM, "resumed") is not None, again.transcript()
    await asyncio.wait_for(raw.recorder.lost.wait(), 10)
    await say(hub, bob, alice_id, "after")
    await again.wait_for(lambda p: bodies(p.elements) == ["after"])
    assert bodies(raw.parsed().elements) == []
    assert session_of(hub, alice_id) is session and not manager(hub).held


async def test_a_resume_of_another_users_session_fails(hub: HubHarness) -> None:
    await hub.create_user("alice")
    await hub.create_user("mallory")
    raw, previd = await sm_login(hub, "alice")
    raw.close()
    await held(hub)
    thief = await resume(hub, "mallory", previd, 0)
    assert failed_with(thief) == "item-not-found", thief.transcript()
    unknown = await resume(hub, "alice", "nothing.known", 0)
    assert failed_with(unknown) == "item-not-found"
    # Alice's session is untouched: she resumes it.
    assert len(manager(hub).held) == 1
    own = await resume(hub, "alice", previd, len(stanzas(after_enabled(raw.parsed()))))
    assert own.parsed().find(SM, "resumed") is not None, own.transcript()


async def test_after_the_window_the_missed_messages_come_offline_once(
    settings: Settings, store: Store
) -> None:
    quick = settings.model_copy(update={"xmpp_resume_seconds": 2.0})
    async with start_hub(quick, store) as hub:
        alice_id, _ = await hub.create_user("alice")
        _, bob = await hub.create_user("bob")
        raw, previd = await sm_login(hub, "alice")
        await say(hub, bob, alice_id, "acked")
        parsed = await raw.wait_for(lambda p: bodies(p.elements) == ["acked"])
        h = len(stanzas(after_enabled(parsed)))
        raw.send(f"<a xmlns='{SM}' h='{h}'/>")
        await say(hub, bob, alice_id, "unacked")
        await raw.wait_for(lambda p: bodies(p.elements) == ["acked", "unacked"])
        raw.close()  # "unacked" reached the client, which never said so
        await held(hub)
        for text in ("one", "two", "three"):
            await say(hub, bob, alice_id, text)
        # The hold runs out: alice goes offline for her colleagues.
        await gone(hub)
        xmpp = hub.services.xmpp
        assert xmpp is not None and not xmpp.sessions_of(alice_id)
        await until_offline(hub, alice_id)

        late = await resume(hub, "alice", previd, h)
        assert failed_with(late) == "item-not-found", late.transcript()
        messages = await bind_and_collect(late, 4)
        assert bodies(messages) == ["unacked", "one", "two", "three"]
        assert all(m.find(q(DELAY, "delay")) is not None for m in messages)
        late.send("</stream:stream>")
        await late.closed_with()

        # Once: the next login gets none of them again.
        again = await RawXmpp.connect(hub)
        await again.login("alice", "laptop")
        again.send("<presence/>")
        await asyncio.sleep(1.0)
        assert bodies(again.parsed().elements) == []


async def until_offline(hub: HubHarness, user_id: str) -> None:
    deadline = time.monotonic() + 10
    while await hub.services.presence.seen_status(user_id) != "offline":
        assert time.monotonic() < deadline, "still online"
        await asyncio.sleep(0.05)


async def test_a_restart_fails_the_resume_and_delivers_offline(
    settings: Settings, store: Store
) -> None:
    async with start_hub(settings, store) as one:
        alice_id, _ = await one.create_user("alice")
        _, bob = await one.create_user("bob")
        raw, previd = await sm_login(one, "alice")
        await say(one, bob, alice_id, "before")
        parsed = await raw.wait_for(lambda p: bodies(p.elements) == ["before"])
        h = len(stanzas(after_enabled(parsed))) - 1  # "before" not acknowledged
        raw.close()
        await held(one)
        await say(one, bob, alice_id, "during")
        await until(lambda: queued_messages(session_of(one, alice_id)) == 2)
    # The hub stopped gracefully and starts again over the same database.
    async with start_hub(settings, store) as two:
        late = await resume(two, "alice", previd, h)
        assert failed_with(late) == "item-not-found", late.transcript()
        messages = await bind_and_collect(late, 2)
        assert bodies(messages) == ["before", "during"]
        assert all(m.find(q(DELAY, "delay")) is not None for m in messages)


async def test_a_resume_on_another_node_fails_and_the_holder_lets_go(
    settings: Settings, store: Store, redis_server: RedisServer
) -> None:
    shared = settings.model_copy(update={"redis_url": SecretStr(redis_server.url)})
    async with start_hub(shared, store) as one, start_hub(shared, store) as two:
        alice_id, _ = await one.create_user("alice")
        _, bob = await one.create_user("bob")
        raw, previd = await sm_login(one, "alice")
        await say(one, bob, alice_id, "missed")
        parsed = await raw.wait_for(lambda p: bodies(p.elements) == ["missed"])
        h = len(stanzas(after_enabled(parsed))) - 1
        raw.close()
        await held(one)
        started = time.monotonic()
        elsewhere = await resume(two, "alice", previd, h)
        assert failed_with(elsewhere) == "item-not-found", elsewhere.transcript()
        # Node one gave the session up before node two answered (not at the window's end).
        assert not manager(one).held
        assert time.monotonic() - started < stream_management.RELEASE_WAIT_SECONDS
        messages = await bind_and_collect(elsewhere, 1)
        assert bodies(messages) == ["missed"]


async def test_too_many_unacknowledged_stanzas_end_the_held_session(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_management, "MAX_QUEUE", 4)
    alice_id, _ = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    raw, previd = await sm_login(hub, "alice")
    h = len(stanzas(after_enabled(raw.parsed())))
    raw.close()
    await held(hub)
    texts = [f"m{i}" for i in range(6)]
    for text in texts:
        await say(hub, bob, alice_id, text)
    await gone(hub)
    late = await resume(hub, "alice", previd, h)
    assert failed_with(late) == "item-not-found"
    messages = await bind_and_collect(late, len(texts))
    assert bodies(messages) == texts


async def test_an_h_that_is_not_a_number_ends_the_stream(hub: HubHarness) -> None:
    await hub.create_user("alice")
    raw, _ = await sm_login(hub, "alice")
    raw.send(f"<a xmlns='{SM}' h='x'/>")
    ended = await raw.expect_stream_error("invalid-xml")
    error = ended.find(STREAM_NS, "error")
    assert error is not None and error.find(q(STREAMS_NS, "invalid-xml")) is not None
