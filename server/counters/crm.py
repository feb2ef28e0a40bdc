"""The live CRM counter engine: incremental.

Each user's numbers are stored in ``crm_counters`` as the counts they are at one moment
(``as_of``), with the earliest moment time alone changes one of them (``next_at``), the rules
they were counted under (``rules``: the counter mode and due window) and the user's time zone
(``zone``). The services report each write as its before and after (``activities_changed``,
``records_changed``); a flusher takes what came in over a few milliseconds, works out each
user's difference with the pure rules (``deltas.py``) and applies it with one ``$inc`` per
user, guarded so that the difference is only applied where the stored numbers are right:
same rules, same zone, ``as_of <= now < next_at``. Every write bumps ``version``; the node
that made it pushes the changed numbers with that version.

Time moves numbers too (a deadline passes, a local midnight or an N-minute window opens). Each
user keeps one persisted wake-up in the scheduler at ``next_at``; at it (or when a change finds
``next_at`` passed) the numbers are moved forward from the activities whose deadline lies where
a kind changed - a bounded index range - not recounted.

A recount of one user from index ranges (``touch``) is the repair of last resort and what a
missing or outdated document, a new time zone or a settings switch gets; ``check`` recomputes
everyone from the records and activities themselves and can repair, and ``verify_some`` runs
as a periodic background check, a few users at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from bson.codec_options import CodecOptions
from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError

from server.background import stop
from server.caching import BatchLoad, Cache
from server.counters.deltas import (
    ActivityChange,
    Change,
    Numbers,
    RecordChange,
    RecordCount,
    added,
    badge_of,
    boundaries_of,
    delta_of,
    next_wake,
    reading_range,
    time_delta,
    users_of,
    zero_numbers,
)
from server.counters.rules import (
    RECORD_TYPES,
    ActivityFacts,
    CounterMode,
    DueWindow,
    Kind,
    classify,
    due_threshold,
    kind_of,
    waits_for_answer,
)
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, VersionedState, changed_numbers
from server.events.streams import user_stream
from server.store.database import Document, Store, utcnow

log = logging.getLogger(__name__)

COALESCE_SECONDS = 0.002
# A difference seen by a check is only taken for drift if the user's stored numbers did not
# move for this long: a change written but not yet counted is counted well within it.
STABLE_SECONDS = 1.0
GUARDED_ATTEMPTS = 8
# After a recount: how long a change written before it may take to be queued here.
QUIET_SECONDS = 0.02
Counts = dict[str, dict[str, Any]]  # record type -> Badge.as_dict()
CHECK_JOB = "crm-counters-check"
CHECK_USERS_AT_ONCE = 4
CHECK_PAUSE = timedelta(seconds=2)
# The full check reads the open activities a page at a time (one person's, one record type),
# this many pages asked for ahead of the one being counted, in batches of this many. With 2
# the database, whose CPU decides the check's time, was idle a quarter of it (at a million
# 30 s of CPU in 41-60 s, waiting for the CPU only 1-2.5 s of them): waiting for the next
# request. Each page asked for is held whole by the database until it is sent.
CHECK_PAGES_AHEAD = 6
# ... unless the pages in flight would then hold more activities than this (by their records'
# stored counts): the database holds each page whole, as Python objects, until it is sent.
CHECK_AHEAD_ACTIVITIES = 50_000
CHECK_PAGE_BATCH = 20_000
# ... decoded without time zones: making each of an activity's three dates aware took most of
# the check's own decoding (5.7 us an activity against 1.6 us naive, at a million 4 s of the
# CLI's 11 s of CPU), and only the deadline is used, made aware again by ``_aware``.
CHECK_CODEC: CodecOptions[Document] = CodecOptions(tz_aware=False)
# Told on the bus after every write of a user's numbers: every node drops its copy.
STORED = "crm.counters.stored"


@dataclass(frozen=True, slots=True)
class CounterSettings:
    mode: CounterMode
    window: DueWindow

    @property
    def stamp(self) -> str:
        """Stored with the numbers: numbers counted under other rules are recounted."""
        minutes = self.window.minutes_before
        return f"{self.mode.value}|{'day' if minutes is None else minutes}"


@dataclass
class CheckReport:
    users_checked: int = 0
    activities_checked: int = 0
    counter_differences: dict[str, Counts] = field(default_factory=dict)
    stale_activities: int = 0  # denormalised owner/responsible/incoming fields that drifted
    stale_records: int = 0  # open_activities counts that drifted
    repaired: bool = False
    users_busy: int = 0  # changed while checked: not compared this time

    @property
    def clean(self) -> bool:
        return not (self.counter_differences or self.stale_activities or self.stale_records)


def zero_counts() -> Counts:
    """What a user with nothing to count shows (and is assumed to have been shown)."""
    return counts_of(zero_numbers())


def counts_of(numbers: Mapping[str, Mapping[str, int]]) -> Counts:
    full = added(numbers, {})
    return {t: badge_of(full[t]).as_dict() for t in RECORD_TYPES}


def counted_field(mode: CounterMode) -> str:
    return "record_responsible_id" if mode is CounterMode.ITEM else "responsible_id"


def activity_facts(act: Document) -> ActivityFacts:
    """What counting knows of an activity document: its own copies of its record's type and
    responsible person, as the index ranges count them."""
    return ActivityFacts(
        id=act["_id"],
        owner_type=act["owner_type"],
        owner_id=act["owner_id"],
        record_responsible_id=act["record_responsible_id"],
        responsible_id=act["responsible_id"],
        type=act["type"],
        direction=act["direction"],
        deadline=act.get("deadline"),
        completed=bool(act.get("completed")),
    )


def record_count(doc: Document) -> RecordCount:
    return RecordCount(
        doc["type"],
        doc["_id"],
        doc["responsible_id"],
        bool(doc.get("open")),
        int(doc.get("open_activities", 0)),
    )


def _numbers_in(doc: Document | None) -> Numbers:
    """The numbers of a stored document (also of the older shape holding whole badges)."""
    return added((doc or {}).get("values", {}), {})


def _update(delta: Numbers | None, sets: Document | None, earliest: datetime | None) -> Document:
    """The update of one user's numbers: every write bumps ``version``, so that a guarded
    write knows nobody came first, and pushes are ordered."""
    update: Document = {"$inc": {"version": 1}}
    for record_type, numbers in (delta or {}).items():
        for number, amount in numbers.items():
            update["$inc"][f"values.{record_type}.{number}"] = amount
    if sets:
        update["$set"] = sets
    if earliest is not None:
        update["$min"] = {"next_at": earliest}
    return update


def _aware(moment: datetime | None) -> datetime | None:
    """A date the check read without time zone (``CHECK_CODEC``: stored dates are UTC) made
    comparable with the aware ones again; an aware one as it is."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _job_id(user_id: str) -> str:
    return f"crm-counters|{user_id}"


@dataclass
class _Work:
    """What the flusher takes in one go."""

    changes: list[tuple[int, Change]] = field(default_factory=list)  # (sequence, change)
    recount: set[str] = field(default_factory=set)
    advance: set[str] = field(default_factory=set)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes or self.recount or self.advance or self.waiters)


class CrmCounters:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        settings: Callable[[], Awaitable[CounterSettings]],
        default_time_zone: str,
        clock: Callable[[], datetime] = utcnow,
        *,
        cache_max_entries: int = 100_000,
        cache_ttl_seconds: float = 10.0,
        cache_stale_seconds: float = 0.0,
    ) -> None:
        self._store = store
        self._bus = bus
        # Each user's stored numbers as last read here: every connect starts from them
        # (``baseline``), and reading them was a round trip per connect. Every write of them,
        # on any node, is told on the bus before it is pushed (``_stored``), and each node
        # drops its copy then; the time to live is the backstop for a message lost.
        self._docs: Cache[str, Document] = Cache(
            cache_max_entries, cache_ttl_seconds, stale_seconds=cache_stale_seconds
        )
        # The connects of one moment read their users' numbers together (one query a round).
        self._doc_reads: BatchLoad[str, Document] = BatchLoad(self._read_docs)
        bus.subscribe_ephemeral(self._on_ephemeral)
        self._settings = settings
        self._default_tz = default_time_zone
        self.clock = clock  # tests move it to let time pass
        self._work = _Work()
        self._flusher: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Counting needs each counted user's zone on every change; it changes rarely, and a
        # stale one here is caught by the zone stored with the numbers.
        self._zones: dict[str, ZoneInfo] = {}
        self._check_every = timedelta(0)
        # Changes are numbered as they come in. A recount counts what was written before it
        # started: each user's last recount start (``_absorbed``) tells which of their queued
        # changes it already holds, and the last change touching them (``_arrived``) whether
        # one came in while it counted (then it counts again).
        self._seq = 0
        self._arrived: dict[str, int] = {}
        self._absorbed: dict[str, int] = {}
        # Users whose numbers the flusher is bringing up to date right now (queued for an
        # advance or a recount and taken), and how many times each was brought up to date:
        # a connect that read stale numbers while that was under way must not queue it again.
        self._bringing: set[str] = set()
        self._brought: dict[str, int] = {}
        self.on_schedule_changed: list[Callable[[datetime | None], None]] = []
        # Told which records' activities changed state by time alone (their indicators moved).
        self.on_time_passed: list[Callable[[list[str]], Awaitable[None]]] = []

    @property
    def _coll(self) -> Any:
        return self._store["crm_counters"]

    async def _read_docs(self, user_ids: list[str]) -> dict[str, Document]:
        return {doc["_id"]: doc async for doc in self._coll.find({"_id": {"$in": user_ids}})}

    # zones -----------------------------------------------------------------------------------

    async def time_zones(self, user_ids: Iterable[str]) -> dict[str, ZoneInfo]:
        ids = list(user_ids)
        zones = {uid: self._zone(None) for uid in ids}
        async for doc in self._store.users.find({"_id": {"$in": ids}}, {"time_zone": 1}):
            zones[doc["_id"]] = self._zone(doc.get("time_zone"))
        return zones

    def zone_named(self, name: str | None) -> ZoneInfo:
        """A user's ``time_zone`` as a zone (the portal's default without one)."""
        return self._zone(name)

    def _zone(self, name: str | None) -> ZoneInfo:
        try:
            return ZoneInfo(name or self._default_tz)
        except Exception:  # a zone removed from the system's database since it was set
            return ZoneInfo("UTC")

    async def _zones_of(self, user_ids: Iterable[str], fresh: bool = False) -> dict[str, ZoneInfo]:
        ids = set(user_ids)
        missing = ids if fresh else {u for u in ids if u not in self._zones}
        if missing:
            self._zones.update(await self.time_zones(missing))
        return {u: self._zones[u] for u in ids}

    # reading ---------------------------------------------------------------------------------

    async def compute(
        self,
        user_id: str,
        cfg: CounterSettings,
        tz: ZoneInfo,
        types: Iterable[str] = RECORD_TYPES,
        now: datetime | None = None,
    ) -> Counts:
        """A recount of one user from index ranges: four counts per record type."""
        return counts_of(await self._count(user_id, cfg, tz, now or self.clock(), types))

    async def _count(
        self,
        user_id: str,
        cfg: CounterSettings,
        tz: ZoneInfo,
        now: datetime,
        types: Iterable[str] = RECORD_TYPES,
    ) -> Numbers:
        threshold = due_threshold(now, tz, cfg.window)
        who = counted_field(cfg.mode)
        activities = self._store["crm_activities"]
        records = self._store["crm_records"]

        async def one_type(record_type: str) -> tuple[str, dict[str, int]]:
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
            return record_type, {"incoming": incoming, "due": due, "overdue": overdue, "idle": idle}

        found = await asyncio.gather(*(one_type(t) for t in types))
        return added(dict(found), {})

    async def baseline(self, user_id: str) -> VersionedState:
        """The numbers last pushed to the user, with their version: what a connecting client
        starts from, since pushes are differences from exactly these. Numbers that are
        missing, counted under other rules or past a time-driven change are brought up to
        date at once (and pushed)."""
        brought = self._brought.get(user_id, 0)
        doc = await self._docs.get_or_load(user_id, lambda: self._doc_reads.load(user_id))
        cfg = await self._settings()
        if (
            not self._current(doc, cfg, self.clock())
            and not self._coming(user_id)
            and self._brought.get(user_id, 0) == brought  # else ``doc`` is older than that
        ):
            # A connect reads the numbers twice (the snapshot, then after catching up): the
            # second read must not queue a second bring-up while the first is under way or
            # once it landed; that cost a repeated settle whose presence depended on timing.
            self._queue(advance=[user_id])
        if doc is None:
            return VersionedState("crm", 0, zero_counts())
        return VersionedState("crm", int(doc.get("version", 0)), counts_of(_numbers_in(doc)))

    async def user_created(self, user: Document) -> None:
        """A new user owns and answers for nothing yet: their numbers are stored, zero, now,
        so that their first connect finds them right instead of counting them (four counts
        and a range read per record type, all empty). A change naming them that comes
        before these land recounts them (there is nothing to apply a difference to), and
        the insert here then leaves what it counted; one that comes after is applied on top
        of the zeros."""
        cfg = await self._settings()
        zone = self._zone(user.get("time_zone"))
        now = self.clock()
        wake = next_wake(now, zone, cfg.window, [])
        await self._store_counted(str(user["_id"]), cfg, zone, zero_numbers(), now, wake, None)

    async def current(self, user_id: str) -> Counts:
        """All four record types as they are now (for the counters document)."""
        doc = await self._coll.find_one({"_id": user_id})
        cfg = await self._settings()
        if not self._current(doc, cfg, self.clock()):
            await self._settle_user(user_id, [], cfg)
            doc = await self._coll.find_one({"_id": user_id})
        return counts_of(_numbers_in(doc))

    def _coming(self, user_id: str) -> bool:
        """Whether the user's numbers are queued or under way to be brought up to date."""
        queued = self._work.advance | self._work.recount
        return user_id in queued or user_id in self._bringing

    def _current(self, doc: Document | None, cfg: CounterSettings, now: datetime) -> bool:
        """Whether stored numbers are right at ``now``, as far as this node knows."""
        if doc is None or doc.get("rules") != cfg.stamp or "next_at" not in doc:
            return False
        zone = self._zones.get(doc["_id"])
        if zone is not None and doc.get("zone") != zone.key:
            return False
        return bool(doc["as_of"] <= now < doc["next_at"])

    # changes ---------------------------------------------------------------------------------

    def activities_changed(self, *pairs: tuple[Document | None, Document | None]) -> None:
        """Activities as they were before a write and as it left them (None: not there).
        Both must be the documents' real states around that write - a write guarded by the
        fields read, say - not copies read at some point before."""
        self._queue(
            changes=[
                ActivityChange(
                    activity_facts(b) if b is not None else None,
                    activity_facts(a) if a is not None else None,
                )
                for b, a in pairs
            ]
        )

    def records_changed(self, *pairs: tuple[Document | None, Document | None]) -> None:
        """Records before and after a write, for the idle numbers (``open``,
        ``open_activities``, ``responsible_id``, ``type``)."""
        self._queue(
            changes=[
                RecordChange(
                    record_count(b) if b is not None else None,
                    record_count(a) if a is not None else None,
                )
                for b, a in pairs
            ]
        )

    def touch(self, user_ids: Iterable[str], types: Iterable[str] = RECORD_TYPES) -> None:
        """Recount these users from scratch (index ranges) and push what changed: for changes
        not reported as differences (a new time zone, a stage that changed meaning, a write
        whose difference may have been lost)."""
        users = [u for u in user_ids if u]
        for uid in users:
            self._zones.pop(uid, None)
        self._queue(recount=users)

    def _queue(
        self,
        changes: Iterable[Change] = (),
        recount: Iterable[str] = (),
        advance: Iterable[str] = (),
        waiter: asyncio.Future[None] | None = None,
    ) -> None:
        for change in changes:
            self._seq += 1
            self._work.changes.append((self._seq, change))
            for uid in users_of([change], CounterMode.ITEM) | users_of(
                [change], CounterMode.ACTIVITY
            ):
                self._arrived[uid] = self._seq
        self._work.recount.update(recount)
        self._work.advance.update(advance)
        if waiter is not None:
            self._work.waiters.append(waiter)
        if self._work and self._flusher is None:
            self._idle.clear()
            self._flusher = asyncio.create_task(self._flush(), name="crm-counters-flush")

    async def settled(self) -> None:
        """Wait until everything queued has been applied and pushed."""
        await self._idle.wait()

    async def close(self) -> None:
        await stop(self._flusher)
        await self._docs.close()

    async def _flush(self) -> None:
        try:
            while self._work:
                await asyncio.sleep(COALESCE_SECONDS)
                work, self._work = self._work, _Work()
                try:
                    await self._apply(work)
                except Exception:
                    # What this batch held may be missing from the stored numbers: its users
                    # are counted from scratch once more (a recount failing in turn is left
                    # to the periodic check).
                    log.exception("applying CRM counter changes failed; recounting their users")
                    changes = [change for _seq, change in work.changes]
                    named = users_of(changes, CounterMode.ITEM) | users_of(
                        changes, CounterMode.ACTIVITY
                    )
                    self._queue(recount=(named | work.advance) - work.recount)
                finally:
                    for waiter in work.waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            self._flusher = None
            if self._work:  # queued while we were finishing
                self._flusher = asyncio.create_task(self._flush(), name="crm-counters-flush")
            else:
                self._idle.set()

    async def _apply(self, work: _Work) -> None:
        cfg = await self._settings()
        now = self.clock()
        mine: dict[str, list[Change]] = {}
        for seq, change in work.changes:
            for uid in users_of([change], cfg.mode):
                if seq > self._absorbed.get(uid, 0):  # else a recount counted it already
                    mine.setdefault(uid, []).append(change)
        users = set(mine) | work.recount | work.advance
        if not users:
            return
        # Taking a difference needs the zone of everyone its change names, not only of the
        # users it is applied to: an activity handed from A to B is applied to B alone when
        # a recount of A already counted it, and its ``before`` is still classified in A's
        # zone. A settle and a recount read their user's zone afresh themselves.
        zones = await self._zones_of(
            users_of((c for changes in mine.values() for c in changes), cfg.mode)
        )
        deltas: dict[str, Numbers] = {}
        bounds: dict[str, datetime] = {}
        for uid, changes in mine.items():
            deltas[uid] = delta_of(changes, cfg.mode, zones.__getitem__, cfg.window, now).get(
                uid, {}
            )
            bound = boundaries_of(changes, cfg.mode, zones.__getitem__, cfg.window, now).get(uid)
            if bound is not None:
                bounds[uid] = bound

        async def one(uid: str) -> None:
            brought = False
            try:
                if uid in work.recount:
                    # What was written before is in what the recount reads.
                    brought = await self._recount_user(uid, cfg)
                elif uid in work.advance:
                    # Not right at ``now`` as far as a reader saw: the careful path applies
                    # the changes where the numbers are right and moves them forward (the
                    # fast path would take a change without a difference as done).
                    brought = await self._settle_user(uid, mine.get(uid, []), cfg)
                elif not await self._fast(
                    uid, zones[uid], deltas.get(uid, {}), bounds.get(uid), cfg, now
                ):
                    await self._settle_user(uid, mine.get(uid, []), cfg)
            except Exception:
                if uid in work.recount:
                    log.exception("CRM counters of user %s not recounted; a check mends them", uid)
                else:
                    # Counted from scratch once more (it holds every change written before
                    # it); a recount failing in turn is not retried.
                    log.exception("CRM counters of user %s not applied; recounting them", uid)
                    self._queue(recount=[uid])
            finally:
                if uid in bringing:
                    self._bringing.discard(uid)
                    self._brought[uid] = self._brought.get(uid, 0) + brought

        bringing = (work.recount | work.advance) - self._bringing
        self._bringing |= bringing
        await asyncio.gather(*(one(uid) for uid in sorted(users)))

    async def _fast(
        self,
        user_id: str,
        zone: ZoneInfo,
        delta: Numbers,
        boundary: datetime | None,
        cfg: CounterSettings,
        now: datetime,
    ) -> bool:
        """One write: the difference taken at ``now`` where the stored numbers hold at
        ``now``. False when they do not (then ``_settle_user``)."""
        if not delta and boundary is None:
            return True
        # ``_id`` first: the embedded database looks the document up by it and checks the
        # rest on that one document (a findAndModify would scan the whole collection).
        result = await self._coll.update_one(
            {
                "_id": user_id,
                "rules": cfg.stamp,
                # the zone the difference was taken in: ``self._zones`` may have lost the
                # user meanwhile (``touch``), which raised here and dropped the difference
                "zone": zone.key,
                "as_of": {"$lte": now},
                "next_at": {"$gt": now},
            },
            # Held as of ``now`` from here: nothing counted changes kind between ``as_of`` and
            # ``next_at``, so the numbers hold at ``now`` as they did at ``as_of``; and the
            # difference was taken at ``now``, so moving forward in time must start there (an
            # activity whose kind changed between the two would otherwise move twice).
            _update(delta, {"as_of": now}, boundary),
        )
        if result.matched_count == 0:
            return False
        await self._stored(user_id)
        earlier = boundary is not None
        if delta:
            # Pushed as read back: a write by someone else in between is pushed with it, and
            # the connections keep the highest version they were sent.
            after = await self._coll.find_one({"_id": user_id})
            if after is not None:
                now_stored = _numbers_in(after)
                undone = {t: {n: -v for n, v in d.items()} for t, d in delta.items()}
                await self._push(
                    user_id, added(now_stored, undone), now_stored, int(after["version"])
                )
                earlier = earlier and after.get("next_at") == boundary
        if earlier and boundary is not None:
            await self._schedule(user_id, boundary, earlier_only=True)
        return True

    async def _write(
        self,
        doc: Document,
        delta: Numbers | None = None,
        sets: Document | None = None,
        earliest: datetime | None = None,
    ) -> Document | None:
        """One write of the numbers ``doc`` was read with, only if nobody wrote them since
        (its ``version``): a difference, fields to set, an earlier ``next_at``. The document
        as it is then, or None when another write came first."""
        version = doc.get("version")
        result = await self._coll.update_one(
            {"_id": doc["_id"], "version": version}, _update(delta, sets, earliest)
        )
        if result.matched_count == 0:
            return None
        await self._stored(doc["_id"])
        after = {**doc, **(sets or {}), "version": int(version or 0) + 1}
        after["values"] = added(_numbers_in(after), delta or {})
        if earliest is not None and ("next_at" not in after or earliest < after["next_at"]):
            after["next_at"] = earliest
        return after

    async def _settle_user(self, user_id: str, changes: list[Change], cfg: CounterSettings) -> bool:
        """The careful path: the changes taken at the moment the stored numbers are right
        (``as_of``), then the numbers moved forward in time if a change by time is due; or a
        recount when there is nothing right to start from. False when the numbers kept
        changing (left to the next change)."""
        for _attempt in range(GUARDED_ATTEMPTS):
            doc = await self._coll.find_one({"_id": user_id})
            zone = (await self._zones_of([user_id], fresh=True))[user_id]
            if (
                doc is None
                or doc.get("rules") != cfg.stamp
                or doc.get("zone") != zone.key
                or "next_at" not in doc
            ):
                return await self._recount_user(user_id, cfg, zone=zone)
            as_of: datetime = doc["as_of"]
            before = _numbers_in(doc)
            zone_of = {user_id: zone}.__getitem__
            delta = delta_of(changes, cfg.mode, zone_of, cfg.window, as_of).get(user_id, {})
            bound = boundaries_of(changes, cfg.mode, zone_of, cfg.window, as_of).get(user_id)
            if delta or bound is not None:
                written = await self._write(doc, delta, None, bound)
                if written is None:
                    continue  # written meanwhile: read again
                doc = written
                changes = []  # applied; what follows is time alone
            now = self.clock()
            if doc["next_at"] <= now and as_of < now:
                moved = await self._advance(user_id, doc, cfg, zone, now)
                if moved is None:
                    continue
                doc = moved
            else:
                await self._schedule(user_id, doc["next_at"], earlier_only=True)
            after = _numbers_in(doc)
            await self._push(user_id, before, after, int(doc["version"]))
            return True
        log.warning("CRM counters of user %s kept changing; left to the next change", user_id)
        return False

    async def _deadlines(
        self, user_id: str, cfg: CounterSettings, lo: datetime, hi: datetime
    ) -> list[ActivityFacts]:
        """The user's open, not incoming activities with ``lo < deadline < hi``: one range of
        the counting index per record type (without the type the index cannot be used)."""
        who = counted_field(cfg.mode)
        activities = self._store["crm_activities"]

        async def one_type(record_type: str) -> list[ActivityFacts]:
            found = activities.find(
                {
                    who: user_id,
                    "owner_type": record_type,
                    "completed": False,
                    "incoming": False,
                    "deadline": {"$gt": lo, "$lt": hi},
                }
            )
            return [activity_facts(a) async for a in found]

        parts = await asyncio.gather(*(one_type(t) for t in RECORD_TYPES))
        return [a for part in parts for a in part]

    async def _advance(
        self, user_id: str, doc: Document, cfg: CounterSettings, zone: ZoneInfo, now: datetime
    ) -> Document | None:
        """Move the user's numbers from ``as_of`` to ``now``: only the activities whose
        deadline lies where a kind changed are read. None when written meanwhile."""
        since: datetime = doc["as_of"]
        lo, hi = reading_range(since, now, zone, cfg.window)
        found = await self._deadlines(user_id, cfg, lo, hi)
        delta = time_delta(user_id, found, cfg.mode, zone, cfg.window, since, now)
        wake = next_wake(now, zone, cfg.window, [a.deadline for a in found if a.deadline])
        moved = await self._write(doc, delta, {"as_of": now, "next_at": wake})
        if moved is None:
            return None
        await self._schedule(user_id, wake)
        crossed = sorted(
            {
                a.owner_id
                for a in found
                if classify(a, since, zone, cfg.window) != classify(a, now, zone, cfg.window)
            }
        )
        if crossed:
            for hook in self.on_time_passed:
                try:
                    await hook(crossed)
                except Exception:
                    log.exception("telling the records changed by time failed")
        return moved

    async def _recount_user(
        self,
        user_id: str,
        cfg: CounterSettings,
        expected_version: int | None = None,
        zone: ZoneInfo | None = None,
    ) -> bool:
        """Count the user again from index ranges and store the numbers as the new start.
        With ``expected_version``: only if the stored numbers are still at that version.
        False when another write came first.

        A change written while the count runs may or may not be in it, so when one touching
        the user came in meanwhile (on this node) the user is counted again; the changes
        queued before a count began are in it and are not applied again. Another node's
        change in that moment can still be counted twice: the periodic check mends that.
        ``zone``: the user's, just read by the caller (else read afresh here)."""
        if zone is None:
            zone = (await self._zones_of([user_id], fresh=True))[user_id]
        written_mark: int | None = None  # the sequence the last stored count took in
        for _attempt in range(GUARDED_ATTEMPTS):
            mark = self._seq
            doc = await self._coll.find_one({"_id": user_id})
            version = int((doc or {}).get("version", 0))
            if expected_version is not None and version != expected_version:
                return False
            now = self.clock()
            numbers = await self._count(user_id, cfg, zone, now)
            lo, hi = reading_range(None, now, zone, cfg.window)
            found = await self._deadlines(user_id, cfg, lo, hi)
            wake = next_wake(now, zone, cfg.window, [a.deadline for a in found if a.deadline])
            fields = {
                "values": numbers,
                "as_of": now,
                "next_at": wake,
                "rules": cfg.stamp,
                "zone": zone.key,
            }
            if doc is None:
                try:
                    await self._coll.insert_one({"_id": user_id, **fields, "version": 1})
                except DuplicateKeyError:
                    if expected_version is not None:
                        return False
                    continue
                await self._stored(user_id)
                stored: Document | None = {"version": 1}
            else:
                stored = await self._write(doc, None, fields)
                if stored is None:
                    if expected_version is not None:
                        return False
                    continue
            assert stored is not None
            written_mark = mark
            await self._push(user_id, _numbers_in(doc), numbers, int(stored["version"]))
            await asyncio.sleep(QUIET_SECONDS)
            if self._arrived.get(user_id, 0) > mark:
                expected_version = None  # the numbers are ours now: count them again
                continue
            self._absorbed[user_id] = max(self._absorbed.get(user_id, 0), mark)
            await self._schedule(user_id, wake)
            return True
        # Changes kept coming. The stored count holds every change queued before its mark;
        # those queued later may be in it too, so they are not applied as differences (that
        # counted them twice) but the user is counted again once the flusher comes round.
        log.warning("CRM counters of user %s kept changing during a recount", user_id)
        if written_mark is not None:
            self._absorbed[user_id] = max(self._absorbed.get(user_id, 0), written_mark)
        self._queue(recount=[user_id])
        return False

    async def _stored(self, user_id: str) -> None:
        """The user's numbers were just written: this node's copy goes at once, every other
        node's when this reaches it - before the push of the new numbers, which comes after
        it on the bus, so that no node starts a connection from the old numbers once it has
        passed the push on."""
        self._docs.invalidate(user_id)
        await self._bus.publish_ephemeral(EphemeralEvent(STORED, {"user_id": user_id}))

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type == STORED and isinstance(event.data.get("user_id"), str):
            self._docs.invalidate(event.data["user_id"])

    def forget_all(self) -> None:
        """Copies may be out of date (invalidations were lost while Redis was away)."""
        self._docs.clear()

    async def _push(self, user_id: str, before: Numbers, after: Numbers, version: int) -> None:
        changed = changed_numbers(counts_of(before), counts_of(after))
        if not changed:
            return
        state = VersionedState("crm", version, counts_of(after))
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "counters.changed",
                {"crm": changed},
                (user_stream(user_id),),
                private=state.as_private(),
            )
        )

    # time ------------------------------------------------------------------------------------

    async def _schedule(self, user_id: str, at: datetime, earlier_only: bool = False) -> None:
        """The user's one persisted wake-up, at their next time-driven change."""
        schedule = self._store["schedule"]
        if earlier_only:
            await schedule.update_one(
                {"_id": _job_id(user_id)},
                {
                    "$min": {"due_at": at},
                    "$set": {"task_id": user_id, "kind": "crm-counters"},
                    "$setOnInsert": {"claimed_until": None},
                },
                upsert=True,
            )
        else:
            await schedule.update_one(
                {"_id": _job_id(user_id)},
                {
                    "$set": {
                        "task_id": user_id,
                        "due_at": at,
                        "kind": "crm-counters",
                        "claimed_until": None,
                    }
                },
                upsert=True,
            )
        for wake in self.on_schedule_changed:
            wake(at)

    async def time_reached(self, user_id: str) -> None:
        """The scheduler's call: a deadline passed or a day began for this user."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(advance=[user_id], waiter=waiter)
        await waiter

    async def start_checking(self, every: timedelta) -> None:
        """Keep the periodic check's job in the schedule (one for all nodes: whichever claims
        it runs it), or remove it when ``every`` is zero."""
        self._check_every = every
        schedule = self._store["schedule"]
        if not every:
            await schedule.delete_one({"_id": CHECK_JOB})
            return
        await schedule.update_one(
            {"_id": CHECK_JOB},
            {
                "$setOnInsert": {
                    "kind": CHECK_JOB,
                    "task_id": "",
                    "due_at": self.clock() + every,
                    "claimed_until": None,
                    "after": None,
                }
            },
            upsert=True,
        )

    async def check_some(self, _task_id: str) -> None:
        """The scheduler's call for the periodic check: a few users, then the job is set for
        the next few a moment later, or for the next round once everyone was seen. Short
        steps, since the scheduler runs one job at a time."""
        schedule = self._store["schedule"]
        job = await schedule.find_one({"_id": CHECK_JOB})
        after = (job or {}).get("after")
        drifted, went_to = await self.verify_some(after, CHECK_USERS_AT_ONCE)
        if drifted:
            log.warning("periodic check: %d users' CRM counters had drifted; repaired", drifted)
        every = self._check_every or timedelta(minutes=60)
        due = self.clock() + (CHECK_PAUSE if went_to is not None else every)
        await schedule.update_one(
            {"_id": CHECK_JOB},
            {
                "$set": {
                    "kind": CHECK_JOB,
                    "task_id": "",
                    "due_at": due,
                    "claimed_until": None,
                    "after": went_to,
                }
            },
            upsert=True,
        )
        for wake in self.on_schedule_changed:
            wake(due)

    async def recount_everyone(self) -> None:
        """After the mode or the due window changed: every user's numbers, pushed if changed."""
        ids = [u["_id"] async for u in self._store.users.find({}, {"_id": 1})]
        for start in range(0, len(ids), 100):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue(recount=ids[start : start + 100], waiter=waiter)
            await waiter

    # checking --------------------------------------------------------------------------------

    async def verify_user(self, user_id: str, repair: bool = True) -> tuple[str, Counts]:
        """One user's stored numbers against a recount from index ranges (the periodic check,
        and a user the full check saw change). ``("right", {})``; ``("drifted", the numbers
        that differ)``: they differed for longer than a change takes to be counted, and were
        repaired with ``repair``; ``("busy", {})``: the user changed meanwhile."""
        cfg = await self._settings()
        zone = (await self._zones_of([user_id], fresh=True))[user_id]
        first = await self._coll.find_one({"_id": user_id})
        now = self.clock()
        if not self._current(first, cfg, now):
            if not repair:
                return "busy", {}
            await self._settle_user(user_id, [], cfg)
            first = await self._coll.find_one({"_id": user_id})
            now = self.clock()
            if not self._current(first, cfg, now):
                return "busy", {}
        assert first is not None
        counted = await self._count(user_id, cfg, zone, now)
        stored = _numbers_in(first)
        if counted == stored:
            return "right", {}
        await asyncio.sleep(STABLE_SECONDS)
        version = int(first.get("version", 0))
        again = await self._coll.find_one({"_id": user_id})
        if again is None or int(again.get("version", 0)) != version:
            return "busy", {}
        differences = changed_numbers(counts_of(stored), counts_of(counted))
        if repair:
            log.warning("CRM counters of user %s had drifted; repaired", user_id)
            if not await self._recount_user(user_id, cfg, expected_version=version):
                return "busy", {}
        return "drifted", differences

    async def verify_some(self, after: str | None, limit: int) -> tuple[int, str | None]:
        """The periodic check: verify (and repair) up to ``limit`` users after ``after`` (by
        id). Returns how many had drifted and where to go on from (None: round complete)."""
        query: Document = {} if after is None else {"_id": {"$gt": after}}
        ids = [
            u["_id"]
            async for u in self._store.users.find(query, {"_id": 1}).sort("_id", 1).limit(limit)
        ]
        drifted = 0
        for uid in ids:
            status, _ = await self.verify_user(uid)
            drifted += status == "drifted"
        return drifted, (ids[-1] if len(ids) == limit else None)

    async def check(self, repair: bool = False) -> CheckReport:
        """Recompute every user's counters from the records and activities themselves (not
        from the copies the live path counts with), in one pass over the open activities,
        read a page at a time (``_pages``): no answer has to hold the whole collection.

        Each user's stored numbers are compared at the moment they hold for. A user whose
        numbers were written while the pass ran is compared again on their own
        (``verify_user``), after the copies are right. With ``repair``: stale copies are
        rewritten, and the numbers of each user found to differ are stored and pushed."""
        report = CheckReport()
        cfg = await self._settings()
        now = self.clock()
        users = [u["_id"] async for u in self._store.users.find({}, {"_id": 1})]
        zones = await self._zones_of(users, fresh=True)
        before_pass = {d["_id"]: d async for d in self._coll.find({})}
        # the moment each user's stored numbers hold for, and the due threshold then
        moments: dict[str, datetime] = {}
        thresholds: dict[str, datetime] = {}
        for uid in users:
            doc = before_pass.get(uid)
            moment = now
            if (
                doc is not None
                and doc.get("rules") == cfg.stamp
                and "next_at" in doc
                and not doc["as_of"] <= now < doc["next_at"]
            ):
                moment = doc["as_of"]  # a time-driven change is due and not yet applied
            moments[uid] = moment
            thresholds[uid] = due_threshold(moment, zones[uid], cfg.window)
        records: dict[str, tuple[str, str, bool, int]] = {}
        async for rec in self._store["crm_records"].find(
            {}, {"type": 1, "responsible_id": 1, "open": 1, "open_activities": 1}
        ):
            records[rec["_id"]] = (
                rec["type"],
                rec["responsible_id"],
                bool(rec.get("open")),
                int(rec.get("open_activities", 0)),
            )
        tallies: dict[str, Numbers] = {uid: zero_numbers() for uid in users}
        open_per_record: dict[str, int] = {}
        fixes: list[UpdateOne] = []
        by_item = cfg.mode is CounterMode.ITEM
        # per user, the earliest deadline still to pass and the earliest still to turn due:
        # their next time-driven changes
        next_over: dict[str, datetime] = {}
        next_due: dict[str, datetime] = {}

        def take(act: Document) -> None:
            report.activities_checked += 1
            owner = records.get(act["owner_id"])
            if owner is None:
                return  # an orphan (its record was deleted mid-way): not counted anywhere
            owner_type, owner_responsible = owner[0], owner[1]
            open_per_record[act["owner_id"]] = open_per_record.get(act["owner_id"], 0) + 1
            incoming = waits_for_answer(act["type"], act["direction"], False)
            if (
                act.get("record_responsible_id") != owner_responsible
                or act.get("owner_type") != owner_type
                or bool(act.get("incoming")) != incoming
            ):
                report.stale_activities += 1
                fixes.append(
                    UpdateOne(
                        {"_id": act["_id"]},
                        {
                            "$set": {
                                "record_responsible_id": owner_responsible,
                                "owner_type": owner_type,
                                "incoming": incoming,
                            }
                        },
                    )
                )
            user = owner_responsible if by_item else act["responsible_id"]
            tally = tallies.get(user)
            if tally is None:
                return  # someone no longer among the users
            deadline = _aware(act.get("deadline"))
            kind = kind_of(False, incoming, deadline, moments[user], thresholds[user])
            if kind is Kind.INCOMING:
                tally[owner_type]["incoming"] += 1
            elif kind is Kind.OVERDUE:
                tally[owner_type]["overdue"] += 1
            elif deadline is not None:
                if kind is Kind.DUE:
                    tally[owner_type]["due"] += 1
                if user not in next_over or deadline < next_over[user]:
                    next_over[user] = deadline
                if kind is Kind.FUTURE and (user not in next_due or deadline < next_due[user]):
                    next_due[user] = deadline

        # The open activities, read in pages: one range of the counting index per person
        # whose records' activities it holds (the copy of the record's responsible person)
        # and record type. One read of the whole collection answers only once it has
        # gathered every document, which at a million took longer than the socket timeout;
        # a page takes what one person has. An activity whose copy names nobody read here
        # is found below, through its record's count.
        holders = sorted(set(users) | {rec[1] for rec in records.values()})
        pages = [(uid, t) for uid in holders for t in RECORD_TYPES]
        sizes: dict[tuple[str, str], int] = {}
        for rtype, responsible, _, stored_open in records.values():
            sizes[responsible, rtype] = sizes.get((responsible, rtype), 0) + stored_open
        async with contextlib.aclosing(self._pages(pages, sizes)) as paged:  # its reads end with it
            async for page in paged:
                for act in page:
                    take(act)
        record_fixes: list[UpdateOne] = []
        for rid, (rtype, responsible, is_open, stored_open) in records.items():
            real = open_per_record.get(rid, 0)
            if stored_open != real:
                # Read again on its own: the pages are not one moment, so a change between
                # two of them can look like a wrong count; and an activity whose copy named
                # nobody read above is only found here.
                recheck = await self._recheck_record(rid, set(holders))
                if recheck is None:
                    continue  # deleted meanwhile
                stored_open, missed, real = recheck
                for act in missed:
                    take(act)
                if stored_open == real:
                    continue
                report.stale_records += 1
                record_fixes.append(
                    UpdateOne(
                        {"_id": rid, "open_activities": stored_open},
                        {"$set": {"open_activities": real}},
                    )
                )
            if is_open and real == 0 and responsible in tallies:
                tallies[responsible][rtype]["idle"] += 1
        report.users_checked = len(users)
        after_pass = {d["_id"]: d async for d in self._coll.find({})}
        suspects: list[str] = []
        restamp: list[str] = []  # right numbers, stored under other rules
        for uid in users:
            doc, first = after_pass.get(uid), before_pass.get(uid)
            stored = _numbers_in(doc)
            if tallies[uid] == stored:
                if doc is not None and doc.get("rules") != cfg.stamp:
                    restamp.append(uid)
                continue
            if (doc or {}).get("version") != (first or {}).get("version"):
                suspects.append(uid)  # written while we read: compared again below
                continue
            report.counter_differences[uid] = changed_numbers(
                counts_of(stored), counts_of(tallies[uid])
            )
        if repair:
            if fixes:
                await self._store["crm_activities"].bulk_write(fixes, ordered=False)
            if record_fixes:
                await self._store["crm_records"].bulk_write(record_fixes, ordered=False)
        for uid in suspects:
            status, differences = await self.verify_user(uid, repair=repair)
            if status == "busy":
                report.users_busy += 1
            elif status == "drifted":
                report.counter_differences[uid] = differences
        if repair:
            for uid in [*report.counter_differences, *restamp]:
                if uid in suspects:
                    continue  # verify_user repaired them
                firsts = [d for d in (next_over.get(uid), next_due.get(uid)) if d is not None]
                wake = next_wake(moments[uid], zones[uid], cfg.window, firsts)
                if not await self._store_counted(
                    uid, cfg, zones[uid], tallies[uid], moments[uid], wake, after_pass.get(uid)
                ):
                    await self._recount_user(uid, cfg)
            report.repaired = True
        return report

    async def _pages(
        self, pages: list[tuple[str, str]], sizes: Mapping[tuple[str, str], int]
    ) -> AsyncGenerator[list[Document]]:
        """The open activities of each (holder, record type): one range of ``count_item``
        each, ``CHECK_PAGES_AHEAD`` of them asked for while the caller counts the one before
        (the database reads its index while this process counts), as long as the pages in
        flight are expected (``sizes``: their records' stored counts) to hold at most
        ``CHECK_AHEAD_ACTIVITIES``: the database holds each whole until it is sent, and one
        person can hold most of the activities. One page is always asked for."""
        ahead: deque[tuple[int, asyncio.Task[list[Document]]]] = deque()
        held = 0  # activities the pages in flight are expected to hold
        following = 0  # the next page to ask for

        def ask() -> None:
            nonlocal held, following
            while following < len(pages) and len(ahead) < CHECK_PAGES_AHEAD:
                size = sizes.get(pages[following], 0)
                if ahead and held + size > CHECK_AHEAD_ACTIVITIES:
                    return
                ahead.append((size, asyncio.create_task(self._read_page(*pages[following]))))
                held += size
                following += 1

        try:
            ask()
            while ahead:
                size, task = ahead.popleft()
                page = await task
                held -= size
                ask()
                yield page
        finally:
            for _, task in ahead:
                await stop(task)

    async def _read_page(self, holder: str, record_type: str) -> list[Document]:
        """One page of ``_pages``."""
        found = (
            self._store["crm_activities"]
            .with_options(codec_options=CHECK_CODEC)
            .find(
                {"record_responsible_id": holder, "owner_type": record_type, "completed": False},
                batch_size=CHECK_PAGE_BATCH,
            )
        )
        return [act async for act in found]

    async def _recheck_record(
        self, record_id: str, holders: set[str]
    ) -> tuple[int, list[Document], int] | None:
        """A record whose open count differed from the activities the pages found: its stored
        count, its open activities the pages could not have read (their copy names nobody
        read), and how many open activities it really has; None when it is gone."""
        record = await self._store["crm_records"].find_one(
            {"_id": record_id}, {"open_activities": 1}
        )
        if record is None:
            return None
        acts = [
            act
            async for act in self._store["crm_activities"].find(
                {"owner_id": record_id, "completed": False}
            )
        ]
        missed = [
            act
            for act in acts
            if act.get("record_responsible_id") not in holders
            or act.get("owner_type") not in RECORD_TYPES
        ]
        return int(record.get("open_activities", 0)), missed, len(acts)

    async def _store_counted(
        self,
        user_id: str,
        cfg: CounterSettings,
        zone: ZoneInfo,
        numbers: Numbers,
        moment: datetime,
        wake: datetime,
        doc: Document | None,
    ) -> bool:
        """Store numbers the check counted for ``moment``, unless the user's numbers were
        written since the check read them (``doc``)."""
        fields = {
            "values": numbers,
            "as_of": moment,
            "next_at": wake,
            "rules": cfg.stamp,
            "zone": zone.key,
        }
        if doc is None:
            try:
                await self._coll.insert_one({"_id": user_id, **fields, "version": 1})
            except DuplicateKeyError:
                return False
            await self._stored(user_id)
            version = 1
        else:
            stored = await self._write(doc, None, fields)
            if stored is None:
                return False
            version = int(stored["version"])
        await self._schedule(user_id, wake)
        await self._push(user_id, _numbers_in(doc), numbers, version)
        return True
