"""Task counters stored (``task_counters``): written by every change that moves them, read
stored, counted again when stored under other rules or past a deadline moment, never
overwritten by an older count, and equal to a fresh count over every task after any sequence
of changes."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from server import cli
from server.events.bus import InProcessBus
from server.settings import Settings
from server.store.database import Document, Store
from server.tasks.counters import Held, TaskCounters, _held
from server.tasks.rules import counters_stamp
from tests.harness import HubHarness, start_hub
from tests.test_tasks import act, create, last_task_counters


async def stored(hub: HubHarness, user_id: str) -> Document:
    doc = await hub.services.store["task_counters"].find_one({"_id": user_id})
    assert doc is not None, user_id
    return doc


async def stored_equals_count(hub: HubHarness, *user_ids: str) -> None:
    for user_id in user_ids:
        doc = await stored(hub, user_id)
        assert doc["rules"] == counters_stamp()
        assert doc["counters"] == await hub.services.tasks.count(user_id), user_id


def counter(doc: Document, role: str, name: str) -> int:
    return int(doc["counters"][role][name])


async def test_every_kind_of_change_stores_the_counters_of_the_people_on_the_task(
    hub: HubHarness,
) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    carol_id, carol = await hub.create_user("carol")
    # made with the user: zero, before any task
    assert counter(await stored(hub, bob_id), "total", "new") == 0
    versions = {u: (await stored(hub, u))["version"] for u in (alice_id, bob_id, carol_id)}

    def moved(before: int, doc: Document) -> bool:
        return int(doc["version"]) > before

    [task] = await create(hub, alice, title="Report", responsible_ids=[bob_id])
    bob_doc = await stored(hub, bob_id)
    assert counter(bob_doc, "responsible", "new") == 1 and moved(versions[bob_id], bob_doc)
    await stored_equals_count(hub, alice_id, bob_id)
    path = f"/api/v1/tasks/{task['id']}"

    # opened: no longer new to bob
    assert (await hub.request("GET", path, token=bob)).status == 200
    assert counter(await stored(hub, bob_id), "responsible", "new") == 0
    # a field: carol follows it now
    patched = await hub.request("PATCH", path, token=alice, json={"observer_ids": [carol_id]})
    assert patched.status == 200, patched.body
    assert counter(await stored(hub, carol_id), "observer", "in_progress") == 1
    # an action
    await act(hub, bob, task["id"], "accept")
    await act(hub, bob, task["id"], "start")
    await act(hub, bob, task["id"], "complete")
    assert counter(await stored(hub, bob_id), "responsible", "in_progress") == 0
    # a comment on the finished task: still counted for the others, until they open it
    said = await hub.request("POST", f"{path}/comments", token=bob, json={"text": "done"})
    assert said.status == 201, said.body
    assert counter(await stored(hub, carol_id), "observer", "new_comments") == 1
    assert (await stored(hub, carol_id))["finished_unseen"] == [task["id"]]
    await stored_equals_count(hub, alice_id, bob_id, carol_id)
    assert (await hub.request("GET", path, token=carol)).status == 200
    carol_doc = await stored(hub, carol_id)
    assert counter(carol_doc, "observer", "new_comments") == 0
    assert carol_doc["finished_unseen"] == []
    # deleted
    [other] = await create(hub, alice, title="Other", responsible_ids=[carol_id])
    assert counter(await stored(hub, carol_id), "responsible", "new") == 1
    deleted = await hub.request("POST", f"/api/v1/tasks/{other['id']}/actions/delete", token=alice)
    assert deleted.status == 204, deleted.body
    assert counter(await stored(hub, carol_id), "responsible", "new") == 0
    await stored_equals_count(hub, alice_id, bob_id, carol_id)


async def test_a_cold_read_is_the_stored_document_whatever_the_number_of_tasks(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader with nothing kept reads the stored numbers: no task, view or workgroup."""
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    for n in range(6):
        [task] = await create(hub, alice, title=f"T{n}", responsible_ids=[bob_id])
        if n % 2:
            await act(hub, bob, task["id"], "accept")
            await act(hub, bob, task["id"], "complete")
    expected = await hub.services.tasks.count(bob_id)
    tasks = hub.services.tasks
    tasks.forget_all()
    store = hub.services.store
    read: list[str] = []
    real_getitem = type(store).__getitem__

    def watched(self: Any, name: str) -> Any:
        read.append(name)
        return real_getitem(self, name)

    monkeypatch.setattr(type(store), "__getitem__", watched)
    assert await tasks.counters(bob_id) == expected
    assert read == ["task_counters"], read
    read.clear()
    assert await tasks.counters(bob_id) == expected  # kept now
    assert read == []


async def test_counters_stored_under_other_rules_are_counted_again(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    await create(hub, alice, title="One", responsible_ids=[bob_id])
    right = await hub.services.tasks.count(bob_id)
    coll = hub.services.store["task_counters"]
    wrong = {role: {name: 7 for name in values} for role, values in right.items()}
    await coll.update_one({"_id": bob_id}, {"$set": {"rules": "0|0", "counters": wrong}})
    hub.services.tasks.forget_all()
    assert await hub.services.tasks.counters(bob_id) == right
    doc = await stored(hub, bob_id)
    assert doc["rules"] == counters_stamp() and doc["counters"] == right
    # under these rules the stored numbers are taken as they are (what ``check`` is for)
    await coll.update_one({"_id": bob_id}, {"$set": {"counters": wrong}})
    hub.services.tasks.forget_all()
    assert await hub.services.tasks.counters(bob_id) == wrong


async def test_a_user_with_no_document_is_counted_once_and_stored(hub: HubHarness) -> None:
    """As for every user after the upgrade that brought stored counters."""
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    await create(hub, alice, title="One", responsible_ids=[bob_id])
    coll = hub.services.store["task_counters"]
    await coll.delete_many({})
    hub.services.tasks.forget_all()
    counted = await hub.services.tasks.counters(bob_id)
    assert counted["responsible"]["new"] == 1
    assert (await stored(hub, bob_id))["counters"] == counted


async def test_a_passing_deadline_is_stored_by_the_scheduler(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _bob = await hub.create_user("bob")
    deadline = datetime.now(UTC) + timedelta(seconds=1.5)
    await create(hub, alice, title="Quick", responsible_ids=[bob_id], deadline=deadline.isoformat())
    before = await stored(hub, bob_id)
    assert counter(before, "responsible", "expiring_soon") == 1
    assert counter(before, "responsible", "overdue") == 0
    assert before["next_at"] is not None
    for _ in range(100):
        doc = await stored(hub, bob_id)
        if counter(doc, "responsible", "overdue") == 1:
            break
        await asyncio.sleep(0.05)
    # stored by the scheduler's wake-up, nobody having read them
    assert counter(doc, "responsible", "overdue") == 1
    assert counter(doc, "responsible", "expiring_soon") == 0
    assert doc["next_at"] is None


async def test_a_deadline_passed_while_the_hub_was_down_is_stored_at_its_start(
    settings: Settings, store: Store
) -> None:
    """The deadline's persisted wake-up fires when the next hub starts, and stores the
    counters then, before anyone reads them."""
    async with start_hub(settings, store) as first:
        _, alice = await first.create_user("alice")
        bob_id, _ = await first.create_user("bob")
        soon = datetime.now(UTC) + timedelta(hours=1)
        [task] = await create(
            first, alice, title="Later", responsible_ids=[bob_id], deadline=soon.isoformat()
        )
    # time passes while no hub runs: the deadline is behind, the wake-up due
    past = datetime.now(UTC) - timedelta(minutes=1)
    await store["tasks"].update_one({"_id": task["id"]}, {"$set": {"deadline": past}})
    await store["schedule"].update_one(
        {"_id": f"task-deadline|{task['id']}"}, {"$set": {"due_at": past}}
    )
    before = await store["task_counters"].find_one({"_id": bob_id})
    assert before is not None and before["counters"]["responsible"]["overdue"] == 0
    async with start_hub(settings, store):
        doc: Document = {}
        for _ in range(100):
            doc = await store["task_counters"].find_one({"_id": bob_id}) or {}
            if doc["counters"]["responsible"]["overdue"] == 1:
                break
            await asyncio.sleep(0.05)
        assert doc["counters"]["responsible"]["overdue"] == 1
        assert doc["version"] > before["version"]


async def test_numbers_past_their_next_moment_are_counted_again_when_read(
    hub: HubHarness,
) -> None:
    """A deadline passed while no scheduler ran (the hub was down): the stored numbers are
    past their ``next_at``, and a reader gets them counted again, not as stored."""
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    past = datetime.now(UTC) - timedelta(minutes=5)
    [task] = await create(hub, alice, title="Late", responsible_ids=[bob_id])
    store = hub.services.store
    await store["tasks"].update_one({"_id": task["id"]}, {"$set": {"deadline": past}})
    # as stored before the deadline passed: expiring soon, due to change at the deadline
    stale = await hub.services.tasks.count(bob_id)
    stale["responsible"]["expiring_soon"] = 1
    await store["task_counters"].update_one(
        {"_id": bob_id}, {"$set": {"counters": stale, "next_at": past}}
    )
    hub.services.tasks.forget_all()
    counted = await hub.services.tasks.counters(bob_id)
    assert counted["responsible"]["overdue"] == 1
    assert counted["responsible"]["expiring_soon"] == 0
    assert (await stored(hub, bob_id))["counters"] == counted


async def test_an_older_count_never_overwrites_a_newer_one(hub: HubHarness) -> None:
    """A count that read the tasks before a change is stored only if nothing was stored
    meanwhile; here the change's own count is stored first, and the older one counts again."""
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    [task] = await create(hub, alice, title="Race", responsible_ids=[bob_id])
    counters: TaskCounters = hub.services.tasks.stored_counters
    real = counters._count_since
    hold = asyncio.Event()
    counted_once = asyncio.Event()
    calls = 0

    async def slow(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = await real(*args, **kwargs)
        if calls == 1:  # the first count read the task as new: it waits with that
            counted_once.set()
            await hold.wait()
        return result

    counters._count_since = slow  # type: ignore[method-assign]
    try:
        older = asyncio.create_task(counters.store([bob_id], [task["id"]]))
        await counted_once.wait()
        # bob opens the task meanwhile: no longer new, stored by the view's own count
        assert (await hub.request("GET", f"/api/v1/tasks/{task['id']}", token=bob)).status == 200
        assert counter(await stored(hub, bob_id), "responsible", "new") == 0
        hold.set()
        await older
    finally:
        del counters._count_since
    assert calls >= 3  # the older count lost and counted again
    assert counter(await stored(hub, bob_id), "responsible", "new") == 0
    await stored_equals_count(hub, bob_id)


async def test_a_connection_never_goes_back_to_older_task_counters(hub: HubHarness) -> None:
    """Two pushes of one user's counters, made at once on two nodes, can arrive in either
    order: the older, arriving second, reaches no connection (it would stay on screen until
    the next change)."""
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    client = await hub.connect(bob)
    await client.wait_for("snapshot")
    counters: TaskCounters = hub.services.tasks.stored_counters
    await client.wait_for("counters.changed")  # the session's last step, once caught up
    await create(hub, alice, title="Order", responsible_ids=[bob_id])
    newer = _held(await stored(hub, bob_id))
    await client.wait_until(lambda: last_task_counters(client) == newer.counters, timeout=5)
    assert counter(await stored(hub, bob_id), "responsible", "new") == 1
    older = Held(newer.version - 1, {**newer.counters, "responsible": {}}, None)
    pushes = len(client.of_type("counters.changed"))
    await counters._push(bob_id, older)  # late: a node's push of the count before the task
    await counters._push(bob_id, newer)  # and the newest again: a duplicate
    marker = Held(newer.version + 1, newer.counters, None)
    await counters._push(bob_id, marker)  # a newer one, so that we know the others were handled
    await client.wait_until(lambda: len(client.of_type("counters.changed")) > pushes, timeout=5)
    await asyncio.sleep(0.2)
    got = [c["tasks"] for c in client.of_type("counters.changed")[pushes:] if "tasks" in c]
    assert got == [marker.counters]
    assert last_task_counters(client) == newer.counters


async def test_check_finds_drift_and_repairs_it(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    client = await hub.connect(bob)
    await client.wait_for("snapshot")
    await create(hub, alice, title="One", responsible_ids=[bob_id])
    counters: TaskCounters = hub.services.tasks.stored_counters
    assert (await counters.check()).clean
    right = await hub.services.tasks.count(bob_id)
    wrong = {role: dict(values) for role, values in right.items()}
    wrong["responsible"]["new"] = 5
    await hub.services.store["task_counters"].update_one(
        {"_id": bob_id}, {"$set": {"counters": wrong}}
    )
    found = await counters.check()
    assert found.differences == {bob_id: (wrong, right)} and not found.repaired
    repaired = await counters.check(repair=True)
    assert repaired.repaired and bob_id in repaired.differences
    assert (await stored(hub, bob_id))["counters"] == right
    assert (await counters.check()).clean
    await client.wait_until(lambda: last_task_counters(client) == right, timeout=5)


async def test_no_drift_after_random_changes(hub: HubHarness) -> None:
    """Random changes to several tasks by the people on them (completions and comments on
    finished tasks included, people added and removed): afterwards every stored document
    equals a fresh count over every task, and ``check`` finds nothing."""
    people = [await hub.create_user(name) for name in ("ann", "ben", "cid", "dee")]
    ids = [user_id for user_id, _ in people]
    rng = random.Random(1407)
    tasks: list[str] = []
    for n in range(4):
        author, responsible = rng.sample(range(len(people)), 2)
        [task] = await create(
            hub,
            people[author][1],
            title=f"T{n}",
            responsible_ids=[ids[responsible]],
            deadline=(datetime.now(UTC) + timedelta(hours=rng.choice([2, 48]))).isoformat(),
        )
        tasks.append(task["id"])
    actions = ("accept", "start", "complete", "approve", "reopen", "defer", "decline", "pause")
    for step in range(60):
        task_id = rng.choice(tasks)
        _, token = rng.choice(people)
        path = f"/api/v1/tasks/{task_id}"
        kind = rng.random()
        if kind < 0.45:
            await hub.request("POST", f"{path}/actions/{rng.choice(actions)}", token=token)
        elif kind < 0.7:
            await hub.request("POST", f"{path}/comments", token=token, json={"text": "x"})
        elif kind < 0.85:
            await hub.request("GET", path, token=token)
        else:
            watchers = rng.sample(ids, rng.randint(0, 2))
            await hub.request("PATCH", path, token=token, json={"observer_ids": watchers})
        if step % 15 == 14:
            await stored_equals_count(hub, *ids)
    await stored_equals_count(hub, *ids)
    assert (await hub.services.tasks.stored_counters.check()).clean


async def test_the_cli_check_reports_task_counter_drift_and_repairs_it(
    hub: HubHarness, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``portalhub counters check``: the stored task counters are part of its report."""
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    await create(hub, alice, title="One", responsible_ids=[bob_id])
    right = await hub.services.tasks.count(bob_id)
    wrong = {role: dict(values) for role, values in right.items()}
    wrong["total"]["new"] = 3
    coll = hub.services.store["task_counters"]
    await coll.update_one({"_id": bob_id}, {"$set": {"counters": wrong}})
    capsys.readouterr()
    assert await cli.counters_check(settings, repair=False, as_json=True) is False
    report = json.loads(capsys.readouterr().out)["tasks"]
    assert report["differences"] == {bob_id: {"stored": wrong, "counted": right}}
    assert await cli.counters_check(settings, repair=True, as_json=False) is True
    assert "stored task counters differ" in capsys.readouterr().out
    assert (await stored(hub, bob_id))["counters"] == right
    assert await cli.counters_check(settings, repair=False, as_json=False) is True
    assert "task counters are correct" in capsys.readouterr().out


async def test_a_kept_copy_past_its_next_moment_is_not_served_while_it_refreshes(
    settings: Settings, store: Store
) -> None:
    """A node's copy past its time to live is served while one background read refreshes
    it; one also past its deadline moment (``next_at``) holds numbers that are wrong now, and
    is read instead."""
    settings = settings.model_copy(update={"cache_ttl_seconds": 0.05, "cache_stale_seconds": 600})
    stamp = counters_stamp()
    moment = datetime.now(UTC) + timedelta(seconds=0.5)
    await store["task_counters"].insert_one(
        {
            "_id": "u-late",
            "counters": {"as_stored": 1},
            "rules": stamp,
            "next_at": moment,
            "finished_unseen": [],
            "version": 1,
        }
    )
    counters = TaskCounters(store, InProcessBus(), settings)
    try:
        assert await counters.get("u-late") == {"as_stored": 1}
        await asyncio.sleep(0.7)  # past the time to live and past next_at
        fresh = await counters.get("u-late")
        assert fresh == await counters.count("u-late")
        assert "as_stored" not in fresh
    finally:
        await counters.close()
