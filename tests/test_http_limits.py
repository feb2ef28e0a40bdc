"""Slow and greedy HTTP clients with no proxy in front: header and body deadlines, connections
per address (server/web/limits.py), and the security headers of every answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from server.settings import Settings
from server.store.database import Store
from server.web.limits import address_key
from tests.harness import HubHarness, start_hub


@asynccontextmanager
async def limited_hub(
    settings: Settings, store: Store, **limits: object
) -> AsyncIterator[HubHarness]:
    async with start_hub(settings.model_copy(update=limits), store) as hub:
        yield hub


def host_port(hub: HubHarness) -> tuple[str, int]:
    host, port = hub.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything until the server closes the connection (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(4096):
                data += chunk
    return data


async def dribble(writer: asyncio.StreamWriter, data: bytes, interval: float) -> None:
    """Send ``data`` a byte at a time, until it is sent or the server hangs up."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(interval)


async def test_dribbled_heads_and_bodies_are_cut_and_others_still_served(
    settings: Settings, store: Store
) -> None:
    async with limited_hub(
        settings, store, http_header_timeout_seconds=1.0, http_body_timeout_seconds=1.0
    ) as hub:
        host, port = host_port(hub)
        head = b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
        body = json.dumps({"login": "nobody", "password": "x" * 200}).encode()
        post = (
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: hub\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        connections = []
        started = time.monotonic()
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, port)
            connections.append((reader, writer, dribble(writer, head, 0.05), "head"))
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(post)  # the head at once, then the body a byte at a time
            connections.append((reader, writer, dribble(writer, body, 0.05), "body"))
        # a silent connection, which never sends a byte, is cut by the same head deadline
        silent_reader, silent_writer = await asyncio.open_connection(host, port)
        dribblers = [asyncio.create_task(send) for _r, _w, send, _k in connections]
        try:
            answers = await asyncio.gather(
                *(read_all(reader, 10) for reader, _w, _s, _k in connections),
                read_all(silent_reader, 10),
            )
            elapsed = time.monotonic() - started
            # all cut after about a second (a dribble takes 10 s), none answered normally
            assert elapsed < 6, elapsed
            for (_r, _w, _s, kind), answer in zip(connections, answers, strict=False):
                if kind == "head":
                    assert answer == b"", answer[:100]
                else:
                    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
                    assert b"urn:portalhub:problem:request-timeout" in answer
            assert answers[-1] == b""
            # a client that is not slow is served all along
            assert (await hub.request("GET", "/healthz")).status == 200
            await hub.create_user("alice")
            assert await hub.login("alice")
        finally:
            for task in dribblers:
                task.cancel()
            for _r, writer, _s, _k in connections:
                writer.close()
            silent_writer.close()


async def test_a_large_upload_on_a_slow_line_gets_more_time(
    settings: Settings, store: Store
) -> None:
    """The body deadline grows with what has arrived: steady progress is not cut off."""
    async with limited_hub(settings, store, http_body_timeout_seconds=0.5) as hub:
        _, token = await hub.create_user("alice")
        host, port = host_port(hub)
        reader, writer = await asyncio.open_connection(host, port)
        size = 64 * 1024
        writer.write(
            b"POST /api/v1/mail/attachments?filename=a.bin HTTP/1.1\r\nHost: hub\r\n"
            + f"Authorization: Bearer {token}\r\n".encode()
            + b"Content-Type: application/octet-stream\r\n"
            + f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
        )
        # 8 KiB every 0.2 s: 1.6 s in all, well past the half second, at 40 KiB/s
        for _ in range(size // 8192):
            writer.write(b"x" * 8192)
            await writer.drain()
            await asyncio.sleep(0.2)
        answer = await read_all(reader, 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]


async def test_connections_per_address_are_capped(settings: Settings, store: Store) -> None:
    async with limited_hub(
        settings, store, http_max_connections_per_address=5, http_header_timeout_seconds=60
    ) as hub:
        host, port = host_port(hub)
        held = [await asyncio.open_connection(host, port) for _ in range(5)]
        await asyncio.sleep(0.1)  # all five accepted and counted
        request = b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n"

        async def get(local: str = "127.0.0.1") -> bytes:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0))
            writer.write(request)
            try:
                return await read_all(reader, 5)
            finally:
                writer.close()

        refused = await get()
        assert refused.startswith(b"HTTP/1.1 429 "), refused[:100]
        assert b"urn:portalhub:problem:too-many-connections" in refused
        assert b"Retry-After: 5" in refused
        # another address is not affected (all of 127/8 is loopback on Linux)
        assert (await get("127.0.0.2")).startswith(b"HTTP/1.1 200 ")
        # one closed: room for one more, and the count follows closes
        held.pop()[1].close()
        await asyncio.sleep(0.1)
        assert (await get()).startswith(b"HTTP/1.1 200 ")
        for _reader, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        answers = await asyncio.gather(*(get() for _ in range(5)))
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)


def test_addresses_are_counted_per_ipv4_address_and_ipv6_64() -> None:
    assert address_key(("192.0.2.7", 5000)) == "192.0.2.7"
    assert address_key(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    a = address_key(("2001:db8:1:2::1", 5000, 0, 0))
    assert a == address_key(("2001:db8:1:2:ffff::9", 6000, 0, 0)) == "2001:db8:1:2::/64"
    assert a != address_key(("2001:db8:1:3::1", 5000, 0, 0))
    assert address_key("/run/hub.sock") is None


async def test_every_answer_carries_the_security_headers(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    client = tmp_path / "client"
    (client / "assets").mkdir(parents=True)
    (client / "index.html").write_text("<!doctype html><title>Portal Hub</title>")
    (client / "assets" / "app.js").write_text("console.log('hi')")
    async with limited_hub(settings, store, web_client_dir=client) as hub:
        page = await hub.request("GET", "/")
        static = await hub.request("GET", "/static/assets/app.js")
        api = await hub.request("GET", "/api/v1/openapi.json")
        problem = await hub.request("GET", "/api/v1/nothing-here")
    for resp in (page, static, api, problem):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert page.status == 200 and page.content_type == "text/html"
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in page.headers["Content-Security-Policy"].split(";")
    )
    assert policy["script-src"] == "'self'"  # no inline script, nothing from elsewhere
    assert policy["connect-src"] == "'self'"
    assert policy["object-src"] == "'none'"
    assert static.status == 200
    assert static.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert api.status == 200
    assert api.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert problem.status == 404


async def test_the_client_addresses_get_the_page_and_nothing_else_does(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    """A reload or a shared link of a screen (/tasks/<id>, /crm/deals/<id>...) gets the web
    client's page with its policy; the API, Socket.IO, static files, metrics and health
    answer as before, and an unknown path is not turned into a page."""
    client = tmp_path / "client"
    client.mkdir()
    (client / "index.html").write_text("<!doctype html><title>Portal Hub</title>")
    async with limited_hub(settings, store, web_client_dir=client) as hub:
        for path in (
            "/",
            "/messenger",
            "/messenger/65f0c0ffee0000000000abcd",
            "/employees/65f0c0ffee0000000000abcd",
            "/tasks/65f0c0ffee0000000000abcd",
            "/crm/deals/kanban",
            "/crm/contacts/65f0c0ffee0000000000abcd",
            "/settings",
        ):
            page = await hub.request("GET", path)
            assert page.status == 200, path
            assert page.content_type == "text/html", path
            assert "<title>Portal Hub</title>" in page.body
            assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
            assert page.headers["X-Frame-Options"] == "DENY"
            # a reload revalidates: the 304 keeps the page's policy, which the browser takes
            again = await hub.request(
                "GET", path, headers={"If-Modified-Since": page.headers["Last-Modified"]}
            )
            assert again.status == 304, path
            assert again.headers["Content-Security-Policy"].startswith("default-src 'self'")
        unknown_api = await hub.request("GET", "/api/v1/tasks-nothing")
        assert unknown_api.status == 404
        assert unknown_api.content_type == "application/problem+json"
        assert (await hub.request("POST", "/api/v1/nothing")).status == 404
        health = await hub.request("GET", "/healthz")
        assert health.status == 200 and health.body["status"] == "ok"
        ready = await hub.request("GET", "/readyz")
        assert ready.content_type == "application/json"
        metrics = await hub.request("GET", "/metrics")
        assert metrics.content_type == "text/plain"
        assert (await hub.request("GET", "/static/tasks/x.js")).status == 404
        socket = await hub.request("GET", "/socket.io/?EIO=4&transport=polling")
        assert socket.content_type != "text/html"
        for path in ("/nothing-here", "/tasksx", "/index.php"):
            assert (await hub.request("GET", path)).status == 404, path
