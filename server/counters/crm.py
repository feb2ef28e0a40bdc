"""The live CRM counter engine.

A user's numbers are counted in the database, never kept as running sums: each is the size
of one index range (user, record type, kind), so a recount costs the same with a hundred or
a million open activities, and an increment lost in a crash cannot make a number drift.
After every change the users it touches are queued; a background flusher recounts them in a
batch (bursts coalesce), compares with the last numbers stored in ``crm_counters`` and pushes
only the numbers that changed. Time changes numbers too - a deadline passes, a local
midnight turns future activities into due ones - so each user keeps one persisted wake-up in
the scheduler at the next such moment.

``check`` recomputes everything from the activities and records themselves with the pure
rules (not from the denormalised fields the live path counts on) and can repair both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pymongo import ReturnDocument, UpdateOne

from server.background import stop
from server.counters.rules import (
    COUNTED_KINDS,
    RECORD_TYPES,
    ActivityFacts,
    Badge,
    CounterMode,
    DueWindow,
    Kind,
    classify,
    counted_user,
    due_threshold,
    next_change,
)
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, VersionedState, changed_numbers
from server.events.streams import user_stream
from server.store.database import Document, Store, utcnow

log = logging.getLogger(__name__)

COALESCE_SECONDS = 0.01
# A connect queues a recount of the user (to mend numbers gone stale) at most this often.
MEND_ON_CONNECT_SECONDS = 600.0
Counts = dict[str, dict[str, Any]]  # record type -> Badge.as_dict()


@dataclass(frozen=True, slots=True)
class CounterSettings:
    mode: CounterMode
    window: DueWindow


@dataclass
class CheckReport:
    users_checked: int = 0
    activities_checked: int = 0
    counter_differences: dict[str, Counts] = field(default_factory=dict)
    stale_activities: int = 0  # denormalised owner/responsible/incoming fields that drifted
    stale_records: int = 0  # open_activities counts that drifted
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (self.counter_differences or self.stale_activities or self.stale_records)


def zero_counts() -> Counts:
    """What a user with nothing to count shows (and is assumed to have been shown)."""
    return {t: Badge().as_dict() for t in RECORD_TYPES}


def counted_field(mode: CounterMode) -> str:
    return "record_responsible_id" if mode is CounterMode.ITEM else "responsible_id"


class CrmCounters:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        settings: Callable[[], Awaitable[CounterSettings]],
        default_time_zone: str,
    ) -> None:
        self._store = store
        self._bus = bus
        self._settings = settings
        self._default_tz = default_time_zone
        self._pending: dict[str, set[str]] = {}
        self._mended: dict[str, float] = {}  # when a connect last queued the user's recount
        self._flusher: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_schedule_changed: list[Callable[[datetime | None], None]] = []
        # Told which records' activities changed state by time alone (their indicators moved).
        self.on_time_passed: list[Callable[[list[str]], Awaitable[None]]] = []

    # reading ---------------------------------------------------------------------------------

    async def time_zones(self, user_ids: Iterable[str]) -> dict[str, ZoneInfo]:
        ids = list(user_ids)
        zones = {uid: self._zone(None) for uid in ids}
        async for doc in self._store.users.find({"_id": {"$in": ids}}, {"time_zone": 1}):
            zones[doc["_id"]] = self._zone(doc.get("time_zone"))
        return zones

    def _zone(self, name: str | None) -> ZoneInfo:
        try:
            return ZoneInfo(name or self._default_tz)
        except Exception:  # a zone removed from the system's database since it was set
            return ZoneInfo("UTC")

    async def compute(
        self,
        user_id: str,
        cfg: CounterSettings,
        tz: ZoneInfo,
        types: Iterable[str] = RECORD_TYPES,
        now: datetime | None = None,
    ) -> Counts:
        now = now or utcnow()
        threshold = due_threshold(now, tz, cfg.window)
        who = counted_field(cfg.mode)
        activities = self._store["crm_activities"]
        records = self._store["crm_records"]

        async def one_type(record_type: str) -> tuple[str, Badge]:
            base = {who: user_id, "owner_type": record_type, "completed": False}
            incoming, overdue, due, idle = await asyncio.gather(
                activities.count_documents({**base, "incoming": True}),
                activities.count_documents({**base, "incoming": False, "deadline": {"$lte": now}}),
                activities.count_documents(
                    {**base, "incoming": False, "deadline": {"$gt": now, "$lt": threshold}}
                ),
                records.count_documents(
                    {
                        "responsible_id": user_id,
                        "type": record_type,
                        "open": True,
                        "open_activities": 0,
                    }
                ),
            )
            return record_type, Badge(incoming=incoming, due=due, overdue=overdue, idle=idle)

        found = await asyncio.gather(*(one_type(t) for t in types))
        return {t: badge.as_dict() for t, badge in found}

    async def baseline(self, user_id: str) -> VersionedState:
        """The numbers last pushed to the user, with their version: what a connecting client
        starts from, since pushes are differences from exactly these. A recount is queued
        too (at most once per ``MEND_ON_CONNECT_SECONDS`` per user on this node), so that
        numbers gone stale without a push (a missed touch) are put right."""
        doc = await self._store["crm_counters"].find_one({"_id": user_id})
        now = time.monotonic()
        if now - self._mended.get(user_id, -MEND_ON_CONNECT_SECONDS) >= MEND_ON_CONNECT_SECONDS:
            # Mending costs a recount (some twenty index reads): once a while per user and
            # node is enough for a safety net, and a reconnecting crowd does not pay it each.
            if len(self._mended) > 100_000:
                self._mended.clear()
            self._mended[user_id] = now
            self.touch([user_id])
        if doc is None:
            return VersionedState("crm", 0, zero_counts())
        values: Counts = {**zero_counts(), **doc.get("values", {})}
        return VersionedState("crm", int(doc.get("version", 0)), values)

    async def current(self, user_id: str) -> Counts:
        """All four record types, counted now (for the counters document and snapshots)."""
        cfg = await self._settings()
        zones = await self.time_zones([user_id])
        return await self.compute(user_id, cfg, zones[user_id])

    # changes ---------------------------------------------------------------------------------

    def touch(self, user_ids: Iterable[str], types: Iterable[str] = RECORD_TYPES) -> None:
        """Queue a recount; the flusher pushes whatever changed."""
        type_list = list(types)
        for uid in user_ids:
            if uid:
                self._pending.setdefault(uid, set()).update(type_list)
        if self._pending and self._flusher is None:
            self._idle.clear()
            self._flusher = asyncio.create_task(self._flush(), name="crm-counters-flush")

    async def settled(self) -> None:
        """Wait until every queued recount has been pushed."""
        await self._idle.wait()

    async def close(self) -> None:
        await stop(self._flusher)

    async def _flush(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(COALESCE_SECONDS)
                batch, self._pending = self._pending, {}
                try:
                    await self.recount(batch)
                except Exception:
                    # Numbers stay as last pushed; the next change, tick or check mends them.
                    log.exception("recounting CRM counters of %d users failed", len(batch))
        finally:
            self._flusher = None
            if self._pending:  # touched while we were finishing
                self._flusher = asyncio.create_task(self._flush(), name="crm-counters-flush")
            else:
                self._idle.set()

    async def recount(self, batch: dict[str, set[str]]) -> None:
        cfg = await self._settings()
        zones = await self.time_zones(batch)
        await asyncio.gather(*(self._recount_one(u, t, cfg, zones[u]) for u, t in batch.items()))

    async def _recount_one(
        self, user_id: str, types: set[str], cfg: CounterSettings, tz: ZoneInfo
    ) -> None:
        fresh = await self.compute(user_id, cfg, tz, sorted(types))
        await self._store_and_push(user_id, fresh)
        await self.reschedule(user_id, cfg, tz)

    async def _store_and_push(self, user_id: str, fresh: Counts) -> None:
        """Store the new numbers and push what changed. The version guard makes one writer win
        when two nodes recount the same user, so a change is pushed once."""
        stored = self._store["crm_counters"]
        for _attempt in range(5):
            doc = await stored.find_one({"_id": user_id})
            before: Counts = {**zero_counts(), **(doc or {}).get("values", {})}
            changed = changed_numbers(before, fresh)
            if not changed:
                return
            values = {**before, **fresh}
            version = int((doc or {}).get("version", 0))
            if doc is None:
                try:
                    await stored.insert_one({"_id": user_id, "values": values, "version": 1})
                except Exception:
                    continue  # someone else created it: read again
            else:
                won = await stored.find_one_and_update(
                    {"_id": user_id, "version": version},
                    {"$set": {"values": values, "version": version + 1}},
                    return_document=ReturnDocument.AFTER,
                )
                if won is None:
                    continue
            state = VersionedState("crm", version + 1, values)
            await self._bus.publish_ephemeral(
                EphemeralEvent(
                    "counters.changed",
                    {"crm": changed},
                    (user_stream(user_id),),
                    private=state.as_private(),
                )
            )
            return

    # time ------------------------------------------------------------------------------------

    async def reschedule(self, user_id: str, cfg: CounterSettings, tz: ZoneInfo) -> None:
        """Keep one persisted wake-up per user at the next moment their numbers change by time."""
        now = utcnow()
        who = counted_field(cfg.mode)
        activities = self._store["crm_activities"]
        base = {who: user_id, "completed": False, "incoming": False}
        lookups = [now]
        if cfg.window.minutes_before is not None:
            lookups.append(now + timedelta(minutes=cfg.window.minutes_before))
        deadlines: list[datetime] = []
        # One lookup per record type: each is then a range of the counting index (user, type,
        # completed, incoming, deadline), already in deadline order - without the type the
        # index cannot serve the sort and the whole collection is scanned.
        for after in lookups:
            for record_type in RECORD_TYPES:
                nxt = await activities.find_one(
                    {**base, "owner_type": record_type, "deadline": {"$gt": after}},
                    {"deadline": 1},
                    sort=[("deadline", 1)],
                )
                if nxt is not None:
                    deadlines.append(nxt["deadline"])
        due = next_change(now, tz, cfg.window, deadlines)
        threshold = due_threshold(now, tz, cfg.window)
        schedule = self._store["schedule"]
        job_id = f"crm-counters|{user_id}"
        if due is None:
            await schedule.delete_one({"_id": job_id})
            return
        await schedule.update_one(
            {"_id": job_id},
            {
                "$set": {
                    "task_id": user_id,
                    "due_at": due,
                    "kind": "crm-counters",
                    "claimed_until": None,
                    # the moment counted from: what changed by the firing is what lies between
                    "since": now,
                    "threshold": threshold,
                }
            },
            upsert=True,
        )
        for wake in self.on_schedule_changed:
            wake(due)

    async def time_reached(self, user_id: str) -> None:
        """The scheduler's call: a deadline passed or a day began for this user."""
        job = await self._store["schedule"].find_one({"_id": f"crm-counters|{user_id}"})
        await self.recount({user_id: set(RECORD_TYPES)})
        if job is None or "since" not in job or not self.on_time_passed:
            return
        cfg = await self._settings()
        tz = (await self.time_zones([user_id]))[user_id]
        now = utcnow()
        threshold = due_threshold(now, tz, cfg.window)
        # Activities that became overdue, or entered the due window, since the job was set.
        owners = await self._store["crm_activities"].distinct(
            "owner_id",
            {
                counted_field(cfg.mode): user_id,
                "completed": False,
                "incoming": False,
                "$or": [
                    {"deadline": {"$gt": job["since"], "$lte": now}},
                    {"deadline": {"$gte": job["threshold"], "$lt": threshold}},
                ],
            },
        )
        if owners:
            for hook in self.on_time_passed:
                await hook(sorted(owners))

    async def recount_everyone(self) -> None:
        """After the mode or the due window changed: every user's numbers, pushed if changed."""
        ids = [u["_id"] async for u in self._store.users.find({}, {"_id": 1})]
        for start in range(0, len(ids), 100):
            await self.recount({uid: set(RECORD_TYPES) for uid in ids[start : start + 100]})

    # checking --------------------------------------------------------------------------------

    async def check(self, repair: bool = False) -> CheckReport:
        """Recompute every user's counters from the records and activities themselves."""
        report = CheckReport()
        cfg = await self._settings()
        now = utcnow()
        records: dict[str, Document] = {}
        async for rec in self._store["crm_records"].find(
            {}, {"type": 1, "responsible_id": 1, "open": 1, "open_activities": 1}
        ):
            records[rec["_id"]] = rec
        users = [u["_id"] async for u in self._store.users.find({}, {"_id": 1})]
        zones = await self.time_zones(users)
        tallies: dict[str, dict[str, dict[str, int]]] = {}
        open_per_record: dict[str, int] = {}
        fixes: list[UpdateOne] = []
        async for act in self._store["crm_activities"].find(
            {"completed": False},
            {
                "owner_type": 1,
                "owner_id": 1,
                "record_responsible_id": 1,
                "responsible_id": 1,
                "type": 1,
                "direction": 1,
                "deadline": 1,
                "incoming": 1,
            },
        ):
            report.activities_checked += 1
            owner = records.get(act["owner_id"])
            if owner is None:
                continue  # an orphan (its record was deleted mid-way): not counted anywhere
            open_per_record[owner["_id"]] = open_per_record.get(owner["_id"], 0) + 1
            facts = ActivityFacts(
                id=act["_id"],
                owner_type=owner["type"],
                owner_id=owner["_id"],
                record_responsible_id=owner["responsible_id"],
                responsible_id=act["responsible_id"],
                type=act["type"],
                direction=act["direction"],
                deadline=act.get("deadline"),
            )
            if (
                act.get("record_responsible_id") != owner["responsible_id"]
                or act.get("owner_type") != owner["type"]
                or bool(act.get("incoming")) != facts.is_incoming
            ):
                report.stale_activities += 1
                fixes.append(
                    UpdateOne(
                        {"_id": act["_id"]},
                        {
                            "$set": {
                                "record_responsible_id": owner["responsible_id"],
                                "owner_type": owner["type"],
                                "incoming": facts.is_incoming,
                            }
                        },
                    )
                )
            user = counted_user(facts, cfg.mode)
            kind = classify(facts, now, zones.get(user) or self._zone(None), cfg.window)
            if kind in COUNTED_KINDS:
                assert kind is not None
                per_type = tallies.setdefault(user, {}).setdefault(facts.owner_type, {})
                per_type[kind.value] = per_type.get(kind.value, 0) + 1
        record_fixes: list[UpdateOne] = []
        idle: dict[str, dict[str, int]] = {}
        for rec in records.values():
            real = open_per_record.get(rec["_id"], 0)
            if int(rec.get("open_activities", 0)) != real:
                report.stale_records += 1
                record_fixes.append(
                    UpdateOne({"_id": rec["_id"]}, {"$set": {"open_activities": real}})
                )
            if rec.get("open") and real == 0:
                per_user = idle.setdefault(rec["responsible_id"], {})
                per_user[rec["type"]] = per_user.get(rec["type"], 0) + 1
        expected: dict[str, Counts] = {}
        for uid in users:
            counts: Counts = {}
            for record_type in RECORD_TYPES:
                t = tallies.get(uid, {}).get(record_type, {})
                counts[record_type] = Badge(
                    incoming=t.get(Kind.INCOMING.value, 0),
                    due=t.get(Kind.DUE.value, 0),
                    overdue=t.get(Kind.OVERDUE.value, 0),
                    idle=idle.get(uid, {}).get(record_type, 0),
                ).as_dict()
            expected[uid] = counts
        stored = {
            d["_id"]: d.get("values", {})
            async for d in self._store["crm_counters"].find({"_id": {"$in": users}})
        }
        report.users_checked = len(users)
        for uid, counts in expected.items():
            delta = changed_numbers({**zero_counts(), **stored.get(uid, {})}, counts)
            if delta:
                report.counter_differences[uid] = delta
        if repair:
            if fixes:
                await self._store["crm_activities"].bulk_write(fixes, ordered=False)
            if record_fixes:
                await self._store["crm_records"].bulk_write(record_fixes, ordered=False)
            for uid in report.counter_differences:
                await self._store_and_push(uid, expected[uid])
            report.repaired = True
        return report
