"""Presence across tabs, devices, silent connections and manual states."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from server.presence.rules import Manual, Source, automatic_status, own_status
from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, SocketClient, start_hub


def statuses(observer: SocketClient, user_id: str) -> list[str]:
    return [c["status"] for c in observer.of_type("presence.changed") if c["user_id"] == user_id]


@pytest.fixture
async def slow_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    """Grace of one second and a heartbeat timeout of 1.5 s: long enough to observe "not yet"."""
    tuned = settings.model_copy(
        update={"presence_grace_seconds": 1.0, "presence_heartbeat_timeout_seconds": 1.5}
    )
    async with start_hub(tuned, store) as hub:
        yield hub


async def observed(hub: HubHarness) -> tuple[str, str, SocketClient]:
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    observer = await hub.connect(bob)
    observer.keep_alive()
    await observer.wait_for("snapshot")
    return alice_id, alice, observer


async def test_two_tabs_then_one_then_none(slow_hub: HubHarness) -> None:
    hub = slow_hub
    alice_id, alice, observer = await observed(hub)
    tab1, tab2 = await hub.connect(alice), await hub.connect(alice)
    tab1.keep_alive()
    tab2.keep_alive()
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online"])
    await tab1.close()
    await asyncio.sleep(1.5)  # longer than the grace period
    assert statuses(observer, alice_id) == ["online"]
    await tab2.close()
    await asyncio.sleep(0.5)  # within the grace period: not offline yet
    assert statuses(observer, alice_id) == ["online"]
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online", "offline"])
    view = (await hub.request("GET", f"/api/v1/presence?ids={alice_id}", token=alice)).body
    assert view["presence"][0]["status"] == "offline"
    assert view["presence"][0]["last_seen"] is not None


async def test_a_flap_within_the_grace_period_emits_nothing(slow_hub: HubHarness) -> None:
    hub = slow_hub
    alice_id, alice, observer = await observed(hub)
    tab = await hub.connect(alice)
    tab.keep_alive()
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online"])
    await tab.close()
    await asyncio.sleep(0.3)
    again = await hub.connect(alice)
    again.keep_alive()
    await again.wait_for("snapshot")
    await asyncio.sleep(1.5)  # past the grace period of the first close
    assert statuses(observer, alice_id) == ["online"]


async def test_silent_connection_goes_offline_after_heartbeat_timeout(slow_hub: HubHarness) -> None:
    hub = slow_hub
    alice_id, alice, observer = await observed(hub)
    carol_id, carol = await hub.create_user("carol")
    silent = await hub.connect(alice)  # never sends a heartbeat: like a frozen or cut-off tab
    beating = await hub.connect(carol)
    beating.keep_alive()
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online"])
    await observer.wait_until(
        lambda: statuses(observer, alice_id) == ["online", "offline"], timeout=10
    )
    await silent.wait_until(lambda: not silent.sio.connected)  # the server closed it
    assert statuses(observer, carol_id) == ["online"]


async def test_idle_connections_make_away_and_any_active_one_online(hub: HubHarness) -> None:
    alice_id, alice, observer = await observed(hub)
    tab1, tab2 = await hub.connect(alice), await hub.connect(alice)
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online"])
    for _ in range(100):  # both tabs registered as sources before one goes idle
        if len(await hub.services.presence.sources_of(alice_id)) == 2:
            break
        await asyncio.sleep(0.02)
    await tab1.call("presence.heartbeat", {"active": False})
    await asyncio.sleep(0.2)
    assert statuses(observer, alice_id) == ["online"]  # the other tab is still active
    await tab2.call("presence.heartbeat", {"active": False})
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online", "away"])
    await tab1.call("presence.heartbeat", {"active": True})
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online", "away", "online"])


async def test_manual_dnd_survives_reconnects_and_expires(hub: HubHarness) -> None:
    alice_id, alice, observer = await observed(hub)
    tab = await hub.connect(alice)
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online"])
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    resp = await hub.request(
        "PUT", "/api/v1/presence/me", token=alice, json={"status": "dnd", "until": until}
    )
    assert resp.status == 200 and resp.body["status"] == "dnd" and resp.body["manual"] == "dnd"
    await observer.wait_until(lambda: statuses(observer, alice_id)[-1] == "dnd")
    await tab.close()
    await observer.wait_until(lambda: statuses(observer, alice_id)[-1] == "offline")
    back = await hub.connect(alice)
    [snapshot] = await back.wait_for("snapshot")
    assert snapshot["presence"][alice_id] == "dnd"
    await observer.wait_until(lambda: statuses(observer, alice_id)[-1] == "dnd")
    await back.wait_until(
        lambda: any(c.get("manual") == "dnd" for c in back.of_type("presence.changed"))
    )

    # a do-not-disturb whose time is up lapses by itself
    soon = (datetime.now(UTC) + timedelta(seconds=0.5)).isoformat()
    await hub.request(
        "PUT", "/api/v1/presence/me", token=alice, json={"status": "dnd", "until": soon}
    )
    await hub.services.presence.sweep()
    await asyncio.sleep(0.6)
    await hub.services.presence.sweep()
    await observer.wait_until(lambda: statuses(observer, alice_id)[-1] == "online")
    stored = await hub.services.store.users.find_one({"_id": alice_id})
    assert stored is not None and stored["presence"]["status"] is None  # cleared, once

    cleared = await hub.request("PUT", "/api/v1/presence/me", token=alice, json={"status": None})
    assert cleared.body["manual"] is None and cleared.body["status"] == "online"


async def test_invisible_looks_offline_to_others(hub: HubHarness) -> None:
    alice_id, alice, observer = await observed(hub)
    await hub.connect(alice)
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online"])
    resp = await hub.request(
        "PUT", "/api/v1/presence/me", token=alice, json={"status": None, "invisible": True}
    )
    assert resp.body["status"] == "online" and resp.body["invisible"] is True
    await observer.wait_until(lambda: statuses(observer, alice_id) == ["online", "offline"])
    _, bob = await hub.create_user("bob2")
    seen = (await hub.request("GET", f"/api/v1/presence?ids={alice_id}", token=bob)).body
    assert seen["presence"][0]["status"] == "offline"
    online = (await hub.request("GET", "/api/v1/users?online=true", token=bob)).body
    assert alice_id not in [u["id"] for u in online]


async def test_presence_query_and_online_filter(hub: HubHarness) -> None:
    alice_id, alice, _observer = await observed(hub)
    carol_id, _ = await hub.create_user("carol")
    ext_id, _ = await hub.create_user("extra", external=True)
    await hub.connect(alice)
    await asyncio.sleep(0.1)
    resp = await hub.request(
        "GET", f"/api/v1/presence?ids={alice_id},{carol_id},{ext_id},nobody", token=alice
    )
    assert resp.status == 200
    got = {p["user_id"]: p["status"] for p in resp.body["presence"]}
    assert got == {alice_id: "online", carol_id: "offline"}  # extranet and unknown left out
    online = (await hub.request("GET", "/api/v1/users?online=true", token=alice)).body
    assert alice_id in [u["id"] for u in online] and carol_id not in [u["id"] for u in online]
    offline = (await hub.request("GET", "/api/v1/users?online=false", token=alice)).body
    assert carol_id in [u["id"] for u in offline] and alice_id not in [u["id"] for u in offline]
    too_many = ",".join(str(n) for n in range(501))
    assert (await hub.request("GET", f"/api/v1/presence?ids={too_many}", token=alice)).status == 422


@pytest.mark.parametrize(
    ("actives", "manual", "expected"),
    [
        ([], Manual(), "offline"),
        ([], Manual("dnd"), "offline"),
        ([True], Manual(), "online"),
        ([False, False], Manual(), "away"),
        ([False, True], Manual(), "online"),
        ([True], Manual("away"), "away"),
        ([True], Manual("dnd"), "dnd"),
        ([True], Manual("dnd", until=datetime(2000, 1, 1, tzinfo=UTC)), "online"),
    ],
)
def test_status_rules(actives: list[bool], manual: Manual, expected: str) -> None:
    sources = [Source(str(n), "socketio", active, 0.0) for n, active in enumerate(actives)]
    assert own_status(sources, manual, datetime.now(UTC)) == expected
    assert automatic_status(sources) in ("online", "away", "offline")
