"""Task service: handler -> rules -> store write -> events on the personal streams of everyone
who may see the task -> live counters for everyone the task counts for.

A task change is an event on each viewer's personal stream (`task.updated`, `task.removed`),
so it replays like everything else, and each viewer gets it with their own roles and allowed
actions. The counters of the people concerned are counted again, stored and pushed live
(``server.tasks.counters``): a reader reads them stored, whatever the number of tasks.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime
from typing import Any

from pymongo import ReturnDocument

from server.channels.ratelimit import TokenBucket
from server.directory.models import display_name
from server.directory.rules import DepartmentNode, Person, supervisors_of
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.events.models import VersionedState
from server.events.streams import StreamLog, user_stream
from server.im.service import ImService
from server.settings import Settings
from server.store.database import Document, Store, new_id, plain, utcnow
from server.tasks.counters import TaskCounters, task_facts
from server.tasks.models import (
    CommentOut,
    HistoryEntry,
    TaskCreate,
    TaskOut,
    TaskQuery,
    TaskUpdate,
)
from server.tasks.rules import (
    Action,
    Field,
    NotAllowed,
    Role,
    Status,
    TaskFacts,
    Viewer,
    allowed_actions,
    initial_status,
    is_overdue,
    may_change_field,
    next_deadline_change,
    roles_of,
    supervised_by,
    transition,
)
from server.text import clean_name, xml_safe
from server.web.problems import Problem, not_found

STATUS_NAMES = {
    Status.NEW: "new",
    Status.PENDING: "pending",
    Status.IN_PROGRESS: "in_progress",
    Status.AWAITING_CONTROL: "awaiting_control",
    Status.COMPLETED: "completed",
    Status.DEFERRED: "deferred",
    Status.DECLINED: "declined",
}
STATUS_BY_NAME = {name: status for status, name in STATUS_NAMES.items()}
# what "open" and "overdue" mean
OPEN_STATUSES = (Status.NEW, Status.PENDING, Status.IN_PROGRESS)


def _listed(doc: Document, query: TaskQuery, now: datetime) -> bool:
    """Whether a task read for the caller's roles meets the list's other filters (what a
    filter of the same fields would have matched in the database)."""
    if query.group_id and doc.get("group_id") != query.group_id:
        return False
    if query.tag:
        tags = doc.get("tags")
        if not (tags == query.tag or (isinstance(tags, list) and query.tag in tags)):
            return False
    status = doc.get("status")
    if query.status in STATUS_BY_NAME:
        return bool(status == int(STATUS_BY_NAME[query.status]))
    if query.status in ("open", "overdue"):
        if status not in OPEN_STATUSES:
            return False
        if query.status == "overdue":
            deadline = doc.get("deadline")
            return deadline is not None and deadline <= now
    return True


FIELD_RULES: dict[str, Field] = {
    "title": Field.TITLE,
    "description": Field.DESCRIPTION,
    "priority": Field.PRIORITY,
    "tags": Field.TAGS,
    "participant_ids": Field.PARTICIPANTS,
    "observer_ids": Field.OBSERVERS,
    "responsible_id": Field.RESPONSIBLE,
    "group_id": Field.GROUP,
    "deadline": Field.DEADLINE,
    "planned_start": Field.PLANNED_START,
    "planned_end": Field.PLANNED_END,
    "require_approval": Field.REQUIRE_APPROVAL,
    "responsible_may_change_deadline": Field.RESPONSIBLE_MAY_CHANGE_DEADLINE,
    "include_in_report": Field.INCLUDE_IN_REPORT,
}
COUNTED = ("author_id", "responsible_id", "participant_ids", "observer_ids")


def editable_fields(roles: frozenset[Role], facts: TaskFacts) -> list[str]:
    """The PATCH fields ``update`` would accept from someone with ``roles``: the same checks."""
    fields = [name for name, rule in FIELD_RULES.items() if may_change_field(rule, roles, facts)]
    if roles & {Role.AUTHOR, Role.ADMIN}:
        fields.append("rating")
    return sorted(fields)


PeopleAndTree = tuple[list[Person], dict[str, DepartmentNode]]


def involved(doc: Document) -> set[str]:
    """The people a task counts for (author, responsible, participants, observers)."""
    return {
        doc["author_id"],
        doc["responsible_id"],
        *doc.get("participant_ids", []),
        *doc.get("observer_ids", []),
    }


class TaskService:
    def __init__(
        self,
        store: Store,
        streams: StreamLog,
        directory: DirectoryService,
        im: ImService,
        bus: EventBus,
        settings: Settings,
    ) -> None:
        self._store = store
        self._streams = streams
        self._directory = directory
        self._im = im
        self._bus = bus
        self._settings = settings
        # Task creation per user: a burst, then a steady rate (per node, like messages).
        self._buckets: dict[str, TokenBucket] = {}
        self.on_schedule_changed: list[Any] = []  # the scheduler wakes up on these
        # Each user's task counters, stored by every change that moves them.
        self.stored_counters = TaskCounters(store, bus, settings)
        directory.user_created_hooks.append(self.stored_counters.user_created)

    def forget_all(self) -> None:
        """Kept counters may be out of date (pushes were lost)."""
        self.stored_counters.forget_all()

    async def close(self) -> None:
        """Stop the counters cache's background refreshes."""
        await self.stored_counters.close()

    @property
    def tasks(self) -> Any:
        return self._store["tasks"]

    # who is who ------------------------------------------------------------------------------

    async def _people(self) -> PeopleAndTree:
        # the directory's cache of active users, dropped on every node by directory.changed
        return await self._directory.active_people(), await self._directory.department_tree()

    async def viewer(self, user: Document) -> Viewer:
        people, tree = await self._people()
        user_id = str(user["_id"])
        return Viewer(user_id, bool(user.get("is_admin")), supervised_by(user_id, people, tree))

    async def facts(self, doc: Document) -> TaskFacts:
        group = None
        if doc.get("group_id"):
            group = await self._store.workgroups.find_one({"_id": doc["group_id"]})
        return task_facts(doc, group)

    async def viewers_of(
        self, doc: Document, facts: TaskFacts, known: PeopleAndTree | None = None
    ) -> set[str]:
        """Everyone who may see the task and so hears of its changes (admins only when on it).

        ``known``: the directory already read for this change, so it is read once, not per use.
        """
        people, tree = known or await self._people()
        responsible = next((p for p in people if p.id == doc["responsible_id"]), None)
        heads = set(supervisors_of(responsible, tree)) if responsible else set()
        members = set(facts.group_member_ids) if facts.group_members_see_tasks else set()
        return involved(doc) | heads | members

    async def _visible(
        self, user: Document, task_id: str
    ) -> tuple[Document, TaskFacts, frozenset[Role]]:
        doc = await self.tasks.find_one({"_id": task_id})
        if doc is None:
            raise not_found(f"task {task_id}")
        facts = await self.facts(doc)
        roles = roles_of(await self.viewer(user), facts)
        if not roles:
            raise not_found(f"task {task_id}")  # not "forbidden": its existence is private too
        return doc, facts, roles

    async def _require_people(self, actor: Document, user_ids: list[str]) -> None:
        """Everyone put on a task exists, is active, and is someone the actor may see."""
        unreachable = await self._directory.first_unreachable(actor, user_ids)
        if unreachable is not None:
            raise Problem(
                422, "unknown-reference", "Unknown reference", f"no active user {unreachable}"
            )

    async def _require_group(self, actor: Document, group_id: str) -> None:
        group = await self._store.workgroups.find_one({"_id": group_id})
        if group is None or (
            not actor.get("is_admin") and str(actor["_id"]) not in group.get("member_ids", [])
        ):
            raise Problem(
                422,
                "unknown-reference",
                "Unknown reference",
                f"workgroup {group_id} does not exist or you are not in it",
            )

    # reading ---------------------------------------------------------------------------------

    async def out(
        self,
        doc: Document,
        facts: TaskFacts,
        user_id: str,
        roles: frozenset[Role],
        view: Document | None = None,
    ) -> TaskOut:
        if view is None:
            view = await self._store["task_views"].find_one({"_id": f"{doc['_id']}|{user_id}"})
        seen = view or {}
        return TaskOut(
            id=doc["_id"],
            title=doc["title"],
            description=doc.get("description", ""),
            status=int(doc["status"]),
            status_name=STATUS_NAMES[Status(doc["status"])],
            overdue=is_overdue(facts, utcnow()),
            author_id=doc["author_id"],
            responsible_id=doc["responsible_id"],
            participant_ids=doc.get("participant_ids", []),
            observer_ids=doc.get("observer_ids", []),
            group_id=doc.get("group_id"),
            parent_id=doc.get("parent_id"),
            master_id=doc.get("master_id"),
            predecessor_ids=doc.get("predecessor_ids", []),
            tags=doc.get("tags", []),
            priority=doc.get("priority", "medium"),
            deadline=doc.get("deadline"),
            planned_start=doc.get("planned_start"),
            planned_end=doc.get("planned_end"),
            require_approval=bool(doc.get("require_approval")),
            responsible_may_change_deadline=bool(doc.get("responsible_may_change_deadline")),
            include_in_report=bool(doc.get("include_in_report", True)),
            rating=doc.get("rating"),
            time_spent_seconds=int(doc.get("time_spent_seconds", 0)),
            timer_started_at=doc.get("timer_started_at"),
            created_at=doc["created_at"],
            updated_at=doc["updated_at"],
            closed_at=doc.get("closed_at"),
            comment_count=int(doc.get("comment_count", 0)),
            my_roles=sorted(r.value for r in roles),
            allowed_actions=sorted(a.value for a in allowed_actions(roles, facts)),
            editable_fields=editable_fields(roles, facts),
            unseen_updates=max(
                0, int(doc.get("update_count", 0)) - int(seen.get("updates_seen", 0))
            ),
            unseen_comments=max(
                0, int(doc.get("comment_count", 0)) - int(seen.get("comments_seen", 0))
            ),
        )

    async def get(self, user: Document, task_id: str) -> TaskOut:
        """The task; opening it marks it seen (new, updates, comments) for this user."""
        doc, facts, roles = await self._visible(user, task_id)
        user_id = str(user["_id"])
        before = await self._store["task_views"].find_one({"_id": f"{task_id}|{user_id}"})
        view = await self._store["task_views"].find_one_and_update(
            {"_id": f"{task_id}|{user_id}"},
            {
                "$set": {
                    "task_id": task_id,
                    "user_id": user_id,
                    "viewed_at": utcnow(),
                    "updates_seen": int(doc.get("update_count", 0)),
                    "comments_seen": int(doc.get("comment_count", 0)),
                }
            },
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert view is not None
        changed_view = (
            before is None
            or before.get("updates_seen") != view.get("updates_seen")
            or before.get("comments_seen") != view.get("comments_seen")
        )
        if changed_view and user_id in involved(doc):
            await self.push_counters([user_id], [task_id])
        return await self.out(doc, facts, user_id, roles, view)

    async def find(self, user: Document, query: TaskQuery) -> list[TaskOut]:
        """The caller's list, newest first. The tasks are read by the indexes of the roles
        that can put the caller on them (one read each, at once), never by a filter with a
        field outside an index: the embedded database scans the whole collection for those,
        so "all my tasks" read every task of the company and a status or tag filter did too.
        What the list asks beyond the role is checked on the tasks read (``_listed``). The
        cost follows the caller's own tasks, not the company's."""
        viewer = await self.viewer(user)
        user_id = viewer.user_id
        by_role = {
            "responsible": {"responsible_id": user_id},
            "author": {"author_id": user_id},
            "participant": {"participant_ids": user_id},
            "observer": {"observer_ids": user_id},
        }
        reads: list[Document]
        if query.subordinates:
            reads = [{"responsible_id": {"$in": sorted(viewer.supervised_ids)}}]
        elif query.role != "all":
            reads = [by_role[query.role]]
        elif query.group_id:
            reads = [{"group_id": query.group_id}]
        else:
            # every way onto a task: the four roles, a workgroup that shows its tasks to its
            # members, and heads above the responsible person (``rules.roles_of``)
            reads = list(by_role.values())
            groups = [g["_id"] async for g in self._store.workgroups.find({"member_ids": user_id})]
            if groups:
                reads.append({"group_id": {"$in": groups}})
            if viewer.supervised_ids:
                reads.append({"responsible_id": {"$in": sorted(viewer.supervised_ids)}})
        found = await asyncio.gather(*(self.tasks.find(r).to_list() for r in reads))
        docs = {d["_id"]: d for group in found for d in group}
        now = utcnow()
        candidates = sorted(
            (d for d in docs.values() if _listed(d, query, now)),
            key=lambda d: (d["created_at"], d["_id"]),
            reverse=True,
        )
        group_ids = sorted({d["group_id"] for d in candidates if d.get("group_id")})
        workgroups = (
            {g["_id"]: g async for g in self._store.workgroups.find({"_id": {"$in": group_ids}})}
            if group_ids
            else {}
        )
        results: list[TaskOut] = []
        skipped = 0
        for doc in candidates:
            facts = task_facts(doc, workgroups.get(doc.get("group_id")))
            roles = roles_of(viewer, facts)
            # Lists show the tasks one is concerned with; an administrator's power to open any
            # task (by id) does not fill their lists with everyone's work.
            if not roles - {Role.ADMIN}:
                continue
            if query.status == "overdue" and not is_overdue(facts, now):
                continue
            if skipped < query.offset:
                skipped += 1
                continue
            results.append(await self.out(doc, facts, user_id, roles))
            if len(results) >= query.limit:
                break
        return results

    async def comments(self, user: Document, task_id: str) -> list[CommentOut]:
        await self._visible(user, task_id)
        return [
            CommentOut(
                id=c["_id"],
                task_id=c["task_id"],
                author_id=c["author_id"],
                text=c["text"],
                created_at=c["created_at"],
            )
            async for c in self._store["task_comments"].find(
                {"task_id": task_id}, sort=[("_id", 1)]
            )
        ]

    async def history(self, user: Document, task_id: str) -> list[HistoryEntry]:
        await self._visible(user, task_id)
        return [
            HistoryEntry(
                id=h["_id"],
                task_id=h["task_id"],
                user_id=h.get("user_id"),
                kind=h["kind"],
                action=h.get("action"),
                field=h.get("field"),
                before=h.get("before"),
                after=h.get("after"),
                at=h["at"],
            )
            async for h in self._store["task_history"].find({"task_id": task_id}, sort=[("_id", 1)])
        ]

    # writing ---------------------------------------------------------------------------------

    def _take_token(self, user_id: str) -> None:
        """One token per creation request (with up to 50 responsible people, the request
        makes up to 51 tasks: their number is capped by validation)."""
        now = time.monotonic()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets[user_id] = TokenBucket(
                self._settings.task_creates_per_second, self._settings.task_create_burst, now
            )
        if not bucket.take(now):
            wait = max(1, math.ceil((1 - bucket.tokens) / bucket.rate))
            raise Problem(
                429,
                "rate-limited",
                "Too many tasks",
                "slow down: too many tasks created in a short time",
                headers={"Retry-After": str(wait)},
                retry_after=wait,
            )

    async def create(self, user: Document, data: TaskCreate) -> list[TaskOut]:
        actor_id = str(user["_id"])
        self._take_token(actor_id)
        author_id = data.author_id or actor_id
        if author_id != actor_id and not user.get("is_admin"):
            raise Problem(
                403,
                "forbidden",
                "Forbidden",
                "only administrators create tasks on behalf of someone else",
            )
        responsible_ids = list(dict.fromkeys(data.responsible_ids))
        await self._require_people(
            user,
            list(
                {
                    author_id,
                    *responsible_ids,
                    *(data.participant_ids or []),
                    *(data.observer_ids or []),
                }
            ),
        )
        if data.parent_id is not None:
            await self._visible(user, data.parent_id)
        for predecessor in data.predecessor_ids:
            await self._visible(user, predecessor)
        if data.group_id is not None:
            await self._require_group(user, data.group_id)
        if len(responsible_ids) == 1:
            doc = await self._insert(data, author_id, responsible_ids[0], data.parent_id, None)
            return [await self._after_create(user, doc)]
        # Several responsible people: a master task (the author's) and a copy for each.
        master = await self._insert(data, author_id, author_id, data.parent_id, None)
        created = [await self._after_create(user, master)]
        for responsible in responsible_ids:
            copy = await self._insert(data, author_id, responsible, master["_id"], master["_id"])
            created.append(await self._after_create(user, copy))
        return created

    async def _insert(
        self,
        data: TaskCreate,
        author_id: str,
        responsible_id: str,
        parent_id: str | None,
        master_id: str | None,
    ) -> Document:
        people, tree = await self._people()
        responsible = next((p for p in people if p.id == responsible_id), None)
        supervises = responsible is not None and author_id in supervisors_of(responsible, tree)
        now = utcnow()
        doc: Document = {
            "_id": new_id(),
            "title": data.title,
            "description": data.description or "",
            "status": int(initial_status(author_id, responsible_id, supervises)),
            "author_id": author_id,
            "responsible_id": responsible_id,
            "participant_ids": list(dict.fromkeys(data.participant_ids or [])),
            "observer_ids": list(dict.fromkeys(data.observer_ids or [])),
            "group_id": data.group_id,
            "parent_id": parent_id,
            "master_id": master_id,
            "predecessor_ids": data.predecessor_ids,
            "tags": data.tags or [],
            "priority": data.priority or "medium",
            "deadline": data.deadline,
            "planned_start": data.planned_start,
            "planned_end": data.planned_end,
            "require_approval": bool(data.require_approval),
            "responsible_may_change_deadline": bool(data.responsible_may_change_deadline),
            "include_in_report": True if data.include_in_report is None else data.include_in_report,
            "rating": None,
            "time_spent_seconds": 0,
            "timer_started_at": None,
            "created_at": now,
            "updated_at": now,
            "closed_at": None,
            "comment_count": 0,
            "update_count": 0,
        }
        await self.tasks.insert_one(doc)
        return doc

    async def _after_create(self, user: Document, doc: Document) -> TaskOut:
        actor_id = str(user["_id"])
        await self._record(doc["_id"], actor_id, "created")
        facts = await self.facts(doc)
        await self._announce(doc, facts, ["created"], actor_id, before=set())
        return await self.out(doc, facts, actor_id, roles_of(await self.viewer(user), facts))

    async def update(self, user: Document, task_id: str, patch: TaskUpdate) -> TaskOut:
        doc, facts, roles = await self._visible(user, task_id)
        actor_id = str(user["_id"])
        requested = patch.model_dump(exclude_unset=True)
        changes: Document = {}
        for name, value in requested.items():
            if name == "rating":
                if not roles & {Role.AUTHOR, Role.ADMIN}:
                    raise Problem(403, "forbidden", "Forbidden", "only the author rates a task")
            elif not may_change_field(FIELD_RULES[name], roles, facts):
                raise Problem(403, "forbidden", "Forbidden", f"you may not change {name}")
            if doc.get(name) != value:
                changes[name] = value
        people = [
            changes.get("responsible_id"),
            *changes.get("participant_ids", []),
            *changes.get("observer_ids", []),
        ]
        if any(people):
            await self._require_people(user, [p for p in people if p])
        if changes.get("group_id"):
            await self._require_group(user, changes["group_id"])
        if not changes:
            return await self.out(doc, facts, actor_id, roles)
        old = dict(doc)
        before_people = involved(doc)
        before_viewers = await self.viewers_of(doc, facts)
        if changes.get("responsible_id"):
            # A new responsible person starts afresh: their acceptance, their timer.
            people_list, tree = await self._people()
            newcomer = next((p for p in people_list if p.id == changes["responsible_id"]), None)
            supervises = newcomer is not None and doc["author_id"] in supervisors_of(newcomer, tree)
            if Status(doc["status"]) in (Status.NEW, Status.PENDING, Status.IN_PROGRESS):
                changes["status"] = int(
                    initial_status(doc["author_id"], changes["responsible_id"], supervises)
                )
            changes.update(_stop_timer(doc, utcnow()))
        changes["updated_at"] = utcnow()
        doc = await self.tasks.find_one_and_update(
            {"_id": task_id},
            {"$set": changes, "$inc": {"update_count": 1}},
            return_document=ReturnDocument.AFTER,
        )
        for name in requested:
            if name in changes:
                await self._record(
                    task_id,
                    actor_id,
                    "field",
                    field=name,
                    before=plain(old.get(name)),
                    after=plain(changes[name]),
                )
        facts = await self.facts(doc)
        await self._mark_own_change_seen(doc, actor_id)
        await self._announce(
            doc,
            facts,
            sorted(k for k in changes if k != "updated_at"),
            actor_id,
            before=before_people,
            before_viewers=before_viewers,
        )
        return await self.out(doc, facts, actor_id, roles_of(await self.viewer(user), facts))

    async def act(self, user: Document, task_id: str, action: Action) -> TaskOut | None:
        doc, facts, roles = await self._visible(user, task_id)
        actor_id = str(user["_id"])
        try:
            status = transition(action, facts, roles)
        except NotAllowed as refused:
            raise Problem(
                409
                if roles
                & {Role.RESPONSIBLE, Role.PARTICIPANT, Role.AUTHOR, Role.ADMIN, Role.SUPERVISOR}
                else 403,
                "action-not-allowed",
                "Action not allowed",
                refused.reason,
                action=action.value,
                task_status=STATUS_NAMES[facts.status],
            ) from None
        if action is Action.START and await self._blocked(doc):
            raise Problem(
                409,
                "action-not-allowed",
                "Action not allowed",
                "a predecessor task is not completed yet",
                action=action.value,
            )
        if action is Action.DELETE:
            await self._delete(doc, facts, actor_id)
            return None
        if action is Action.COPY:
            copy = await self._copy(user, doc)
            return await self.out(
                copy,
                await self.facts(copy),
                actor_id,
                roles_of(await self.viewer(user), await self.facts(copy)),
            )
        if action is Action.COMMENT or action is Action.EDIT:
            raise Problem(
                422,
                "validation-error",
                "Invalid request",
                f"use the {action.value} endpoint",
                errors=[],
            )
        now = utcnow()
        changes: Document = {"status": int(status), "updated_at": now}
        if status is Status.IN_PROGRESS and facts.status is not Status.IN_PROGRESS:
            changes["timer_started_at"] = now
        elif facts.status is Status.IN_PROGRESS and status is not Status.IN_PROGRESS:
            changes.update(_stop_timer(doc, now))
        if status in (Status.COMPLETED, Status.DECLINED):
            changes["closed_at"] = now
        elif facts.status in (Status.COMPLETED, Status.DECLINED):
            changes["closed_at"] = None
        doc = await self.tasks.find_one_and_update(
            {"_id": task_id, "status": int(facts.status)},  # a concurrent change loses cleanly
            {"$set": changes, "$inc": {"update_count": 1}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise Problem(409, "conflict", "Conflict", "the task changed meanwhile; reload it")
        await self._record(
            task_id,
            actor_id,
            "action",
            action=action.value,
            before=STATUS_NAMES[facts.status],
            after=STATUS_NAMES[status],
        )
        facts = await self.facts(doc)
        await self._mark_own_change_seen(doc, actor_id)  # before the counters are computed
        await self._announce(
            doc, facts, ["status"], actor_id, before=involved(doc), action=action.value
        )
        return await self.out(doc, facts, actor_id, roles_of(await self.viewer(user), facts))

    async def _blocked(self, doc: Document) -> bool:
        if not doc.get("predecessor_ids"):
            return False
        open_one = await self.tasks.find_one(
            {"_id": {"$in": doc["predecessor_ids"]}, "status": {"$ne": int(Status.COMPLETED)}},
            projection={"_id": True},
        )
        return open_one is not None

    async def _copy(self, user: Document, doc: Document) -> Document:
        # A task stored before the text rules may hold what they refuse: its copy is cleaned
        # rather than refused.
        data = TaskCreate(
            title=clean_name(doc["title"]) or "(untitled)",
            description=xml_safe(doc.get("description", "")),
            responsible_ids=[doc["responsible_id"]],
            participant_ids=doc.get("participant_ids", []),
            observer_ids=doc.get("observer_ids", []),
            group_id=doc.get("group_id"),
            deadline=doc.get("deadline"),
            tags=[t for t in map(clean_name, doc.get("tags", [])) if t],
            priority=doc.get("priority", "medium"),
            require_approval=bool(doc.get("require_approval")),
            responsible_may_change_deadline=bool(doc.get("responsible_may_change_deadline")),
            include_in_report=bool(doc.get("include_in_report", True)),
            planned_start=doc.get("planned_start"),
            planned_end=doc.get("planned_end"),
            predecessor_ids=doc.get("predecessor_ids", []),
        )
        copy = await self._insert(data, str(user["_id"]), doc["responsible_id"], doc["_id"], None)
        await self._after_create(user, copy)
        return copy

    async def _delete(self, doc: Document, facts: TaskFacts, actor_id: str) -> None:
        viewers = await self.viewers_of(doc, facts)
        await self.tasks.delete_one({"_id": doc["_id"]})
        # Subtasks and copies live on, as tasks of their own.
        await self.tasks.update_many({"parent_id": doc["_id"]}, {"$set": {"parent_id": None}})
        for name in ("task_comments", "task_views", "task_history"):
            await self._store[name].delete_many({"task_id": doc["_id"]})
        await self._store["schedule"].delete_many({"task_id": doc["_id"]})
        for user_id in sorted(viewers):
            await self._streams.append(
                user_stream(user_id), "task.removed", {"task_id": doc["_id"], "by": actor_id}
            )
        await self.push_counters(sorted(involved(doc)), [doc["_id"]])

    async def add_comment(self, user: Document, task_id: str, text: str) -> CommentOut:
        doc, facts, _roles = await self._visible(user, task_id)
        actor_id = str(user["_id"])
        comment = {
            "_id": new_id(),
            "task_id": task_id,
            "author_id": actor_id,
            "text": text,
            "created_at": utcnow(),
        }
        await self._store["task_comments"].insert_one(comment)
        doc = await self.tasks.find_one_and_update(
            {"_id": task_id},
            {"$inc": {"comment_count": 1}, "$set": {"updated_at": utcnow()}},
            return_document=ReturnDocument.AFTER,
        )
        await self._record(task_id, actor_id, "comment")
        out = CommentOut(
            id=comment["_id"],
            task_id=task_id,
            author_id=actor_id,
            text=text,
            created_at=comment["created_at"],
        )
        await self._mark_own_change_seen(doc, actor_id)
        await self._announce(
            doc,
            facts,
            ["comments"],
            actor_id,
            before=involved(doc),
            comment=out.model_dump(mode="json"),
        )
        return out

    async def _mark_own_change_seen(self, doc: Document, user_id: str) -> None:
        """One's own change or comment is not news to oneself."""
        await self._store["task_views"].update_one(
            {"_id": f"{doc['_id']}|{user_id}"},
            {
                "$set": {
                    "task_id": doc["_id"],
                    "user_id": user_id,
                    "viewed_at": utcnow(),
                    "updates_seen": int(doc.get("update_count", 0)),
                    "comments_seen": int(doc.get("comment_count", 0)),
                }
            },
            upsert=True,
        )

    async def _record(self, task_id: str, user_id: str | None, kind: str, **data: Any) -> None:
        await self._store["task_history"].insert_one(
            {
                "_id": new_id(),
                "task_id": task_id,
                "user_id": user_id,
                "kind": kind,
                "at": utcnow(),
                **data,
            }
        )

    # telling people --------------------------------------------------------------------------

    async def _announce(
        self,
        doc: Document,
        facts: TaskFacts,
        changed: list[str],
        actor_id: str | None,
        *,
        before: set[str],
        before_viewers: set[str] | None = None,
        action: str | None = None,
        comment: dict[str, Any] | None = None,
    ) -> None:
        known = await self._people()
        viewers = await self.viewers_of(doc, facts, known)
        extra: dict[str, Any] = {}
        if action:
            extra["action"] = action
        if comment:
            extra["comment"] = comment
        await self._tell(sorted(viewers), doc, facts, changed, actor_id, extra, known)
        now_involved = involved(doc)
        for user_id in sorted((before | now_involved | (before_viewers or set())) - viewers):
            await self._streams.append(
                user_stream(user_id), "task.removed", {"task_id": doc["_id"], "by": actor_id}
            )
        await self._notify_newcomers(doc, before, actor_id)
        await self.push_counters(sorted(before | now_involved), [doc["_id"]])
        await self.reschedule(doc, facts)

    async def _tell(
        self,
        user_ids: list[str],
        doc: Document,
        facts: TaskFacts,
        changed: list[str],
        actor_id: str | None,
        extra: dict[str, Any],
        known: PeopleAndTree | None = None,
    ) -> None:
        """``task.updated`` on each person's stream, with their own roles and actions."""
        people, tree = known or await self._people()
        users = {
            str(u["_id"]): u
            async for u in self._store.users.find(
                {"_id": {"$in": user_ids}}, projection={"is_admin": True}
            )
        }
        for user_id in user_ids:
            user_doc = users.get(user_id)
            if user_doc is None:
                continue
            supervised = supervised_by(user_id, people, tree)
            roles = roles_of(Viewer(user_id, bool(user_doc.get("is_admin")), supervised), facts)
            data: dict[str, Any] = {
                "task": (await self.out(doc, facts, user_id, roles)).model_dump(mode="json"),
                "changed": changed,
                "by": actor_id,
                **extra,
            }
            await self._streams.append(user_stream(user_id), "task.updated", data)

    # workgroups (the directory tells us) -----------------------------------------------------

    async def workgroup_created(self, owner: Document, group: Any) -> None:
        return None  # a new group has no tasks yet

    async def workgroup_members_added(self, group_id: str, user_ids: list[str]) -> None:
        """New members of a group whose tasks members see get those tasks, live."""
        async for doc in self.tasks.find({"group_id": group_id}):
            facts = await self.facts(doc)
            if facts.group_members_see_tasks:
                await self._tell(
                    sorted(set(user_ids) - involved(doc)), doc, facts, ["group_members"], None, {}
                )

    async def workgroup_member_removed(self, group_id: str, user_id: str) -> None:
        """A member who leaves stops seeing the group's tasks they are not on."""
        user = await self._store.users.find_one({"_id": user_id})
        if user is None:
            return
        viewer = await self.viewer(user)
        async for doc in self.tasks.find({"group_id": group_id}):
            if not roles_of(viewer, await self.facts(doc)):
                await self._streams.append(
                    user_stream(user_id), "task.removed", {"task_id": doc["_id"], "by": None}
                )

    async def _notify_newcomers(
        self, doc: Document, before: set[str], actor_id: str | None
    ) -> None:
        """A system notice to each person newly on the task (not to the one who did it)."""
        actor = await self._store.users.find_one({"_id": actor_id}) if actor_id else None
        who = display_name(actor) if actor else "Someone"
        roles = [
            (doc["responsible_id"], "assigned you the task"),
            *[
                (p, "added you as a participant to the task")
                for p in doc.get("participant_ids", [])
            ],
            *[(o, "added you as an observer to the task") for o in doc.get("observer_ids", [])],
        ]
        told: set[str] = set()
        for user_id, what in roles:
            if user_id in before or user_id == actor_id or user_id in told:
                continue
            told.add(user_id)
            await self._im.post_system_notice(user_id, f"{who} {what} “{doc['title']}”")

    async def counters(self, user_id: str) -> dict[str, Any]:
        """The user's task counters, as stored (one read; kept as last pushed)."""
        return await self.stored_counters.get(user_id)

    async def counters_state(self, user_id: str) -> VersionedState:
        """``counters`` with the version they were stored at, for a connection (which takes a
        push only when it is newer)."""
        return await self.stored_counters.state(user_id)

    async def count(self, user_id: str) -> dict[str, Any]:
        """The user's task counters counted afresh over every task they are on (not stored):
        what the stored ones must equal."""
        return await self.stored_counters.count(user_id)

    async def push_counters(self, user_ids: list[str], changed: list[str]) -> None:
        """Count, store and push the users' task counters after a change of the tasks
        ``changed`` (every node keeps them from the push)."""
        await self.stored_counters.store(user_ids, changed)

    # time ------------------------------------------------------------------------------------

    async def reschedule(self, doc: Document, facts: TaskFacts) -> None:
        """Keep one persisted wake-up per task: the next moment its counters change by time."""
        due = next_deadline_change([facts], utcnow())
        schedule = self._store["schedule"]
        if due is None:
            await schedule.delete_one({"_id": f"task-deadline|{doc['_id']}"})
            return
        await schedule.update_one(
            {"_id": f"task-deadline|{doc['_id']}"},
            {
                "$set": {
                    "task_id": doc["_id"],
                    "due_at": due,
                    "kind": "task-deadline",
                    "claimed_until": None,
                }
            },
            upsert=True,
        )
        for wake in self.on_schedule_changed:
            wake(due)

    async def deadline_reached(self, task_id: str) -> None:
        """The scheduler's call: a task just became overdue or expiring soon."""
        doc = await self.tasks.find_one({"_id": task_id})
        if doc is None:
            return
        facts = await self.facts(doc)
        deadline = facts.deadline
        # the task's own history by its index, the entry looked for here (with ``kind`` and
        # ``at`` in the filter the embedded database reads every task's history)
        already = deadline is not None and any(
            [
                h
                async for h in self._store["task_history"].find(
                    {"task_id": task_id}, {"kind": 1, "at": 1}
                )
                if h.get("kind") == "overdue" and h["at"] >= deadline
            ]
        )
        if is_overdue(facts, utcnow()) and not already:  # a repeated run records it once
            await self._record(task_id, None, "overdue")
        await self._announce(doc, facts, ["deadline_state"], None, before=involved(doc))


def _stop_timer(doc: Document, now: datetime) -> Document:
    """The changes that stop a running timer, adding its time to the time spent."""
    started = doc.get("timer_started_at")
    if started is None:
        return {}
    spent = int(doc.get("time_spent_seconds", 0)) + int((now - started).total_seconds())
    return {"timer_started_at": None, "time_spent_seconds": spent}
