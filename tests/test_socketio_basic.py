"""Socket.IO: authentication on connect and the snapshot of ephemeral state."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.harness import HubHarness, Refused


async def test_connect_without_token_is_refused_with_reason(hub: HubHarness) -> None:
    with pytest.raises(Refused) as info:
        await hub.connect(None, auth={})
    [reason] = info.value.reasons
    assert "authentication required" in reason["message"]
    assert reason["data"] == {"code": "auth_required"}


async def test_connect_with_bad_token_is_refused(hub: HubHarness) -> None:
    with pytest.raises(Refused) as info:
        await hub.connect("not-a-token")
    [reason] = info.value.reasons
    assert reason["message"] == "invalid or expired token"
    assert reason["data"] == {"code": "invalid_token"}


async def test_connecting_client_gets_snapshot(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    client = await hub.connect(alice)
    [snapshot] = await client.wait_for("snapshot")
    assert snapshot["presence"][bob_id] == "online"
    assert snapshot["presence"][alice_id] == "online"
    assert snapshot["counters"]["im"] == {"unread": 0, "chats": {}}
    assert snapshot["counters"]["tasks"]["total"]["in_progress"] == 0
    assert snapshot["settings"] == {"im": {"sound": True, "send_key": "enter"}}
    assert snapshot["streams"] == {f"user:{alice_id}": 0}

    # bob sees alice come online, live
    def seen(status: str) -> bool:
        return any(
            change["user_id"] == alice_id and change["status"] == status
            for change in bob_client.of_type("presence.changed")
        )

    await bob_client.wait_until(lambda: seen("online"))
    await client.close()
    await bob_client.wait_until(lambda: seen("offline"))


async def test_websocket_frames_are_not_compressed(hub: HubHarness) -> None:
    """A browser offers permessage-deflate; the hub declines it (memory and CPU per socket)."""
    url = hub.base_url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as session, session.ws_connect(url, compress=15) as ws:
        opened = await ws.receive(timeout=5)
        assert opened.data.startswith("0{")  # the engine.io handshake still works
        assert ws.compress == 0


async def test_a_failing_snapshot_part_ends_the_session(hub: HubHarness) -> None:
    """A snapshot part that fails ends the session start: no snapshot goes out without it (a
    client would take the missing part for empty numbers)."""
    _, alice = await hub.create_user("alice")

    async def broken(_user: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("part failed")

    hub.services.hub.add_snapshot_part("broken", broken)
    client = await hub.connect(alice)
    await client.wait_until(lambda: not client.sio.connected, timeout=10)
    assert client.of_type("snapshot") == []
