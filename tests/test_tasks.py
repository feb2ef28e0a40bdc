"""Tasks over the real stack: REST, Socket.IO events and counters, the deadline scheduler."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pymongo import monitoring

from server.settings import Settings
from server.store.database import Store
from server.tasks.scheduler import Scheduler
from server.tasks.service import FIELD_RULES
from tests.harness import HubHarness, SocketClient, start_hub


async def create(hub: HubHarness, token: str, **body: Any) -> list[dict[str, Any]]:
    resp = await hub.request("POST", "/api/v1/tasks", token=token, json=body)
    assert resp.status == 201, resp.body
    tasks: list[dict[str, Any]] = resp.body["tasks"]
    return tasks


async def act(hub: HubHarness, token: str, task_id: str, action: str) -> dict[str, Any]:
    resp = await hub.request("POST", f"/api/v1/tasks/{task_id}/actions/{action}", token=token)
    assert resp.status == 200, (action, resp.body)
    task: dict[str, Any] = resp.body
    return task


def task_events(client: SocketClient, task_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in client.of_type("task.updated") if e["data"]["task"]["id"] == task_id]


def notices(client: SocketClient) -> list[str]:
    return [
        e["data"]["message"]["text"]
        for e in client.of_type("im.message")
        if e["data"]["message"]["system"]
    ]


def last_task_counters(client: SocketClient) -> dict[str, Any] | None:
    """The task counters the client shows: its snapshot's, then each push's."""
    shown: dict[str, Any] | None = None
    for name, data in client.events:
        if name == "snapshot":
            shown = data.get("counters", {}).get("tasks", shown)
        elif name == "counters.changed" and "tasks" in data:
            shown = data["tasks"]
    return shown


async def test_controlled_task_for_three_employees_with_an_observer(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    company = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Co"})
    depts = {}
    for name in ("New York finance", "Berlin accounts", "Paris finance"):
        resp = await hub.request(
            "POST",
            "/api/v1/departments",
            token=admin,
            json={"name": name, "parent_id": company.body["id"]},
        )
        depts[name] = resp.body["id"]
    john_id, john = await hub.create_user(
        "john", department_id=depts["New York finance"], first_name="John"
    )
    sophie_id, sophie = await hub.create_user("sophie", department_id=depts["Paris finance"])
    for name, head in (("New York finance", john_id), ("Paris finance", sophie_id)):
        await hub.request(
            "PATCH", f"/api/v1/departments/{depts[name]}", token=admin, json={"head_id": head}
        )
    berlin = [
        await hub.create_user(login, department_id=depts["Berlin accounts"])
        for login in ("anna", "jonas", "lena")
    ]
    outsider_id, outsider = await hub.create_user("outsider")
    clients = {
        "john": await hub.connect(john),
        "sophie": await hub.connect(sophie),
        "outsider": await hub.connect(outsider),
    }
    for login, (_uid, token) in zip(("anna", "jonas", "lena"), berlin, strict=True):
        clients[login] = await hub.connect(token)
    for client in clients.values():
        await client.wait_for("snapshot")

    created = await create(
        hub,
        john,
        title="Reconcile Q3 accounts",
        responsible_ids=[uid for uid, _ in berlin],
        observer_ids=[sophie_id],
        require_approval=True,
    )
    master, copies = created[0], created[1:]
    assert len(copies) == 3
    assert master["responsible_id"] == john_id and master["parent_id"] is None
    assert [c["responsible_id"] for c in copies] == [uid for uid, _ in berlin]
    assert all(c["parent_id"] == master["id"] == c["master_id"] for c in copies)
    assert all(c["status_name"] == "new" for c in copies)  # john is not their head
    for login in ("anna", "jonas", "lena"):
        client = clients[login]
        await client.wait_until(
            lambda c=client: any(  # type: ignore[misc]
                "assigned you the task “Reconcile Q3 accounts”" in n for n in notices(c)
            )
        )
    await clients["sophie"].wait_until(
        lambda: len([n for n in notices(clients["sophie"]) if "observer" in n]) == 4
    )

    for (uid, token), copy in zip(berlin, copies, strict=True):
        assert (
            "start"
            in (await hub.request("GET", f"/api/v1/tasks/{copy['id']}", token=token)).body[
                "allowed_actions"
            ]
        )
        await act(hub, token, copy["id"], "start")
        done = await act(hub, token, copy["id"], "complete")
        assert done["status_name"] == "awaiting_control" and uid
    mine = (
        await hub.request("GET", "/api/v1/tasks?role=author&status=awaiting_control", token=john)
    ).body["tasks"]
    assert sorted(t["id"] for t in mine) == sorted(c["id"] for c in copies)
    await clients["john"].wait_until(
        lambda: (
            (last_task_counters(clients["john"]) or {}).get("author", {}).get("awaiting_control")
            == 3
        )
    )

    assert (await act(hub, john, copies[0]["id"], "approve"))["status_name"] == "completed"
    assert (await act(hub, john, copies[1]["id"], "approve"))["status_name"] == "completed"
    returned = await act(hub, john, copies[2]["id"], "return")
    assert returned["status_name"] == "pending"
    await clients["john"].wait_until(
        lambda: (
            (last_task_counters(clients["john"]) or {}).get("author", {}).get("awaiting_control")
            == 0
        )
    )

    # the observer heard of every step of every copy: created, start, complete, the verdict
    for copy in copies:
        steps = [
            e.get("action", e["changed"][0]) for e in task_events(clients["sophie"], copy["id"])
        ]
        assert steps[0] == "created" and steps[1:] == [
            "start",
            "complete",
            "approve" if copy is not copies[2] else "return",
        ]
    # a returned task comes back to its responsible person, live
    lena = clients["lena"]
    await lena.wait_until(
        lambda: any(e.get("action") == "return" for e in task_events(lena, copies[2]["id"]))
    )
    # nobody else heard anything, nor can read it
    assert clients["outsider"].of_type("task.updated") == []
    for task in created:
        resp = await hub.request("GET", f"/api/v1/tasks/{task['id']}", token=outsider)
        assert resp.status == 404
    assert outsider_id


async def test_a_passing_deadline_pushes_overdue_counters(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    deadline = datetime.now(UTC) + timedelta(seconds=1.5)
    [task] = await create(
        hub, alice, title="Quick one", responsible_ids=[bob_id], deadline=deadline.isoformat()
    )
    assert task["overdue"] is False

    def overdue() -> int:
        counters = last_task_counters(bob_client) or {}
        return int(counters.get("responsible", {}).get("overdue", 0))

    await bob_client.wait_until(lambda: overdue() == 1, timeout=10)
    # nobody asked: the push came from the scheduler, and the task says so too
    assert any(e["changed"] == ["deadline_state"] for e in task_events(bob_client, task["id"]))
    fetched = await hub.request("GET", f"/api/v1/tasks/{task['id']}", token=bob)
    assert fetched.body["overdue"] is True
    overdue_list = await hub.request("GET", "/api/v1/tasks?status=overdue", token=bob)
    assert [t["id"] for t in overdue_list.body["tasks"]] == [task["id"]]


async def test_deadline_jobs_survive_a_restart(settings: Settings, store: Store) -> None:
    async with start_hub(settings, store) as first:
        _, alice = await first.create_user("alice")
        bob_id, _ = await first.create_user("bob")
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        await create(
            first, alice, title="Later", responsible_ids=[bob_id], deadline=deadline.isoformat()
        )
    job = await store["schedule"].find_one({"kind": "task-deadline"})  # beside other jobs
    assert job is not None and job["kind"] == "task-deadline"
    # the job is persisted; a new hub (or another node) fires it once when due
    await store["schedule"].update_one({"_id": job["_id"]}, {"$set": {"due_at": datetime.now(UTC)}})
    async with start_hub(settings, store) as second:
        fired = await second.services.scheduler.run_due()
        assert fired in (0, 1)  # the background loop may have taken it first: once in all
        assert await store["schedule"].count_documents({"_id": job["_id"]}) in (0, 1)
        await asyncio.sleep(1.5)
        assert await second.services.scheduler.run_due() == 0


class _ScheduleReads(monitoring.CommandListener):
    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command.get(event.command_name) == "schedule":
            self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_job_whose_lease_is_held_is_not_asked_for_in_a_loop(store: Store) -> None:
    """A due job that another node is running (or whose handler failed) waits for its lease;
    meanwhile the scheduler looks again at its usual pace. It used to take the job's due time
    for its next round, already past, and ask the database over and over, at once."""
    reads = _ScheduleReads()
    watched = Store(store.url, store.db.name)
    watched.client = type(store.client)(store.url, event_listeners=[reads], tz_aware=True)
    watched.db = watched.client[store.db.name]
    now = datetime.now(UTC)
    await store["schedule"].insert_one(
        {
            "_id": "held",
            "kind": "task-deadline",
            "task_id": "t1",
            "due_at": now - timedelta(seconds=1),
            "claimed_until": now + timedelta(seconds=30),
        }
    )
    fired: list[str] = []

    async def deadline(task_id: str) -> None:
        fired.append(task_id)

    scheduler = Scheduler(watched)
    scheduler.handle("task-deadline", deadline)
    scheduler.start()
    try:
        await asyncio.sleep(1.5)
    finally:
        await scheduler.close()
        await watched.client.close()
    assert fired == []  # the lease is another node's
    assert reads.count <= 6  # one or two reads a second; was hundreds


class _ScheduleFinds(monitoring.CommandListener):
    """The jobs that the reads of ``schedule`` brought back."""

    def __init__(self) -> None:
        self.requests: set[int] = set()
        self.returned: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == "schedule":
            self.requests.add(event.request_id)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.request_id in self.requests:
            self.returned.extend(event.reply.get("cursor", {}).get("firstBatch", []))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_an_idle_round_reads_no_job_due_after_the_next_round(store: Store) -> None:
    """The scheduler's poll asks only for jobs due before its next round: the embedded
    database fetches every job for a sorted read before applying the limit, so the first of
    all jobs cost it more the more deadlines the company had open (14.7 ms with 1,000), once a
    second, in front of whatever message came next. A job due soon, written by another node,
    still fires on time."""
    finds = _ScheduleFinds()
    watched = Store(store.url, store.db.name)
    watched.client = type(store.client)(store.url, event_listeners=[finds], tz_aware=True)
    watched.db = watched.client[store.db.name]
    now = datetime.now(UTC)
    await store["schedule"].insert_many(
        [
            {
                "_id": f"later-{i}",
                "kind": "task-deadline",
                "task_id": f"later-{i}",
                "due_at": now + timedelta(hours=1 + i),
                "claimed_until": None,
            }
            for i in range(20)
        ]
    )
    fired: list[str] = []

    async def deadline(task_id: str) -> None:
        fired.append(task_id)

    scheduler = Scheduler(watched)
    scheduler.handle("task-deadline", deadline)
    scheduler.start()
    try:
        await asyncio.sleep(0.3)
        await store["schedule"].insert_one(  # another node's job, not woken for here
            {
                "_id": "soon",
                "kind": "task-deadline",
                "task_id": "soon",
                "due_at": datetime.now(UTC) + timedelta(seconds=1),
                "claimed_until": None,
            }
        )
        for _ in range(60):
            if fired:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # a round or two more, idle again
    finally:
        await scheduler.close()
        await watched.client.close()
    assert fired == ["soon"]
    assert finds.requests  # it did look
    assert [job["_id"] for job in finds.returned if job["_id"] != "soon"] == []


async def test_permissions_fields_and_comments(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    carol_id, carol = await hub.create_user("carol")
    [task] = await create(
        hub, alice, title="Write report", responsible_ids=[bob_id], participant_ids=[carol_id]
    )
    path = f"/api/v1/tasks/{task['id']}"
    # what each may change, field by field, is in the task as they get it
    everything = sorted([*FIELD_RULES, "rating"])
    assert task["editable_fields"] == everything
    assert (await hub.request("GET", path, token=bob)).body["editable_fields"] == []
    assert (await hub.request("GET", path, token=carol)).body["editable_fields"] == []
    assert (await hub.request("PATCH", path, token=bob, json={"title": "Mine now"})).status == 403
    soon = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    assert (await hub.request("PATCH", path, token=bob, json={"deadline": soon})).status == 403
    allowed = await hub.request(
        "PATCH", path, token=alice, json={"responsible_may_change_deadline": True, "tags": ["q3"]}
    )
    assert allowed.status == 200 and allowed.body["tags"] == ["q3"]
    assert allowed.body["editable_fields"] == everything
    assert (await hub.request("GET", path, token=bob)).body["editable_fields"] == ["deadline"]
    assert (await hub.request("PATCH", path, token=bob, json={"deadline": soon})).status == 200
    refused = await hub.request("POST", f"{path}/actions/approve", token=bob)
    assert refused.status == 409
    assert refused.body["type"] == "urn:portalhub:problem:action-not-allowed"
    assert (await hub.request("POST", f"{path}/actions/fly", token=bob)).status == 404
    comment = await hub.request("POST", f"{path}/comments", token=carol, json={"text": "Draft?"})
    assert comment.status == 201
    listed = await hub.request("GET", f"{path}/comments", token=alice)
    assert [c["text"] for c in listed.body["comments"]] == ["Draft?"]
    bob_view = await hub.request("GET", path, token=bob)
    assert bob_view.body["comment_count"] == 1
    history = await hub.request("GET", f"{path}/history", token=alice)
    kinds = [h["kind"] for h in history.body["history"]]
    assert kinds[0] == "created" and "comment" in kinds and "field" in kinds
    assert (await hub.request("DELETE", path, token=bob)).status == 409
    assert (await hub.request("DELETE", path, token=alice)).status == 204
    assert (await hub.request("GET", path, token=alice)).status == 404
    assert alice_id


@pytest.fixture
def base_settings(settings: Settings) -> Settings:
    return settings


ACTORS = ("author", "responsible", "participant", "observer")
ACTIONS = (
    "accept",
    "decline",
    "start",
    "pause",
    "resume",
    "complete",
    "approve",
    "return",
    "reopen",
    "defer",
    "view",
    "comment",
)


async def run_sequence(settings: Settings, steps: list[tuple[str, str]]) -> None:
    assert settings.mongodb_url is not None
    store = Store(settings.mongodb_url.get_secret_value(), f"t_{uuid.uuid4().hex[:12]}")
    await store.ensure_indexes()
    try:
        async with start_hub(settings, store) as hub:
            users = {role: await hub.create_user(role) for role in ACTORS}
            clients = {role: await hub.connect(token) for role, (_i, token) in users.items()}
            for client in clients.values():
                await client.wait_for("snapshot")
            [task] = await create(
                hub,
                users["author"][1],
                title="Random walk",
                responsible_ids=[users["responsible"][0]],
                participant_ids=[users["participant"][0]],
                observer_ids=[users["observer"][0]],
                require_approval=True,
                deadline=(datetime.now(UTC) + timedelta(hours=3)).isoformat(),
            )
            path = f"/api/v1/tasks/{task['id']}"
            for actor, action in steps:
                token = users[actor][1]
                if action == "view":
                    await hub.request("GET", path, token=token)
                elif action == "comment":
                    await hub.request("POST", f"{path}/comments", token=token, json={"text": "x"})
                else:
                    resp = await hub.request("POST", f"{path}/actions/{action}", token=token)
                    assert resp.status in (200, 403, 409), resp.body
            for role, (user_id, _token) in users.items():
                # counted afresh over every task: what is stored and pushed must equal it
                expected = await hub.services.tasks.count(user_id)
                assert await hub.services.tasks.counters(user_id) == expected
                client = clients[role]
                await client.wait_until(
                    lambda c=client, e=expected: (  # type: ignore[misc]
                        last_task_counters(c) == e
                    ),
                    timeout=10,
                )
    finally:
        await store.client.drop_database(store.db.name)
        await store.close()


@hypothesis_settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(ACTORS), st.sampled_from(ACTIONS)), min_size=1, max_size=10
    )
)
def test_pushed_counters_always_equal_recomputed(
    base_settings: Settings, steps: list[tuple[str, str]]
) -> None:
    """Whatever happens to a task, the counters each person has stored, and the last ones
    they received over Socket.IO, are the ones recomputed from the database."""
    asyncio.run(run_sequence(base_settings, steps))


async def boss_over_team(hub: HubHarness) -> tuple[str, str, str]:
    """A department "Top" headed by "boss" and its sub-department "Team": (boss id, boss
    token, team id)."""
    _, admin = await hub.create_user("root", admin=True)
    top = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Top"})
    team = await hub.request(
        "POST",
        "/api/v1/departments",
        token=admin,
        json={"name": "Team", "parent_id": top.body["id"]},
    )
    boss_id, boss = await hub.create_user("boss", department_id=top.body["id"])
    await hub.request(
        "PATCH", f"/api/v1/departments/{top.body['id']}", token=admin, json={"head_id": boss_id}
    )
    return boss_id, boss, team.body["id"]


async def test_heads_auto_accept_see_subordinates_and_predecessors_block(hub: HubHarness) -> None:
    _, boss, team_id = await boss_over_team(hub)
    worker_id, worker = await hub.create_user("worker", department_id=team_id)
    peer_id, peer = await hub.create_user("peer", department_id=team_id)

    # a head two levels up assigns: accepted at once; a peer assigns: new
    [from_head] = await create(hub, boss, title="From the boss", responsible_ids=[worker_id])
    [from_peer] = await create(hub, peer, title="From a peer", responsible_ids=[worker_id])
    assert from_head["status_name"] == "pending" and from_peer["status_name"] == "new"
    # the head sees the subordinate's tasks, including the one the peer set
    mine = await hub.request("GET", "/api/v1/tasks?subordinates=true", token=boss)
    assert {t["id"] for t in mine.body["tasks"]} == {from_head["id"], from_peer["id"]}
    seen = await hub.request("GET", f"/api/v1/tasks/{from_peer['id']}", token=boss)
    assert "supervisor" in seen.body["my_roles"] and "approve" not in seen.body["allowed_actions"]

    # a task cannot start before its predecessor is completed
    [follow_up] = await create(
        hub, peer, title="Next", responsible_ids=[worker_id], predecessor_ids=[from_peer["id"]]
    )
    blocked = await hub.request(
        "POST", f"/api/v1/tasks/{follow_up['id']}/actions/start", token=worker
    )
    assert blocked.status == 409 and "predecessor" in blocked.body["detail"]
    await act(hub, worker, from_peer["id"], "start")
    await asyncio.sleep(1.1)
    completed = await act(hub, worker, from_peer["id"], "complete")
    assert completed["status_name"] == "completed" and completed["time_spent_seconds"] >= 1
    assert completed["closed_at"] is not None
    assert (await act(hub, worker, follow_up["id"], "start"))["status_name"] == "in_progress"

    # copy makes a subtask of the original, by the one who copied it
    copy = await act(hub, peer, from_peer["id"], "copy")
    assert copy["parent_id"] == from_peer["id"] and copy["author_id"] == peer_id
    assert copy["status_name"] == "new"


async def test_workgroup_members_follow_the_groups_tasks_live(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    carol_id, carol = await hub.create_user("carol")
    group = await hub.request(
        "POST", "/api/v1/workgroups", token=alice, json={"name": "Launch", "member_ids": [bob_id]}
    )
    [task] = await create(
        hub, alice, title="Group work", responsible_ids=[bob_id], group_id=group.body["id"]
    )
    carol_client = await hub.connect(carol)
    await carol_client.wait_for("snapshot")
    assert (await hub.request("GET", f"/api/v1/tasks/{task['id']}", token=carol)).status == 404
    added = await hub.request(
        "POST",
        f"/api/v1/workgroups/{group.body['id']}/members",
        token=alice,
        json={"user_ids": [carol_id]},
    )
    assert added.status == 200
    await carol_client.wait_until(lambda: len(task_events(carol_client, task["id"])) == 1)
    [event] = task_events(carol_client, task["id"])
    assert event["task"]["my_roles"] == ["group_member"]
    assert (await hub.request("GET", f"/api/v1/tasks/{task['id']}", token=carol)).status == 200
    removed = await hub.request(
        "DELETE", f"/api/v1/workgroups/{group.body['id']}/members/{carol_id}", token=alice
    )
    assert removed.status == 200
    await carol_client.wait_until(
        lambda: any(
            e["data"]["task_id"] == task["id"] for e in carol_client.of_type("task.removed")
        )
    )
    assert (await hub.request("GET", f"/api/v1/tasks/{task['id']}", token=carol)).status == 404
    assert alice_id and bob


async def test_task_creation_is_rate_limited_per_user(settings: Settings, store: Store) -> None:
    limited = settings.model_copy(update={"task_creates_per_second": 0.2, "task_create_burst": 3})
    async with start_hub(limited, store) as hub:
        alice_id, alice = await hub.create_user("alice")
        _, bob = await hub.create_user("bob")
        body = {"title": "Write the report", "responsible_ids": [alice_id]}
        for _ in range(3):
            await create(hub, alice, **body)
        refused = await hub.request("POST", "/api/v1/tasks", token=alice, json=body)
        assert refused.status == 429 and refused.content_type == "application/problem+json"
        assert refused.body["type"] == "urn:portalhub:problem:rate-limited"
        assert refused.headers["Retry-After"] == str(refused.body["retry_after"])
        assert 1 <= refused.body["retry_after"] <= 5
        # nothing was created by the refused request
        listed = await hub.request("GET", "/api/v1/tasks?role=all", token=alice)
        assert listed.status == 200, listed.body
        assert len(listed.body["tasks"]) == 3
        # another user has a bucket of their own
        await create(hub, bob, title="Another", responsible_ids=[alice_id])
