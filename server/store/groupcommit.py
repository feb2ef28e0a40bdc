"""Journaled inserts, gathered: many messages' ``250`` for one flush of the database's log.

A ``250`` hands the responsibility for a message over to us (RFC 5321, 6.1): the sending
server deletes its copy. So a raw message is inserted with ``writeConcern {j: true}``, which
returns only once the database's journal holds it on disk; with the default write concern a
commit may still sit in a log buffer, and a crash of the database right after the ``250``
lost it (issue 13: six of six). Journaling one insert at a time costs a flush each, so while
one journaled write is in flight, the messages arriving meanwhile wait and go together in the
next one: one ``insert_many``, one flush (group commit). Every caller gets its own answer:
stored, or the ``DuplicateKeyError`` of its own document.

The database's log is written in order, so a journaled write also makes every earlier write
durable: the GridFS chunks of a large message, written before its document, need no journal
flush of their own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymongo import UpdateOne, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from server.background import stop
from server.store.database import Document

log = logging.getLogger(__name__)

JOURNALED = WriteConcern(w=1, j=True)
MAX_BATCH_DOCS = 64
MAX_BATCH_BYTES = 16 << 20  # an 8 MiB message alone is one flush anyway
CLOSE_WAIT_SECONDS = 10.0

# A document, its size, the document of its bytes (or None), the caller's answer.
_Waiter = tuple[Document, int, Document | None, "asyncio.Future[None]"]


def journaled(collection: AsyncCollection[Document]) -> AsyncCollection[Document]:
    """The same collection, every write of it flushed to the journal before it returns."""
    return collection.with_options(write_concern=JOURNALED)


class GroupCommit:
    """``journal``: False for writes that need no flush of their own (the CRM's activities
    and history, gathered the same way so that a batch of mail writes them in one go).

    ``companions``: a collection for a second document per insert (a raw message's bytes,
    kept apart from the document that is updated as it is processed, so that no update
    rewrites them). The batch's companions are inserted first without a flush of their own:
    the journaled insert after them flushes the log through them too. A companion whose
    document is refused (a duplicate) is deleted again."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        journal: bool = True,
        companions: AsyncCollection[Document] | None = None,
    ) -> None:
        self._collection = journaled(collection) if journal else collection
        self._companions = companions
        self._pending: list[_Waiter] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # journaled writes made, for tests and the benchmark
        self.inserted = 0

    async def insert(self, doc: Document, size: int, companion: Document | None = None) -> None:
        """Returns once ``doc`` (and its ``companion``) is on disk; raises
        ``DuplicateKeyError`` for a unique key already taken, or whatever failed the write
        (nothing was acknowledged then)."""
        assert companion is None or self._companions is not None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((doc, size, companion, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="group-commit")
        # A caller cancelled here (its SMTP session dropped) leaves its document in the batch:
        # it is stored without a 250, and the sender's retry finds it by its SHA-256.
        await future

    async def _write_all(self) -> None:
        # One turn of the loop first, for the sessions whose data ended in the same read; the
        # rest gather while the write before them is flushed.
        await asyncio.sleep(0)
        while self._pending:
            batch: list[_Waiter] = []
            size = 0
            while self._pending and len(batch) < MAX_BATCH_DOCS:
                if batch and size + self._pending[0][1] > MAX_BATCH_BYTES:
                    break
                batch.append(self._pending.pop(0))
                size += batch[-1][1]
            try:
                await self._write(batch)
            except BaseException as exc:  # cancelled at shutdown: nobody may wait for ever
                failure = exc if isinstance(exc, Exception) else ConnectionError("shutting down")
                for _doc, _size, _companion, future in [*batch, *self._pending]:
                    if not future.done():
                        future.set_exception(failure)
                self._pending.clear()
                raise

    async def _write(self, batch: list[_Waiter]) -> None:
        errors: dict[int, dict[str, Any]] = {}
        companions = [c for _doc, _size, c, _future in batch if c is not None]
        # Companions there before this write (a message inserted again under its own id, as
        # the mail spool does after a crash): the same bytes, kept, and never deleted below.
        already: set[Any] = set()
        if companions:
            assert self._companions is not None
            try:
                await self._companions.insert_many(companions, ordered=False)
            except BulkWriteError as exc:
                failed = exc.details.get("writeErrors", [])
                if exc.details.get("writeConcernErrors") or any(
                    e.get("code") != 11000 for e in failed
                ):
                    self._fail(batch, exc)
                    return
                already = {companions[int(e["index"])]["_id"] for e in failed}
            except Exception as exc:  # nothing of the batch is answered
                self._fail(batch, exc)
                return
        try:
            await self._collection.insert_many([doc for doc, *_ in batch], ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                # Inserted but perhaps not journaled: no 250 for any of them. A retry finds
                # its copy by SHA-256 and is answered after a journaled write of its own.
                for *_rest, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            errors = {int(e["index"]): e for e in exc.details.get("writeErrors", [])}
        except Exception as exc:
            for *_rest, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.inserted += len(batch) - len(errors)
        for index, (_doc, _size, _companion, future) in enumerate(batch):
            if future.done():
                continue
            error = errors.get(index)
            if error is None:
                future.set_result(None)
            elif error.get("code") == 11000:
                future.set_exception(DuplicateKeyError(error.get("errmsg", ""), 11000, error))
            else:
                future.set_exception(WriteError(error.get("errmsg", ""), error.get("code"), error))
        refused = [c for i in errors if (c := batch[i][2]) is not None and c["_id"] not in already]
        if refused and self._companions is not None:
            # Their documents were not stored (a copy was), so nothing reads these.
            try:
                await self._companions.delete_many({"_id": {"$in": [c["_id"] for c in refused]}})
            except Exception:
                log.warning("could not delete %s refused companions", len(refused), exc_info=True)

    @staticmethod
    def _fail(batch: list[_Waiter], exc: Exception) -> None:
        for *_rest, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        """Let the write under way finish (its senders are waiting for their answer), then
        stop."""
        writer = self._writer
        if writer is None or writer.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(writer), CLOSE_WAIT_SECONDS)
        except Exception:
            log.warning("the last gathered insert did not finish in time", exc_info=True)
        await stop(writer)


class GroupUpdate:
    """Updates of one collection, gathered as ``GroupCommit`` gathers inserts (with the
    collection's own write concern): those queued while one bulk write is in flight go
    together in the next. Each caller returns once its update is written, or gets the
    failure of the write it was in."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self._collection = collection
        self._pending: list[tuple[UpdateOne, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0

    async def update(self, op: UpdateOne) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="group-update")
        await future

    async def _write_all(self) -> None:
        await asyncio.sleep(0)
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH_DOCS], self._pending[MAX_BATCH_DOCS:]
            try:
                await self._collection.bulk_write([op for op, _ in batch], ordered=False)
            except BaseException as exc:
                failure = exc if isinstance(exc, Exception) else ConnectionError("shutting down")
                for _op, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                if not isinstance(exc, Exception):
                    for _op, future in self._pending:
                        if not future.done():
                            future.set_exception(failure)
                    self._pending.clear()
                    raise
                continue
            self.batches += 1
            for _op, future in batch:
                if not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        """Let the write under way finish (its callers wait for it), then stop."""
        writer = self._writer
        if writer is None or writer.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(writer), CLOSE_WAIT_SECONDS)
        except Exception:
            log.warning("the last gathered update did not finish in time", exc_info=True)
        await stop(writer)
