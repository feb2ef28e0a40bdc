"""The task lists read the caller's tasks by their roles' indexes, not the company's tasks.

``TaskService.find`` reads the tasks each way one can be on them (author, responsible,
participant, observer, a workgroup, a head above the responsible person) and checks the
list's other filters on what it read. These tests compare every list of five people, under
every role and status filter and the other filters, with the list a scan of every task gives
(the way it was read before), over 300 tasks of random roles, groups, statuses, tags and
deadlines, and check that no read of a list has a field outside an index.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from server.settings import Settings
from server.store.database import Document, Store, utcnow
from server.tasks.rules import Role, is_overdue, roles_of
from server.tasks.service import STATUS_BY_NAME
from tests.harness import FindsOn, HubHarness, start_hub, watched_store
from tests.index_rule import served_by_index
from tests.test_tasks import boss_over_team

TASKS = 300
ROLES = ("all", "responsible", "author", "participant", "observer")
STATUSES = (None, "open", "overdue", "completed", "new", "deferred")
# The fields of the tasks collection's single-field indexes (server/store/database.py).
INDEXED = {"responsible_id", "author_id", "participant_ids", "observer_ids", "group_id", "_id"}


@pytest.fixture
async def watched(settings: Settings, store: Store) -> AsyncIterator[tuple[HubHarness, FindsOn]]:
    finds = FindsOn("tasks")
    async with watched_store(store, finds) as monitored, start_hub(settings, monitored) as hub:
        yield hub, finds


async def scanned(hub: HubHarness, store: Store, user_id: str, query: dict[str, Any]) -> list[str]:
    """The list as a scan of every task gives it (the filter, then roles, newest first),
    read through ``store``, not the hub's watched client."""
    svc = hub.services.tasks
    viewer = await svc.viewer(await hub.services.directory.user_document(user_id))
    filters: Document = {}
    by_role = {
        "responsible": {"responsible_id": user_id},
        "author": {"author_id": user_id},
        "participant": {"participant_ids": user_id},
        "observer": {"observer_ids": user_id},
    }
    if query.get("subordinates"):
        filters["responsible_id"] = {"$in": sorted(viewer.supervised_ids)}
    elif query.get("role", "all") != "all":
        filters.update(by_role[query["role"]])
    if query.get("group_id"):
        filters["group_id"] = query["group_id"]
    if query.get("tag"):
        filters["tags"] = query["tag"]
    status = query.get("status")
    if status in STATUS_BY_NAME:
        filters["status"] = int(STATUS_BY_NAME[status])
    elif status in ("open", "overdue"):
        filters["status"] = {"$in": [1, 2, 3]}
    if status == "overdue":
        filters["deadline"] = {"$lte": utcnow()}
    listed: list[str] = []
    async for doc in store["tasks"].find(filters, sort=[("created_at", -1)]):
        facts = await svc.facts(doc)
        if not roles_of(viewer, facts) - {Role.ADMIN}:
            continue
        if status == "overdue" and not is_overdue(facts, utcnow()):
            continue
        listed.append(doc["_id"])
    offset = int(query.get("offset", 0))
    return listed[offset : offset + int(query.get("limit", 100))]


async def test_every_list_is_what_a_scan_of_every_task_gives(
    watched: tuple[HubHarness, FindsOn], store: Store
) -> None:
    hub, finds = watched
    boss_id, boss, team_id = await boss_over_team(hub)
    alice_id, alice = await hub.create_user("alice", department_id=team_id)
    bob_id, bob = await hub.create_user("bob", department_id=team_id)
    carol_id, carol = await hub.create_user("carol")
    people = [boss_id, alice_id, bob_id, carol_id]
    shown = await hub.request(
        "POST", "/api/v1/workgroups", token=alice, json={"name": "Shown", "member_ids": [carol_id]}
    )
    hidden = await hub.request(
        "POST", "/api/v1/workgroups", token=bob, json={"name": "Hidden", "member_ids": [carol_id]}
    )
    assert shown.status == hidden.status == 201, (shown.body, hidden.body)
    await store.workgroups.update_one(
        {"_id": hidden.body["id"]}, {"$set": {"members_see_tasks": False}}
    )
    made = await hub.request(
        "POST", "/api/v1/tasks", token=alice, json={"title": "T", "responsible_ids": [bob_id]}
    )
    assert made.status == 201, made.body
    template = await store["tasks"].find_one({"_id": made.body["tasks"][0]["id"]})
    assert template is not None
    rng = random.Random(20261207)
    now = utcnow()
    copies: list[Document] = []
    for i in range(TASKS):
        copies.append(
            {
                **template,
                "_id": str(ObjectId()),
                "title": f"Task {i}",
                "author_id": rng.choice(people),
                "responsible_id": rng.choice(people),
                "participant_ids": rng.sample(people, rng.randint(0, 2)),
                "observer_ids": rng.sample(people, rng.randint(0, 2)),
                "group_id": rng.choice([None, None, shown.body["id"], hidden.body["id"]]),
                "status": rng.randint(1, 7),
                "tags": rng.sample(["a", "b"], rng.randint(0, 2)),
                "deadline": rng.choice([None, now - timedelta(days=3), now + timedelta(days=3)]),
                "created_at": now - timedelta(seconds=i + 1),
            }
        )
    await store["tasks"].insert_many(copies)

    queries: list[dict[str, Any]] = [
        {"role": role, **({"status": status} if status else {})}
        for role in ROLES
        for status in STATUSES
    ]
    queries += [
        {"group_id": shown.body["id"]},
        {"group_id": hidden.body["id"], "role": "author"},
        {"tag": "a", "status": "open"},
        {"subordinates": "true"},
        {"subordinates": "true", "status": "overdue"},
        {"role": "all", "offset": 5, "limit": 7},
    ]
    tokens = {boss_id: boss, alice_id: alice, bob_id: bob, carol_id: carol}
    finds.seen.clear()
    listed = 0
    for user_id, token in tokens.items():
        for query in queries:
            params = "&".join(f"{k}={v}" for k, v in query.items())
            resp = await hub.request("GET", f"/api/v1/tasks?{params}", token=token)
            assert resp.status == 200, resp.body
            got = [t["id"] for t in resp.body["tasks"]]
            assert got == await scanned(hub, store, user_id, query), (user_id, query)
            listed += len(got)
    assert listed > len(tokens) * TASKS // 2  # the lists are not empty by mistake
    assert finds.seen
    for find in finds.seen:
        assert set(find["filter"]) <= INDEXED, find


async def test_a_deadline_reached_reads_the_tasks_own_history_and_records_it_once(
    settings: Settings, store: Store
) -> None:
    history = FindsOn("task_history")
    async with watched_store(store, history) as monitored, start_hub(settings, monitored) as hub:
        alice_id, alice = await hub.create_user("alice")
        made = await hub.request(
            "POST", "/api/v1/tasks", token=alice, json={"title": "T", "responsible_ids": [alice_id]}
        )
        assert made.status == 201, made.body
        task_id = made.body["tasks"][0]["id"]
        await store["tasks"].update_one(
            {"_id": task_id}, {"$set": {"deadline": utcnow() - timedelta(hours=1)}}
        )
        history.seen.clear()
        await hub.services.tasks.deadline_reached(task_id)
        await hub.services.tasks.deadline_reached(task_id)  # a repeated run records nothing
        entries = {"task_id": task_id, "kind": "overdue"}
        assert await store["task_history"].count_documents(entries) == 1
        assert history.seen
        for find in history.seen:
            assert served_by_index("task_history", find["filter"]), find


async def test_a_head_sees_a_newcomers_tasks_as_soon_as_they_move_in(hub: HubHarness) -> None:
    """Who is a head above whom comes from the directory's cache of active people
    (``DirectoryService.active_people``): a move between departments drops it."""
    _, admin = await hub.create_user("root", admin=True)
    top = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Top"})
    boss_id, boss = await hub.create_user("boss", department_id=top.body["id"])
    await hub.request(
        "PATCH", f"/api/v1/departments/{top.body['id']}", token=admin, json={"head_id": boss_id}
    )
    worker_id, worker = await hub.create_user("worker")
    made = await hub.request(
        "POST", "/api/v1/tasks", token=worker, json={"title": "T", "responsible_ids": [worker_id]}
    )
    assert made.status == 201, made.body
    before = await hub.request("GET", "/api/v1/tasks?subordinates=true", token=boss)
    assert before.status == 200 and before.body["tasks"] == []
    moved = await hub.request(
        "PATCH",
        f"/api/v1/users/{worker_id}",
        token=admin,
        json={"department_id": top.body["id"]},
    )
    assert moved.status == 200, moved.body
    after = await hub.request("GET", "/api/v1/tasks?subordinates=true", token=boss)
    assert [t["id"] for t in after.body["tasks"]] == [made.body["tasks"][0]["id"]]
