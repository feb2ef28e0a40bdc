"""Calls, meetings, emails, tasks and messages on CRM records.

An activity carries copies of what counting needs (its record's type and responsible person,
whether it is an unprocessed incoming one) so each counter is one index range; the record
carries how many of its activities are open (for the idle counter). Both are kept in step
here and re-derived by ``portalhub counters check``. Each write is told to the counters as
the document's state before and after it, which they apply as a difference; the writes are
guarded by the state read, so that "before" is what was really there.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from server.counters.crm import activity_facts
from server.counters.rules import due_threshold
from server.crm.access import Viewer
from server.crm.core import COUNTED_FIELDS, CrmCore, activity_state, record_title
from server.crm.models import ActivityCreate, ActivityFields, ActivityOut, ActivityQuery
from server.crm.rules import RECORD_TYPES
from server.directory.models import display_name
from server.store.database import Document, new_id, utcnow
from server.web.problems import Problem, forbidden, not_found

GUARDED_ATTEMPTS = 20


def _in_range(value: datetime, bounds: Document) -> bool:
    """Whether ``value`` is inside ``{$gt/$gte/$lt/$lte: ...}``, as the database would say."""
    checks = {
        "$gt": lambda b: value > b,
        "$gte": lambda b: value >= b,
        "$lt": lambda b: value < b,
        "$lte": lambda b: value <= b,
    }
    return all(checks[op](bound) for op, bound in bounds.items())


def counted_as(act: Document) -> Document:
    """A filter matching the activity only while everything counting reads of it is as in
    ``act``. ``_id`` first: the embedded database finds the document by it and checks the
    rest on it alone (a findAndModify, which returns the document, scans the collection)."""
    return {"_id": act["_id"], **{f: act.get(f) for f in COUNTED_FIELDS}}


def is_incoming(act: Document) -> bool:
    """The counting rule's own answer, stored on the activity so counting is an index range."""
    return activity_facts(act).is_incoming


def new_activity(
    owner: Document,
    responsible_id: str,
    type_: str,
    direction: str,
    subject: str,
    description: str,
    completed: bool,
    extra: Document,
    now: datetime,
    *,
    actor_id: str | None = None,
    deadline: datetime | None = None,
    missed: bool = False,
) -> Document:
    """An activity's document as ``add`` and ``add_many`` store it (no actor: the system)."""
    act: Document = {
        "_id": new_id(),
        "owner_type": owner["type"],
        "owner_id": owner["_id"],
        "record_responsible_id": owner["responsible_id"],
        "responsible_id": responsible_id,
        "type": type_,
        "direction": direction,
        "missed": missed,
        "subject": subject,
        "description": description,
        "deadline": deadline,
        "completed": completed,
        "completed_at": now if completed else None,
        "created_by": actor_id or "",
        "created_at": now,
        "modified_at": now,
        **extra,
    }
    act["incoming"] = is_incoming(act)
    return act


@dataclass
class NewActivity:
    """One activity of ``ActivityService.add_many``: added by the system (no actor), with no
    deadline."""

    owner: Document
    responsible_id: str
    type_: str
    direction: str
    subject: str
    description: str = ""
    completed: bool = False
    extra: Document = field(default_factory=dict)
    history: Document = field(default_factory=dict)


@dataclass
class _Turn:
    """Writers of one record's open count on this node, and the record as the last left it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    last: Document | None = None


class ActivityService:
    def __init__(self, core: CrmCore) -> None:
        self.core = core
        self._open_turns: dict[str, _Turn] = {}

    async def _viewer(self, actor_id: str) -> Viewer:
        return await self.core.member(actor_id)

    async def _require_user(self, user_id: str) -> Document:
        """An activity's responsible person: active, and holding a CRM role, since they are
        told about the activity and its record (events, a messenger notice)."""
        user = await self.core.store.users.find_one({"_id": user_id})
        if user is None or user.get("is_active") is False:
            raise Problem(422, "unknown-reference", "Unknown reference", f"no user {user_id}")
        await self.core.require_crm_user(user_id)
        return user

    async def _owned(self, viewer: Viewer, activity_id: str) -> tuple[Document, Document]:
        """The activity and its record, if the caller sees the record or is the activity's
        responsible person."""
        act = await self.core.activities.find_one({"_id": activity_id})
        if act is None:
            raise not_found(f"activity {activity_id}")
        owner = await self.core.records.find_one({"_id": act["owner_id"]})
        if owner is None:
            raise not_found(f"activity {activity_id}")
        if not viewer.sees(owner["responsible_id"]) and act["responsible_id"] != viewer.user_id:
            raise not_found(f"activity {activity_id}")
        return act, owner

    async def _out(
        self, viewer_id: str, act: Document, owner_title: str, bodies: bool = False
    ) -> ActivityOut:
        cfg = await self.core.config.counter_config()
        state = activity_state(act, utcnow(), await self.core.zone(viewer_id), cfg.window)
        return self.core.activity_out(act, owner_title, state, bodies)

    # create ----------------------------------------------------------------------------------

    async def create(self, actor_id: str, data: ActivityCreate) -> ActivityOut:
        viewer = await self._viewer(actor_id)
        owner = await self.core.visible_record(viewer, data.owner_type, data.owner_id)
        responsible = data.responsible_id or actor_id
        await self._require_user(responsible)
        return await self.add(
            owner,
            actor_id=actor_id,
            responsible_id=responsible,
            type_=data.type,
            direction=data.direction,
            subject=data.subject or "",
            description=data.description or "",
            deadline=data.deadline,
            completed=bool(data.completed),
            missed=data.missed,
            viewer_id=actor_id,
        )

    async def add(
        self,
        owner: Document,
        *,
        actor_id: str | None,
        responsible_id: str,
        type_: str,
        direction: str,
        subject: str,
        description: str = "",
        deadline: datetime | None = None,
        completed: bool = False,
        missed: bool = False,
        extra: Document | None = None,
        viewer_id: str | None = None,
        history: Document | None = None,
    ) -> ActivityOut:
        """Append an activity to a record; also the entry point of the mail bridge.
        ``history``: more for the record's history entry (who sent a mail, when no user
        added it)."""
        act = new_activity(
            owner,
            responsible_id,
            type_,
            direction,
            subject,
            description,
            completed,
            extra or {},
            utcnow(),
            actor_id=actor_id,
            deadline=deadline,
            missed=missed,
        )
        await self.core.activity_inserts.insert(act, 1)
        self.core.counters.activities_changed((None, act))
        if not completed:
            owner = await self._count_open(owner, +1)
        await self.core.record_history(
            owner,
            actor_id,
            "activity_added",
            "activity",
            None,
            {"id": act["_id"], "type": type_, **(history or {})},
        )
        await self._tell(act, owner)
        if actor_id is not None and responsible_id != actor_id:
            actor = await self.core.store.users.find_one({"_id": actor_id})
            who = display_name(actor) if actor else "Someone"
            await self.core.im.post_system_notice(
                responsible_id,
                f"{who} assigned you {_article(type_)} {type_} on “{record_title(owner)}”: "
                f"{subject or '(no subject)'}",
            )
        return await self._out(viewer_id or responsible_id, act, record_title(owner))

    async def add_one(self, item: NewActivity) -> ActivityOut:
        """``add`` of one activity built as ``add_many`` takes them (the mail bridge builds
        a received mail's activity once, for either path)."""
        return await self.add(
            item.owner,
            actor_id=None,
            responsible_id=item.responsible_id,
            type_=item.type_,
            direction=item.direction,
            subject=item.subject,
            description=item.description,
            completed=item.completed,
            extra=item.extra,
            history=item.history,
        )

    async def add_many(self, items: list[NewActivity]) -> list[str | Exception]:
        """Append many activities at once (a batch of received mail): one insert of the
        activities, one open-count update per record, one insert of the history entries,
        and each record announced once with its final state, by construction rather than by
        when each caller reached its write. Per item: the activity's id, or the exception
        of its own insert (a ``DuplicateKeyError`` for a unique key already taken)."""
        now = utcnow()
        acts = [
            new_activity(
                item.owner,
                item.responsible_id,
                item.type_,
                item.direction,
                item.subject,
                item.description,
                item.completed,
                item.extra,
                now,
            )
            for item in items
        ]
        results: list[str | Exception] = [a["_id"] for a in acts]
        if not acts:
            return results
        try:
            await self.core.activities.insert_many(acts, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            for error in exc.details.get("writeErrors", []):
                index = int(error["index"])
                message = error.get("errmsg", "")
                results[index] = (
                    DuplicateKeyError(message, 11000, error)
                    if error.get("code") == 11000
                    else WriteError(message, error.get("code"), error)
                )
        stored = [
            (item, act)
            for item, act, r in zip(items, acts, results, strict=True)
            if not isinstance(r, Exception)
        ]
        if not stored:
            return results
        self.core.counters.activities_changed(*((None, act) for _item, act in stored))
        owners: dict[str, Document] = {}
        opened: dict[str, int] = {}
        for item, act in stored:
            owners.setdefault(item.owner["_id"], item.owner)
            if not act["completed"]:
                opened[item.owner["_id"]] = opened.get(item.owner["_id"], 0) + 1
        owners.update(
            await self._count_open_many({rid: (owners[rid], n) for rid, n in opened.items()})
        )
        await self.core.record_histories(
            [
                (
                    owners[item.owner["_id"]],
                    None,
                    "activity_added",
                    "activity",
                    None,
                    {"id": act["_id"], "type": act["type"], **item.history},
                )
                for item, act in stored
            ]
        )
        # Side by side, so that the stream writer stores their events in few inserts.
        await asyncio.gather(
            *(self.core.announce_activity(act, owners[act["owner_id"]]) for _item, act in stored)
        )
        # Their indicators from one read of the records' open activities.
        open_acts = await self.core.open_activities_of(list(owners))
        await asyncio.gather(
            *(self.core.announce_record(o, activities=open_acts) for o in owners.values())
        )
        return results

    async def _count_open(self, owner: Document, delta: int) -> Document:
        """Move the record's count of open activities; the record as it is then. The idle
        number takes the count's real before and after: the write is guarded by the count
        read, and read again when someone else moved it first.

        Changes to one record on this node go one after the other, each starting from the
        count the one before left (a batch of replies to one deal would otherwise miss its
        guard and read the record again, one after another)."""
        record_id = owner["_id"]
        turn = self._join_turn(record_id)
        try:
            async with turn.lock:
                after = await self._count_open_now(turn.last or owner, delta)
                turn.last = after
                return after
        finally:
            self._leave_turn(record_id, turn)

    async def _count_open_many(
        self, changes: dict[str, tuple[Document, int]]
    ) -> dict[str, Document]:
        """``_count_open`` for several records in one write: each update guarded by the count
        read, as there, and marked with this write's token, so that when some guard missed
        (another node moved a count first) a read of the records tells which were applied;
        those are then counted one by one. Holds the records' turns (in id order: no two
        writers wait for each other)."""
        if len(changes) <= 1:
            return {
                rid: await self._count_open(owner, delta) for rid, (owner, delta) in changes.items()
            }
        async with contextlib.AsyncExitStack() as turns:
            current: dict[str, Document] = {}
            held: list[tuple[str, _Turn]] = []
            for rid in sorted(changes):
                turn = self._join_turn(rid)
                held.append((rid, turn))
                turns.callback(self._leave_turn, rid, turn)
                await turns.enter_async_context(turn.lock)
                current[rid] = turn.last or changes[rid][0]
            token = new_id()
            result = await self.core.records.bulk_write(
                [
                    UpdateOne(
                        {"_id": rid, "open_activities": current[rid].get("open_activities")},
                        {"$inc": {"open_activities": delta}, "$set": {"open_batch": token}},
                    )
                    for rid, (_owner, delta) in changes.items()
                ],
                ordered=False,
            )
            applied = set(changes)
            if result.matched_count < len(changes):
                applied = {
                    r["_id"]
                    async for r in self.core.records.find(
                        {"_id": {"$in": list(changes)}}, {"open_batch": 1}
                    )
                    if r.get("open_batch") == token
                }
            after: dict[str, Document] = {}
            pairs = []
            for rid, (_owner, delta) in changes.items():
                if rid in applied:
                    before = current[rid]
                    count = int(before.get("open_activities", 0)) + delta
                    after[rid] = {**before, "open_activities": count}
                    pairs.append((before, after[rid]))
                else:  # moved by someone else first: read again and counted alone
                    after[rid] = await self._count_open_now(current[rid], delta)
            if pairs:
                self.core.counters.records_changed(*pairs)
            for rid, turn in held:
                turn.last = after[rid]
            return after

    def _join_turn(self, record_id: str) -> _Turn:
        turn = self._open_turns.get(record_id)
        if turn is None:
            turn = self._open_turns[record_id] = _Turn()
        turn.waiting += 1
        return turn

    def _leave_turn(self, record_id: str, turn: _Turn) -> None:
        turn.waiting -= 1
        if not turn.waiting:
            self._open_turns.pop(record_id, None)

    async def _count_open_now(self, owner: Document, delta: int) -> Document:
        current: Document | None = owner
        for _attempt in range(GUARDED_ATTEMPTS):
            if current is None:
                break  # the record was deleted meanwhile: nothing left to count
            count = int(current.get("open_activities", 0))
            result = await self.core.records.update_one(
                {"_id": owner["_id"], "open_activities": current.get("open_activities")},
                {"$inc": {"open_activities": delta}},
            )
            if result.matched_count:
                after = {**current, "open_activities": count + delta}
                self.core.counters.records_changed((current, after))
                return after
            current = await self.core.records.find_one({"_id": owner["_id"]})
        else:
            # Still moving after all these tries: count it unguarded and recount its owner.
            await self.core.records.update_one(
                {"_id": owner["_id"]}, {"$inc": {"open_activities": delta}}
            )
            self.core.counters.touch([owner["responsible_id"]])
        return {**owner, "open_activities": int(owner.get("open_activities", 0)) + delta}

    async def _tell(self, act: Document, owner: Document, also: set[str] | None = None) -> None:
        await self.core.announce_activity(act, owner, also=also or set())
        await self.core.announce_record(owner)

    # read ------------------------------------------------------------------------------------

    async def get(self, actor_id: str, activity_id: str) -> ActivityOut:
        viewer = await self._viewer(actor_id)
        act, owner = await self._owned(viewer, activity_id)
        return await self._out(actor_id, act, record_title(owner), bodies=True)

    async def find(self, actor_id: str, query: ActivityQuery) -> list[ActivityOut]:
        """A record's activities, or a person's, by deadline (none first), then age.

        The embedded database uses an index only when the filter's fields are a leading run
        of its keys: ``{responsible_id, completed}`` skips ``owner_type`` in
        ``count_activity`` and ``{owner_id, type}`` is not in ``owner``, and either scanned
        every activity of the company. So the database is asked only such runs (a person's
        activities once per record type, a record's by ``owner``) and the rest of the
        list's conditions are checked here, on what the person or the record holds."""
        viewer = await self._viewer(actor_id)
        cfg = await self.core.config.counter_config()
        tz = await self.core.zone(actor_id)
        now = utcnow()
        completed: bool | None = {"open": False, "completed": True}.get(query.status)
        incoming: bool | None = None
        deadline_range: Document | None = None
        later: datetime | None = None  # "future": a deadline from here, or none at all
        if query.deadline is not None:
            completed = False
            threshold = due_threshold(now, tz, cfg.window)
            incoming = query.deadline == "incoming"
            if query.deadline == "overdue":
                deadline_range = {"$lte": now}
            elif query.deadline == "due":
                deadline_range = {"$gt": now, "$lt": threshold}
            elif query.deadline == "future":
                later = threshold
        reads: list[Document] = []
        checks: Document = {}  # field -> value, checked on what was read
        if query.owner_id is not None:
            owner = await self.core.visible_record(viewer, query.owner_type, query.owner_id)
            read: Document = {"owner_id": owner["_id"]}
            if completed is not None:
                read["completed"] = completed
            reads.append(read)
            if query.responsible_id is not None:
                checks["responsible_id"] = query.responsible_id
            if incoming is not None:
                checks["incoming"] = incoming
        else:
            responsible = query.responsible_id or actor_id
            if responsible != actor_id and not viewer.sees(responsible):
                raise forbidden("you may not see this person's activities")
            for owner_type in (query.owner_type,) if query.owner_type else RECORD_TYPES:
                read = {"responsible_id": responsible, "owner_type": owner_type}
                if completed is not None:
                    read["completed"] = completed
                    if incoming is not None:
                        read["incoming"] = incoming
                        if deadline_range is not None:
                            read["deadline"] = deadline_range
                reads.append(read)
        if query.type is not None:
            checks["type"] = query.type
        found = await asyncio.gather(*(self.core.activities.find(r).to_list() for r in reads))

        def listed(act: Document) -> bool:
            if any(act.get(k) != v for k, v in checks.items()):
                return False
            deadline = act.get("deadline")
            if deadline_range is not None and (
                deadline is None or not _in_range(deadline, deadline_range)
            ):
                return False
            return later is None or deadline is None or deadline >= later

        acts = sorted(
            (a for group in found for a in group if listed(a)),
            key=lambda a: (a.get("deadline") is not None, a.get("deadline") or now, a["_id"]),
        )[query.offset : query.offset + query.limit]
        owner_ids = list({a["owner_id"] for a in acts})
        titles = {
            r["_id"]: record_title(r)
            async for r in self.core.records.find({"_id": {"$in": owner_ids}}, {"title": 1})
        }
        return [
            self.core.activity_out(
                a, titles.get(a["owner_id"], ""), activity_state(a, now, tz, cfg.window)
            )
            for a in acts
        ]

    # change ----------------------------------------------------------------------------------

    async def update(self, actor_id: str, activity_id: str, patch: ActivityFields) -> ActivityOut:
        viewer = await self._viewer(actor_id)
        act, owner = await self._owned(viewer, activity_id)
        fields = patch.model_dump(exclude_unset=True)
        if "responsible_id" in fields:
            await self._require_user(fields["responsible_id"])
        sets: dict[str, Any] = {k: v for k, v in fields.items() if act.get(k) != v}
        if not sets:
            return await self._out(actor_id, act, record_title(owner))
        now = utcnow()
        if "completed" in sets:
            sets["completed_at"] = now if sets["completed"] else None
        after = {**act, **sets}
        sets["incoming"] = is_incoming(after)
        sets["modified_at"] = now
        # Guarded by what counting reads of the activity as read here (the completed flag
        # among it, so two people completing at once count once): the counters then know
        # exactly what it was before.
        result = await self.core.activities.update_one(counted_as(act), {"$set": sets})
        if result.matched_count == 0:
            raise Problem(409, "conflict", "Conflict", "the activity changed meanwhile; try again")
        after = {**act, **sets}
        self.core.counters.activities_changed((act, after))
        if "completed" in fields and bool(act.get("completed")) != bool(after["completed"]):
            owner = await self._count_open(owner, -1 if after["completed"] else +1)
            await self.core.record_history(
                owner,
                actor_id,
                "activity_completed" if after["completed"] else "activity_reopened",
                "activity",
                None,
                {"id": activity_id, "type": act["type"]},
            )
        previous = act["responsible_id"]
        await self._tell(after, owner, also={previous})
        if after["responsible_id"] != previous and after["responsible_id"] != actor_id:
            actor = await self.core.store.users.find_one({"_id": actor_id})
            who = display_name(actor) if actor else "Someone"
            await self.core.im.post_system_notice(
                after["responsible_id"],
                f"{who} assigned you {_article(act['type'])} {act['type']} on "
                f"“{record_title(owner)}”: {after.get('subject') or '(no subject)'}",
            )
        return await self._out(actor_id, after, record_title(owner))

    async def delete(self, actor_id: str, activity_id: str) -> None:
        viewer = await self._viewer(actor_id)
        act, owner = await self._owned(viewer, activity_id)
        result = await self.core.activities.delete_one(counted_as(act))
        if result.deleted_count == 0:
            if await self.core.activities.find_one({"_id": activity_id}, {"_id": 1}) is None:
                return  # deleted meanwhile: nothing left to count
            raise Problem(409, "conflict", "Conflict", "the activity changed meanwhile; try again")
        self.core.counters.activities_changed((act, None))
        if not act.get("completed"):
            owner = await self._count_open(owner, -1)
        await self.core.record_history(
            owner, actor_id, "activity_removed", "activity", {"id": activity_id}, None
        )
        await self.core.announce_activity(act, owner, removed=True)
        await self.core.announce_record(owner)

    # move ------------------------------------------------------------------------------------

    async def move(
        self, actor_id: str, activity_id: str, owner_type: str, owner_id: str
    ) -> ActivityOut:
        """An e-mail put on another record (misfiled by the sender's address, a reply that
        belongs to the deal rather than the contact), by someone who may change both
        records: who sees them. Its code and thread follow it, so later replies land on the
        new record too."""
        viewer = await self._viewer(actor_id)
        act = await self.core.activities.find_one({"_id": activity_id})
        if act is None:
            raise not_found(f"activity {activity_id}")
        source = await self.core.records.find_one({"_id": act["owner_id"]})
        if source is None or not viewer.sees(source["responsible_id"]):
            raise not_found(f"activity {activity_id}")
        if act["type"] != "email":
            raise Problem(
                422, "invalid-value", "Invalid value", "only e-mail activities can be moved"
            )
        target = await self.core.visible_record(viewer, owner_type, owner_id)
        if target["_id"] == source["_id"]:
            return await self._out(actor_id, act, record_title(source))
        moved = await self.relocate([act], source, target, actor_id)
        if not moved:
            raise Problem(409, "conflict", "Conflict", "the activity changed meanwhile; try again")
        return await self._out(actor_id, moved[0], record_title(target))

    async def relocate(
        self, acts: list[Document], source: Document, target: Document, actor_id: str | None
    ) -> list[Document]:
        """Activities of ``source`` put on ``target``: the record's copies on them, both
        records' open counts, a history entry on each record, both records' viewers told (the
        old record's lose them, the new one's get them) and the counters of both. Returns the
        activities as moved (one moved meanwhile by someone else is left out)."""
        moved: list[Document] = []
        now = utcnow()
        sets = {
            "owner_type": target["type"],
            "owner_id": target["_id"],
            "record_responsible_id": target["responsible_id"],
            "modified_at": now,
        }
        for act in acts:
            done = await self.put_on(act, source, sets)
            if done is not None:
                moved.append(done)
        if not moved:
            return moved
        opened = sum(1 for a in moved if not a.get("completed"))
        if opened:
            source = await self._count_open(source, -opened)
            target = await self._count_open(target, +opened)
        there = {"type": target["type"], "id": target["_id"], "title": record_title(target)}
        here = {"type": source["type"], "id": source["_id"], "title": record_title(source)}
        for act in moved:
            what = {"id": act["_id"], "type": act["type"], "subject": act.get("subject", "")}
            before, after = {"record": here, "activity": what}, {"record": there, "activity": what}
            for record in (source, target):  # the same entry on both: from here, to there
                await self.core.record_history(
                    record, actor_id, "activity_moved", "activity", before, after
                )
            await self.core.announce_activity({**act, "owner_id": source["_id"]}, source, True)
            await self.core.announce_activity(act, target, also={act["responsible_id"]})
        await self.core.announce_record(source)
        await self.core.announce_record(target)
        return moved

    async def put_on(self, act: Document, source: Document, sets: Document) -> Document | None:
        """One activity of ``source`` given the owner in ``sets``; the activity as moved, or
        None when it left ``source`` (or was deleted) meanwhile. The write is guarded by what
        counting reads of it, so its counters move by the exact difference (the record's
        type and responsible person it is counted under), as any other change does."""
        current: Document | None = act
        for _attempt in range(GUARDED_ATTEMPTS):
            if current is None or current["owner_id"] != source["_id"]:
                return None
            result = await self.core.activities.update_one(counted_as(current), {"$set": sets})
            if result.matched_count:
                after = {**current, **sets}
                self.core.counters.activities_changed((current, after))
                return after
            current = await self.core.activities.find_one({"_id": act["_id"]})
        # Still changing after all these tries: moved unguarded, its people recounted.
        result = await self.core.activities.update_one(
            {"_id": act["_id"], "owner_id": source["_id"]}, {"$set": sets}
        )
        if not result.matched_count:
            return None
        people = [act["responsible_id"], source["responsible_id"], sets["record_responsible_id"]]
        self.core.counters.touch(people)
        return {**act, **sets}


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
