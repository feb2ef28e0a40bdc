"""Hostile Socket.IO clients: garbage, unknown events, oversize messages, floods.

Each gets a clear answer or is cut off, and the hub keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, Refused, SocketClient, start_hub


async def still_serving(hub: HubHarness, token: str) -> None:
    client = await hub.connect(token)
    await client.wait_for("snapshot")
    assert await client.call("ping", {}) == {"ok": True}
    await client.close()


async def test_unknown_event_gets_an_error(hub: HubHarness) -> None:
    _, token = await hub.create_user("alice")
    client = await hub.connect(token)
    assert await client.call("delete_everything", {"now": True}) == {
        "ok": False,
        "error": "unknown_event",
    }
    [error] = await client.wait_for("error")
    assert error["code"] == "unknown_event"


async def test_flooding_client_is_limited_then_disconnected(hub: HubHarness) -> None:
    _, token = await hub.create_user("alice")
    flooder = await hub.connect(token)
    await flooder.wait_for("snapshot")
    for _ in range(200):
        if not flooder.sio.connected:
            break
        await flooder.sio.emit("ping", {})
    await flooder.wait_until(lambda: not flooder.sio.connected)
    errors = flooder.of_type("error")
    assert errors and errors[0]["code"] == "rate_limited"
    await still_serving(hub, token)


async def test_garbage_frames_do_not_take_the_hub_down(hub: HubHarness) -> None:
    _, token = await hub.create_user("alice")
    url = hub.base_url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    frames = [
        "garbage",
        "4",
        "40{not json",
        '42["x",',
        "42" + json.dumps(["subscribe", {"stream": "x" * 10_000}]),
        "\x00\xff",
        "9999",
    ]
    for frame in frames:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await ws.receive(timeout=5)  # engine.io open packet
            await ws.send_str(frame)
            await ws.send_bytes(b"\x00\x01\x02")
            # the server answers or hangs up; either way it must not crash
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.receive(), 1)
    await still_serving(hub, token)


async def test_oversize_message_is_refused(hub: HubHarness) -> None:
    _, token = await hub.create_user("alice")
    client: SocketClient = await hub.connect(token)
    await client.wait_for("snapshot")
    await client.sio.emit("subscribe", {"stream": "y" * (200 * 1024)})
    await client.wait_until(lambda: not client.sio.connected)
    await still_serving(hub, token)


async def test_malformed_auth_and_since_are_refused_clearly(hub: HubHarness) -> None:
    _, token = await hub.create_user("alice")
    for auth in ({"token": 12}, {"token": token, "since": {"user:x": "seven"}}, "token"):
        try:
            await hub.connect(None, auth=auth)
        except Refused as refused:
            [reason] = refused.reasons
            assert reason["data"]["code"] in ("bad_auth", "auth_required")
        else:
            raise AssertionError(f"{auth!r} was accepted")
    await still_serving(hub, token)


def websocket_url(hub: HubHarness) -> str:
    return hub.base_url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"


async def closed_by_server(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5) -> bool:
    """True once the server has closed ``ws``; False if it is still open after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = await ws.receive(timeout=deadline - time.monotonic())
        except TimeoutError:
            return False
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return True
    return False


def bad_frame_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "bad frame" in r.getMessage()]


@pytest.mark.parametrize("authenticated", [False, True])
async def test_a_bad_frame_closes_the_connection_with_one_log_line(
    hub: HubHarness, caplog: pytest.LogCaptureFixture, authenticated: bool
) -> None:
    """Engine.IO and Socket.IO garbage, before or after authenticating: the server closes the
    connection at the first bad frame and logs one line for it, not a traceback per frame."""
    caplog.set_level(logging.INFO)
    _, token = await hub.create_user("alice")
    frames: list[str | bytes] = [
        "garbage",  # not an Engine.IO packet
        "4",  # a message without a Socket.IO packet
        "4" + "[" * 5000,  # nested past the JSON parser's depth
        "9999",
        "b" + "QUJD",  # a binary message, base64
        b"\x00\x01\x02",  # a binary frame
        '42["x",',  # a Socket.IO event that is not JSON
        "42" + "[" * 5000 + "]" * 5000,  # an event nested past the parser's depth
        '42{"not": "a list"}',
        '42[{"name": 1}]',  # an event named by an object
        '42["connect", {}, {"token": "x"}]',  # a reserved event name
        '452-["x",{"_placeholder":true,"num":0}]',  # a binary event
        "44{}",  # CONNECT_ERROR comes from servers only
    ]
    if not authenticated:
        frames.append('42["ping",{}]')  # an event with no CONNECT
    for frame in frames:
        caplog.clear()
        async with aiohttp.ClientSession() as session, session.ws_connect(websocket_url(hub)) as ws:
            await ws.receive(timeout=5)  # the Engine.IO open packet
            if authenticated:
                await ws.send_str("40" + json.dumps({"token": token}))
                connected = await ws.receive(timeout=5)
                assert connected.data.startswith("40{"), connected.data
            for _ in range(3):  # the first one ends it; the others find it closed
                with contextlib.suppress(ConnectionError):
                    if isinstance(frame, bytes):
                        await ws.send_bytes(frame)
                    else:
                        await ws.send_str(frame)
            assert await closed_by_server(ws), frame
        await asyncio.sleep(0.05)
        lines = bad_frame_lines(caplog)
        assert len(lines) == 1, (frame, [r.getMessage() for r in caplog.records])
        who = "user " if authenticated else "not authenticated"
        assert who in lines[0].getMessage() or "(websocket)" in lines[0].getMessage()
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], frame
    await still_serving(hub, token)


async def test_a_bad_long_polling_payload_ends_the_session(
    hub: HubHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, token = await hub.create_user("alice")
    url = hub.base_url + "/socket.io/?EIO=4&transport=polling"
    for payload in ["garbage", "4[[[[", "4" + "[" * 5000, '42["x",', "2\x1e" * 20, "d=x"]:
        caplog.clear()
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                opened = await resp.text()
            sid = json.loads(opened[1:])["sid"]
            async with session.post(f"{url}&sid={sid}", data=payload.encode()) as resp:
                status = resp.status
            await asyncio.sleep(0.05)
            logged = list(caplog.records)
            async with session.get(f"{url}&sid={sid}") as resp:
                after = resp.status
        # 400 for Engine.IO garbage; the library has answered a Socket.IO one already
        assert status in (400, 200), payload
        assert after == 400, payload  # either way the session is gone
        assert len([r for r in logged if "bad frame" in r.getMessage()]) == 1, payload
        assert not [r for r in logged if r.exc_info or r.levelno >= logging.ERROR], payload
    await still_serving(hub, token)


@asynccontextmanager
async def hub_with(
    settings: Settings, store: Store, **changes: object
) -> AsyncIterator[HubHarness]:
    async with start_hub(settings.model_copy(update=changes), store) as hub:
        yield hub


async def test_a_connection_that_never_authenticates_is_closed(
    settings: Settings, store: Store
) -> None:
    async with hub_with(settings, store, socket_auth_timeout_seconds=0.5) as hub:
        _, token = await hub.create_user("alice")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(websocket_url(hub)) as idle:
                await idle.receive(timeout=5)
                started = time.monotonic()
                assert await closed_by_server(idle, timeout=10)
                assert time.monotonic() - started < 5
            async with session.ws_connect(websocket_url(hub)) as refused:
                await refused.receive(timeout=5)
                await refused.send_str('40{"token":"not-a-token"}')
                assert "invalid_token" in (await refused.receive(timeout=5)).data
                assert await closed_by_server(refused, timeout=10)
        # an authenticated connection stays past the deadline
        client = await hub.connect(token)
        await client.wait_for("snapshot")
        await asyncio.sleep(1.0)
        assert client.sio.connected
        assert await client.call("ping", {}) == {"ok": True}


async def test_connections_per_user_are_capped(settings: Settings, store: Store) -> None:
    async with hub_with(settings, store, socket_max_connections_per_user=2) as hub:
        _, token = await hub.create_user("alice")
        _, other = await hub.create_user("bob")
        first = await hub.connect(token)
        second = await hub.connect(token)
        with pytest.raises(Refused) as refused:
            await hub.connect(token)
        [reason] = refused.value.reasons
        assert reason["data"]["code"] == "too_many_connections"
        assert "at most 2" in reason["message"]
        await hub.connect(other)  # another user is not affected
        # the limit counts open connections: one closed, one more may come
        await first.close()
        await asyncio.sleep(0.2)
        third = await hub.connect(token)
        await third.wait_for("snapshot")
        assert second.sio.connected
