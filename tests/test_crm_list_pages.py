"""A page of a CRM list reads a bounded part of the records, whatever their number.

The embedded database fetches every document of an index range before it sorts and limits,
so list pages are read from windows of ids going back in time (``server/crm/paging.py``).
These tests walk every page of a list of 1,200 deals made over two years, with and without
the list's filters, check each page against the same list computed from every record, and
check what the database examined for the pages that need no search.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
from bson import ObjectId

from server.counters.crm import counted_field
from server.counters.rules import due_threshold
from server.crm.paging import WINDOW_GROWTH, id_windows
from server.settings import Settings
from server.store.database import Document, Store, utcnow
from tests.harness import FindsOn, HubHarness, start_hub, watched_store

DEALS = 1_200
YEARS = 2
STAGES = ("new", "proposal", "won", "lost")
LIMIT = 50


@pytest.fixture
async def watched(settings: Settings, store: Store) -> AsyncIterator[tuple[HubHarness, FindsOn]]:
    finds = FindsOn("crm_records")
    async with watched_store(store, finds) as monitored, start_hub(settings, monitored) as hub:
        yield hub, finds


def spread_id(rng: random.Random, days_ago: float) -> str:
    """An ObjectId made ``days_ago`` days ago, as a record created then would have."""
    at = utcnow() - timedelta(days=days_ago)
    return str(ObjectId.from_datetime(at))[:8] + f"{rng.getrandbits(64):016x}"


async def every_page(hub: HubHarness, token: str, query: str) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = ""
    while True:
        path = f"/api/v1/crm/deals?limit={LIMIT}{query}{cursor}"
        resp = await hub.request("GET", path, token=token)
        assert resp.status == 200, resp.body
        pages.append([r["id"] for r in resp.body["records"]])
        if resp.body["next_cursor"] is None:
            return pages
        cursor = f"&cursor={resp.body['next_cursor']}"


def paged(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + LIMIT] for i in range(0, len(ids), LIMIT)] or [[]]


async def test_every_page_of_every_filter_is_the_list_of_all_records(
    watched: tuple[HubHarness, FindsOn], store: Store
) -> None:
    hub, finds = watched
    _, root = await hub.create_user("root", admin=True)
    mary_id, mary = await hub.create_user("mary")
    sam_id, _ = await hub.create_user("sam")
    made = await hub.request("POST", "/api/v1/crm/deals", token=mary, json={"title": "First"})
    assert made.status == 201, made.body
    template = await store["crm_records"].find_one({"_id": made.body["id"]})
    assert template is not None
    rng = random.Random(20261207)
    copies: list[Document] = []
    for i in range(DEALS):
        stage = rng.choice(STAGES)
        copies.append(
            {
                **template,
                "_id": spread_id(rng, 365 * YEARS * rng.random()),
                "title": f"Deal {i}",
                "responsible_id": rng.choice([mary_id, mary_id, sam_id]),
                "stage_id": stage,
                "open": stage not in ("won", "lost"),
            }
        )
    await store["crm_records"].insert_many(copies)
    # Mary's open calls on a few deals, for the "records with my open work" filters
    worked = rng.sample([c for c in copies if c["responsible_id"] == mary_id], 7)
    for i, deal in enumerate(worked):
        body = {"owner_type": "deal", "owner_id": deal["_id"], "type": "call", "subject": "Ring"}
        if i % 2 == 0:  # overdue: counted for Mary
            body["deadline"] = (utcnow() - timedelta(days=1)).isoformat()
        resp = await hub.request("POST", "/api/v1/crm/activities", token=mary, json=body)
        assert resp.status == 201, resp.body
    # what counts for Mary, as one query of the rule gives it (incoming, or due in the window)
    core = hub.services.crm.records.core
    cfg = await core.config.counter_config()
    threshold = due_threshold(utcnow(), await core.zone(mary_id), cfg.window)
    counted_ids = set(
        await store["crm_activities"].distinct(
            "owner_id",
            {
                counted_field(cfg.mode): mary_id,
                "owner_type": "deal",
                "completed": False,
                "$or": [{"incoming": True}, {"deadline": {"$lt": threshold}}],
            },
        )
    )
    assert len(counted_ids) == 4

    everything = await store["crm_records"].find({"type": "deal"}).to_list()

    def expected(keep: Callable[[Document], bool]) -> list[list[str]]:
        return paged(sorted((d["_id"] for d in everything if keep(d)), reverse=True))

    worked_ids = {d["_id"] for d in worked}
    cases: list[tuple[str, str, str, Callable[[Document], bool]]] = [
        ("everything", root, "", lambda d: True),
        (
            "a responsible",
            root,
            f"&responsible_id={sam_id}",
            lambda d: d["responsible_id"] == sam_id,
        ),
        ("a stage", root, "&status=won", lambda d: d["stage_id"] == "won"),
        ("open", root, "&open=true", lambda d: d["open"] is True),
        ("closed", root, "&open=false", lambda d: d["open"] is False),
        ("what Mary sees", mary, "", lambda d: d["responsible_id"] == mary_id),
        (
            "Mary's, a stage",
            mary,
            "&status=proposal",
            lambda d: d["responsible_id"] == mary_id and d["stage_id"] == "proposal",
        ),
        ("counted for Mary", mary, "&counted=true", lambda d: d["_id"] in counted_ids),
        (
            "with Mary's open work",
            root,
            f"&activity_responsible_id={mary_id}",
            lambda d: d["_id"] in worked_ids,
        ),
        (
            "with Mary's open work, open",
            root,
            f"&activity_responsible_id={mary_id}&open=true",
            lambda d: d["_id"] in worked_ids and d["open"] is True,
        ),
    ]
    for name, token, query, keep in cases:
        assert await every_page(hub, token, query) == expected(keep), name

    # Pages of the whole list examine about what a page needs, not all 1,200 deals: with
    # deals made evenly over two years a page of 50 spans about a month, and the window
    # that covers it is at most WINDOW_GROWTH times longer than the one before.
    finds.seen.clear()
    pages = await every_page(hub, root, "")
    per_page: list[int] = []
    for find in finds.seen:
        per_page.append(await finds.examined(store, find))
    assert len(pages) == len(expected(lambda d: True))
    bound = (WINDOW_GROWTH + 2) * LIMIT
    assert sum(per_page) <= bound * len(pages) * 1.5, per_page
    assert max(per_page) < DEALS // 3, per_page


def test_the_windows_hold_every_id_below_the_cursor_once() -> None:
    now = utcnow()
    rng = random.Random(5)
    ids = sorted(spread_id(rng, rng.random() * 4000) for _ in range(2_000))
    ids += ["zz-not-an-objectid", "0000"]  # ids of another shape are reached too
    future = str(ObjectId.from_datetime(now + timedelta(days=3)))
    for upper in (None, ids[1500], ids[10], future, "0" * 24, "000000010000000000000000"):
        windows = list(id_windows(upper, now))
        assert windows[-1][0] is None  # the last window is open below
        below = [i for i in ids if upper is None or i < upper]
        held = [
            i
            for lo, hi in windows
            for i in below
            if (lo is None or i >= lo) and (hi is None or i < hi)
        ]
        assert sorted(held) == sorted(below)  # each once
        his = [hi for _, hi in windows]
        assert his[0] == upper
        assert all(b < a for a, b in itertools.pairwise(his) if a is not None and b is not None)


async def test_companies_and_their_contacts_are_read_by_the_link_indexes(
    watched: tuple[HubHarness, FindsOn], store: Store
) -> None:
    """A page of companies reads their contacts in one find, and a company's links (its
    page, its list entry) through an index: not a scan of every record per company."""
    hub, finds = watched
    _, mary = await hub.create_user("mary")
    companies = []
    for name in ("Acme", "Globex", "Initech"):
        made = await hub.request("POST", "/api/v1/crm/companies", token=mary, json={"title": name})
        assert made.status == 201, made.body
        companies.append(made.body["id"])
    linked: dict[str, list[str]] = {c: [] for c in companies}
    for i in range(9):
        mine = [companies[i % 3]] + ([companies[(i + 1) % 3]] if i % 4 == 0 else [])
        made = await hub.request(
            "POST",
            "/api/v1/crm/contacts",
            token=mary,
            json={"first_name": f"C{i}", "last_name": "Person", "company_ids": mine},
        )
        assert made.status == 201, made.body
        for company in mine:
            linked[company].append(made.body["id"])
    template = await store["crm_records"].find_one({"type": "contact"})
    assert template is not None
    rng = random.Random(3)
    others = [
        {**template, "_id": spread_id(rng, rng.random() * 30), "company_ids": ["elsewhere"]}
        for _ in range(400)
    ]
    await store["crm_records"].insert_many(others)

    finds.seen.clear()
    page = await hub.request("GET", "/api/v1/crm/companies", token=mary)
    assert page.status == 200, page.body
    listed = {r["id"]: sorted(r["contact_ids"]) for r in page.body["records"]}
    assert listed == {c: sorted(ids) for c, ids in linked.items()}
    for company in companies:
        detail = await hub.request("GET", f"/api/v1/crm/companies/{company}", token=mary)
        assert detail.status == 200, detail.body
        assert sorted(detail.body["contact_ids"]) == sorted(linked[company])
        assert sorted(r["id"] for r in detail.body["links"]["contact"]) == sorted(linked[company])
    reads = [f for f in finds.seen if "company_ids" in str(f["filter"])]
    assert reads
    for find in reads:
        # the contacts of at most the three companies, not the 400 others
        assert await finds.examined(store, find) <= 12, find
