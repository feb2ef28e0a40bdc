"""The activity lists read a person's or a record's activities by an index, whatever else
the company holds.

``ActivityService.find`` asks the database only for a leading run of an index's keys (a
person's activities per record type, a record's by ``owner``) and checks the rest of the
list's conditions on what it read. These tests compare its lists, under every status,
deadline, type and owner filter, with the list a single database query of all the
conditions gives (the way it was read before), over 600 activities of random kinds beside
2,000 of other people and records, and bound what the database examined for each read.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from server.counters.rules import due_threshold
from server.settings import Settings
from server.store.database import Document, Store, utcnow
from tests.harness import FindsOn, HubHarness, start_hub, watched_store
from tests.index_rule import served_by_index

MINE = 600
OTHERS = 2_000
TYPES = ("call", "meeting", "email", "task")


@pytest.fixture
async def watched(settings: Settings, store: Store) -> AsyncIterator[tuple[HubHarness, FindsOn]]:
    finds = FindsOn("crm_activities")
    async with watched_store(store, finds) as monitored, start_hub(settings, monitored) as hub:
        yield hub, finds


async def first_call(hub: HubHarness, store: Store, token: str, deal_id: str) -> Document:
    """An open call on ``deal_id`` made through the API, as stored: the template the tests
    copy their activities from."""
    made = await hub.request(
        "POST",
        "/api/v1/crm/activities",
        token=token,
        json={"owner_type": "deal", "owner_id": deal_id, "type": "call", "subject": "Ring"},
    )
    assert made.status == 201, made.body
    template = await store["crm_activities"].find_one({"_id": made.body["id"]})
    assert template is not None
    return template


async def one_query(
    hub: HubHarness, store: Store, actor_id: str, query: dict[str, Any]
) -> list[str]:
    """The list as one database query of every condition gives it."""
    core = hub.services.crm.records.core
    filters: Document = {}
    if "owner_id" in query:
        filters["owner_id"] = query["owner_id"]
        if "responsible_id" in query:
            filters["responsible_id"] = query["responsible_id"]
    else:
        filters["responsible_id"] = query.get("responsible_id", actor_id)
        if "owner_type" in query:
            filters["owner_type"] = query["owner_type"]
    if "type" in query:
        filters["type"] = query["type"]
    status = query.get("status", "open")
    if status == "open":
        filters["completed"] = False
    elif status == "completed":
        filters["completed"] = True
    now = utcnow()
    if "deadline" in query:
        cfg = await core.config.counter_config()
        threshold = due_threshold(now, await core.zone(actor_id), cfg.window)
        filters["completed"] = False
        kind = query["deadline"]
        if kind == "incoming":
            filters["incoming"] = True
        elif kind == "overdue":
            filters.update(incoming=False, deadline={"$lte": now})
        elif kind == "due":
            filters.update(incoming=False, deadline={"$gt": now, "$lt": threshold})
        else:
            filters.update(
                incoming=False, **{"$or": [{"deadline": {"$gte": threshold}}, {"deadline": None}]}
            )
    found = (
        await store["crm_activities"]
        .find(filters, {"_id": 1})
        .sort([("deadline", 1), ("_id", 1)])
        .skip(int(query.get("offset", 0)))
        .limit(int(query.get("limit", 100)))
        .to_list()
    )
    return [a["_id"] for a in found]


async def test_every_list_is_what_one_query_of_all_its_conditions_gives(
    watched: tuple[HubHarness, FindsOn], store: Store
) -> None:
    hub, finds = watched
    mary_id, mary = await hub.create_user("mary")
    sam_id, _ = await hub.create_user("sam")
    owners: list[tuple[str, str]] = []
    for kind, body in (
        ("deals", {"title": "One"}),
        ("deals", {"title": "Two"}),
        ("contacts", {"first_name": "Ann", "last_name": "Lee"}),
    ):
        made = await hub.request("POST", f"/api/v1/crm/{kind}", token=mary, json=body)
        assert made.status == 201, made.body
        owners.append((made.body["type"], made.body["id"]))
    template = await first_call(hub, store, mary, owners[0][1])
    rng = random.Random(20261207)
    now = utcnow()
    copies: list[Document] = []
    for i in range(MINE + OTHERS):
        theirs = i >= MINE
        owner_type, owner_id = ("deal", f"elsewhere-{i % 50}") if theirs else rng.choice(owners)
        copies.append(
            {
                **template,
                "_id": str(ObjectId()),
                "owner_type": owner_type,
                "owner_id": owner_id,
                "responsible_id": f"other-{i % 7}" if theirs else rng.choice([mary_id, sam_id]),
                "type": rng.choice(TYPES),
                "completed": rng.random() < 0.6,
                "incoming": rng.random() < 0.2,
                "deadline": rng.choice(
                    [
                        None,
                        now - timedelta(days=rng.randint(1, 30)),
                        now + timedelta(minutes=rng.randint(1, 50)),
                        now + timedelta(days=rng.randint(2, 30)),
                    ]
                ),
            }
        )
    await store["crm_activities"].insert_many(copies)

    queries: list[dict[str, Any]] = [
        {"status": status, **extra}
        for status in ("open", "completed", "all")
        for extra in ({}, {"type": "email"}, {"owner_type": "deal"}, {"limit": 7, "offset": 11})
    ]
    queries += [{"deadline": kind} for kind in ("incoming", "overdue", "due", "future")]
    queries += [{"deadline": "overdue", "owner_type": "deal", "type": "call"}]
    for owner_type, owner_id in owners:
        base = {"owner_type": owner_type, "owner_id": owner_id}
        queries += [
            {**base, "status": "all"},
            {**base, "status": "all", "type": "email"},
            {**base, "status": "open", "responsible_id": sam_id},
            {**base, "deadline": "future"},
            {**base, "status": "completed", "limit": 5, "offset": 3},
        ]
    finds.seen.clear()
    listed = 0
    for query in queries:
        params = "&".join(f"{k}={v}" for k, v in query.items())
        resp = await hub.request("GET", f"/api/v1/crm/activities?{params}", token=mary)
        assert resp.status == 200, (query, resp.body)
        got = [a["id"] for a in resp.body["activities"]]
        assert got == await one_query(hub, store, mary_id, query), query
        listed += len(got)
    assert listed > MINE  # the lists are not empty by mistake
    assert finds.seen
    for find in finds.seen:
        # at most Mary's and Sam's activities (and the first one), never the 2,000 others
        assert await finds.examined(store, find) <= MINE + 1, find


def test_the_index_rule_reads_as_measured() -> None:
    assert not served_by_index("crm_activities", {"responsible_id": "u", "completed": False})
    assert served_by_index(
        "crm_activities", {"responsible_id": "u", "owner_type": "deal", "completed": False}
    )
    assert not served_by_index("crm_activities", {"owner_id": "r", "type": "email"})
    assert served_by_index("crm_activities", {"owner_id": "r"})
    assert served_by_index("crm_records", {"_id": {"$in": ["a"]}, "type": "deal"})
    assert not served_by_index("tasks", {"$or": [{"author_id": "u"}]})


async def test_a_conversion_and_a_new_responsible_read_activities_by_an_index(
    watched: tuple[HubHarness, FindsOn],
) -> None:
    hub, finds = watched
    _, mary = await hub.create_user("mary", admin=True)
    sam_id, _ = await hub.create_user("sam")
    deal = await hub.request("POST", "/api/v1/crm/deals", token=mary, json={"title": "Big"})
    lead = await hub.request(
        "POST",
        "/api/v1/crm/leads",
        token=mary,
        json={"title": "Enquiry", "first_name": "Ann", "last_name": "Lee"},
    )
    assert deal.status == lead.status == 201, (deal.body, lead.body)
    for owner_type, owner_id in (("deal", deal.body["id"]), ("lead", lead.body["id"])):
        made = await hub.request(
            "POST",
            "/api/v1/crm/activities",
            token=mary,
            json={"owner_type": owner_type, "owner_id": owner_id, "type": "call", "subject": "R"},
        )
        assert made.status == 201, made.body
    finds.seen.clear()
    moved = await hub.request(
        "PATCH", f"/api/v1/crm/deals/{deal.body['id']}", token=mary, json={"responsible_id": sam_id}
    )
    assert moved.status == 200, moved.body
    converted = await hub.request(
        "POST", f"/api/v1/crm/leads/{lead.body['id']}/convert", token=mary, json={"mode": "deal"}
    )
    assert converted.status == 201, converted.body
    assert finds.seen
    for find in finds.seen:
        assert served_by_index("crm_activities", find["filter"]), find


async def test_a_list_pages_indicators_read_only_the_open_activities(
    watched: tuple[HubHarness, FindsOn], store: Store
) -> None:
    """A page of deals reads its deals' open activities for their indicators in one query;
    the deals' completed history (30 each here, years of it in a real CRM) is not read."""
    hub, finds = watched
    _, mary = await hub.create_user("mary")
    deal_ids = []
    for title in ("One", "Two", "Three"):
        made = await hub.request("POST", "/api/v1/crm/deals", token=mary, json={"title": title})
        assert made.status == 201, made.body
        deal_ids.append(made.body["id"])
    template = await first_call(hub, store, mary, deal_ids[0])
    assert template["completed"] is False
    history = [
        {**template, "_id": str(ObjectId()), "owner_id": deal_id, "completed": True}
        for deal_id in deal_ids
        for _ in range(30)
    ]
    await store["crm_activities"].insert_many(history)
    finds.seen.clear()
    resp = await hub.request("GET", "/api/v1/crm/deals", token=mary)
    assert resp.status == 200, resp.body
    assert {r["id"] for r in resp.body["records"]} == set(deal_ids)
    several = [f for f in finds.seen if isinstance(f["filter"].get("owner_id"), dict)]
    assert len(several) == 1, finds.seen
    assert await finds.examined(store, several[0]) == 1  # the one open activity
