"""Observability: /metrics in the Prometheus text format, request and event ids in JSON logs,
and the node registry behind `portalhub status`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import SecretStr

from server import cli
from server.observability import nodes
from server.observability.context import REQUEST_ID, traced, valid_request_id
from server.observability.http import is_loopback
from server.observability.logs import (
    OWN,
    THIRD_PARTY,
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    configure_logging,
)
from server.observability.metrics import Registry, render
from server.observability.runtime import OBSERVABILITY
from server.settings import Settings
from server.store.database import Store, utcnow
from tests.harness import HubHarness, start_hub
from tests.test_mail_bridge import deliver, settled
from tests.xmpp_client import xmpp_login

# a parser of the text exposition format 0.0.4, strict where Prometheus is ----------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass
class Parsed:
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _value(text: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    return special[text] if text in special else float(text)


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        assert match is not None, f"bad labels {text!r} at {position}"
        name, raw = match.group(1), match.group(2)
        assert name not in labels, f"label {name} twice"
        labels[name] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], raw)
        position = match.end()
    return labels


def parse_metrics(text: str) -> dict[str, Parsed]:
    assert text.endswith("\n")
    families: dict[str, Parsed] = {}
    helps: dict[str, str] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps, f"HELP of {name} twice"
            helps[name] = help_text.replace("\\n", "\n").replace("\\\\", "\\")
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in families, f"TYPE of {name} twice"
            assert name in helps, f"TYPE of {name} before its HELP"
            families[name] = Parsed(kind, helps[name])
            current = name
        else:
            assert not line.startswith("#"), line
            match = _SAMPLE.fullmatch(line)
            assert match is not None, f"bad sample line {line!r}"
            name = match.group(1)
            assert current is not None, f"sample {name} before any TYPE"
            family = families[current]
            allowed = {current}
            if family.type == "histogram":
                allowed = {f"{current}_bucket", f"{current}_sum", f"{current}_count"}
            assert name in allowed, f"sample {name} in family {current}"
            family.samples.append((name, _labels(match.group(2) or ""), _value(match.group(3))))
    for name, family in families.items():
        if family.type == "histogram":
            _check_histogram(name, family)
    return families


def _check_histogram(name: str, family: Parsed) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for sample, sample_labels, value in family.samples:
        labels = dict(sample_labels)
        if sample.endswith("_bucket"):
            le = _value(labels.pop("le"))
            series.setdefault(tuple(sorted(labels.items())), []).append((le, value))
        elif sample.endswith("_count"):
            counts[tuple(sorted(labels.items()))] = value
    for key, buckets in series.items():
        bounds = [le for le, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}: buckets {bounds}"
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{name}: buckets are not cumulative"
        assert values[-1] == counts[key], f"{name}: +Inf bucket is not the count"


def value(families: dict[str, Parsed], name: str, **labels: str) -> float:
    family_name = re.sub(r"_(bucket|sum|count)$", "", name)
    family = families.get(name) or families[family_name]
    for sample, sample_labels, number in family.samples:
        if sample == name and sample_labels == labels:
            return number
    raise KeyError(f"{name}{labels}")


async def scrape(hub: HubHarness, **headers: str) -> dict[str, Parsed]:
    resp = await hub.request("GET", "/metrics", headers=headers)
    assert resp.status == 200, resp.body
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_metrics(resp.body)


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Until ``check`` (a coroutine function) stops raising AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def send(
    hub: HubHarness, token: str, headers: dict[str, str] | None = None, **body: Any
) -> Any:
    resp = await hub.request("POST", "/api/v1/im/messages", token=token, json=body, headers=headers)
    assert resp.status == 201, resp.body
    return resp


def texts(client: Any) -> list[str]:
    return [e["data"]["message"]["text"] for e in client.of_type("im.message")]


# the exposition itself ------------------------------------------------------------------------


def test_the_exposition_escapes_and_cumulates() -> None:
    registry = Registry()
    counter = registry.counter("t_things_total", 'Things with "quotes", a \\ and a\nnewline', ["k"])
    counter.inc(2, k='a"b\\c\nd')
    counter.inc(k="plain")
    gauge = registry.gauge("t_level", "A level")
    gauge.set(-1.5)
    histogram = registry.histogram("t_seconds", "Durations", buckets=(0.1, 1.0))
    for seconds in (0.05, 0.5, 0.5, 7.0):
        histogram.observe(seconds)
    text = render(registry.collect())
    assert '# HELP t_things_total Things with "quotes", a \\\\ and a\\nnewline' in text
    assert 't_things_total{k="a\\"b\\\\c\\nd"} 2.0' in text
    parsed = parse_metrics(text)
    assert parsed["t_things_total"].help == 'Things with "quotes", a \\ and a\nnewline'
    assert value(parsed, "t_things_total", k='a"b\\c\nd') == 2
    assert value(parsed, "t_level") == -1.5
    assert value(parsed, "t_seconds_bucket", le="0.1") == 1
    assert value(parsed, "t_seconds_bucket", le="1.0") == 3
    assert value(parsed, "t_seconds_bucket", le="+Inf") == 4
    assert value(parsed, "t_seconds_count") == 4
    assert value(parsed, "t_seconds_sum") == pytest.approx(8.05)
    with pytest.raises(ValueError):
        counter.inc(-1, k="x")
    with pytest.raises(ValueError):
        counter.inc(other="x")
    with pytest.raises(ValueError):
        registry.counter("t_bad", "no _total")
    with pytest.raises(ValueError):
        registry.gauge("t_level", "twice")


def test_request_ids_and_loopback() -> None:
    assert valid_request_id("4bf92f3577b34da6a3ce929d0e0e4736") is not None
    assert valid_request_id("req:42/a.b_c-d") == "req:42/a.b_c-d"
    for bad in ("", "has space", "x" * 65, "new\nline", 'quo"te', "-leading", None):
        assert valid_request_id(bad) is None
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    for remote in ("10.0.0.1", "192.168.1.2", "::ffff:10.0.0.1", "fe80::1", "", None, "x"):
        assert not is_loopback(remote)


def test_json_log_lines() -> None:
    formatter, stamp = JsonFormatter(), ContextFilter()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "server.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
        )
    record.custom = {"a": 1}
    with traced(request_id="req-1", event="chat:c#3"):
        stamp.filter(record)
    line = formatter.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "ERROR" and doc["logger"] == "server.x" and doc["msg"] == "failed here"
    assert doc["request_id"] == "req-1" and doc["event_id"] == "chat:c#3"
    assert doc["custom"] == {"a": 1}
    assert doc["exc_info"].startswith("Traceback") and "RuntimeError: boom" in doc["exc_info"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
    assert "node" in doc
    plain = logging.LogRecord("server.y", logging.INFO, __file__, 1, "hello", (), None)
    stamp.filter(plain)
    assert set(json.loads(formatter.format(plain))) == {"ts", "level", "logger", "msg", "node"}


# metrics of a running hub ---------------------------------------------------------------------


async def test_metrics_follow_connections_messages_and_fan_out(hub: HubHarness) -> None:
    families = await scrape(hub)
    for name, kind in {
        "portalhub_connections": "gauge",
        "portalhub_xmpp_sessions": "gauge",
        "portalhub_events_published_total": "counter",
        "portalhub_events_delivered_total": "counter",
        "portalhub_fanout_seconds": "histogram",
        "portalhub_queue_depth": "gauge",
        "portalhub_mail_messages_total": "counter",
        "portalhub_http_requests_total": "counter",
        "process_resident_memory_bytes": "gauge",
        "process_open_fds": "gauge",
        "python_gc_collections_total": "counter",
        "python_gc_objects_frozen": "gauge",
    }.items():
        assert families[name].type == kind, name
    assert value(families, "portalhub_connections", transport="socketio") == 0
    assert value(families, "portalhub_connections", transport="xmpp") == 0
    assert value(families, "process_resident_memory_bytes") > 10 * 2**20
    assert value(families, "process_open_fds") > 0
    assert {
        labels["generation"] for _, labels, _ in families["python_gc_collections_total"].samples
    } == {"0", "1", "2"}
    for queue in ("stream_appends", "hub_replay_buffer", "mail_inbox_pending"):
        assert value(families, "portalhub_queue_depth", queue=queue) == 0
    [info] = families["portalhub_info"].samples
    assert info[1]["node"] == hub.app[OBSERVABILITY].node

    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    assert value(await scrape(hub), "portalhub_connections", transport="socketio") == 1
    await send(hub, alice, to=[bob_id], text="first")
    await bob_client.wait_until(lambda: texts(bob_client) == ["first"])
    [message] = bob_client.of_type("im.message")

    before = await scrape(hub)
    await send(hub, alice, chat_id=message["data"]["message"]["chat_id"], text="second")
    await bob_client.wait_until(lambda: texts(bob_client) == ["first", "second"])
    after = await scrape(hub)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("portalhub_events_published_total", kind="chat") >= 1
    assert grew("portalhub_events_delivered_total", transport="socketio") >= 1
    assert grew("portalhub_fanout_seconds_count") >= 1
    assert grew("portalhub_fanout_seconds_sum") < 5
    assert grew("portalhub_http_requests_total", method="POST", status="201") == 1
    assert grew("portalhub_http_requests_total", method="GET", status="200") == 1  # a scrape

    await bob_client.close()

    async def gone() -> None:
        families = await scrape(hub)
        assert value(families, "portalhub_connections", transport="socketio") == 0

    await eventually(gone)


async def test_xmpp_sessions_and_deliveries_are_counted(hub: HubHarness) -> None:
    await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    jabber = await xmpp_login(hub, "alice")
    families = await scrape(hub)
    assert value(families, "portalhub_xmpp_sessions") == 1
    assert value(families, "portalhub_connections", transport="xmpp") == 1
    before = value(families, "portalhub_events_delivered_total", transport="xmpp")
    alice_id = next(iter(hub.services.xmpp.sessions))  # type: ignore[union-attr]
    await send(hub, bob, to=[alice_id], text="to pidgin")
    await jabber.wait_for_condition(lambda: "to pidgin" in jabber.bodies())
    after = await scrape(hub)
    assert value(after, "portalhub_events_delivered_total", transport="xmpp") > before


async def test_mail_outcomes_are_counted(hub: HubHarness) -> None:
    before = await scrape(hub)
    msg = EmailMessage()
    msg["From"] = "stranger@example.test"
    msg["To"] = hub.services.mail.address
    msg["Subject"] = "hello"
    msg["Message-ID"] = "<observability-1@example.test>"
    msg.set_content("who reads this?")
    await deliver(hub, msg, [hub.services.mail.address])
    await settled(hub)
    after = await scrape(hub)
    outcomes = ("done", "duplicate", "unmatched", "refused", "bounce", "ignored")
    grown = {
        outcome: value(after, "portalhub_mail_messages_total", outcome=outcome)
        - value(before, "portalhub_mail_messages_total", outcome=outcome)
        for outcome in outcomes
    }
    assert sum(grown.values()) == 1, grown
    assert value(after, "portalhub_queue_depth", queue="mail_inbox_pending") == 0


async def test_metrics_are_for_loopback_or_whoever_has_the_token(
    settings: Settings, store: Store, hub: HubHarness
) -> None:
    # no token: loopback only, and never through a proxy
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        resp = await hub.request("GET", "/metrics", headers={header: "203.0.113.9"})
        assert resp.status == 403, header
        assert resp.content_type == "application/problem+json"
    token = "scrape-me-" + "x" * 20
    guarded = settings.model_copy(update={"metrics_token": SecretStr(token)})
    async with start_hub(guarded, store) as other:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            resp = await other.request("GET", "/metrics", headers=headers)
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        ok = await other.request(
            "GET",
            "/metrics",
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9"},
        )
        assert ok.status == 200 and "portalhub_connections" in ok.body


# request and event ids ------------------------------------------------------------------------


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(ContextFilter())
        self.setFormatter(JsonFormatter())
        self.docs: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.docs.append(json.loads(self.format(record)))


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    lines = Lines()
    logger = logging.getLogger("server.observability")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(lines)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


async def test_a_request_id_follows_a_message_to_its_delivery(
    hub: HubHarness, json_lines: Lines
) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    await send(hub, alice, to=[bob_id], text="first")
    await bob_client.wait_until(lambda: texts(bob_client) == ["first"])
    chat_id = bob_client.of_type("im.message")[0]["data"]["message"]["chat_id"]

    resp = await send(
        hub, alice, headers={"X-Request-ID": "trace-me-42"}, chat_id=chat_id, text="second"
    )
    assert resp.headers["X-Request-ID"] == "trace-me-42"
    await bob_client.wait_until(lambda: texts(bob_client) == ["first", "second"])
    seq = bob_client.of_type("im.message")[1]["seq"]
    event = f"chat:{chat_id}#{seq}"

    def lines(msg: str) -> list[dict[str, Any]]:
        return [d for d in json_lines.docs if d["msg"] == msg and d.get("event_id") == event]

    [stored] = lines("event stored")
    assert stored["request_id"] == "trace-me-42" and stored["type"] == "im.message"
    assert stored["logger"] == "server.observability.trace"
    assert stored["node"] == hub.app[OBSERVABILITY].node
    [delivered] = lines("event delivered")
    assert delivered["request_id"] == "trace-me-42" and delivered["copies"] == 1
    [request_line] = [
        d
        for d in json_lines.docs
        if d["logger"] == "server.observability.http" and d.get("request_id") == "trace-me-42"
    ]
    assert request_line["msg"].startswith("POST /api/v1/im/messages 201")
    assert REQUEST_ID.get() is None

    # a request id that is not short and plain is replaced, not echoed
    for bad in ("x" * 100, "two words"):
        answer = await hub.request("GET", "/healthz", headers={"X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{16}", answer.headers["X-Request-ID"])
    problem = await hub.request("GET", "/api/v1/nowhere", headers={"X-Request-ID": "r-404"})
    assert problem.status == 404 and problem.headers["X-Request-ID"] == "r-404"


# the node registry and `portalhub status` -----------------------------------------------------


async def test_nodes_register_their_ports_and_load_and_status_prints_them(
    settings: Settings, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    fast = settings.model_copy(update={"node_heartbeat_seconds": 0.2})
    registry = store[nodes.COLLECTION]
    now = utcnow()
    await registry.insert_many(
        [
            {
                "_id": "crashed:1:aaaaaa",
                "started_at": now - timedelta(hours=1),
                "last_seen": now - timedelta(seconds=30),
                "interval_seconds": 5.0,
            },
            {
                "_id": "long-gone:2:bbbbbb",
                "started_at": now - timedelta(days=2),
                "last_seen": now - timedelta(hours=2),
                "interval_seconds": 5.0,
            },
        ]
    )
    async with start_hub(fast, store) as hub:
        observability = hub.app[OBSERVABILITY]
        port = int(hub.base_url.rsplit(":", 1)[1])
        observability.listening("127.0.0.1", port)  # as `portalhub serve` does
        _, alice = await hub.create_user("alice")
        client = await hub.connect(alice)
        await client.wait_for("snapshot")
        xmpp = hub.services.xmpp
        assert xmpp is not None

        async def registered() -> None:
            doc = await registry.find_one({"_id": observability.node})
            assert doc is not None
            assert doc["ports"]["http"] == port
            assert doc["ports"]["xmpp_starttls"] == xmpp.ports["starttls"]
            assert doc["ports"]["xmpp_tls"] == xmpp.ports["tls"]
            assert doc["ports"]["smtp"] == hub.services.mail.ports["smtp"]
            assert doc["connections"] == {"socketio": 1, "xmpp": 0}
            assert doc["pid"] > 0 and doc["rss_bytes"] > 0
            assert await registry.find_one({"_id": "long-gone:2:bbbbbb"}) is None

        await eventually(registered)

        await cli.status(fast, as_json=False)
        out = capsys.readouterr().out
        [mine] = [line for line in out.splitlines() if line.startswith(observability.node)]
        assert mine.split()[1:4] == [
            "up",
            str(port),
            f"{xmpp.ports['starttls']}/{xmpp.ports['tls']}",
        ]
        [crashed] = [line for line in out.splitlines() if line.startswith("crashed:1:")]
        assert crashed.split()[1] == "lost"
        assert out.splitlines()[-1].startswith("2 nodes: 1 up, 1 lost; 1 open connections on")

        await cli.status(fast, as_json=True)
        shown = {node["id"]: node for node in json.loads(capsys.readouterr().out)}
        assert shown[observability.node]["state"] == "up"
        assert shown[observability.node]["connections"]["socketio"] == 1
        assert shown[observability.node]["last_seen"].endswith("Z")
        assert shown["crashed:1:aaaaaa"]["state"] == "lost"
        node = observability.node

        hub.services.hub.draining = True  # as on SIGTERM, during the grace period

        async def draining() -> None:
            doc = await registry.find_one({"_id": node})
            assert doc is not None and doc["state"] == "draining"

        await eventually(draining)
        assert "draining" in await nodes.status_report(store, False)
    # a clean stop leaves the registry
    assert await registry.find_one({"_id": node}) is None
    assert await registry.count_documents({}) == 1


def test_debug_is_for_the_hubs_own_loggers() -> None:
    """PORTALHUB_LOG_LEVEL=DEBUG opens the hub's loggers; the libraries that echo what passes
    through them stay above that: PyMongo's command log, python-engineio's and
    python-socketio's packets, aiosmtpd's mail lines. aiosmtpd's per-connection INFO lines
    ("mail.log") are hidden at INFO and shown at DEBUG."""
    names = [*OWN, *THIRD_PARTY]
    before = {name: logging.getLogger(name).level for name in names}
    mail = logging.getLogger("mail.log")
    try:
        configure_logging("INFO", "text")
        assert not mail.isEnabledFor(logging.INFO) and mail.isEnabledFor(logging.WARNING)
        assert not logging.getLogger("server.im.service").isEnabledFor(logging.DEBUG)
        configure_logging("debug", "text")
        assert logging.getLogger("server.im.service").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("portalhub").isEnabledFor(logging.DEBUG)
        assert mail.isEnabledFor(logging.INFO) and not mail.isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("pymongo.command").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("engineio.server").isEnabledFor(logging.INFO)
        assert not logging.getLogger("socketio.server").isEnabledFor(logging.INFO)
        configure_logging("ERROR", "json")
        assert not mail.isEnabledFor(logging.WARNING)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def test_log_lines_are_redacted() -> None:
    """The second line of defence: whatever slips into a log line is masked on the way out."""
    argon2 = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
    document = {
        "login": "bob",
        "password_hash": argon2,
        "scram": {"SCRAM_SHA_256": {"salt": "c2FsdA==", "stored_key": "S+/k=", "server_key": "K"}},
        "text": 'the "secret" plan, with a \\ and a comma',
    }
    messages = [
        ("command %s", (json.dumps({"command": json.dumps(document)}),)),  # PyMongo's form
        ("document %r", (document,)),
        ("login %s", ('{"login": "bob", "password": "hunter2-hunter2"}',)),
        ("GET /x?token=tok3n-value&page=2 Authorization: Bearer tok3n-value", ()),
        ("connecting to mongodb://admin:hunter2-hunter2@db:27017/portalhub", ()),
        ("hash %s", (argon2,)),
    ]
    secrets = [
        argon2,
        "c2FsdA==",
        "S+/k=",
        "secret",
        "hunter2-hunter2",
        "tok3n-value",
        "aGFzaGhhc2hoYXNo",
    ]
    for formatter in (TextFormatter(), JsonFormatter()):
        for msg, args in messages:
            record = logging.LogRecord("server.x", logging.INFO, __file__, 1, msg, args, None)
            line = formatter.format(record)
            for secret in secrets:
                assert secret not in line, (secret, line)
            assert "***" in line
    plain = logging.LogRecord("server.x", logging.INFO, __file__, 1, "user %s", ("bob",), None)
    assert TextFormatter().format(plain).endswith("server.x: user bob")
    try:
        raise ValueError('duplicate key: {"password_hash": "' + argon2 + '"}')
    except ValueError:
        failed = logging.LogRecord("server.x", logging.ERROR, __file__, 1, "x", (), sys.exc_info())
    for formatter in (TextFormatter(), JsonFormatter()):
        assert argon2 not in formatter.format(failed)
