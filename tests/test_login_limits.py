"""Login limits under concurrency, over real HTTP and real XMPP streams.

A hundred guesses sent at once get no more password checks than the lock allows, on REST and
over XMPP (PLAIN and SCRAM); the per-address limit refuses a flood before hashing, and a real
login from elsewhere still completes within a second (the issue's bound, not a benchmark).
The flood comes from 127.0.0.2: the loopback peer 127.0.0.1 is a trusted proxy by default,
so its own requests carry no address.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from scramp import ScramClient

from server.settings import Settings
from server.store.database import Store
from tests.harness import DEFAULT_PASSWORD, HubHarness, Response, start_hub

SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAM_NS = "http://etherx.jabber.org/streams"
FLOOD_ADDRESS = "127.0.0.2"
OTHER_ADDRESS = "127.0.0.3"


@pytest.fixture
async def strict(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    """A hub that locks a login after 5 failures."""
    async with start_hub(settings.model_copy(update={"login_max_failures": 5}), store) as hub:
        yield hub


async def post_login(
    http: aiohttp.ClientSession, hub: HubHarness, login: str, password: str, **kw: Any
) -> Response:
    async with http.post(
        hub.base_url + "/api/v1/auth/login", json={"login": login, "password": password}, **kw
    ) as resp:
        body = await resp.json(content_type=None)
        return Response(resp.status, body, dict(resp.headers), resp.content_type)


def from_address(host: str) -> aiohttp.ClientSession:
    """An HTTP client whose connections come from ``host`` (any 127.x.y.z is loopback)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(host, 0), limit=0))


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.005)


# REST -----------------------------------------------------------------------------------------


async def test_a_hundred_parallel_guesses_get_five_checks_and_the_right_one_is_refused(
    strict: HubHarness,
) -> None:
    hub = strict
    await hub.create_user("alice")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        wrong = [
            asyncio.create_task(post_login(http, hub, "alice", f"guess {i}")) for i in range(99)
        ]
        # The right password goes last, once the server has let the first guesses through.
        await wait_until(
            lambda: hub.services.auth.throttle.retry_after("alice", time.monotonic()) > 0
        )
        right = await post_login(http, hub, "alice", DEFAULT_PASSWORD)
        answers = [*await asyncio.gather(*wrong), right]
    statuses = [a.status for a in answers]
    assert statuses.count(401) == 5, statuses  # was 99 (every guess checked), then a 200
    assert statuses.count(429) == 95 and right.status == 429
    refused = next(a for a in answers if a.status == 429)
    assert refused.body["type"] == "urn:portalhub:problem:login-throttled"
    assert refused.body["scope"] == "login" and int(refused.headers["Retry-After"]) >= 1
    # the lock holds: the right password is refused, unchecked, for the lockout's length
    again = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "alice", "password": DEFAULT_PASSWORD}
    )
    assert again.status == 429 and int(again.headers["Retry-After"]) > 200


async def bound_during_flood(login: Callable[[], Awaitable[object]]) -> float:
    """The issue's bound for a real login during a flood: 1 s. On a machine so loaded that a
    login alone takes more than a quarter of that, four lone logins' time instead (the median
    of three): the flood may cost about one more check's time, never a queue of them."""
    lone = []
    for _ in range(3):
        started = time.monotonic()
        await login()
        lone.append(time.monotonic() - started)
    return max(1.0, 4 * statistics.median(lone))


async def test_a_real_login_completes_within_a_second_during_a_flood(hub: HubHarness) -> None:
    await hub.create_user("alice")
    async with from_address(FLOOD_ADDRESS) as flood_http, from_address(OTHER_ADDRESS) as http:
        bound = await bound_during_flood(lambda: post_login(http, hub, "alice", DEFAULT_PASSWORD))
        flood = [
            asyncio.create_task(post_login(flood_http, hub, f"bogus{i}", "nope"))
            for i in range(100)
        ]
        await asyncio.sleep(0.3)  # the flood is at the server by now
        started = time.monotonic()
        real = await post_login(http, hub, "alice", DEFAULT_PASSWORD)
        took = time.monotonic() - started
        answers = await asyncio.gather(*flood)
    assert real.status == 200, real.body
    assert took < bound, f"a real login took {took:.2f} s during the flood"  # was 5-20 s
    statuses = [a.status for a in answers]
    # the address runs one check at a time with 8 waiting; the rest is refused unchecked
    assert statuses.count(401) <= 1 + hub.services.settings.login_address_queue, statuses
    assert statuses.count(429) >= 80
    refused = next(a for a in answers if a.status == 429)
    assert refused.body["scope"] == "address" and refused.headers["Retry-After"] == "1"


async def test_failures_from_one_address_lock_it_for_every_login(
    settings: Settings, store: Store
) -> None:
    tight = settings.model_copy(update={"login_address_max_failures": 3})
    async with start_hub(tight, store) as hub:
        await hub.create_user("alice")
        proxied = {"X-Forwarded-For": "198.51.100.7"}  # from the trusted proxy 127.0.0.1
        async with aiohttp.ClientSession() as http:
            for login in ("carol", "dave", "erin"):
                assert (await post_login(http, hub, login, "x", headers=proxied)).status == 401
            locked = await post_login(http, hub, "alice", DEFAULT_PASSWORD, headers=proxied)
            assert locked.status == 429 and locked.body["scope"] == "address", locked.body
            assert int(locked.headers["Retry-After"]) > 200
            # another client behind the same proxy, and the proxy itself, are not locked
            other = {"X-Forwarded-For": "198.51.100.8"}
            assert (await post_login(http, hub, "alice", DEFAULT_PASSWORD, headers=other)).status
            assert (await post_login(http, hub, "alice", DEFAULT_PASSWORD)).status == 200
        # a peer that is no trusted proxy cannot pick its own address with the header
        async with from_address(FLOOD_ADDRESS) as http:
            for login in ("carol", "dave", "erin"):
                assert (await post_login(http, hub, login, "x", headers=other)).status == 401
            spoofed = {"X-Forwarded-For": "198.51.100.9"}
            resp = await post_login(http, hub, "alice", DEFAULT_PASSWORD, headers=spoofed)
            assert resp.status == 429 and resp.body["scope"] == "address"


# XMPP -----------------------------------------------------------------------------------------


class RawSasl:
    """One direct-TLS stream driven by hand up to the SASL verdict."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0

    @classmethod
    async def open(cls, hub: HubHarness, host: str = "127.0.0.1") -> RawSasl:
        xmpp = hub.services.xmpp
        assert xmpp is not None
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            xmpp.ports["tls"],
            ssl=context,
            server_hostname=xmpp.domain,
            local_addr=(host, 0),
        )
        raw = cls(reader, writer)
        writer.write(
            f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream="
            f"'{STREAM_NS}' to='{xmpp.domain}' version='1.0'>".encode()
        )
        await raw.next_element()  # the features
        return raw

    async def next_element(self) -> ET.Element:
        while True:
            for item in self.parser.read_events():
                event, el = item[0], item[-1]
                if event == "start":
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth == 1:
                        assert isinstance(el, ET.Element)
                        return el
            data = await asyncio.wait_for(self.reader.read(65536), 30)
            if not data:
                raise ConnectionError("stream closed")
            self.parser.feed(data)

    async def sasl(self, element: str) -> ET.Element:
        self.writer.write(element.encode())
        return await self.next_element()

    def close(self) -> None:
        self.writer.close()


def verdict(el: ET.Element) -> str:
    """success, challenge, or the failure's condition."""
    name = el.tag.rpartition("}")[2]
    if name != "failure":
        return name
    return next(c.tag.rpartition("}")[2] for c in el if not c.tag.endswith("}text"))


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


async def plain(raw: RawSasl, login: str, password: str) -> str:
    """SASL PLAIN on an open stream; closes it after the verdict."""
    try:
        initial = b64(f"\0{login}\0{password}")
        answer = await raw.sasl(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{initial}</auth>")
        return verdict(answer)
    finally:
        raw.close()


async def plain_attempt(hub: HubHarness, login: str, password: str, host: str = "127.0.0.1") -> str:
    return await plain(await RawSasl.open(hub, host), login, password)


async def open_streams(hub: HubHarness, count: int, host: str = "127.0.0.1") -> list[RawSasl]:
    """Streams ready for SASL. Opened first, so that what comes at once is the logins (a
    hundred TLS handshakes in this one process would otherwise be what is measured)."""
    return list(await asyncio.gather(*(RawSasl.open(hub, host) for _ in range(count))))


async def test_a_hundred_parallel_plain_guesses_over_xmpp(strict: HubHarness) -> None:
    hub = strict
    await hub.create_user("alice")
    *streams, last = await open_streams(hub, 100)
    wrong = [
        asyncio.create_task(plain(raw, "alice", f"guess {i}")) for i, raw in enumerate(streams)
    ]
    await wait_until(lambda: hub.services.auth.throttle.retry_after("alice", time.monotonic()) > 0)
    right = await plain(last, "alice", DEFAULT_PASSWORD)
    answers = [*await asyncio.gather(*wrong), right]
    assert answers.count("not-authorized") == 5, answers  # was 99, then a success
    assert answers.count("temporary-auth-failure") == 95 and right == "temporary-auth-failure"
    # locked for web logins too: the count is shared
    web = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "alice", "password": DEFAULT_PASSWORD}
    )
    assert web.status == 429


async def scram_first(hub: HubHarness, client: ScramClient) -> tuple[RawSasl, ET.Element]:
    raw = await RawSasl.open(hub)
    first = b64(client.get_client_first())
    return raw, await raw.sasl(f"<auth xmlns='{SASL_NS}' mechanism='SCRAM-SHA-256'>{first}</auth>")


async def scram_final(raw: RawSasl, client: ScramClient, challenge: ET.Element) -> str:
    client.set_server_first(base64.b64decode(challenge.text or "").decode())
    final = await asyncio.to_thread(client.get_client_final)  # PBKDF2: off the test's loop
    return verdict(await raw.sasl(f"<response xmlns='{SASL_NS}'>{b64(final)}</response>"))


async def test_a_hundred_parallel_scram_exchanges_get_five_verdicts(strict: HubHarness) -> None:
    hub = strict
    await hub.create_user("alice")
    clients = [ScramClient(["SCRAM-SHA-256"], "alice", f"guess {i}") for i in range(100)]
    opened = await asyncio.gather(*(scram_first(hub, c) for c in clients))
    try:
        challenged = [(raw, c, el) for (raw, el), c in zip(opened, clients, strict=True)]
        firsts = [verdict(el) for _, _, el in challenged]
        # only the reserved exchanges get a challenge; the rest are refused at once
        assert firsts.count("challenge") == 5, firsts  # was 100
        assert firsts.count("temporary-auth-failure") == 95
        finals = await asyncio.gather(
            *(scram_final(raw, c, el) for raw, c, el in challenged if verdict(el) == "challenge")
        )
        assert finals == ["not-authorized"] * 5
    finally:
        for raw, _ in opened:
            raw.close()
    raw, answer = await scram_first(hub, ScramClient(["SCRAM-SHA-256"], "alice", DEFAULT_PASSWORD))
    raw.close()
    assert verdict(answer) == "temporary-auth-failure"  # locked


async def test_a_real_jabber_login_completes_within_a_second_during_a_flood(
    hub: HubHarness,
) -> None:
    await hub.create_user("alice")

    async def real_login() -> str:
        return await plain_attempt(hub, "alice", DEFAULT_PASSWORD, OTHER_ADDRESS)

    bound = await bound_during_flood(real_login)
    streams = await open_streams(hub, 100, FLOOD_ADDRESS)
    flood = [asyncio.create_task(plain(raw, f"bogus{i}", "nope")) for i, raw in enumerate(streams)]
    await asyncio.sleep(0.3)  # the flood is at the server by now
    started = time.monotonic()
    real = await real_login()
    took = time.monotonic() - started
    answers = await asyncio.gather(*flood)
    assert real == "success"
    assert took < bound, f"a real login took {took:.2f} s during the flood"
    assert answers.count("temporary-auth-failure") >= 80, answers
