"""CRM counters over the real stack: what each connected client is pushed, live, always equals
the counters recomputed from the database by the pure rules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from server.counters.crm import CHECK_AHEAD_ACTIVITIES, CHECK_PAGES_AHEAD
from server.counters.rules import (
    ActivityFacts,
    CounterMode,
    DueWindow,
    RecordFacts,
    badges_for,
)
from server.crm.activities import NewActivity
from server.crm.models import CrmSettingsUpdate
from server.events.models import EphemeralEvent
from server.settings import Settings
from server.store.database import Store, utcnow
from tests.harness import HubHarness, SocketClient, start_hub
from tests.test_hot_queries import plan_of

ZERO = {"incoming": 0, "due": 0, "overdue": 0, "total": 0, "idle": 0, "colour": "none"}


async def recomputed(hub: HubHarness, user_id: str) -> dict[str, dict[str, Any]]:
    """From scratch, with the pure rules, from every record and activity in the database."""
    store = hub.services.store
    settings = await hub.services.crm.config.settings()
    user = await store.users.find_one({"_id": user_id})
    assert user is not None
    tz = ZoneInfo(user.get("time_zone") or "UTC")
    records = {r["_id"]: r async for r in store["crm_records"].find({})}
    activities = [
        ActivityFacts(
            id=a["_id"],
            owner_type=records[a["owner_id"]]["type"],
            owner_id=a["owner_id"],
            record_responsible_id=records[a["owner_id"]]["responsible_id"],
            responsible_id=a["responsible_id"],
            type=a["type"],
            direction=a["direction"],
            deadline=a.get("deadline"),
            completed=bool(a.get("completed")),
        )
        async for a in store["crm_activities"].find({})
    ]
    facts = [
        RecordFacts(r["type"], r["_id"], r["responsible_id"], bool(r["open"]))
        for r in records.values()
    ]
    badges = badges_for(
        user_id,
        activities,
        facts,
        CounterMode(settings.counter_mode),
        hub.services.crm.counters.clock(),
        tz,
        DueWindow(settings.due_minutes_before),
    )
    return {t: b.as_dict() for t, b in badges.items()}


async def settle_and_compare(
    hub: HubHarness, clients: dict[str, SocketClient], ids: dict[str, str]
) -> None:
    await hub.services.crm.counters.settled()
    for name, client in clients.items():
        expected = await recomputed(hub, ids[name])
        try:
            await client.wait_until(lambda c=client, e=expected: c.crm_counters() == e, timeout=10)  # type: ignore[misc]
        except TimeoutError:
            raise AssertionError(f"{name}: pushed {client.crm_counters()} != {expected}") from None


async def post(hub: HubHarness, token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await hub.request("POST", path, token=token, json=body)
    assert resp.status == 201, resp.body
    found: dict[str, Any] = resp.body
    return found


async def change(hub: HubHarness, token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await hub.request("PATCH", path, token=token, json=body)
    assert resp.status == 200, resp.body
    found: dict[str, Any] = resp.body
    return found


async def chief(hub: HubHarness, login: str) -> tuple[str, str]:
    """A user holding the Chief executive role (sees everyone's records)."""
    user_id, token = await hub.create_user(login)
    root = await hub.services.directory.user_by_login("root")
    if root is None:
        await hub.create_user("root", admin=True)
    admin_token = await hub.services.auth.issue_token(
        str((await hub.services.directory.user_by_login("root") or {})["_id"])
    )
    resp = await hub.request(
        "PUT",
        "/api/v1/crm/roles",
        token=admin_token,
        json={"role": "chief", "subject_kind": "user", "subject_id": user_id},
    )
    assert resp.status == 200, resp.body
    return user_id, token


def later_today() -> datetime | None:
    """A deadline still today (UTC), a little ahead; None too close to midnight."""
    now = datetime.now(UTC)
    soon = now + timedelta(minutes=20)
    return soon.astimezone(UTC) if soon.date() == now.date() else None


async def test_a_managers_deal_turns_green_then_red_green_then_drops(hub: HubHarness) -> None:
    mary_id, mary = await hub.create_user("mary")
    _, colleague = await chief(hub, "cleo")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Big deal"})
    await client.wait_until(lambda: client.crm_counters().get("deal", {}).get("idle") == 1)

    call = await post(
        hub,
        colleague,
        "/api/v1/crm/activities",
        {
            "owner_type": "deal",
            "owner_id": deal["id"],
            "type": "call",
            "direction": "incoming",
            "subject": "Called back",
        },
    )
    assert call["state"] == "incoming" and call["responsible_id"] != mary_id
    # the activity and its record's open count are two writes: a recount between them may
    # push green first and the idle number a moment later
    green = {**ZERO, "incoming": 1, "total": 1, "colour": "green"}
    await client.wait_until(lambda: client.crm_counters()["deal"] == green)
    # only what changed travels: the last push names no record type but deals
    last = [c["crm"] for c in client.of_type("counters.changed") if "crm" in c][-1]
    assert set(last) == {"deal"} and "overdue" not in last["deal"]
    # the record's indicator follows, for mary
    await client.wait_until(
        lambda: any(
            e["data"]["record"]["indicator"] == {"number": 1, "colour": "green", "dot": None}
            for e in client.of_type("crm.record.updated")
        )
    )

    deadline = later_today()
    if deadline is None:  # within 20 minutes of midnight: light "due" by a minutes window
        await hub.services.crm.config.update(CrmSettingsUpdate(due_minutes_before=60))
        deadline = datetime.now(UTC) + timedelta(minutes=20)
    meeting = await post(
        hub,
        colleague,
        "/api/v1/crm/activities",
        {
            "owner_type": "deal",
            "owner_id": deal["id"],
            "type": "meeting",
            "subject": "Demo",
            "deadline": deadline.isoformat(),
            "responsible_id": mary_id,
        },
    )
    assert meeting["state"] == "due"
    await client.wait_until(lambda: client.crm_counters()["deal"]["colour"] == "red-green")
    assert client.crm_counters()["deal"]["total"] == 2 and client.crm_counters()["deal"]["due"] == 1

    for activity in (call, meeting):
        await change(
            hub, colleague, f"/api/v1/crm/activities/{activity['id']}", {"completed": True}
        )
    await client.wait_until(lambda: client.crm_counters()["deal"] == {**ZERO, "idle": 1})
    all_counters = await hub.request("GET", "/api/v1/counters", token=mary)
    assert all_counters.body["crm"]["deal"] == {**ZERO, "idle": 1}
    assert set(all_counters.body) == {"im", "tasks", "crm"}


async def test_a_new_users_numbers_are_stored_zero_and_what_comes_later_counts_on_top(
    hub: HubHarness, store: Store
) -> None:
    """A new user's numbers are stored (zero) when the user is made, not counted at their
    first connect; a deal made then moves them from there. Numbers a recount stored first
    (a change that named the user before the zeros landed) are left as they are."""
    mary_id, mary = await hub.create_user("mary")
    stored = await store.db["crm_counters"].find_one({"_id": mary_id})
    assert stored is not None and stored["version"] == 1, stored
    assert stored["next_at"] > stored["as_of"]
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    await post(hub, mary, "/api/v1/crm/deals", {"title": "Big"})
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"]["idle"] == 1

    counters = hub.services.crm.counters
    await counters.user_created(await hub.services.directory.user_document(mary_id))
    await counters.settled()
    assert await recomputed(hub, mary_id) == await counters.current(mary_id)
    assert (await counters.current(mary_id))["deal"]["idle"] == 1


async def test_a_lost_push_is_made_good_by_the_next(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pushes carry only changed numbers; one lost on its way (Redis in an outage) must not
    leave a number wrong for ever: the next push brings the connection up to date."""
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    await post(hub, mary, "/api/v1/crm/deals", {"title": "One"})
    await client.wait_until(lambda: client.crm_counters()["deal"]["idle"] == 1)

    counters = hub.services.crm.counters
    bus = counters._bus
    publish = bus.publish_ephemeral
    lost: list[EphemeralEvent] = []

    async def losing_one(event: EphemeralEvent) -> None:
        if event.type == "counters.changed" and not lost:
            lost.append(event)
            return
        await publish(event)

    monkeypatch.setattr(bus, "publish_ephemeral", losing_one)
    await post(hub, mary, "/api/v1/crm/deals", {"title": "Two"})  # idle 2: never told
    await counters.settled()
    assert lost and client.crm_counters()["deal"]["idle"] == 1

    # a change to another record type: its push must also put the deals right
    await post(hub, mary, "/api/v1/crm/leads", {"title": "Walk-in"})
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"]["idle"] == 2


async def test_a_deadline_passing_and_a_due_window_opening_are_pushed(hub: HubHarness) -> None:
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    _, root = await hub.create_user("root", admin=True)
    assert (
        await hub.request(
            "PATCH", "/api/v1/crm/settings", token=root, json={"due_minutes_before": 1}
        )
    ).status == 200
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Timed"})
    now = datetime.now(UTC)
    # becomes due in ~2 s (its last minute starts), overdue in ~3 s
    await post(
        hub,
        mary,
        "/api/v1/crm/activities",
        {
            "owner_type": "deal",
            "owner_id": deal["id"],
            "type": "task",
            "deadline": (now + timedelta(seconds=62)).isoformat(),
        },
    )
    await post(
        hub,
        mary,
        "/api/v1/crm/activities",
        {
            "owner_type": "deal",
            "owner_id": deal["id"],
            "type": "call",
            "deadline": (now + timedelta(seconds=3)).isoformat(),
        },
    )
    await client.wait_until(lambda: client.crm_counters().get("deal", {}).get("due") == 1)
    await client.wait_until(lambda: client.crm_counters()["deal"].get("due") == 2, timeout=15)
    # time alone moved the record's indicator too: it is sent again
    await client.wait_until(
        lambda: any(
            e["data"]["record"]["indicator"]["number"] == 2
            for e in client.of_type("crm.record.updated")
        )
    )
    await client.wait_until(lambda: client.crm_counters()["deal"].get("overdue") == 1, timeout=15)
    assert client.crm_counters()["deal"]["due"] == 1
    assert await recomputed(hub, mary_id) == client.crm_counters()


async def test_switching_the_mode_repushes_everyones_counters(hub: HubHarness) -> None:
    mary_id, mary = await hub.create_user("mary")
    bob_id, bob = await hub.create_user("bob")
    _, root = await hub.create_user("root", admin=True)
    clients = {"mary": await hub.connect(mary), "bob": await hub.connect(bob)}
    for c in clients.values():
        await c.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Shared work"})
    # mary's deal, an incoming email assigned to bob
    await post(
        hub,
        mary,
        "/api/v1/crm/activities",
        {
            "owner_type": "deal",
            "owner_id": deal["id"],
            "type": "email",
            "direction": "incoming",
            "responsible_id": bob_id,
        },
    )
    ids = {"mary": mary_id, "bob": bob_id}
    await settle_and_compare(hub, clients, ids)
    assert clients["mary"].crm_counters()["deal"]["incoming"] == 1
    assert clients["bob"].crm_counters().get("deal", ZERO)["incoming"] == 0
    resp = await hub.request(
        "PATCH", "/api/v1/crm/settings", token=root, json={"counter_mode": "activity"}
    )
    assert resp.status == 200 and resp.body["counter_mode"] == "activity"
    await settle_and_compare(hub, clients, ids)
    assert clients["mary"].crm_counters()["deal"]["incoming"] == 0
    assert clients["bob"].crm_counters()["deal"]["incoming"] == 1
    # the indicator for mary is now a gray... no: mary is a manager, she may not see others'
    # numbers; the record shows nothing counted for her
    listed = await hub.request("GET", "/api/v1/crm/deals", token=mary)
    assert listed.body["records"][0]["indicator"] == {"number": 0, "colour": "none", "dot": None}


async def test_counters_check_finds_and_repairs_drift(hub: HubHarness) -> None:
    mary_id, mary = await hub.create_user("mary")
    _, root = await hub.create_user("root", admin=True)
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Drifting"})
    await post(
        hub,
        mary,
        "/api/v1/crm/activities",
        {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"},
    )
    await hub.services.crm.counters.settled()
    clean = await hub.request("POST", "/api/v1/crm/counters/check", token=root, json={})
    assert clean.status == 200 and clean.body["differences"] == {}, clean.body
    # simulate a crash between the activity write and its bookkeeping
    store = hub.services.store
    await store["crm_records"].update_one({"_id": deal["id"]}, {"$set": {"open_activities": 5}})
    await store["crm_counters"].update_one(
        {"_id": mary_id}, {"$set": {"values.deal.incoming": 7, "values.deal.total": 7}}
    )
    found = await hub.request("POST", "/api/v1/crm/counters/check", token=root, json={})
    assert found.body["stale_records"] == 1
    assert found.body["differences"][mary_id]["deal"]["incoming"] == 1
    assert (
        await hub.request("POST", "/api/v1/crm/counters/check", token=mary, json={})
    ).status == 403
    repaired = await hub.request(
        "POST", "/api/v1/crm/counters/check", token=root, json={"repair": True}
    )
    assert repaired.body["repaired"] is True
    again = await hub.request("POST", "/api/v1/crm/counters/check", token=root, json={})
    assert again.body["differences"] == {} and again.body["stale_records"] == 0
    doc = await store["crm_records"].find_one({"_id": deal["id"]})
    assert doc is not None and doc["open_activities"] == 1


async def test_the_full_check_reads_activities_in_index_ranges(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``counters check`` reads the open activities a page at a time, each page one range of
    an index: one read of the whole collection answered only once the database had gathered
    every document, and at a million that took longer than the socket timeout."""
    mary_id, mary = await hub.create_user("mary")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Paged"})
    for kind, direction in (("call", "incoming"), ("task", "outgoing"), ("email", "incoming")):
        await post(
            hub,
            mary,
            "/api/v1/crm/activities",
            {"owner_type": "deal", "owner_id": deal["id"], "type": kind, "direction": direction},
        )
    counters = hub.services.crm.counters
    await counters.settled()
    store = hub.services.store
    filters: list[dict[str, Any]] = []
    original = Store.__getitem__

    class Recorded:
        def __init__(self, collection: Any) -> None:
            self._collection = collection

        def find(self, filter: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            filters.append(filter)
            return self._collection.find(filter, *args, **kwargs)

        def with_options(self, *args: Any, **kwargs: Any) -> Recorded:
            # the check reads its pages through other decoding options (CHECK_CODEC)
            return Recorded(self._collection.with_options(*args, **kwargs))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._collection, name)

    def recording(self: Store, name: str) -> Any:
        found = original(self, name)
        return Recorded(found) if name == "crm_activities" else found

    monkeypatch.setattr(Store, "__getitem__", recording)
    report = await counters.check()
    monkeypatch.undo()
    assert report.clean and report.activities_checked == 3, report
    assert filters
    for read in filters:
        stage, index = plan_of(await store["crm_activities"].find(read).explain())
        assert stage == "IXSCAN", (read, stage)
        assert index == "count_item", (read, index)
    assert {"record_responsible_id": mary_id, "owner_type": "deal", "completed": False} in filters


async def test_the_check_asks_for_pages_ahead_within_an_activity_budget(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check's pages are asked for ahead of the one being counted, up to
    CHECK_PAGES_AHEAD of them, but never more than CHECK_AHEAD_ACTIVITIES expected activities
    in flight (the database holds each page whole): a person holding more than that is read
    on their own. Every page comes out once, in order."""
    counters = hub.services.crm.counters
    pages = [(f"person{i}", "deal") for i in range(12)]
    sizes = dict.fromkeys(pages, CHECK_AHEAD_ACTIVITIES // 10)
    sizes[pages[8]] = CHECK_AHEAD_ACTIVITIES * 2
    asked: list[str] = []
    finished: set[str] = set()
    peak = 0

    def read(holder: str, record_type: str) -> Any:
        nonlocal peak
        asked.append(holder)
        flight = [h for h in asked if h not in finished]
        peak = max(peak, len(flight))
        held = sum(sizes[h, record_type] for h in flight)
        assert len(flight) == 1 or held <= CHECK_AHEAD_ACTIVITIES, (holder, flight)

        async def page() -> list[dict[str, Any]]:
            await asyncio.sleep(0)
            finished.add(holder)
            return [{"_id": holder}]

        return page()

    monkeypatch.setattr(counters, "_read_page", read)
    seen: list[str] = []
    async with contextlib.aclosing(counters._pages(pages, sizes)) as paged:
        async for page in paged:
            seen.extend(act["_id"] for act in page)
    assert seen == asked == [holder for holder, _ in pages]
    assert peak == CHECK_PAGES_AHEAD


async def test_the_full_check_finds_an_activity_whose_copy_names_nobody(hub: HubHarness) -> None:
    """The pages read by the copy of the record's responsible person; an activity whose copy
    names someone else than any person is found through its record's open count, reported
    and repaired (and the record's count is not 'repaired' to what the pages saw)."""
    mary_id, mary = await hub.create_user("mary")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Ghost"})
    body = {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"}
    act = await post(hub, mary, "/api/v1/crm/activities", body)
    await post(hub, mary, "/api/v1/crm/activities", body)
    counters = hub.services.crm.counters
    await counters.settled()
    store = hub.services.store
    await store["crm_activities"].update_one(
        {"_id": act["id"]}, {"$set": {"record_responsible_id": "nobody"}}
    )
    found = await counters.check()
    assert (found.stale_activities, found.stale_records) == (1, 0), found
    assert found.counter_differences == {}, found
    repaired = await counters.check(repair=True)
    assert repaired.repaired and repaired.stale_activities == 1
    again = await counters.check()
    assert again.clean, again
    fixed = await store["crm_activities"].find_one({"_id": act["id"]})
    assert fixed is not None and fixed["record_responsible_id"] == mary_id
    record = await store["crm_records"].find_one({"_id": deal["id"]})
    assert record is not None and record["open_activities"] == 2


async def test_changes_at_once_on_one_record_count_each_once(hub: HubHarness) -> None:
    """Twenty activities added to one deal at the same time, then completed at the same
    time: each write's difference is taken from the state it really changed (the record's
    count of open activities moves under every one of them)."""
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Busy"})
    body = {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"}
    made = await asyncio.gather(
        *(post(hub, mary, "/api/v1/crm/activities", body) for _ in range(20))
    )
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"]["incoming"] == 20
    assert client.crm_counters()["deal"]["idle"] == 0
    done = await asyncio.gather(
        *(
            hub.request(
                "PATCH", f"/api/v1/crm/activities/{a['id']}", token=mary, json={"completed": True}
            )
            for a in made
        )
    )
    assert all(r.status == 200 for r in done), [r.body for r in done if r.status != 200]
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"] == {**ZERO, "idle": 1}
    record = await hub.services.store["crm_records"].find_one({"_id": deal["id"]})
    assert record is not None and record["open_activities"] == 0


async def test_the_periodic_check_repairs_numbers_that_drifted(hub: HubHarness) -> None:
    """A difference lost on its way (a crash between the activity's write and its count) is
    found by the background check, which stores and pushes the recounted numbers."""
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Drifting"})
    await post(
        hub,
        mary,
        "/api/v1/crm/activities",
        {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"},
    )
    counters = hub.services.crm.counters
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert await counters.verify_some(None, 100) == (0, None)
    # the stored number moves without a change: as if a difference had been applied twice
    stored = hub.services.store["crm_counters"]
    await stored.update_one({"_id": mary_id}, {"$inc": {"values.deal.incoming": 1, "version": 1}})
    assert (await counters.verify_user(mary_id, repair=False))[0] == "drifted"
    # the scheduler's job runs a few users at a time, then sets itself for the next round
    await counters.start_checking(timedelta(minutes=5))
    await counters.check_some("")
    doc = await stored.find_one({"_id": mary_id})
    assert doc is not None and doc["values"]["deal"]["incoming"] == 1
    job = await hub.services.store["schedule"].find_one({"_id": "crm-counters-check"})
    assert job is not None and job["after"] is None
    assert job["due_at"] > utcnow() + timedelta(minutes=4)
    assert (await counters.verify_user(mary_id))[0] == "right"
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})


async def test_a_recount_that_changes_keep_overtaking_counts_nothing_twice(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recount gives up when changes keep coming in while it counts (here at once: one
    attempt). Changes it may have counted already are then not applied as differences on top;
    the user is counted again once they stop."""
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Busy"})
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    monkeypatch.setattr("server.counters.crm.GUARDED_ATTEMPTS", 1)
    body = {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"}
    for _round in range(3):
        hub.services.crm.counters.touch([mary_id])
        await asyncio.gather(*(post(hub, mary, "/api/v1/crm/activities", body) for _ in range(10)))
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"]["incoming"] == 30


async def test_a_recount_asked_for_while_a_change_is_applied_loses_nothing(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A recount asked for (a new time zone, a stage that changed meaning) while the flusher
    is applying a difference of the same user: the difference was dropped with "not
    applied; a check mends them" (the user's zone, which the request forgets, was looked up
    again between the two)."""
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Busy"})
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    counters = hub.services.crm.counters
    zones_of = counters._zones_of
    asked: list[str] = []

    async def then_a_recount_is_asked_for(user_ids: Any, fresh: bool = False) -> Any:
        found = await zones_of(user_ids, fresh)
        if mary_id in found and not fresh and not asked:
            # the flusher has the zones it takes the differences in: a request asks for a
            # recount of mary right then, before her difference is written
            asked.append(mary_id)
            asyncio.get_running_loop().call_soon(counters.touch, [mary_id])
        return found

    monkeypatch.setattr(counters, "_zones_of", then_a_recount_is_asked_for)
    body = {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"}
    with caplog.at_level(logging.WARNING, logger="server.counters.crm"):
        await post(hub, mary, "/api/v1/crm/activities", body)
        await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert asked
    assert "not applied" not in caplog.text and "failed" not in caplog.text, caplog.text
    assert client.crm_counters()["deal"]["incoming"] == 1


async def test_an_activity_handed_over_during_its_old_owners_recount_counts_for_the_new(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Mary's incoming call is handed to bob while mary is being recounted. Mary's recount
    reads the activity as bob's already, so for her the change is counted; for bob it is a
    difference to apply. Taking that difference needed mary's zone too, which the flusher
    had not read: the whole batch failed and bob's number stayed short until a check."""
    mary_id, mary = await hub.create_user("mary")
    bob_id, bob = await hub.create_user("bob")
    _, boss = await chief(hub, "boss")
    admin = await hub.services.directory.user_by_login("root")  # made by chief()
    assert admin is not None
    root = await hub.services.auth.issue_token(str(admin["_id"]))
    resp = await hub.request(
        "PATCH", "/api/v1/crm/settings", token=root, json={"counter_mode": "activity"}
    )
    assert resp.status == 200, resp.body
    clients = {"mary": await hub.connect(mary), "bob": await hub.connect(bob)}
    for c in clients.values():
        await c.wait_for("snapshot")
    ids = {"mary": mary_id, "bob": bob_id}
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Handed over"})
    call = await post(
        hub,
        mary,
        "/api/v1/crm/activities",
        {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"},
    )
    await settle_and_compare(hub, clients, ids)
    assert clients["mary"].crm_counters()["deal"]["incoming"] == 1
    counters = hub.services.crm.counters
    zones_of = counters._zones_of
    handed: list[int] = []

    async def handed_over_meanwhile(user_ids: Any, fresh: bool = False) -> Any:
        found = await zones_of(user_ids, fresh)
        if fresh and list(found) == [mary_id] and not handed:
            # mary's recount has her zone and has not started counting: the call is handed
            # to bob now, a real request
            moved = await hub.request(
                "PATCH",
                f"/api/v1/crm/activities/{call['id']}",
                token=boss,
                json={"responsible_id": bob_id},
            )
            handed.append(moved.status)
        return found

    monkeypatch.setattr(counters, "_zones_of", handed_over_meanwhile)
    with caplog.at_level(logging.WARNING, logger="server.counters.crm"):
        counters.touch([mary_id])
        await counters.settled()
        await settle_and_compare(hub, clients, ids)
    assert handed == [200]
    assert "failed" not in caplog.text and "not applied" not in caplog.text, caplog.text
    assert clients["mary"].crm_counters()["deal"]["incoming"] == 0
    assert clients["bob"].crm_counters()["deal"]["incoming"] == 1


async def test_a_difference_that_failed_to_apply_is_recounted_at_once(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write of the numbers fails (the database went away for a moment): the user is
    counted again from scratch right after, not left wrong until the periodic check."""
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Flaky"})
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    counters = hub.services.crm.counters
    fast = counters._fast
    failed: list[str] = []

    async def failing_once(user_id: str, *args: Any) -> bool:
        if not failed:
            failed.append(user_id)
            raise ConnectionError("the database went away")
        return await fast(user_id, *args)

    monkeypatch.setattr(counters, "_fast", failing_once)
    body = {"owner_type": "deal", "owner_id": deal["id"], "type": "call", "direction": "incoming"}
    with caplog.at_level(logging.WARNING, logger="server.counters.crm"):
        await post(hub, mary, "/api/v1/crm/activities", body)
        await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert failed == [mary_id]
    assert "recounting them" in caplog.text, caplog.text
    assert client.crm_counters()["deal"]["incoming"] == 1
    assert (await counters.verify_user(mary_id, repair=False))[0] == "right"


async def test_an_activity_due_when_made_turns_overdue_once(hub: HubHarness) -> None:
    """A difference taken at the moment of the change moves the numbers' moment there too:
    an activity already inside its due window when made (the window opened after the numbers
    were last moved in time) is due once, then overdue once - not overdue on top of due,
    as when time was moved on from the numbers' older moment."""
    mary_id, mary = await hub.create_user("mary")
    _, root = await hub.create_user("root", admin=True)
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    deal = await post(hub, mary, "/api/v1/crm/deals", {"title": "Timed"})
    ahead = [timedelta(0)]
    counters = hub.services.crm.counters
    counters.clock = lambda: utcnow() + ahead[0]
    # everyone's numbers are counted again, as of now, under the hour's window
    resp = await hub.request(
        "PATCH", "/api/v1/crm/settings", token=root, json={"due_minutes_before": 60}
    )
    assert resp.status == 200, resp.body
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    ahead[0] = timedelta(minutes=2)
    # due within the hour from 1 minute on: already due when made, 2 minutes later
    deadline = utcnow() + timedelta(minutes=61)
    await post(
        hub,
        mary,
        "/api/v1/crm/activities",
        {
            "owner_type": "deal",
            "owner_id": deal["id"],
            "type": "task",
            "deadline": deadline.isoformat(),
        },
    )
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"]["due"] == 1
    ahead[0] = timedelta(minutes=63)  # past the deadline
    await wake_up(hub, [mary_id])
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"]["due"] == 0
    assert client.crm_counters()["deal"]["overdue"] == 1


async def test_moved_and_converted_mail_moves_the_counters_by_differences(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moving an e-mail to another person's record, and a conversion taking the lead's mail
    to the deal, apply their differences in the write path like every other change: no
    recount of anyone, and what each client is pushed equals a recount from scratch."""
    boss_id, boss = await chief(hub, "boss")
    mary_id, mary = await hub.create_user("mary")
    ben_id, ben = await hub.create_user("ben")
    clients = {}
    for name, token in (("boss", boss), ("mary", mary), ("ben", ben)):
        clients[name] = await hub.connect(token)
        await clients[name].wait_for("snapshot")
    ids = {"boss": boss_id, "mary": mary_id, "ben": ben_id}
    lead = await post(hub, mary, "/api/v1/crm/leads", {"title": "From mail", "last_name": "Li"})
    contact = await post(hub, mary, "/api/v1/crm/contacts", {"last_name": "Ko"})
    deal = await post(hub, ben, "/api/v1/crm/deals", {"title": "Ben's"})
    mails = []
    for owner_type, owner_id in (
        ("lead", lead["id"]),
        ("lead", lead["id"]),
        ("contact", contact["id"]),
    ):
        mails.append(
            await post(
                hub,
                mary,
                "/api/v1/crm/activities",
                {
                    "owner_type": owner_type,
                    "owner_id": owner_id,
                    "type": "email",
                    "direction": "incoming",
                    "subject": "hello",
                },
            )
        )
    await change(hub, mary, f"/api/v1/crm/activities/{mails[1]['id']}", {"completed": True})
    await settle_and_compare(hub, clients, ids)
    assert clients["mary"].crm_counters()["lead"]["incoming"] == 1
    assert clients["mary"].crm_counters()["contact"]["incoming"] == 1

    recounted: list[list[str]] = []
    touch = hub.services.crm.counters.touch

    def spied(user_ids: Iterable[str], *args: Any) -> None:
        users = list(user_ids)
        recounted.append(users)
        touch(users, *args)

    monkeypatch.setattr(hub.services.crm.counters, "touch", spied)
    # mary's contact's mail onto ben's deal, by the boss who sees both
    moved = await hub.request(
        "POST",
        f"/api/v1/crm/activities/{mails[2]['id']}/move",
        token=boss,
        json={"owner_type": "deal", "owner_id": deal["id"]},
    )
    assert moved.status == 200, moved.body
    await settle_and_compare(hub, clients, ids)
    assert clients["mary"].crm_counters()["contact"]["incoming"] == 0
    assert clients["ben"].crm_counters()["deal"]["incoming"] == 1
    assert clients["ben"].crm_counters()["deal"]["idle"] == 0
    # the lead's mail, open and completed, goes to the deal it becomes
    converted = await hub.request(
        "POST", f"/api/v1/crm/leads/{lead['id']}/convert", token=mary, json={"mode": "deal"}
    )
    assert converted.status == 201, converted.body
    await settle_and_compare(hub, clients, ids)
    assert clients["mary"].crm_counters()["lead"]["incoming"] == 0
    assert clients["mary"].crm_counters()["deal"]["incoming"] == 1
    assert recounted == []
    stale = await hub.services.crm.counters.verify_some(None, 100)
    assert stale == (0, None), stale


async def test_a_merge_moves_the_counters_by_the_differences_of_the_moved_activities(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merging two duplicates moves the other's activities to the survivor and deletes the
    other: the counters take each moved activity's difference and the records' (the
    survivor's open count, the other gone) in the write path, with no recount of anyone,
    and what each client is pushed equals a recount from scratch."""
    boss_id, boss = await chief(hub, "boss")
    mary_id, mary = await hub.create_user("mary")
    ben_id, ben = await hub.create_user("ben")
    clients = {}
    for name, token in (("boss", boss), ("mary", mary), ("ben", ben)):
        clients[name] = await hub.connect(token)
        await clients[name].wait_for("snapshot")
    ids = {"boss": boss_id, "mary": mary_id, "ben": ben_id}
    keep = await post(hub, mary, "/api/v1/crm/contacts", {"last_name": "Ko"})
    dupe = await post(
        hub, ben, "/api/v1/crm/contacts", {"last_name": "Ko", "ignore_duplicates": True}
    )
    idle = await post(hub, ben, "/api/v1/crm/contacts", {"last_name": "Idle"})
    acts = []
    for owner, person, direction in (
        (keep, mary_id, "incoming"),
        (dupe, ben_id, "incoming"),
        (dupe, mary_id, "incoming"),  # mary's activity on ben's record
        (dupe, ben_id, "outgoing"),
        (idle, ben_id, "incoming"),
    ):
        acts.append(
            await post(
                hub,
                boss,
                "/api/v1/crm/activities",
                {
                    "owner_type": "contact",
                    "owner_id": owner["id"],
                    "responsible_id": person,
                    "type": "email",
                    "direction": direction,
                    "subject": "hello",
                    "deadline": (utcnow() - timedelta(hours=1)).isoformat()
                    if direction == "outgoing"
                    else None,
                },
            )
        )
    await change(hub, boss, f"/api/v1/crm/activities/{acts[4]['id']}", {"completed": True})
    await settle_and_compare(hub, clients, ids)
    # item mode (the default): counted for the record's responsible person
    assert clients["ben"].crm_counters()["contact"]["incoming"] == 2
    assert clients["ben"].crm_counters()["contact"]["overdue"] == 1
    assert clients["ben"].crm_counters()["contact"]["idle"] == 1  # "Idle": none open

    recounted: list[list[str]] = []
    touch = hub.services.crm.counters.touch

    def spied(user_ids: Iterable[str], *args: Any) -> None:
        users = list(user_ids)
        recounted.append(users)
        touch(users, *args)

    monkeypatch.setattr(hub.services.crm.counters, "touch", spied)
    merged = await hub.request(
        "POST",
        f"/api/v1/crm/contacts/{keep['id']}/merge",
        token=boss,
        json={"other_id": dupe["id"]},
    )
    assert merged.status == 200, merged.body
    assert merged.body["open_activities"] == 4
    await settle_and_compare(hub, clients, ids)
    # the survivor's responsible person (mary) counts all four now
    assert clients["mary"].crm_counters()["contact"]["incoming"] == 3
    assert clients["mary"].crm_counters()["contact"]["overdue"] == 1
    assert clients["ben"].crm_counters()["contact"]["incoming"] == 0
    assert clients["ben"].crm_counters()["contact"]["idle"] == 1
    assert recounted == []
    stored = await hub.services.store["crm_records"].find_one({"_id": keep["id"]})
    assert stored is not None and stored["open_activities"] == 4
    stale = await hub.services.crm.counters.verify_some(None, 100)
    assert stale == (0, None), stale


# the property: random operations, several users, both modes -----------------------------------

USERS = ("ann", "ben", "cat")
NEW_ACTIVITY = st.tuples(
    st.just("activity"),
    st.sampled_from(USERS),  # who logs it
    st.integers(0, 9),  # on which record
    st.sampled_from(["incoming", "overdue", "due", "future", "none"]),
    st.sampled_from(USERS),  # its responsible person
)
OPS = st.one_of(
    st.tuples(
        st.just("record"), st.sampled_from(USERS), st.sampled_from(["deal", "lead", "contact"])
    ),
    NEW_ACTIVITY,
    st.tuples(st.just("complete"), st.integers(0, 19)),
    st.tuples(st.just("reopen"), st.integers(0, 19)),
    st.tuples(st.just("reassign_activity"), st.integers(0, 19), st.sampled_from(USERS)),
    st.tuples(st.just("redate"), st.integers(0, 19), st.sampled_from(["overdue", "future", "due"])),
    st.tuples(st.just("reassign_record"), st.integers(0, 9), st.sampled_from(USERS)),
    st.tuples(st.just("close_record"), st.integers(0, 9)),
    st.tuples(st.just("delete_activity"), st.integers(0, 19)),
    st.tuples(st.just("mode"), st.sampled_from(["item", "activity"])),
    st.tuples(st.just("window"), st.sampled_from([None, 1, 60, 24 * 60])),
    # time passes: the counters' clock moves on, and the users' wake-ups that fell due fire
    st.tuples(st.just("time"), st.sampled_from([1, 90, 11 * 60, 24 * 60 + 7])),
    st.tuples(st.just("time"), st.sampled_from([1, 90, 11 * 60, 24 * 60 + 7])),
)


def deadline_for(kind: str) -> str | None:
    now = datetime.now(UTC)
    if kind == "overdue":
        return (now - timedelta(hours=2)).isoformat()
    if kind == "future":
        return (now + timedelta(days=3)).isoformat()
    if kind == "due":  # a minutes window of a day makes this due whatever the hour
        return (now + timedelta(hours=2)).isoformat()
    return None


async def run_operations(settings: Settings, mode: str, ops: list[tuple[Any, ...]]) -> None:
    assert settings.mongodb_url is not None
    store = Store(settings.mongodb_url.get_secret_value(), f"t_{uuid.uuid4().hex[:12]}")
    await store.ensure_indexes()
    try:
        async with start_hub(settings, store) as hub:
            _, root = await hub.create_user("root", admin=True)
            # everyone a chief: any of them may act on any record (roles have their own tests)
            ids: dict[str, str] = {}
            tokens: dict[str, str] = {}
            for name in USERS:
                ids[name], tokens[name] = await chief(hub, name)
            await hub.request(
                "PATCH",
                "/api/v1/crm/settings",
                token=root,
                json={"due_minutes_before": 24 * 60, "counter_mode": mode},
            )
            # the counters' own clock, moved on by the "time" operations
            ahead = [timedelta(0)]
            hub.services.crm.counters.clock = lambda: utcnow() + ahead[0]
            clients = {name: await hub.connect(tokens[name]) for name in USERS}
            for c in clients.values():
                await c.wait_for("snapshot")
            records: list[dict[str, Any]] = []
            activities: list[dict[str, Any]] = []
            # a populated CRM to start from: a deal and a lead each
            for name in USERS:
                for record_type in ("deal", "lead"):
                    await apply(
                        hub, root, tokens, ids, records, activities, ("record", name, record_type)
                    )
            for op in ops:
                if op[0] == "time":
                    ahead[0] += timedelta(minutes=op[1])
                    await wake_up(hub, ids.values())
                else:
                    await apply(hub, root, tokens, ids, records, activities, op)
                await settle_and_compare(hub, clients, ids)
    finally:
        await store.client.drop_database(store.db.name)
        await store.close()


async def wake_up(hub: HubHarness, user_ids: Iterable[str]) -> None:
    """What the scheduler does at the counters' clock: each user's wake-up that fell due
    runs (the scheduler itself goes by the real clock, which the test does not move)."""
    counters = hub.services.crm.counters
    for uid in user_ids:
        job = await hub.services.store["schedule"].find_one({"_id": f"crm-counters|{uid}"})
        if job is not None and job["due_at"] <= counters.clock():
            await counters.time_reached(uid)


async def apply(
    hub: HubHarness,
    root: str,
    tokens: dict[str, str],
    ids: dict[str, str],
    records: list[dict[str, Any]],
    activities: list[dict[str, Any]],
    op: tuple[Any, ...],
) -> None:
    kind = op[0]
    plural = {"deal": "deals", "lead": "leads", "contact": "contacts"}
    if kind == "record":
        _, who, record_type = op
        body: dict[str, Any] = {"ignore_duplicates": True}
        body["title" if record_type != "contact" else "first_name"] = f"R{len(records)}"
        records.append(await post(hub, tokens[who], f"/api/v1/crm/{plural[record_type]}", body))
        return
    if kind in ("mode", "window"):
        field = "counter_mode" if kind == "mode" else "due_minutes_before"
        resp = await hub.request("PATCH", "/api/v1/crm/settings", token=root, json={field: op[1]})
        assert resp.status == 200, resp.body
        return
    if kind in ("activity", "reassign_record", "close_record"):
        if not records:
            return
        record = records[op[2 if kind == "activity" else 1] % len(records)]
        path = f"/api/v1/crm/{plural[record['type']]}/{record['id']}"
        if kind == "activity":
            _, who, _, state, responsible = op
            body = {"owner_type": record["type"], "owner_id": record["id"], "subject": "x"}
            body["type"] = "call" if state == "incoming" else "meeting"
            body["direction"] = "incoming" if state == "incoming" else "outgoing"
            body["responsible_id"] = ids[responsible]
            if (deadline := deadline_for(state)) is not None:
                body["deadline"] = deadline
            activities.append(await post(hub, tokens[who], "/api/v1/crm/activities", body))
        elif kind == "reassign_record":
            record.update(await change(hub, root, path, {"responsible_id": ids[op[2]]}))
        elif record["type"] == "deal":
            await change(hub, root, path, {"stage_id": "won"})
        elif record["type"] == "lead":
            await change(hub, root, path, {"status": "junk"})
        return
    if not activities:
        return
    activity = activities[op[1] % len(activities)]
    path = f"/api/v1/crm/activities/{activity['id']}"
    if kind == "delete_activity":
        resp = await hub.request("DELETE", path, token=root)
        assert resp.status in (204, 404)
        return
    patch: dict[str, Any] = {
        "complete": {"completed": True},
        "reopen": {"completed": False},
    }.get(kind, {})
    if kind == "reassign_activity":
        patch = {"responsible_id": ids[op[2]]}
    elif kind == "redate":
        patch = {"deadline": deadline_for(op[2])}
    resp = await hub.request("PATCH", path, token=root, json=patch)
    assert resp.status in (200, 404), resp.body


@pytest.fixture
def base_settings(settings: Settings) -> Settings:
    return settings


@hypothesis_settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    mode=st.sampled_from(["item", "activity"]),
    first=st.lists(NEW_ACTIVITY, min_size=3, max_size=6),
    then=st.lists(OPS, min_size=2, max_size=12),
)
def test_pushed_counters_always_equal_counters_recomputed_from_scratch(
    base_settings: Settings, mode: str, first: list[tuple[Any, ...]], then: list[tuple[Any, ...]]
) -> None:
    """After every operation, whoever did it, in either mode, with either due window, and
    after time passed over deadlines and midnights, every connected user's merged pushes
    equal their counters recomputed from all records and activities."""
    asyncio.run(run_operations(base_settings, mode, first + then))


async def test_activities_added_together_count_each_record_once_also_after_another_write(
    hub: HubHarness,
) -> None:
    """``add_many`` (a batch of mail) moves the open counts of all its records in one write,
    each guarded by the count it read: a record whose count another write moved first (here
    an activity added after the batch read its records) is found by the write's token, read
    again and counted on its own, so no count is lost or doubled and the pushed numbers
    equal a recount."""
    mary_id, mary = await hub.create_user("mary")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    first = await post(hub, mary, "/api/v1/crm/deals", {"title": "First"})
    second = await post(hub, mary, "/api/v1/crm/deals", {"title": "Second"})
    store = hub.services.store
    read = {
        d["_id"]: d
        async for d in store["crm_records"].find({"_id": {"$in": [first["id"], second["id"]]}})
    }
    body = {"owner_type": "deal", "owner_id": first["id"], "type": "call", "direction": "incoming"}
    await post(hub, mary, "/api/v1/crm/activities", body)  # moves the first's count
    items = [
        NewActivity(
            owner=read[owner_id],
            responsible_id=mary_id,
            type_="email",
            direction="incoming",
            subject=f"mail {n}",
        )
        for n, owner_id in enumerate([first["id"], second["id"], second["id"]])
    ]
    results = await hub.services.crm.activities.add_many(items)
    assert all(isinstance(r, str) for r in results), results
    await settle_and_compare(hub, {"mary": client}, {"mary": mary_id})
    assert client.crm_counters()["deal"]["incoming"] == 4
    counts = {
        d["_id"]: d["open_activities"]
        async for d in store["crm_records"].find({"_id": {"$in": [first["id"], second["id"]]}})
    }
    assert counts == {first["id"]: 2, second["id"]: 2}, counts
    assert (await hub.services.crm.counters.check()).stale_records == 0
