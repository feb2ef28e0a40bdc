"""Hostile Socket.IO clients: garbage, unknown events, oversize messages, floods.

Each gets a clear answer or is cut off, and the hub keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp

from tests.harness import HubHarness, Refused, SocketClient


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
