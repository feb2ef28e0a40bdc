"""Streams: append-only logs with a gap-free, increasing ``seq``, persisted in MongoDB.

Gap-freeness holds by construction: a ``seq`` exists only once an event document carrying it
was inserted under the unique ``(stream, seq)`` index, and the next one is always ``last + 1``.
A writer that loses a race (another node took the number) re-reads the head and retries.

Appends are group-committed: one writer per node takes whatever is queued, across all
streams, and stores it with one ordered ``insert_many`` (up to ``MAX_BATCH`` events), while the
next appends queue up behind it. A burst therefore costs a round trip per batch, not per event
nor per stream.

Heads are known in memory: from this node's own appends and from every event it sees on the
bus (other nodes' included). The ``streams`` document's ``head`` is a hint, raised after the
events are published and off the caller's path; it can lag (a raise still on its way, or lost
with a node or the database), which the writer repairs when it loses a race, and readers that
need the exact head (``last_seq``, ``replay``, ``heads``) complete from the events themselves.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from bson import ObjectId
from pymongo import DESCENDING, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from server.background import raise_if_stopping, stop
from server.caching import BatchLoad, Cache
from server.events.bus import EventBus
from server.events.models import Event
from server.store.database import Store, utcnow

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
MAX_BATCH = 500
MAX_RACE_RETRIES = 50
MAX_KNOWN_HEADS = 200_000  # streams whose head is kept in memory; the least recent go first
# Heads raised less long ago than this may not be in the head documents yet (a raise still
# queued, or lost with the node that stored the events): exact reads look at recent events.
HEAD_LAG_WINDOW = timedelta(seconds=60)
# At most one write of the head documents per this while: under load a stream's head is
# raised once per interval for all its events since the last one, not once per batch. The
# same second as the messenger's bookkeeping (``BOOKKEEPING_INTERVAL``): head documents are
# hints, far inside ``HEAD_LAG_WINDOW``.
HEAD_RAISE_INTERVAL = 1.0
# A head raise due while the writer is idle goes at once if a batch was published this
# recently (it is then in the gap after that batch), else right after the next one.
JUST_ANSWERED = 0.005
# Head documents read for connects' snapshots are kept this long (``heads_of``): a chat nobody
# has written in yet has no head in memory, and each connect of each of its members read it.
HINT_TTL_SECONDS = 10.0
MAX_HINTS = 100_000


# Ranges of events by the time they were stored go through the ``_id`` index, named: the
# embedded database reads a range of ``_id`` through its index only when told to (a scan of
# every event without it).
BY_ID = "_id_"


def stored_since(moment: datetime) -> dict[str, Any]:
    """The events stored at ``moment`` or later (and in the second before it): their ``_id``s
    are ObjectIds the driver mints as they are inserted, time first, on the clock that gives
    their ``ts``. Read with ``hint=BY_ID``."""
    return {"_id": {"$gte": ObjectId.from_datetime(moment)}}


def stored_before(moment: datetime) -> dict[str, Any]:
    """The events stored before ``moment`` (but for those of its last second); ``hint=BY_ID``."""
    return {"_id": {"$lt": ObjectId.from_datetime(moment)}}


async def _back_off(attempt: int) -> None:
    """After a lost race, wait a random while, so that two writers do not keep colliding."""
    await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))


def user_stream(user_id: str) -> str:
    """The personal stream of a user (also the name of the user's private room)."""
    return f"user:{user_id}"


@dataclass(frozen=True, slots=True)
class Append:
    """One event to store. ``request_id``: the request it is for, when the caller is not
    running in that request's context (a group-committing writer); for tracing only."""

    stream: str
    type: str
    data: dict[str, Any]
    request_id: str | None = None


class _PartialWrite(Exception):
    """A batch failed after some of its events were stored; those must still be published."""

    def __init__(self, written: list[Event], cause: Exception) -> None:
        super().__init__(str(cause))
        self.written = written
        self.cause = cause


@dataclass(slots=True)
class _Pending:
    item: Append
    future: asyncio.Future[Event]


PositionStatus = Literal["ok", "resync"]


class StreamLog:
    """Appends to and reads from streams; publishes each stored event on the bus, in order."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        retention_seconds: int,
        replay_limit: int = 5000,
        hint_ttl_seconds: float = HINT_TTL_SECONDS,
    ) -> None:
        self._store = store
        self._bus = bus
        self.retention = timedelta(seconds=retention_seconds)
        self.replay_limit = replay_limit
        self._queue: deque[_Pending] = deque()
        self._writer: asyncio.Task[None] | None = None
        # The exact head of each stream known here (never ahead of what is stored).
        self._heads: OrderedDict[str, int] = OrderedDict()
        self._inflight: dict[str, int] = {}
        self._published: dict[str, int] = {}
        self._progress = asyncio.Condition()
        self._head_raises: dict[str, int] = {}
        self._head_writer: asyncio.Task[None] | None = None
        self._last_raise = -HEAD_RAISE_INTERVAL  # loop time of the last raise's start
        self._recent: tuple[float, dict[str, int]] | None = None
        # What ``heads_of`` read of head documents, for streams with no head in memory; a head
        # learned meanwhile (an append here, an event seen) takes precedence.
        self._hints: Cache[str, int] = Cache(MAX_HINTS, hint_ttl_seconds)
        # The head documents that the connects of one moment ask for, read together.
        self._hint_reads: BatchLoad[str, int] = BatchLoad(self._head_hints)
        self._batch_waiters: list[asyncio.Future[None]] = []
        self._answered_at = -1.0  # loop time the last batch was answered
        self._closed = False
        bus.subscribe(self._observe)

    # appending ---------------------------------------------------------------------------------

    async def append(self, stream: str, type_: str, data: dict[str, Any]) -> Event:
        """Store an event at the end of ``stream``; returns once it is stored and published."""
        [future] = self.enqueue([Append(stream, type_, data)])
        return await asyncio.shield(future)

    async def append_many(self, items: Sequence[Append]) -> list[Event]:
        """Store several events (any streams), in this order; one round trip when the writer is
        free. Raises the first failure; what was stored before it is stored and published."""
        futures = self.enqueue(items)
        return [await asyncio.shield(future) for future in futures]

    def enqueue(self, items: Sequence[Append]) -> list[asyncio.Future[Event]]:
        """Queue events for the next batch, without waiting: each future resolves once its
        event is stored and published (or fails). Events are stored in the order queued, so
        per stream their ``seq`` follow that order."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Event]] = []
        for item in items:
            future: asyncio.Future[Event] = loop.create_future()
            self._queue.append(_Pending(item, future))
            futures.append(future)
        if self._writer is None and self._queue:
            self._writer = asyncio.create_task(self._run(), name="stream-writer")
        return futures

    @property
    def pending_appends(self) -> int:
        """Appends waiting for the next batch (the one in flight not counted)."""
        return len(self._queue)

    async def _run(self) -> None:
        queue = self._queue
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
                failure: Exception | None = None
                try:
                    events = await self._write(batch)
                except _PartialWrite as partial:
                    events, failure = partial.written, partial.cause
                # What was stored is published, in order, even when the rest of the batch failed.
                try:
                    for event in events:
                        try:
                            await self._bus.publish(event)
                        except Exception:
                            # Stored is stored: its callers are answered; readers find it.
                            log.exception("publishing %s#%s failed", event.stream, event.seq)
                        self._published[event.stream] = event.seq
                finally:
                    for pending in batch:
                        self._inflight.pop(pending.item.stream, None)
                        self._published.pop(pending.item.stream, None)
                    async with self._progress:
                        self._progress.notify_all()
                for pending, event in zip(batch, events, strict=False):
                    if not pending.future.done():
                        pending.future.set_result(event)
                self._batch_answered()
                if failure is not None:
                    log.warning("append of %s events failed: %s", len(batch) - len(events), failure)
                    for pending in batch[len(events) :]:
                        self._forget(pending.item.stream)
                        if not pending.future.done():
                            pending.future.set_exception(failure)
        except asyncio.CancelledError:
            for pending in queue:
                pending.future.cancel()
            queue.clear()
            raise
        finally:
            self._inflight.clear()
            self._published.clear()
            self._writer = None
            if queue and not self._closed:  # queued after the loop's last look
                self._writer = asyncio.create_task(self._run(), name="stream-writer")

    async def _write(self, batch: list[_Pending]) -> list[Event]:
        """Insert the batch at the heads of its streams, retrying where another writer won."""
        written: list[Event] = []
        remaining = batch
        stale: set[str] = set()  # streams whose head another writer moved: read it exactly
        try:
            for attempt in range(MAX_RACE_RETRIES):
                heads = await self._heads_for_writing({p.item.stream for p in remaining}, stale)
                now = utcnow()
                events: list[Event] = []
                for pending in remaining:
                    stream = pending.item.stream
                    heads[stream] += 1
                    events.append(
                        Event(stream, heads[stream], pending.item.type, pending.item.data, now)
                    )
                # Readers may see these documents before they are published: they wait for it.
                self._inflight.update(heads)
                docs = [
                    {"stream": e.stream, "seq": e.seq, "type": e.type, "data": e.data, "ts": e.ts}
                    for e in events
                ]
                try:
                    await self._store.events.insert_many(docs, ordered=True)
                except BulkWriteError as exc:
                    inserted = int(exc.details.get("nInserted", 0))
                    errors = exc.details.get("writeErrors", [])
                    self._learn(events[:inserted])
                    written.extend(events[:inserted])
                    remaining = remaining[inserted:]
                    if not errors or errors[0].get("code") != DUPLICATE_KEY:
                        raise
                    lost = events[inserted].stream
                    self._forget(lost)
                    stale.add(lost)
                    await _back_off(attempt)
                    continue
                except DuplicateKeyError:
                    lost = events[0].stream
                    self._forget(lost)
                    stale.add(lost)
                    await _back_off(attempt)
                    continue
                self._learn(events)
                written.extend(events)
                return written
            raise RuntimeError(f"could not append: lost {MAX_RACE_RETRIES} races")
        except Exception as exc:
            raise _PartialWrite(written, exc) from exc

    async def _heads_for_writing(self, streams: set[str], stale: set[str]) -> dict[str, int]:
        heads: dict[str, int] = {}
        missing: list[str] = []
        for stream in streams:
            known = self._heads.get(stream)
            if known is None:
                missing.append(stream)
            else:
                heads[stream] = known
        if missing:
            # The head documents may lag; a stream whose document lags makes this writer lose
            # one race, after which it is read exactly.
            hints = await self._head_hints(missing)
            for stream in missing:
                if stream in stale:
                    heads[stream] = await self._exact_head(stream, hints.get(stream, 0))
                    self._learn_head(stream, heads[stream])
                else:
                    heads[stream] = hints.get(stream, 0)
        return heads

    def _learn(self, events: Sequence[Event]) -> None:
        for event in events:
            self._learn_head(event.stream, event.seq)
            if event.seq > self._head_raises.get(event.stream, 0):
                self._head_raises[event.stream] = event.seq
        if self._head_raises and self._head_writer is None and not self._closed:
            self._head_writer = asyncio.create_task(self._raise_heads(), name="stream-heads")

    def _learn_head(self, stream: str, seq: int) -> None:
        if seq > self._heads.get(stream, -1):
            self._heads[stream] = seq
            if self._hints:
                self._hints.invalidate(stream)  # superseded (and not to outlive the head)
        self._heads.move_to_end(stream)
        while len(self._heads) > MAX_KNOWN_HEADS:
            self._heads.popitem(last=False)

    def _forget(self, stream: str) -> None:
        self._heads.pop(stream, None)

    async def _observe(self, event: Event) -> None:
        """Every event published on this node (its own, other nodes' through the bus)."""
        self._learn_head(event.stream, event.seq)

    async def _raise_heads(self) -> None:
        """Write the raised heads into the head documents, coalesced (at most one write per
        ``HEAD_RAISE_INTERVAL``), off the appenders' path.

        Unjournaled: a lost raise leaves a head document behind, which is repaired (a writer
        loses a race and reads the head exactly; exact readers look at recent events)."""
        try:
            loop = asyncio.get_running_loop()
            while self._head_raises:
                wait = self._last_raise + HEAD_RAISE_INTERVAL - loop.time()
                if wait > 0 and not self._closed:
                    await asyncio.sleep(wait)  # what is appended meanwhile joins this write
                if not self._closed:
                    # Right after a batch, in the gap before the next one at a light rate,
                    # not across an append's insert (which it would delay).
                    await self.after_batch(HEAD_RAISE_INTERVAL)
                self._last_raise = loop.time()
                raises, self._head_raises = self._head_raises, {}
                try:
                    await self._store_heads(raises)
                except Exception:
                    raise_if_stopping()
                    log.warning("raising %s stream heads failed; retrying", len(raises))
                    for stream, seq in raises.items():
                        if seq > self._head_raises.get(stream, 0):
                            self._head_raises[stream] = seq
                    await asyncio.sleep(1.0)
        finally:
            self._head_writer = None

    async def _store_heads(self, raises: dict[str, int]) -> None:
        heads = self._store.relaxed("streams")
        ops = [
            UpdateOne({"_id": stream}, {"$max": {"head": seq}}, upsert=True)
            for stream, seq in raises.items()
        ]
        for _ in range(3):  # two first upserts may race on the _id; the loser just updates
            try:
                await heads.bulk_write(ops, ordered=False)
                return
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
                ops = [ops[int(e["index"])] for e in errors]

    async def after_batch(self, at_most: float) -> None:
        """Return once the batch being written is published (or the next one, when none is),
        or after ``at_most`` seconds, whichever comes first.
        Right after a batch (this turn of the loop, or a moment ago) it returns at once.
        The head raises wait for it, and so do the node's pollers (``background.Gap``)."""
        loop = asyncio.get_running_loop()
        if self._writer is None and loop.time() - self._answered_at < JUST_ANSWERED:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), at_most)
        except TimeoutError:
            pass
        finally:
            if waiter in self._batch_waiters:
                self._batch_waiters.remove(waiter)

    def _batch_answered(self) -> None:
        self._answered_at = asyncio.get_running_loop().time()
        waiters, self._batch_waiters = self._batch_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def settled(self) -> None:
        """Wait until what was appended so far is stored and its heads are written."""
        while self._writer is not None or self._head_writer is not None:
            await asyncio.gather(
                *(t for t in (self._writer, self._head_writer) if t is not None),
                return_exceptions=True,
            )

    # heads -------------------------------------------------------------------------------------

    def published(self, stream: str, seq: int) -> bool:
        """Whether every event up to ``seq`` that this node stored has been published."""
        inflight = self._inflight.get(stream)
        return inflight is None or self._published.get(stream, 0) >= min(seq, inflight)

    async def wait_published(self, stream: str, seq: int) -> None:
        """Return once every event up to ``seq`` that this node stored has been published.

        A reader that found an event in the database before its publication must not treat
        the later live delivery as new: the hub waits here before switching a client to live.
        """
        if not self.published(stream, seq):
            async with self._progress:
                await self._progress.wait_for(lambda: self.published(stream, seq))

    def known_head(self, stream: str) -> int | None:
        """The head as this node knows it for sure (its own appends, events it has seen), or
        None. Every event up to it is published on this node or on its way to its subscribers."""
        return self._heads.get(stream)

    async def last_seq(self, stream: str, *, exact: bool = False) -> int:
        """The highest ``seq`` ever given in ``stream`` (0 for a new stream).

        Known in memory for the streams this node writes or sees; otherwise the head document
        (one lookup by key), completed by the events stored after what it says (an indexed
        range: the document lags only by raises not written yet). ``exact`` ignores memory.
        """
        if not exact:
            known = self._heads.get(stream)
            if known is not None:
                return known
        doc = await self._store.streams.find_one({"_id": stream})
        hint = max(int(doc.get("head", 0)), int(doc.get("trimmed_to", 0))) if doc else 0
        head = await self._exact_head(stream, hint)
        if doc is None or head > int(doc.get("head", 0)):
            await self._raise_head(stream, head)
        self._learn_head(stream, head)
        return head

    async def _exact_head(self, stream: str, at_least: int) -> int:
        newest = await self._store.events.find_one(
            {"stream": stream, "seq": {"$gt": at_least}},
            sort=[("seq", DESCENDING)],
            projection={"seq": True},
        )
        return int(newest["seq"]) if newest else at_least

    async def _raise_head(self, stream: str, seq: int) -> None:
        for _ in range(2):  # two first upserts may race on the _id; the loser just updates
            try:
                await self._store.streams.update_one(
                    {"_id": stream}, {"$max": {"head": seq}}, upsert=True
                )
                return
            except DuplicateKeyError:
                continue

    async def _head_hints(self, streams: Sequence[str]) -> dict[str, int]:
        return {
            doc["_id"]: max(int(doc.get("head", 0)), int(doc.get("trimmed_to", 0)))
            async for doc in self._store.streams.find(
                {"_id": {"$in": list(streams)}}, projection={"head": True, "trimmed_to": True}
            )
        }

    async def heads_of(self, streams: Sequence[str]) -> dict[str, int]:
        """The head of each stream: from memory, and the rest in one query of their head
        documents (which may lag by what is being written: a client told such a head gets
        the later events live, or replayed on its next connect).

        What the head documents said is kept a while (``hint_ttl_seconds``) for the next
        connect: a stream nobody wrote in yet (a new chat) has no head in memory, and every
        connect of every member read it again. Kept hints lag no more than read ones: an
        event appended here or seen on the bus puts the stream's head in memory, which comes
        first; the rest is what a read could lag by anyway (a head document is raised after
        its events are published)."""
        found: dict[str, int] = {}
        missing: list[str] = []
        for stream in streams:
            head = self._heads.get(stream)
            if head is None:
                head = self._hints.get(stream)
            if head is None:
                missing.append(stream)
            else:
                found[stream] = head
        if missing:
            hints = await self._hint_reads.load_many(missing)
            for stream in missing:
                found[stream] = hints.get(stream, 0)
                self._hints.put(stream, found[stream])
        return found

    def forget_hints(self) -> None:
        """Drop the kept head documents (after a Redis outage, with the other caches)."""
        self._hints.clear()

    async def heads(self, streams: Sequence[str]) -> dict[str, int]:
        """The exact head of each stream that has one (for the bus's recovery): the head
        documents, completed by the events stored recently, whose heads may not be in them
        yet (a raise lost with a node that died). Two queries, whatever the number of streams."""
        found = await self._head_hints(streams)
        recent = await self._recent_heads()
        for stream in streams:
            if recent.get(stream, 0) > found.get(stream, 0):
                found[stream] = recent[stream]
        return found

    async def _recent_heads(self) -> dict[str, int]:
        """The newest seq of each stream written in the last ``HEAD_LAG_WINDOW`` (one range of
        the ``_id`` index), reused for a second: a recovery asks for its streams in batches."""
        now = asyncio.get_running_loop().time()
        if self._recent is not None and now - self._recent[0] < 1.0:
            return self._recent[1]
        heads: dict[str, int] = {}
        async for doc in self._store.events.find(
            stored_since(utcnow() - HEAD_LAG_WINDOW),
            projection={"stream": True, "seq": True, "_id": False},
            hint=BY_ID,
        ):
            stream, seq = doc["stream"], int(doc["seq"])
            if seq > heads.get(stream, 0):
                heads[stream] = seq
        self._recent = (now, heads)
        return heads

    # reading -----------------------------------------------------------------------------------

    async def position_status(self, stream: str, after_seq: int) -> PositionStatus:
        """Whether a client at ``after_seq`` can be brought up to date from history."""
        if after_seq < 0:
            return "resync"
        head = await self._store.streams.find_one({"_id": stream}, projection={"trimmed_to": True})
        if head is not None and after_seq < int(head.get("trimmed_to", 0)):
            return "resync"
        if after_seq > await self.last_seq(stream):
            return "resync"
        return "ok"

    async def replay(self, stream: str, after_seq: int) -> list[Event] | None:
        """What a client at ``after_seq`` missed, in order; None when it must resync (a
        position before the cut, beyond the head, or further back than ``replay_limit``).

        A client at the head this node knows costs no query: whatever comes after it is not
        published here yet, so it arrives live. Otherwise one indexed read, whose first event
        must follow the position (else history was cut there)."""
        if after_seq < 0:
            return None
        if self._heads.get(stream) == after_seq:
            return []
        missed = await self.read_since(stream, after_seq)
        if missed is None:
            return None
        if missed:
            return missed if missed[0].seq == after_seq + 1 else None
        # Nothing after it: fine at the head, not beyond it nor before a cut.
        return [] if await self.position_status(stream, after_seq) == "ok" else None

    async def read_since(self, stream: str, after_seq: int) -> list[Event] | None:
        """Events after ``after_seq`` in order, or None when there are more than can be replayed."""
        cursor = self._store.events.find(
            {"stream": stream, "seq": {"$gt": after_seq}},
            sort=[("seq", 1)],
            limit=self.replay_limit + 1,
        )
        events = [Event.from_document(doc) async for doc in cursor]
        if len(events) > self.replay_limit:
            return None
        return events

    async def read_range(self, stream: str, after_seq: int, through_seq: int) -> list[Event]:
        """Events ``after_seq < seq <= through_seq`` in order (fewer where history was cut)."""
        cursor = self._store.events.find(
            {"stream": stream, "seq": {"$gt": after_seq, "$lte": through_seq}}, sort=[("seq", 1)]
        )
        return [Event.from_document(doc) async for doc in cursor]

    async def prune(self, now: datetime | None = None) -> int:
        """Drop events older than the retention window, remembering how far each stream was cut."""
        cutoff = (now or datetime.now(UTC)) - self.retention
        cut_points = await self._store.events.aggregate(
            [
                {"$match": stored_before(cutoff)},
                {"$group": {"_id": "$stream", "max_seq": {"$max": "$seq"}}},
            ],
            hint=BY_ID,
        )
        removed = 0
        async for point in cut_points:
            stream, max_seq = point["_id"], int(point["max_seq"])
            # Record the cut first: a crash between the two writes leaves old events in place,
            # never a stream whose head could be recomputed lower than it was.
            await self._store.streams.update_one(
                {"_id": stream}, {"$max": {"trimmed_to": max_seq}}, upsert=True
            )
            result = await self._store.events.delete_many(
                {"stream": stream, "seq": {"$lte": max_seq}}
            )
            removed += result.deleted_count
        return removed

    async def close(self) -> None:
        """Finish what is queued (its callers wait for it), write the heads, then stop."""
        try:
            await asyncio.wait_for(self.settled(), 5.0)
        except TimeoutError:
            log.warning("stream writes still under way at shutdown; cancelled")
        self._closed = True
        await stop(self._writer, self._head_writer)
