"""The CRM part's data set, written straight into the hub's database with PyMongo.

A million activities through the REST API would take hours, so deals and activities are
inserted in batches, in exactly the shapes the hub writes: the same fields as
``RecordService.create`` (a deal) and ``ActivityService.add``, with the hub's own helpers for
what is derived (``derived_title``, ``search_keys``, ``record_is_open``, ``is_incoming``).
Each deal's ``open_activities`` is the number of its open activities, as the hub keeps it.
What the hub writes besides (history entries, stream events) is not counted and not written.

The set grows: each call of ``Seeder.grow`` adds deals and activities, so one hub serves all
sizes. Deadlines are spread from 30 days ago to 60 days ahead but none falls in a gap around
the start of the run (``GAP_BEFORE`` .. ``GAP_AFTER``): a deadline passing during the run
would make the hub push a time-driven change, and ``counters check`` - which reads the stored
numbers after its minute-long scan - would race with it. The users' time zone is chosen so
that no local midnight falls in the run either (``midday_zone``).

The client has ``retryWrites`` off: the embedded database keeps a record of every retryable
write for 30 minutes and walks them all on every write (see ``bench/dbceiling.py``), so
seeding with it on would slow down the hub's own writes during the measurement.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import MongoClient

from server.crm.activities import is_incoming
from server.crm.records import derived_title, search_keys
from server.crm.rules import DEFAULT_DEAL_STAGES, Stage, StageSemantics, record_is_open
from server.store.database import new_id

Document = dict[str, Any]

DATABASE = "portalhub"
BATCH = 5000
GAP_BEFORE = timedelta(hours=1)
GAP_AFTER = timedelta(hours=8)
PAST = timedelta(days=30)
AHEAD = timedelta(days=60)
# shares: deals won or lost, open deals left without open activity (idle), open activities
# that are incoming (calls and e-mails waiting for an answer), open activities without
# deadline, activities assigned to someone else than the deal's responsible person, and
# completed activities added on top of the open ones
CLOSED_DEALS = 0.10
IDLE_DEALS = 0.03
INCOMING = 0.15
NO_DEADLINE = 0.10
INCOMING_NO_DEADLINE = 0.50
OTHER_RESPONSIBLE = 0.10
COMPLETED_SHARE = 0.05

OPEN_STAGES = [s for s in DEFAULT_DEAL_STAGES if s.semantics is StageSemantics.PROCESS]
CLOSED_STAGES = [s for s in DEFAULT_DEAL_STAGES if s.semantics is not StageSemantics.PROCESS]
OUTGOING_TYPES = ("call", "meeting", "email", "task")
OUTGOING_WEIGHTS = (0.3, 0.25, 0.2, 0.25)


def midday_zone(now: datetime) -> str:
    """An IANA zone (``Etc/GMT...``) where it is about noon at ``now``: local midnight is then
    at least 11 hours away, in both directions."""
    hours = now.astimezone(UTC).hour + now.astimezone(UTC).minute / 60
    offset = round(12 - hours)
    if offset > 14:
        offset -= 24
    if offset < -12:
        offset += 24
    if offset == 0:
        return "Etc/GMT"
    # the Etc zones are named the POSIX way: Etc/GMT-3 is three hours ahead of UTC
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


def _ms(moment: datetime) -> datetime:
    """To the millisecond, as BSON stores it (and as the hub's ``utcnow``)."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def deal_document(
    responsible_id: str, title: str, stage: Stage, amount: float | None, now: datetime
) -> Document:
    """A deal as ``RecordService.create`` writes one (no company, no contacts)."""
    doc: Document = {
        "_id": new_id(),
        "type": "deal",
        "responsible_id": responsible_id,
        "emails": [],
        "phones": [],
        "source": "",
        "comments": "",
        "custom_fields": {},
        "created_by": responsible_id,
        "created_at": now,
        "modified_by": responsible_id,
        "modified_at": now,
        "open_activities": 0,
        "title": title,
        "stage_id": stage.id,
        "amount": amount,
        "currency": "USD",
        "company_id": None,
        "contact_ids": [],
        "stage_semantics": stage.semantics.value,
    }
    doc["title"] = derived_title(doc)
    doc["open"] = record_is_open("deal", None, stage.semantics)
    doc.update(search_keys(doc))
    return doc


def activity_document(
    deal: Document,
    *,
    responsible_id: str,
    type_: str,
    direction: str,
    subject: str,
    deadline: datetime | None,
    completed: bool,
    missed: bool,
    now: datetime,
) -> Document:
    """An activity as ``ActivityService.add`` writes one."""
    act: Document = {
        "_id": new_id(),
        "owner_type": deal["type"],
        "owner_id": deal["_id"],
        "record_responsible_id": deal["responsible_id"],
        "responsible_id": responsible_id,
        "type": type_,
        "direction": direction,
        "missed": missed,
        "subject": subject,
        "description": "",
        "deadline": deadline,
        "completed": completed,
        "completed_at": now if completed else None,
        "created_by": responsible_id,
        "created_at": now,
        "modified_at": now,
    }
    act["incoming"] = is_incoming(act)
    return act


@dataclass
class Grown:
    """What one ``Seeder.grow`` inserted, and how long it took."""

    deals: int
    open_activities: int
    completed_activities: int
    seconds: float

    @property
    def documents_per_second(self) -> float:
        docs = self.deals + self.open_activities + self.completed_activities
        return docs / self.seconds if self.seconds else 0.0


@dataclass
class Seeder:
    """Deals of ``user_ids`` and their activities, grown in steps; keeps what the counters of
    each user must show for the parts that do not depend on time (incoming, idle deals)."""

    db_url: str
    user_ids: list[str]
    started: datetime  # the run's start: the deadline gap is around it
    seed: int = 20261123
    deals_of: dict[str, list[str]] = field(default_factory=dict)
    busy_of: dict[str, list[str]] = field(default_factory=dict)  # open deals with activities
    incoming_of: dict[str, int] = field(default_factory=dict)  # open, by deal's responsible
    idle_of: dict[str, int] = field(default_factory=dict)  # open deals, no open activity
    deals: int = 0
    open_activities: int = 0
    completed_activities: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for uid in self.user_ids:
            self.deals_of.setdefault(uid, [])
            self.busy_of.setdefault(uid, [])
            self.incoming_of.setdefault(uid, 0)
            self.idle_of.setdefault(uid, 0)

    def _deadline(self) -> datetime:
        """Uniform over [started - PAST, started + AHEAD] minus the gap around ``started``."""
        gap = GAP_BEFORE + GAP_AFTER
        span = (PAST + AHEAD - gap).total_seconds()
        offset = timedelta(seconds=self.rng.uniform(0, span)) - PAST
        if offset >= -GAP_BEFORE:
            offset += gap
        return _ms(self.started + offset)

    def _open_activity(self, deal: Document, now: datetime) -> Document:
        rng = self.rng
        responsible = deal["responsible_id"]
        if rng.random() < OTHER_RESPONSIBLE:
            responsible = rng.choice(self.user_ids)
        if rng.random() < INCOMING:
            type_ = "call" if rng.random() < 0.6 else "email"
            deadline = None if rng.random() < INCOMING_NO_DEADLINE else self._deadline()
            return activity_document(
                deal,
                responsible_id=responsible,
                type_=type_,
                direction="incoming",
                subject=f"incoming {type_}",
                deadline=deadline,
                completed=False,
                missed=type_ == "call" and rng.random() < 0.3,
                now=now,
            )
        type_ = rng.choices(OUTGOING_TYPES, OUTGOING_WEIGHTS)[0]
        return activity_document(
            deal,
            responsible_id=responsible,
            type_=type_,
            direction="outgoing",
            subject=f"planned {type_}",
            deadline=None if rng.random() < NO_DEADLINE else self._deadline(),
            completed=False,
            missed=False,
            now=now,
        )

    def _completed_activity(self, deal: Document, now: datetime) -> Document:
        rng = self.rng
        incoming = rng.random() < 0.3
        type_ = rng.choice(("call", "email")) if incoming else rng.choice(OUTGOING_TYPES)
        return activity_document(
            deal,
            responsible_id=deal["responsible_id"],
            type_=type_,
            direction="incoming" if incoming else "outgoing",
            subject=f"done {type_}",
            deadline=self._deadline() if rng.random() < 0.5 else None,
            completed=True,
            missed=False,
            now=now,
        )

    def _batches(self, docs: Iterator[Document]) -> Iterator[list[Document]]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def grow(self, open_activities: int, deals: int) -> Grown:
        """Add ``deals`` deals (spread round-robin over the users) and ``open_activities`` open
        activities on them (uniformly over the deals that are open and not left idle), plus
        ``COMPLETED_SHARE`` as many completed ones on any of the new deals."""
        rng = self.rng
        now = _ms(datetime.now(UTC))
        new_deals: list[Document] = []
        busy: list[int] = []
        for k in range(deals):
            owner = self.user_ids[(self.deals + k) % len(self.user_ids)]
            closed = rng.random() < CLOSED_DEALS
            stage = rng.choice(CLOSED_STAGES if closed else OPEN_STAGES)
            amount = round(rng.uniform(100, 100_000), 2) if rng.random() < 0.8 else None
            deal = deal_document(owner, f"Bench deal {self.deals + k}", stage, amount, now)
            new_deals.append(deal)
            if deal["open"] and rng.random() >= IDLE_DEALS:
                busy.append(k)
        if not busy:
            raise ValueError("no deal to put activities on")
        counts = [0] * deals
        for _ in range(open_activities):
            counts[busy[rng.randrange(len(busy))]] += 1
        completed = [0] * deals
        for _ in range(round(open_activities * COMPLETED_SHARE)):
            completed[rng.randrange(deals)] += 1
        for deal, n in zip(new_deals, counts, strict=True):
            deal["open_activities"] = n
            owner = deal["responsible_id"]
            self.deals_of[owner].append(deal["_id"])
            if deal["open"] and n == 0:
                self.idle_of[owner] += 1
            elif deal["open"]:
                self.busy_of[owner].append(deal["_id"])

        def activities() -> Iterator[Document]:
            for deal, n_open, n_done in zip(new_deals, counts, completed, strict=True):
                for _ in range(n_open):
                    act = self._open_activity(deal, now)
                    if act["incoming"]:
                        self.incoming_of[deal["responsible_id"]] += 1
                    yield act
                for _ in range(n_done):
                    yield self._completed_activity(deal, now)

        started = time.monotonic()
        client: MongoClient[Document] = MongoClient(
            self.db_url,
            retryWrites=False,
            tz_aware=True,
        )
        try:
            db = client[DATABASE]
            for batch in self._batches(iter(new_deals)):
                db["crm_records"].insert_many(batch, ordered=False)
            for batch in self._batches(activities()):
                db["crm_activities"].insert_many(batch, ordered=False)
        finally:
            client.close()
        n_completed = sum(completed)
        self.deals += deals
        self.open_activities += open_activities
        self.completed_activities += n_completed
        return Grown(deals, open_activities, n_completed, time.monotonic() - started)

    def open_incoming(self, user_id: str, limit: int) -> list[str]:
        """Ids of open incoming activities on ``user_id``'s deals (to be completed)."""
        client: MongoClient[Document] = MongoClient(self.db_url, retryWrites=False)
        try:
            found = client[DATABASE]["crm_activities"].find(
                {
                    "record_responsible_id": user_id,
                    "owner_type": "deal",
                    "completed": False,
                    "incoming": True,
                },
                {"_id": 1},
                limit=limit,
            )
            return [str(doc["_id"]) for doc in found]
        finally:
            client.close()
