"""Hostile XMPP clients on raw sockets: restricted XML, oversize stanzas, floods, spoofing,
downgrades, STARTTLS command injection, garbage connections by the thousand, slow logins and
resource conflicts.

Every attack must end with the exact stream error condition RFC 6120 prescribes and a closed
connection, while two logged-in users (real slixmpp clients) keep chatting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import resource
import ssl
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from slixmpp import JID

from server.settings import Settings
from server.store.database import Store
from tests.harness import DEFAULT_PASSWORD, HubHarness, start_hub
from tests.xmpp_client import XmppClient, xmpp_login

STREAM_NS = "http://etherx.jabber.org/streams"
STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
STANZA_LIMIT = 8 * 1024  # xmpp_max_stanza_bytes of the hostile hubs
PRE_AUTH_LIMIT = 16 * 1024  # the cap before authentication (session.PRE_AUTH_STANZA_BYTES)
AUTH_TIMEOUT = 2.0  # xmpp_auth_timeout_seconds of the hostile hubs


def q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


# hubs -----------------------------------------------------------------------------------------


def hostile_settings(settings: Settings, *, plaintext: bool) -> Settings:
    return settings.model_copy(
        update={
            "xmpp_max_stanza_bytes": STANZA_LIMIT,
            "xmpp_auth_timeout_seconds": AUTH_TIMEOUT,
            "xmpp_allow_plaintext": plaintext,
        }
    )


@pytest.fixture
async def strict_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    """TLS required (the default), small stanzas, a short authentication timeout."""
    async with start_hub(hostile_settings(settings, plaintext=False), store) as harness:
        yield harness


@pytest.fixture
async def plain_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    """As strict_hub, but streams without TLS are allowed (loopback tests only)."""
    async with start_hub(hostile_settings(settings, plaintext=True), store) as harness:
        yield harness


@pytest.fixture
async def either_hub(
    request: pytest.FixtureRequest, settings: Settings, store: Store
) -> AsyncIterator[HubHarness]:
    """strict_hub or plain_hub, by the parameter: whether plaintext streams are allowed."""
    plaintext = bool(request.param)
    async with start_hub(hostile_settings(settings, plaintext=plaintext), store) as harness:
        yield harness


def domain_of(hub: HubHarness) -> str:
    assert hub.services.xmpp is not None
    return hub.services.xmpp.domain


# two users who keep chatting ------------------------------------------------------------------


@dataclass
class Chatters:
    """Alice and Bob, logged in with slixmpp; ``check`` proves they can still talk."""

    hub: HubHarness
    alice_id: str
    bob_id: str
    alice: XmppClient
    bob: XmppClient
    sent: int = 0

    async def check(self, label: str, timeout: float = 10.0) -> float:
        """One message, alternately each way; returns how long it took to arrive."""
        self.sent += 1
        sender, receiver, to = (
            (self.alice, self.bob, "bob") if self.sent % 2 else (self.bob, self.alice, "alice")
        )
        text = f"{label} #{self.sent} {uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        sender.send_message(mto=JID(f"{to}@{domain_of(self.hub)}"), mbody=text, mtype="chat")
        await receiver.wait_for_condition(lambda: text in receiver.bodies(), timeout)
        return time.monotonic() - started

    def assert_untouched(self) -> None:
        """Neither got anything but the checks' own messages."""
        for client in (self.alice, self.bob):
            strays = [b for b in client.bodies() if not b.startswith(("before", "after"))]
            assert not strays, strays


async def chatters(hub: HubHarness) -> Chatters:
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    pair = Chatters(
        hub, alice_id, bob_id, await xmpp_login(hub, "alice"), await xmpp_login(hub, "bob")
    )
    await pair.check("before")
    return pair


# a raw client ---------------------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    """Keeps every byte the server sends, and notices when it closes the connection."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()
        self.lost = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def eof_received(self) -> bool | None:
        return None  # the server closed its side: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.arrived.set()


@dataclass
class Parsed:
    """What the server sent on the current stream: its header, top-level elements, the end."""

    header: dict[str, str] | None = None
    elements: list[ET.Element] = field(default_factory=list)
    ended: bool = False

    def find(self, ns: str, local: str) -> ET.Element | None:
        return next((el for el in self.elements if el.tag == q(ns, local)), None)

    @property
    def stream_error(self) -> str | None:
        error = self.find(STREAM_NS, "error")
        if error is None:
            return None
        conditions = [
            c.tag.rpartition("}")[2] for c in error if c.tag.startswith(f"{{{STREAMS_NS}}}")
        ]
        conditions = [c for c in conditions if c != "text"]
        assert len(conditions) == 1, ET.tostring(error)
        return conditions[0]


def parse_stream(data: bytes) -> Parsed:
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
    parser.feed(data)
    parsed = Parsed()
    depth = 0
    for item in parser.read_events():
        event, el = item[0], item[-1]
        assert isinstance(el, ET.Element)
        if event == "start":
            depth += 1
            if depth == 1:
                assert el.tag == q(STREAM_NS, "stream"), el.tag
                parsed.header = dict(el.attrib)
        else:
            depth -= 1
            if depth == 1:
                parsed.elements.append(el)
            elif depth == 0:
                parsed.ended = True
    return parsed


def client_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the development certificate is self-signed
    return context


def plain_auth(login: str, password: str = DEFAULT_PASSWORD) -> str:
    initial = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{initial}</auth>"


class RawXmpp:
    """A hand-driven client-to-server stream; nothing hides what goes over the wire."""

    def __init__(self, hub: HubHarness, recorder: Recorder, *, tls: bool) -> None:
        self.hub = hub
        self.recorder = recorder
        self.tls = tls
        self.base = 0  # where the server's current stream begins in recorder.data
        self.authenticated = False

    @classmethod
    async def connect(cls, hub: HubHarness, *, direct_tls: bool = False) -> RawXmpp:
        xmpp = hub.services.xmpp
        assert xmpp is not None
        loop = asyncio.get_running_loop()
        _, recorder = await loop.create_connection(
            Recorder,
            "127.0.0.1",
            xmpp.ports["tls" if direct_tls else "starttls"],
            ssl=client_tls_context() if direct_tls else None,
            server_hostname=xmpp.domain if direct_tls else None,
        )
        raw = cls(hub, recorder, tls=direct_tls)
        hub.closers.append(raw.close)
        return raw

    @property
    def header(self) -> str:
        return (
            f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            f"xmlns:stream='{STREAM_NS}' to='{domain_of(self.hub)}' version='1.0'>"
        )

    def send(self, data: str | bytes) -> None:
        assert self.recorder.transport is not None
        self.recorder.transport.write(data.encode() if isinstance(data, str) else data)

    def parsed(self) -> Parsed:
        return parse_stream(bytes(self.recorder.data[self.base :]))

    def transcript(self) -> str:
        return bytes(self.recorder.data).decode(errors="replace")[-2000:]

    async def wait_for(self, condition: Callable[[Parsed], bool], timeout: float = 10.0) -> Parsed:
        deadline = time.monotonic() + timeout
        while True:
            parsed = self.parsed()
            if condition(parsed):
                return parsed
            if self.recorder.lost.is_set():
                raise AssertionError(f"the server closed the stream: {self.transcript()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"nothing expected arrived: {self.transcript()}")
            self.recorder.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.recorder.arrived.wait(), min(remaining, 0.5))

    async def wait_for_element(self, ns: str, local: str, timeout: float = 10.0) -> ET.Element:
        parsed = await self.wait_for(lambda p: p.find(ns, local) is not None, timeout)
        found = parsed.find(ns, local)
        assert found is not None
        return found

    def restart(self) -> None:
        """The server starts a new stream (after <proceed/> or <success/>)."""
        self.base = len(self.recorder.data)

    async def open_stream(self, prolog: str = "") -> ET.Element:
        """Send a stream header; return the server's features."""
        self.send(prolog + self.header)
        return await self.wait_for_element(STREAM_NS, "features")

    async def starttls(self) -> None:
        self.send(f"<starttls xmlns='{TLS_NS}'/>")
        await self.wait_for_element(TLS_NS, "proceed")
        self.restart()
        assert self.recorder.transport is not None
        transport = await asyncio.get_running_loop().start_tls(
            self.recorder.transport,
            self.recorder,
            client_tls_context(),
            server_hostname=domain_of(self.hub),
        )
        assert transport is not None
        self.recorder.transport = transport
        self.tls = True

    async def authenticate(self, login: str) -> None:
        """Up to SASL success (over STARTTLS unless already on TLS); the stream then restarts."""
        await self.open_stream()
        if not self.tls:
            await self.starttls()
            await self.open_stream()
        self.send(plain_auth(login))
        parsed = await self.wait_for(
            lambda p: (
                p.find(SASL_NS, "success") is not None or p.find(SASL_NS, "failure") is not None
            )
        )
        assert parsed.find(SASL_NS, "success") is not None, self.transcript()
        self.restart()
        self.authenticated = True

    async def login(self, login: str, resource: str = "raw") -> str:
        """Authenticate and bind; returns the bound JID."""
        await self.authenticate(login)
        features = await self.open_stream()
        assert features.find(q(BIND_NS, "bind")) is not None
        self.send(
            f"<iq type='set' id='bind1'><bind xmlns='{BIND_NS}'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        parsed = await self.wait_for(
            lambda p: any(el.get("id") == "bind1" for el in p.elements if el.tag.endswith("}iq"))
        )
        [reply] = [el for el in parsed.elements if el.get("id") == "bind1"]
        assert reply.get("type") == "result", self.transcript()
        jid = reply.findtext(f"{q(BIND_NS, 'bind')}/{q(BIND_NS, 'jid')}")
        assert jid
        return jid

    async def closed_with(self, timeout: float = 10.0) -> str | None:
        """Wait for the server to close the connection; the stream error it sent, if any."""
        try:
            await asyncio.wait_for(self.recorder.lost.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"the server left the stream open: {self.transcript()}") from None
        parsed = self.parsed()
        if parsed.stream_error is not None:
            assert parsed.ended, f"</stream:stream> missing after the error: {self.transcript()}"
        return parsed.stream_error

    async def expect_stream_error(self, condition: str, timeout: float = 10.0) -> Parsed:
        got = await self.closed_with(timeout)
        assert got == condition, f"expected <{condition}/>, got <{got}/>: {self.transcript()}"
        return self.parsed()

    def close(self) -> None:
        if self.recorder.transport is not None:
            self.recorder.transport.abort()


# restricted XML -------------------------------------------------------------------------------

BILLION_LAUGHS = (
    "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
    + "".join(
        f"<!ENTITY lol{i} '{('&lol' + (str(i - 1) if i > 1 else '') + ';') * 10}'>"
        for i in range(1, 10)
    )
    + "]>"
)
# name -> (what comes before the stream header, what comes after it)
RESTRICTED = {
    "billion-laughs": (BILLION_LAUGHS, "<message to='bob@localhost'><body>&lol9;</body></message>"),
    "doctype": ("<!DOCTYPE stream:stream>", ""),
    "comment": ("", "<!-- a comment between stanzas -->"),
    "comment-in-stanza": ("", "<message to='bob@localhost'><body>hi<!-- x --></body></message>"),
    "processing-instruction": ("", "<?php system('id'); ?>"),
    "doctype-inside-stream": ("", "<!DOCTYPE x [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>"),
    "entity-reference": ("", "<message to='bob@localhost'><body>&xxe;</body></message>"),
}
# A DOCTYPE is only well-formed before a stream header: try it at each stream start. The rest
# go into a stream: one before TLS, and one of a logged-in user.
RESTRICTED_CASES = [
    (name, phase)
    for name, (prolog, _) in RESTRICTED.items()
    for phase in (("plain", "tls", "authenticated") if prolog else ("plain", "bound"))
]


async def raw_in_phase(hub: HubHarness, phase: str, login: str = "mallory") -> RawXmpp:
    """A raw stream brought to ``phase``; for plain/tls/authenticated no header is sent yet."""
    if phase != "plain" and await hub.services.directory.user_by_login(login) is None:
        await hub.create_user(login)
    raw = await RawXmpp.connect(hub)
    if phase == "tls":
        await raw.open_stream()
        await raw.starttls()
    elif phase == "authenticated":
        await raw.authenticate(login)
    elif phase == "bound":
        await raw.login(login)
    return raw


@pytest.mark.parametrize(("attack", "phase"), RESTRICTED_CASES)
async def test_restricted_xml_ends_the_stream(
    strict_hub: HubHarness, attack: str, phase: str
) -> None:
    pair = await chatters(strict_hub)
    raw = await raw_in_phase(strict_hub, phase)
    prolog, body = RESTRICTED[attack]
    raw.send(body if phase == "bound" else prolog + raw.header + body)
    await raw.expect_stream_error("restricted-xml")
    pair.assert_untouched()
    await pair.check(f"after {attack}")


# oversize stanzas -----------------------------------------------------------------------------


def big_message(size: int, finished: bool = True) -> str:
    start = "<message to='bob@localhost' type='chat'><body>"
    end = "</body></message>" if finished else ""
    return start + "x" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize(
    "shape", ["complete", "unfinished", "dribbled", "huge-start-tag", "stream-header"]
)
async def test_oversize_stanza_of_a_user_is_a_policy_violation(
    strict_hub: HubHarness, shape: str
) -> None:
    pair = await chatters(strict_hub)
    raw = await raw_in_phase(strict_hub, "authenticated" if shape == "stream-header" else "bound")
    size = STANZA_LIMIT + 4096
    if shape == "complete":
        raw.send(big_message(size))
    elif shape == "unfinished":
        raw.send(big_message(size, finished=False))
    elif shape == "dribbled":
        for chunk in range(0, size, 1024):
            if raw.recorder.lost.is_set():
                break
            raw.send("<message to='bob@localhost'><body>" if chunk == 0 else "y" * 1024)
            await asyncio.sleep(0.02)
    elif shape == "huge-start-tag":
        # Never finishes its start tag: no stanza has begun as far as expat reports, yet the
        # parser buffers every byte of it.
        raw.send("<message to='bob@localhost' a='" + "A" * (4 * STANZA_LIMIT))
    else:
        raw.send(raw.header.replace(" to=", " x='" + "A" * (4 * STANZA_LIMIT) + "' to="))
    await raw.expect_stream_error("policy-violation")
    pair.assert_untouched()
    await pair.check(f"after oversize {shape}")


@pytest.mark.parametrize(
    ("either_hub", "phase"), [(True, "plain"), (False, "tls")], indirect=["either_hub"]
)
async def test_oversize_stanza_before_authentication(either_hub: HubHarness, phase: str) -> None:
    """Before authentication the cap is the smaller of 16 KiB and xmpp_max_stanza_bytes."""
    hub = either_hub
    pair = await chatters(hub)
    raw = await raw_in_phase(hub, phase)
    await raw.open_stream()
    # Between the stanza limit and the pre-authentication cap: too big for either.
    raw.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>" + "QUFB" * 3000 + "</auth>")
    await raw.expect_stream_error("policy-violation")
    await pair.check("after oversize auth")


async def test_pre_auth_cap_is_16_kib_with_default_settings(hub: HubHarness) -> None:
    pair = await chatters(hub)
    assert hub.services.xmpp is not None
    assert hub.services.xmpp.settings.xmpp_max_stanza_bytes > PRE_AUTH_LIMIT
    raw = await raw_in_phase(hub, "tls")
    await raw.open_stream()
    raw.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>" + "QUFB" * 5000)  # 20 KB, unfinished
    await raw.expect_stream_error("policy-violation")
    # The same size is fine once authenticated (2-byte characters: the portal's limit on a
    # message is 10,000 characters).
    text = "\u00e9" * 9000
    assert len(text.encode()) > PRE_AUTH_LIMIT
    pair.alice.send_message(mto=JID(f"bob@{domain_of(hub)}"), mbody=text, mtype="chat")
    await pair.bob.wait_for_condition(lambda: text in pair.bob.bodies())
    await pair.check("after the pre-auth cap")


# floods before authentication -----------------------------------------------------------------


@pytest.mark.parametrize("phase", ["plain", "tls", "authenticated"])
async def test_unauthenticated_stanza_flood_is_not_authorized(
    strict_hub: HubHarness, phase: str
) -> None:
    pair = await chatters(strict_hub)
    raw = await raw_in_phase(strict_hub, phase)
    flood = "".join(
        f"<message to='bob@{domain_of(strict_hub)}' type='chat'><body>spam {i}</body></message>"
        for i in range(200)
    )
    raw.send(raw.header + flood)
    await raw.expect_stream_error("not-authorized")
    await pair.check("after the flood")
    pair.assert_untouched()


# spoofing -------------------------------------------------------------------------------------


async def test_spoofed_from_is_overwritten_with_the_true_sender(strict_hub: HubHarness) -> None:
    pair = await chatters(strict_hub)
    await strict_hub.create_user("carol")
    mallory_id, _ = await strict_hub.create_user("mallory")
    domain = domain_of(strict_hub)
    raw = await RawXmpp.connect(strict_hub)
    jid = await raw.login("mallory", "laptop")
    assert jid == f"mallory@{domain}/laptop"
    forged = [f"carol@{domain}", f"carol@{domain}/phone", f"bob@{domain}", domain, "x@evil.test"]
    for i, sender in enumerate(forged):
        raw.send(
            f"<message from='{sender}' to='bob@{domain}' type='chat' id='spoof{i}'>"
            f"<body>I am {sender} ({i})</body></message>"
        )
    bob = pair.bob
    await bob.wait_for_condition(
        lambda: sum(b.startswith("I am ") for b in bob.bodies()) == len(forged)
    )
    for message in bob.messages:
        if str(message["body"]).startswith("I am "):
            assert message["from"].bare == f"mallory@{domain}", message
    # The portal's history names the true author too.
    bob_token = await strict_hub.services.auth.issue_token(pair.bob_id)
    dialog = await strict_hub.request(
        "POST", "/api/v1/im/dialogs", token=bob_token, json={"user_id": mallory_id}
    )
    assert dialog.status in (200, 201), dialog.body
    history = await strict_hub.request(
        "GET", f"/api/v1/im/chats/{dialog.body['id']}/messages", token=bob_token
    )
    assert history.status == 200
    assert [m["text"] for m in history.body] == [f"I am {s} ({i})" for i, s in enumerate(forged)]
    assert {m["author_id"] for m in history.body} == {mallory_id}
    assert raw.parsed().stream_error is None
    await pair.check("after spoofing")


# no PLAIN without TLS, no login without TLS ----------------------------------------------------


async def test_plain_is_never_offered_on_an_unencrypted_stream(plain_hub: HubHarness) -> None:
    pair = await chatters(plain_hub)
    await plain_hub.create_user("mallory")
    raw = await RawXmpp.connect(plain_hub)
    features = await raw.open_stream()
    starttls = features.find(q(TLS_NS, "starttls"))
    assert starttls is not None and starttls.find(q(TLS_NS, "required")) is None
    mechanisms = [m.text for m in features.iter(q(SASL_NS, "mechanism"))]
    assert mechanisms and all(str(m).startswith("SCRAM-") for m in mechanisms), mechanisms
    raw.send(plain_auth("mallory"))
    failure = await raw.wait_for_element(SASL_NS, "failure")
    assert [c.tag for c in failure] == [q(SASL_NS, "invalid-mechanism")]
    assert raw.parsed().find(SASL_NS, "success") is None
    # Once encrypted, the same stream offers PLAIN, and it works.
    await raw.starttls()
    features = await raw.open_stream()
    assert "PLAIN" in [m.text for m in features.iter(q(SASL_NS, "mechanism"))]
    raw.send(plain_auth("mallory"))
    await raw.wait_for_element(SASL_NS, "success")
    await pair.check("after the downgrade attempt")


async def test_default_settings_require_starttls_before_anything(hub: HubHarness) -> None:
    pair = await chatters(hub)
    await hub.create_user("mallory")
    raw = await RawXmpp.connect(hub)
    features = await raw.open_stream()
    starttls = features.find(q(TLS_NS, "starttls"))
    assert starttls is not None and starttls.find(q(TLS_NS, "required")) is not None
    assert features.find(q(SASL_NS, "mechanisms")) is None
    assert [child.tag for child in features] == [q(TLS_NS, "starttls")]
    raw.send(plain_auth("mallory"))
    await raw.expect_stream_error("policy-violation")
    assert raw.parsed().find(SASL_NS, "success") is None
    await pair.check("after a login without TLS")


# STARTTLS command injection -------------------------------------------------------------------

INJECTIONS = {
    "auth": plain_auth("mallory"),
    "unfinished-stanza": f"<iq type='set' id='b'><bind xmlns='{BIND_NS}'><resource>x",
    "unfinished-tag": f"<auth xmlns='{SASL_NS}' mechanism='PLAIN",
    "stream-restart": (
        f"<stream:stream xmlns='jabber:client' xmlns:stream='{STREAM_NS}' version='1.0'>"
    ),
}


@pytest.mark.parametrize("injected", list(INJECTIONS))
@pytest.mark.parametrize("form", ["empty-tag", "start-end-tags"])
async def test_starttls_command_injection_is_refused(
    strict_hub: HubHarness, injected: str, form: str
) -> None:
    pair = await chatters(strict_hub)
    await strict_hub.create_user("mallory")
    raw = await RawXmpp.connect(strict_hub)
    await raw.open_stream()
    starttls = (
        f"<starttls xmlns='{TLS_NS}'/>"
        if form == "empty-tag"
        else f"<starttls xmlns='{TLS_NS}'></starttls>"
    )
    raw.send(starttls + INJECTIONS[injected])  # one write: one packet on loopback
    parsed = await raw.expect_stream_error("policy-violation")
    # Nothing of it was acted on: no TLS, no SASL answer, no bind.
    assert [el.tag for el in parsed.elements] == [q(STREAM_NS, "features"), q(STREAM_NS, "error")]
    assert strict_hub.services.xmpp is not None
    assert not [s for s in strict_hub.services.xmpp._all if s.user and s.user["login"] == "mallory"]
    await pair.check("after STARTTLS injection")


async def test_starttls_followed_by_whitespace_still_works(strict_hub: HubHarness) -> None:
    await strict_hub.create_user("mallory")
    raw = await RawXmpp.connect(strict_hub)
    await raw.open_stream()
    raw.send(f"<starttls xmlns='{TLS_NS}'/>  \n")
    await raw.wait_for_element(TLS_NS, "proceed")
    raw.restart()
    assert raw.recorder.transport is not None
    transport = await asyncio.get_running_loop().start_tls(
        raw.recorder.transport, raw.recorder, client_tls_context(), server_hostname="localhost"
    )
    assert transport is not None
    raw.recorder.transport, raw.tls = transport, True
    assert await raw.login("mallory") == f"mallory@{domain_of(strict_hub)}/raw"


# a thousand garbage connections ---------------------------------------------------------------

GARBAGE_CONNECTIONS = 1000
# Connections being set up at the same moment. The hub listens with asyncio's default backlog
# (100): a burst of more unanswered handshakes overflows the kernel's accept queue, and a
# silent client whose handshake the kernel dropped waits forever for a server that never saw
# it. Every connection still ends up open at the same time as the others.
CONNECTING_AT_ONCE = 50
HALF_HEADER = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http"
GARBAGE_KINDS = (
    "bytes-close",  # random bytes, then the client hangs up
    "bytes-silent",  # random bytes, then silence
    "half-header-close",
    "half-header-silent",  # well-formed so far: only the authentication timeout ends it
    "silent",  # connects and says nothing
    "tls-bytes",  # random bytes to the direct TLS port
)


def allowed_connections(wanted: int) -> int:
    """Raise the open-file limit for ``wanted`` connections (both ends are in this process)."""
    needed = 2 * wanted + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        reduced = max(10, (soft - 512) // 2)
        warnings.warn(
            f"open-file limit {soft} allows only {reduced} of {wanted} garbage connections",
            stacklevel=2,
        )
        return reduced
    return wanted


@dataclass
class Garbage:
    kind: str
    closed_by_server: bool = False
    received: bytes = b""


@dataclass
class GarbageAttack:
    port: int
    tls_port: int
    connecting: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(CONNECTING_AT_ONCE)
    )
    open_now: int = 0
    most_open: int = 0

    async def run(self, garbage: Garbage, seed: int) -> None:
        rng = random.Random(seed)
        target = self.tls_port if garbage.kind == "tls-bytes" else self.port
        async with self.connecting:
            reader, writer = await asyncio.open_connection("127.0.0.1", target)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            if garbage.kind.startswith("bytes") or garbage.kind == "tls-bytes":
                writer.write(rng.randbytes(rng.randint(1, 2048)))
            elif garbage.kind.startswith("half-header"):
                writer.write(HALF_HEADER[: rng.randint(10, len(HALF_HEADER))])
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if garbage.kind.endswith("close"):
                return
            while True:  # silent until the server gives up on us
                try:
                    chunk = await reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    garbage.closed_by_server = True
                    return
                garbage.received += chunk
        finally:
            self.open_now -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def test_a_thousand_garbage_connections(strict_hub: HubHarness) -> None:
    xmpp = strict_hub.services.xmpp
    assert xmpp is not None
    pair = await chatters(strict_hub)
    baseline = len(xmpp._all)
    count = allowed_connections(GARBAGE_CONNECTIONS)
    garbage = [Garbage(GARBAGE_KINDS[i % len(GARBAGE_KINDS)]) for i in range(count)]
    attack = GarbageAttack(xmpp.ports["starttls"], xmpp.ports["tls"])

    latencies: list[float] = []
    attack_over = asyncio.Event()

    async def keep_chatting() -> None:
        while not attack_over.is_set():
            latencies.append(await pair.check("during the attack", timeout=15))
            await asyncio.sleep(0.3)

    chatting = asyncio.create_task(keep_chatting())
    started = time.monotonic()
    tasks = [asyncio.create_task(attack.run(g, seed)) for seed, g in enumerate(garbage)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=45)
    finally:
        attack_over.set()
        await chatting
    elapsed = time.monotonic() - started
    for task in pending:
        task.cancel()
    stuck = [
        (g.kind, g.received[-200:]) for g, t in zip(garbage, tasks, strict=True) if t in pending
    ]
    assert not stuck, f"{len(stuck)} connections still open after {elapsed:.0f}s: {stuck[:5]}"
    failures = [t.exception() for t in tasks if t.exception() is not None]
    assert not failures, failures[:5]
    # Those that wait for the authentication timeout were all open together.
    holders = sum(g.kind in ("half-header-silent", "silent") for g in garbage)
    assert attack.most_open >= 0.8 * holders, (attack.most_open, holders)
    assert all(g.closed_by_server for g in garbage if not g.kind.endswith("close"))
    for g in garbage:
        if g.kind == "half-header-silent":
            assert parse_stream(g.received).stream_error == "connection-timeout", g.received
    assert elapsed < 30, f"the server took {elapsed:.1f}s to close {count} connections"
    deadline = time.monotonic() + 15
    while len(xmpp._all) > baseline:
        assert time.monotonic() < deadline, f"{len(xmpp._all) - baseline} sessions left"
        await asyncio.sleep(0.1)
    assert latencies and max(latencies) < 10, latencies
    await pair.check("after the attack")


# timeouts and conflicts -----------------------------------------------------------------------


@pytest.mark.parametrize("stalling", ["silent", "whitespace-dribble", "authenticated-no-bind"])
async def test_authentication_timeout(strict_hub: HubHarness, stalling: str) -> None:
    pair = await chatters(strict_hub)
    await strict_hub.create_user("mallory")
    started = time.monotonic()
    raw = await RawXmpp.connect(strict_hub)
    if stalling == "authenticated-no-bind":
        await raw.authenticate("mallory")
        await raw.open_stream()
    else:
        await raw.open_stream()
    if stalling == "whitespace-dribble":
        while not raw.recorder.lost.is_set() and time.monotonic() - started < 4 * AUTH_TIMEOUT:
            raw.send(b" ")
            await asyncio.sleep(0.2)
    await raw.expect_stream_error("connection-timeout", timeout=4 * AUTH_TIMEOUT)
    elapsed = time.monotonic() - started
    assert AUTH_TIMEOUT * 0.9 <= elapsed < AUTH_TIMEOUT + 3, elapsed
    await pair.check("after the timeout")


async def test_resource_conflict_newer_session_wins(strict_hub: HubHarness) -> None:
    pair = await chatters(strict_hub)
    carol_id, _ = await strict_hub.create_user("carol")
    domain = domain_of(strict_hub)
    first = await RawXmpp.connect(strict_hub)
    assert await first.login("carol", "phone") == f"carol@{domain}/phone"
    second = await xmpp_login(strict_hub, "carol", resource="phone")
    await first.expect_stream_error("conflict")
    assert str(second.boundjid) == f"carol@{domain}/phone"
    xmpp = strict_hub.services.xmpp
    assert xmpp is not None
    [session] = xmpp.sessions_of(carol_id)
    assert session.jid is not None and session.jid.resource == "phone"
    # The newer session works both ways.
    pair.bob.send_message(mto=JID(f"carol@{domain}"), mbody="still there?", mtype="chat")
    await second.wait_for_condition(lambda: "still there?" in second.bodies())
    second.send_message(mto=JID(f"bob@{domain}"), mbody="yes, on my phone", mtype="chat")
    await pair.bob.wait_for_condition(lambda: "yes, on my phone" in pair.bob.bodies())
    assert not second.stream_errors
    await pair.check("after the conflict")
