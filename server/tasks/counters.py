"""Each user's task counters, stored, and kept up to date by the changes that move them.

``task_counters`` holds one document per user (``_id``: the user's id): the counters as
``rules.counters_for`` gives them (``counters``), the stamp of the rules they were counted
under (``rules``), the next moment time alone moves them (``next_at``: a deadline of one of
their open tasks entering its last 24 hours or passing; None when there is none ahead), the
finished tasks that still count for them (``finished_unseen``: those with comments they have
not seen) and a ``version`` that every write bumps.

Writing. Every change that moves someone's counters (a task created, changed, acted on,
commented on, opened, deleted; a deadline moment, through the scheduler's persisted wake-ups,
which also fire for the moments a stopped hub missed, at its start) calls ``store`` for the
people concerned. It counts each of them again and writes the numbers only if the document is
still at the version read before that count: a count that read older tasks (two changes for
the same person at once, on one node or two) never overwrites a newer one; the loser counts
again. Then it pushes them (``counters.changed``), with their version for the nodes' copies.

A count after a change reads what can move the numbers, not the person's whole history: their
unfinished tasks (one read per role, along the role's ``(role, status)`` index), the finished
ones the document lists, the tasks the change was about, and the person's views of those
(``rules.COUNTED_WHEN_FINISHED``: a finished task counts only for comments not yet seen, and
only a change of that task, which names it, can add some). A person with no document yet, or
one counted under other rules, is counted once over every task they are on, and stored.

Reading. ``counters`` is one read of the stored document (a connect burst's reads made as
one, ``BatchLoad``), kept by every node as last pushed. Numbers past their ``next_at`` (the
scheduler has not fired yet, or the hub was down) are counted again, stored and given.

``check`` compares every stored document with a count over every task and can repair: the way
to find drift (a test runs it after random changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.errors import DuplicateKeyError

from server.caching import BatchLoad, Cache
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, VersionedState
from server.events.streams import user_stream
from server.settings import Settings
from server.store.database import Document, Store, utcnow
from server.tasks.rules import (
    FINISHED_STATUSES,
    Status,
    TaskFacts,
    TaskForUser,
    counted_roles,
    counters_for,
    counters_stamp,
    next_deadline_change,
)

log = logging.getLogger(__name__)

# The stored roles that put someone on a task (``rules.counted_roles``).
ROLES = ("author_id", "responsible_id", "participant_ids", "observer_ids")
UNFINISHED = sorted(int(s) for s in Status if s not in FINISHED_STATUSES)
# Counts lost to someone else's write in a row before giving up (each loss means another count
# was stored meanwhile; more than a couple needs changes for one person faster than a count).
ATTEMPTS = 10
# What the counters are called in a snapshot and in ``counters.changed``, and the key of their
# ``VersionedState``.
STATE_KEY = "tasks"


def task_facts(doc: Document, group: Document | None = None) -> TaskFacts:
    """The task's facts, given its workgroup's document (None: none, or gone). The counters
    do not depend on the workgroup (``rules.counted_roles``): they are counted without it."""
    group_members: frozenset[str] = frozenset()
    members_see = False
    if doc.get("group_id") and group is not None:
        group_members = frozenset(group.get("member_ids", []))
        members_see = bool(group.get("members_see_tasks", True))
    return TaskFacts(
        id=doc["_id"],
        status=Status(doc["status"]),
        author_id=doc["author_id"],
        responsible_id=doc["responsible_id"],
        participant_ids=frozenset(doc.get("participant_ids", [])),
        observer_ids=frozenset(doc.get("observer_ids", [])),
        group_id=doc.get("group_id"),
        group_members_see_tasks=members_see,
        group_member_ids=group_members,
        require_approval=bool(doc.get("require_approval")),
        responsible_may_change_deadline=bool(doc.get("responsible_may_change_deadline")),
        deadline=doc.get("deadline"),
        parent_id=doc.get("parent_id"),
    )


@dataclass(frozen=True, slots=True)
class Tally:
    """One user's counters over the tasks read, with what is stored beside them."""

    counters: dict[str, Any]
    next_at: datetime | None
    finished_unseen: list[str]


def tally(
    user_id: str, docs: Iterable[Document], views: Mapping[str, Document], now: datetime
) -> Tally:
    """Count ``user_id``'s counters over ``docs`` (tasks; those they are not on add nothing),
    with their views of them by task id."""
    items: list[TaskForUser] = []
    finished_unseen: list[str] = []
    for doc in docs:
        facts = task_facts(doc)
        if not counted_roles(user_id, facts):
            continue
        view = views.get(doc["_id"], {})
        unseen = max(0, int(doc.get("comment_count", 0)) - int(view.get("comments_seen", 0)))
        items.append(
            TaskForUser(
                task=facts,
                created_at=doc["created_at"],
                viewed_at=view.get("viewed_at"),
                comments_after_view=unseen,
            )
        )
        if facts.status in FINISHED_STATUSES and unseen > 0:
            finished_unseen.append(doc["_id"])
    return Tally(
        dataclasses.asdict(counters_for(user_id, items, now)),
        next_deadline_change((item.task for item in items), now),
        sorted(finished_unseen),
    )


@dataclass(frozen=True, slots=True)
class Held:
    """A user's counters as a node keeps them: stored at ``version``, right until ``next_at``
    (a POSIX timestamp: it crosses nodes in the push; None: no deadline moment ahead)."""

    version: int
    counters: dict[str, Any]
    next_at: float | None

    def fresh(self, now: datetime) -> bool:
        return self.next_at is None or now.timestamp() < self.next_at


def _state(held: Held) -> VersionedState:
    # A copy: the connection keeps what it was sent, and the node's copy moves on.
    return VersionedState(STATE_KEY, held.version, dict(held.counters), whole=True)


def _held(doc: Document) -> Held:
    next_at: datetime | None = doc.get("next_at")
    if next_at is not None and next_at.tzinfo is None:
        next_at = next_at.replace(tzinfo=UTC)
    return Held(
        int(doc.get("version", 0)),
        dict(doc.get("counters") or {}),
        None if next_at is None else next_at.timestamp(),
    )


def _current(doc: Document | None, now: datetime) -> bool:
    """Whether stored counters hold at ``now``: counted under these rules, before the next
    moment time moves them."""
    return (
        doc is not None
        and doc.get("rules") == counters_stamp()
        and "counters" in doc
        and _held(doc).fresh(now)
    )


@dataclass
class CheckReport:
    users_checked: int = 0
    # user id -> (stored, counted) for each user whose stored counters differ
    differences: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    users_busy: int = 0
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.differences


class TaskCounters:
    def __init__(self, store: Store, bus: EventBus, settings: Settings) -> None:
        self._store = store
        self._bus = bus
        # Each user's counters as last stored or pushed, on every node: a connect takes them
        # from here, else reads the stored document.
        self._held: Cache[str, Held] = Cache(
            settings.cache_max_entries,
            settings.cache_ttl_seconds,
            stale_seconds=settings.cache_stale_seconds,
        )
        # The stored documents of the users of one moment, read together (a connect burst).
        self._docs: BatchLoad[str, Document] = BatchLoad(self._read_docs)
        # Every task each user is on, for the full counts of one moment (users with no
        # document yet: a burst after the upgrade) read with one query per role.
        self._all_tasks: BatchLoad[str, list[Document]] = BatchLoad(self._read_all_tasks)
        bus.subscribe_ephemeral(self._on_ephemeral)

    @property
    def _coll(self) -> Any:
        return self._store["task_counters"]

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type != "counters.changed" or not isinstance(event.data.get("tasks"), dict):
            return
        stamp = event.private.get("tasks")
        for stream in event.streams:
            kind, _, user_id = stream.partition(":")
            if kind != "user":
                continue
            if not isinstance(stamp, dict):
                self._held.invalidate(user_id)  # pushed without a version: read it again
                continue
            held = self._held.get(user_id)
            version = int(stamp["version"])
            if held is None or held.version < version:  # a late push changes nothing
                self._held.put(user_id, Held(version, event.data["tasks"], stamp.get("next_at")))

    def forget_all(self) -> None:
        """Kept counters may be out of date (pushes were lost)."""
        self._held.clear()

    async def close(self) -> None:
        await self._held.close()

    # reading ---------------------------------------------------------------------------------

    async def get(self, user_id: str) -> dict[str, Any]:
        """The user's counters: as kept, else as stored (counted and stored first when they
        are missing, under other rules or past a deadline moment)."""
        return (await self.state(user_id)).values

    async def state(self, user_id: str) -> VersionedState:
        """``get``, with the version they were stored at: what a connection is sent, so that
        a push of an older version, arriving after it, is not (``VersionedState``)."""
        found = await self._held.get_or_load(user_id, lambda: self._load(user_id))
        if found is not None and not found.fresh(utcnow()):
            # Kept past its deadline moment (within its time to live, or past it and served
            # while a background read refreshes it: ``cache_stale_seconds``), its numbers are
            # wrong now: read, not served.
            self._held.invalidate(user_id)
            found = await self._held.get_or_load(user_id, lambda: self._load(user_id))
        if found is None:
            return VersionedState(STATE_KEY, 0, {}, whole=True)
        return _state(found)

    async def _load(self, user_id: str) -> Held:
        doc = await self._docs.load(user_id)
        if _current(doc, utcnow()):
            assert doc is not None
            return _held(doc)
        stored, _ = await self._settle(user_id, (), doc)
        return stored

    async def _read_docs(self, user_ids: list[str]) -> dict[str, Document]:
        return {d["_id"]: d async for d in self._coll.find({"_id": {"$in": user_ids}})}

    # counting --------------------------------------------------------------------------------

    async def count(self, user_id: str) -> dict[str, Any]:
        """A fresh count over every task the user is on, not stored (what ``check`` compares
        the stored numbers with)."""
        return (await self._count_all(user_id, utcnow())).counters

    async def _count_all(self, user_id: str, now: datetime) -> Tally:
        docs = await self._all_tasks.load(user_id) or []
        # The views only count for tasks the user is on: on none (most people, most of the
        # time), the count does not read them.
        views = (
            {v["task_id"]: v async for v in self._store["task_views"].find({"user_id": user_id})}
            if docs
            else {}
        )
        return tally(user_id, docs, views, now)

    async def _read_all_tasks(self, user_ids: list[str]) -> dict[str, list[Document]]:
        """The tasks each of ``user_ids`` is on, in any role (one indexed query per role, at
        once: the embedded database scans the collection for an ``$or``)."""
        tasks = self._store["tasks"]

        async def on(field: str) -> list[Document]:
            return [doc async for doc in tasks.find({field: {"$in": user_ids}})]

        found = await asyncio.gather(*(on(field) for field in ROLES))
        on_tasks: dict[str, dict[Any, Document]] = {user_id: {} for user_id in user_ids}
        for field, group in zip(ROLES, found, strict=True):
            for doc in group:
                held = doc.get(field)
                for user_id in held if isinstance(held, list) else [held]:
                    if user_id in on_tasks:
                        on_tasks[user_id][doc["_id"]] = doc
        return {user_id: list(tasks.values()) for user_id, tasks in on_tasks.items()}

    async def _count_since(
        self, user_id: str, doc: Document, changed: Iterable[str], now: datetime
    ) -> Tally:
        """Count the user's counters again from what can have moved them since ``doc`` was
        stored: their unfinished tasks, the finished ones it lists, the changed ones."""
        tasks = self._store["tasks"]
        listed = sorted({*doc.get("finished_unseen", []), *changed})
        reads = [
            tasks.find({field: user_id, "status": {"$in": UNFINISHED}}).to_list() for field in ROLES
        ]
        if listed:
            reads.append(tasks.find({"_id": {"$in": listed}}).to_list())
        found = await asyncio.gather(*reads)
        docs = {d["_id"]: d for group in found for d in group}
        view_ids = [f"{task_id}|{user_id}" for task_id in sorted(docs)]
        views = (
            {
                v["task_id"]: v
                async for v in self._store["task_views"].find({"_id": {"$in": view_ids}})
            }
            if view_ids
            else {}
        )
        return tally(user_id, docs.values(), views, now)

    # storing ---------------------------------------------------------------------------------

    async def user_created(self, user: Document) -> None:
        """A new user is on no task: their counters are stored, zero, now, so that their
        first connect reads them instead of counting. A change that named them first stored
        its own count: that one stays."""
        tallied = tally(str(user["_id"]), [], {}, utcnow())
        with contextlib.suppress(DuplicateKeyError):  # a change that named them stored first
            await self._coll.insert_one(
                {"_id": str(user["_id"]), **self._fields(tallied, utcnow()), "version": 1}
            )

    @staticmethod
    def _fields(tallied: Tally, now: datetime) -> Document:
        return {
            "counters": tallied.counters,
            "rules": counters_stamp(),
            "next_at": tallied.next_at,
            "finished_unseen": tallied.finished_unseen,
            "counted_at": now,
        }

    async def store(self, user_ids: Iterable[str], changed: Iterable[str] = ()) -> None:
        """Count again, store and push the counters of ``user_ids`` after a change of the
        tasks ``changed`` (their ids)."""
        tasks = list(changed)
        for user_id in user_ids:
            held, stored = await self._settle(user_id, tasks)
            if stored:
                await self._push(user_id, held)

    async def _settle(
        self,
        user_id: str,
        changed: Iterable[str],
        doc: Document | None = None,
        *,
        full: bool = False,
    ) -> tuple[Held, bool]:
        """Count the user's counters and store them, unless someone else stored others after
        the document this count started from (then count again). ``doc``: the stored document
        already read, for the first round; ``full``: over every task the user is on, whatever
        is stored (a repair). Returns the counters and whether they were stored."""
        tasks = list(changed)
        read = doc is not None
        tallied: Tally | None = None
        for _ in range(ATTEMPTS):
            if not read:
                doc = await self._coll.find_one({"_id": user_id})
            read = False
            now = utcnow()
            if full or doc is None or doc.get("rules") != counters_stamp():
                tallied = await self._count_all(user_id, now)
            else:
                tallied = await self._count_since(user_id, doc, tasks, now)
            fields = self._fields(tallied, now)
            if doc is None:
                try:
                    await self._coll.insert_one({"_id": user_id, **fields, "version": 1})
                except DuplicateKeyError:
                    continue  # stored meanwhile: count again from that document
                return _held({**fields, "version": 1}), True
            version = int(doc.get("version", 0))
            result = await self._coll.update_one(
                {"_id": user_id, "version": doc.get("version")},
                {"$set": fields, "$inc": {"version": 1}},
            )
            if result.matched_count:
                return _held({**fields, "version": version + 1}), True
        log.warning("task counters of %s changed too often to be stored", user_id)
        assert tallied is not None
        return Held(0, tallied.counters, None), False

    async def _push(self, user_id: str, held: Held) -> None:
        """Tell every node (each keeps the newest version) and the user's connections (each
        is sent a version newer than it holds, and only that: two pushes of one user's
        counters, made at once on two nodes, can arrive in either order)."""
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "counters.changed",
                {STATE_KEY: held.counters},
                (user_stream(user_id),),
                private={
                    **_state(held).as_private(),
                    "tasks": {"version": held.version, "next_at": held.next_at},
                },
            )
        )

    # repair ----------------------------------------------------------------------------------

    async def check(self, repair: bool = False) -> CheckReport:
        """Compare every stored document that holds (these rules, before its ``next_at``) with
        a count over every task its user is on; with ``repair``, store and push the counted
        numbers where they differ. A document that does not hold, or a user with none, is
        counted at its next read anyway."""
        report = CheckReport()
        async for stored in self._coll.find({}):
            user_id = str(stored["_id"])
            now = utcnow()
            if not _current(stored, now):
                continue
            report.users_checked += 1
            counted = await self._count_all(user_id, now)
            if counted.counters == stored.get("counters"):
                continue
            again = await self._coll.find_one({"_id": user_id}, {"version": True})
            if again is None or again.get("version") != stored.get("version"):
                report.users_busy += 1  # changed while counted: not compared this time
                continue
            report.differences[user_id] = (stored.get("counters"), counted.counters)
            if repair:
                held, done = await self._settle(user_id, (), full=True)
                if done:
                    await self._push(user_id, held)
        report.repaired = repair and bool(report.differences)
        return report
