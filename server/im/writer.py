"""Group commit of messages: the sends of a moment stored together, in the order submitted.

One writer per node takes every message queued while the previous batch was being written
(REST sends, system notices, Jabber sessions, all alike) and stores them in two round trips:

1. one ordered ``insert_many`` into ``messages``, each with its chat's next ordinal ``n``
   (unique index ``(chat_id, n)``; the next one is always the last stored + 1, known here from
   this node's inserts and every ``im.message`` it sees, else from ``chats.msg_count``).
   Unjournaled: the journaled write that follows flushes it with itself.
2. their events, through the stream log's writer: one ordered ``insert_many`` into ``events``
   across all the chats' streams, journaled, then published on the bus.

Then each sender is answered, and the bookkeeping (the chats' ``msg_count`` and preview, the
authors' read positions) is queued for the ``Bookkeeper``, which coalesces it into two
``bulk_write``s, off the senders' path, one round per ``BOOKKEEPING_INTERVAL`` at most.

What can go wrong in step 1 keeps the stored prefix (ordered) and retries the rest, as the
stream log does:

- a duplicate ``dedup_key`` (a retry of a send stored before): that one is a duplicate,
  answered with the earlier message (``ImService`` makes sure its event exists); two copies
  in one batch are one insert, the second answered with the first;
- a duplicate ``(chat_id, n)`` (another node took the ordinal): the chat's last ordinal is read
  exactly and the rest retried after a random pause;
- anything else: the rest of the batch fails (503), taken back as far as possible.

In step 2, a message whose event could not be stored is taken back (deleted): no message is
stored without its event. Its ordinal is given again when it was the last of its chat's; when
another message was numbered above it meanwhile (another node's), it cannot be, and is added
to the chat's ``deleted_ns`` so that nobody's unread number counts it. (Another node that read
the chat's head before the delete and inserts after this check still leaves an uncounted gap:
``ImCheck`` finds and repairs it, and the member's count is right again once they read past it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import DESCENDING, UpdateOne
from pymongo.errors import BulkWriteError, PyMongoError

from server.background import SideTasks, raise_if_stopping, stop
from server.events.streams import Append, StreamLog
from server.im.models import MessageOut
from server.im.rules import chat_stream
from server.im.state import preview_of
from server.store.database import Document, Store
from server.web.problems import Problem

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
MAX_BATCH = 256
MAX_RACE_RETRIES = 50
MAX_KNOWN_CHATS = 200_000
# At most one bookkeeping round per this while: under load each chat's and each author's row
# is written once per round for all their messages since the last one (an update costs the
# embedded database more than an insert), not once per batch. Readers are not behind by it:
# every node keeps the numbers of the events it saw as floors (``ImState``, kept 60 s). One
# second, not a quarter: at saturation (eight Jabber pairs) the rounds' updates took 29% of the
# database's time at four rounds a second, for rows that are derived and repaired when lost;
# a crash now loses at most a second of them instead of a quarter.
BOOKKEEPING_INTERVAL = 1.0
# A round due while the writer is idle goes at once if a batch was answered this recently (it
# is then in the gap after that batch), else right after the next one (see Bookkeeper._run).
JUST_ANSWERED = 0.005


def unavailable() -> Problem:
    return Problem(
        503,
        "unavailable",
        "Service unavailable",
        "the message could not be stored; retry with the same client_id",
        headers={"Retry-After": "1"},
    )


@dataclass(frozen=True, slots=True)
class Posted:
    message: MessageOut
    duplicate: bool


@dataclass(eq=False, slots=True)
class Outgoing:
    """One message on its way: its document (``n`` is given when it is written)."""

    doc: Document
    future: asyncio.Future[Posted]
    request_id: str | None = None
    # the chat's msg_count as the sender saw it: where to start numbering when this node
    # knows nothing newer (too low only costs a lost race)
    hint: int | None = None
    copies: list[Outgoing] = field(default_factory=list)  # the same dedup_key, same batch

    @property
    def chat_id(self) -> str:
        return str(self.doc["chat_id"])

    def settle(self, posted: Posted | None, error: BaseException | None = None) -> None:
        for index, item in enumerate([self, *self.copies]):
            if item.future.done():
                continue
            if error is not None:
                item.future.set_exception(error)
            elif posted is not None:
                item.future.set_result(posted if index == 0 else Posted(posted.message, True))


def _error_of(exc: BaseException) -> str:
    """What the database said, without the documents (a bulk write's details carry them)."""
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors") or [{}]
        first = errors[0]
        return f"code {first.get('code')}: {str(first.get('errmsg', ''))[:200]}"
    return str(exc)[:200]


async def _back_off(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))


class Bookkeeper:
    """What follows from stored messages, coalesced and written off the senders' path: each
    chat's ``msg_count`` and preview, each author's read position (``read_n``, and
    ``last_read_id`` for the API). Only moves forward (conditional on the number), so late or
    repeated updates change nothing. Unjournaled while more messages are being written (their
    journaled writes flush these), journaled when the writer is idle. One round per
    ``BOOKKEEPING_INTERVAL`` at most: a burst costs one update per chat and per author per
    round, whatever the number of its messages."""

    def __init__(
        self,
        store: Store,
        writing: Callable[[], bool],
        after_batch: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._writing = writing
        self._after_batch = after_batch
        self._chats: dict[str, tuple[int, dict[str, Any], datetime]] = {}
        self._members: dict[str, tuple[int, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_round = -BOOKKEEPING_INTERVAL  # loop time of the last round's start

    def message_stored(self, doc: Document, preview: dict[str, Any]) -> None:
        n, chat_id = int(doc.get("n", 0)), str(doc["chat_id"])
        if n <= 0:
            return  # not numbered: nothing it could move
        if n > self._chats.get(chat_id, (0,))[0]:
            self._chats[chat_id] = (n, preview, doc["created_at"])
        author = doc.get("author_id")
        if author is not None:
            member = f"{chat_id}|{author}"
            if n > self._members.get(member, (0,))[0]:
                self._members[member] = (n, str(doc["_id"]))
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="im-bookkeeping")

    @property
    def pending(self) -> int:
        return len(self._chats) + len(self._members)

    async def _run(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            while self._chats or self._members:
                wait = self._last_round + BOOKKEEPING_INTERVAL - loop.time()
                if wait > 0 and not self._closed:
                    await asyncio.sleep(wait)  # what comes meanwhile joins this round
                if self._after_batch is not None and not self._closed:
                    # Right after a batch is answered, not whenever the interval ends: at a
                    # light rate that is in the gap before the next message, not across its
                    # inserts (the database serves one command at a time, so an update
                    # landing beside a message's insert delays that message).
                    await self._after_batch(BOOKKEEPING_INTERVAL)
                self._last_round = loop.time()
                chats, self._chats = self._chats, {}
                members, self._members = self._members, {}
                try:
                    await self._write(chats, members)
                except Exception as exc:
                    raise_if_stopping()
                    log.warning("messenger bookkeeping failed (%s); retrying", exc)
                    for chat_id, value in chats.items():
                        if value[0] > self._chats.get(chat_id, (0,))[0]:
                            self._chats[chat_id] = value
                    for member, mark in members.items():
                        if mark[0] > self._members.get(member, (0,))[0]:
                            self._members[member] = mark
                    await asyncio.sleep(1.0)
        finally:
            self._task = None

    async def _write(
        self, chats: dict[str, tuple[int, dict[str, Any], datetime]], members: dict[str, Any]
    ) -> None:
        relaxed = self._writing()
        jobs: list[Awaitable[Any]] = []
        if chats:
            collection = self._store.relaxed("chats") if relaxed else self._store["chats"]
            jobs.append(
                collection.bulk_write(
                    [
                        UpdateOne(
                            {"_id": chat_id, "msg_count": {"$lt": n}},
                            {
                                "$set": {
                                    "msg_count": n,
                                    "last_message": preview,
                                    "last_message_at": at,
                                }
                            },
                        )
                        for chat_id, (n, preview, at) in chats.items()
                    ],
                    ordered=False,
                )
            )
        if members:
            collection = (
                self._store.relaxed("chat_members") if relaxed else self._store["chat_members"]
            )
            jobs.append(
                collection.bulk_write(
                    [
                        UpdateOne(
                            {"_id": member, "read_n": {"$lt": n}},
                            {"$set": {"read_n": n, "last_read_id": message_id}},
                        )
                        for member, (n, message_id) in members.items()
                    ],
                    ordered=False,
                )
            )
        await asyncio.gather(*jobs)

    async def settled(self) -> None:
        while self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.settled(), 5.0)
        except TimeoutError:
            log.warning("messenger bookkeeping still under way at shutdown; left for repair")
        self._closed = True
        await stop(self._task)


DuplicateResolver = Callable[[Outgoing], Awaitable[Posted]]


class MessageWriter:
    def __init__(
        self,
        store: Store,
        streams: StreamLog,
        resolve_duplicate: DuplicateResolver,
        chat_changed: Callable[[str], None] = lambda chat_id: None,
    ):
        self._store = store
        self._streams = streams
        self._resolve_duplicate = resolve_duplicate
        self._chat_changed = chat_changed  # a chat's numbers changed here, not through an event
        self._queue: deque[Outgoing] = deque()
        self._task: asyncio.Task[None] | None = None
        self._sides = SideTasks("answering a duplicate send", log)
        # chat id -> the highest ordinal known to be stored (this node's, and seen in events)
        self._heads: OrderedDict[str, int] = OrderedDict()
        self._closed = False
        self._batch_waiters: list[asyncio.Future[None]] = []
        self._answered_at = -1.0  # loop time the last batch was answered
        self.bookkeeper = Bookkeeper(store, lambda: self.busy, self.after_batch)

    @property
    def busy(self) -> bool:
        return self._task is not None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(
        self, doc: Document, *, request_id: str | None = None, hint: int | None = None
    ) -> asyncio.Future[Posted]:
        """Queue a message; the future resolves once it is stored and its event published.
        Messages are stored in the order submitted."""
        if self._closed:
            raise unavailable()
        future: asyncio.Future[Posted] = asyncio.get_running_loop().create_future()
        self._queue.append(Outgoing(doc, future, request_id, hint))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="im-writer")
        return future

    async def after_batch(self, at_most: float) -> None:
        """Return once the batch being written is answered (or the next one, when none is),
        or after ``at_most`` seconds, whichever comes first.
        Right after a batch (this turn of the loop, or a moment ago) it returns at once."""
        loop = asyncio.get_running_loop()
        if self._task is None and loop.time() - self._answered_at < JUST_ANSWERED:
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

    def saw(self, chat_id: str, n: int) -> None:
        """An ``im.message`` with this ordinal was stored (here or by another node)."""
        if n > self._heads.get(chat_id, 0):
            self._heads[chat_id] = n
            self._heads.move_to_end(chat_id)
            while len(self._heads) > MAX_KNOWN_CHATS:
                self._heads.popitem(last=False)

    def known_head(self, chat_id: str) -> int:
        """The highest ordinal of the chat this node knows to be stored (0: none known)."""
        return self._heads.get(chat_id, 0)

    def _forget(self, chat_id: str) -> None:
        self._heads.pop(chat_id, None)

    # the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self._queue
        batch: list[Outgoing] = []
        try:
            await asyncio.sleep(0)  # what is submitted in the same moment goes together
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
                try:
                    await self._write(batch)
                except Exception:
                    log.exception("writing %s messages failed", len(batch))
                    for item in batch:
                        item.settle(None, unavailable())
                batch = []
                self._batch_answered()
        except asyncio.CancelledError:
            for item in [*batch, *queue]:
                item.settle(None, unavailable())
            queue.clear()
            raise
        finally:
            self._task = None

    async def _write(self, batch: list[Outgoing]) -> None:
        leaders: list[Outgoing] = []
        first: dict[str, Outgoing] = {}
        for item in batch:
            key = item.doc.get("dedup_key")
            if key is not None and key in first:
                first[key].copies.append(item)  # answered with the first one's message
                continue
            if key is not None:
                first[key] = item
            leaders.append(item)
        stored, duplicates, failed = await self._insert(leaders)
        if failed:
            # Told to the senders as 503 (they may retry with their client_id); the cause is
            # for the operator: the error's class and the database's message, no text.
            cause = failed[0][1]
            log.warning(
                "storing %s messages failed (%s: %s); their senders get 503",
                len(failed),
                type(cause).__name__,
                _error_of(cause),
            )
        for item, _cause in failed:
            item.settle(None, unavailable())
        for item in duplicates:
            self._spawn(self._duplicate(item))
        if not stored:
            return
        payloads = [MessageOut.from_document(item.doc).model_dump(mode="json") for item in stored]
        futures = self._streams.enqueue(
            [
                Append(
                    chat_stream(item.chat_id), "im.message", {"message": payload}, item.request_id
                )
                for item, payload in zip(stored, payloads, strict=True)
            ]
        )
        results = await asyncio.gather(*futures, return_exceptions=True)
        lost: list[Outgoing] = []
        for item, payload, result in zip(stored, payloads, results, strict=True):
            if isinstance(result, BaseException):
                lost.append(item)
                continue
            item.settle(Posted(MessageOut.model_validate(payload), False))
            self.bookkeeper.message_stored(item.doc, preview_of(payload))
        if lost:
            await self._take_back(lost)

    async def _take_back(self, lost: list[Outgoing]) -> None:
        """Their events could not be stored: not half-stored, the messages go too.

        An ordinal that was the last of its chat's is given again. One with a message above it
        (another node numbered after it) cannot be: it counts as a deleted message from now
        on, so that nobody's unread number counts it."""
        for item in lost:
            self._forget(item.chat_id)
        messages = self._store["messages"]
        try:
            await messages.delete_many({"_id": {"$in": [i.doc["_id"] for i in lost]}})
            for item in lost:
                n = int(item.doc["n"])
                above = await messages.find_one(
                    {"chat_id": item.chat_id, "n": {"$gt": n}}, projection={"_id": True}
                )
                if above is not None:
                    await self._store["chats"].update_one(
                        {"_id": item.chat_id}, {"$addToSet": {"deleted_ns": n}}
                    )
                    self._chat_changed(item.chat_id)
        except PyMongoError as exc:
            log.warning("could not take back %s messages without events: %s", len(lost), exc)
        for item in lost:
            item.settle(None, unavailable())

    async def _insert(
        self, items: list[Outgoing]
    ) -> tuple[list[Outgoing], list[Outgoing], list[tuple[Outgoing, Exception]]]:
        """Insert the messages with their ordinals; (stored, duplicates, failed)."""
        messages = self._store.relaxed("messages")
        stored: list[Outgoing] = []
        duplicates: list[Outgoing] = []
        failed: list[tuple[Outgoing, Exception]] = []
        remaining = items
        stale: set[str] = set()
        for attempt in range(MAX_RACE_RETRIES):
            if not remaining:
                break
            hints: dict[str, int | None] = {}
            for item in remaining:
                known = hints.get(item.chat_id)
                if item.hint is not None and (known is None or item.hint > known):
                    hints[item.chat_id] = item.hint
                else:
                    hints.setdefault(item.chat_id, known)
            heads = await self._heads_for(hints, stale)
            for item in remaining:
                heads[item.chat_id] += 1
                item.doc["n"] = heads[item.chat_id]
            try:
                await messages.insert_many([item.doc for item in remaining], ordered=True)
            except BulkWriteError as exc:
                inserted = int(exc.details.get("nInserted", 0))
                self._learn(remaining[:inserted])
                stored.extend(remaining[:inserted])
                remaining = remaining[inserted:]
                errors = exc.details.get("writeErrors") or [{}]
                error = errors[0]
                if not remaining or error.get("code") != DUPLICATE_KEY:
                    failed.extend((item, exc) for item in remaining)
                    await self._discard(remaining)
                    return stored, duplicates, failed
                if "dedup_key" in (error.get("keyPattern") or {}) or "dedup" in str(
                    error.get("errmsg", "")
                ):
                    duplicates.append(remaining[0])
                    remaining = remaining[1:]
                    continue
                lost = remaining[0].chat_id  # another writer took that ordinal
                self._forget(lost)
                stale.add(lost)
                await _back_off(attempt)
                continue
            except PyMongoError as exc:
                failed.extend((item, exc) for item in remaining)
                await self._discard(remaining)
                return stored, duplicates, failed
            self._learn(remaining)
            stored.extend(remaining)
            remaining = []
        failure = RuntimeError(f"could not number messages: lost {MAX_RACE_RETRIES} races")
        failed.extend((item, failure) for item in remaining)
        return stored, duplicates, failed

    async def _discard(self, items: list[Outgoing]) -> None:
        """An insert failed with no telling what it stored (a timeout): take them back, as far
        as the database lets us. A send retried with its client_id finds what stays."""
        for item in items:
            self._forget(item.chat_id)
        with contextlib.suppress(PyMongoError):
            await self._store["messages"].delete_many(
                {"_id": {"$in": [item.doc["_id"] for item in items]}}
            )

    async def _heads_for(self, hints: dict[str, int | None], stale: set[str]) -> dict[str, int]:
        """The last ordinal of each chat: known here, else the senders' hint, else read; read
        exactly for a chat where another writer took the next one."""
        heads: dict[str, int] = {}
        missing: list[str] = []
        for chat_id, hint in hints.items():
            known = self._heads.get(chat_id)
            if known is not None:
                heads[chat_id] = known
            elif hint is not None and chat_id not in stale:
                heads[chat_id] = hint
            else:
                missing.append(chat_id)
        if missing:
            counts = {
                doc["_id"]: int(doc.get("msg_count", 0))
                async for doc in self._store["chats"].find(
                    {"_id": {"$in": missing}}, projection={"msg_count": True}
                )
            }
            for chat_id in missing:
                heads[chat_id] = counts.get(chat_id, 0)
                if chat_id in stale:  # msg_count lags (bookkeeping under way, or lost)
                    heads[chat_id] = await self._exact_head(chat_id, heads[chat_id])
        return heads

    async def _exact_head(self, chat_id: str, at_least: int) -> int:
        newest = await self._store["messages"].find_one(
            {"chat_id": chat_id, "n": {"$gt": at_least}},
            sort=[("n", DESCENDING)],
            projection={"n": True},
        )
        return int(newest["n"]) if newest else at_least

    def _learn(self, items: list[Outgoing]) -> None:
        for item in items:
            self.saw(item.chat_id, int(item.doc["n"]))

    # duplicates --------------------------------------------------------------------------------

    async def _duplicate(self, item: Outgoing) -> None:
        try:
            posted = await self._resolve_duplicate(item)
        except Exception as exc:
            if not isinstance(exc, Problem):
                log.warning("a duplicate send could not be answered: %s", exc)
                exc = unavailable()
            item.settle(None, exc)
        else:
            item.settle(Posted(posted.message, True))

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._sides.spawn(coro, name="im-duplicate")

    async def settled(self) -> None:
        while self._task is not None or self._sides:
            await asyncio.gather(
                *(t for t in (self._task, *self._sides) if t is not None), return_exceptions=True
            )
        await self.bookkeeper.settled()

    async def close(self) -> None:
        """Write what is queued (its senders wait for it) and the bookkeeping, then stop."""
        try:
            await asyncio.wait_for(self.settled(), 5.0)
        except TimeoutError:
            log.warning("messages still being written at shutdown; their senders get 503")
        self._closed = True
        await stop(self._task, *self._sides)
        await self.bookkeeper.close()
