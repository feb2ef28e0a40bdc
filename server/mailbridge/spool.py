"""The mail spool: what the listener accepted, on this node's own disk before the database.

A ``250`` hands a message over to us (RFC 5321, 6.1), so it may be answered only once the
message is on disk. Waiting for the database's journal made each ``250`` wait behind the
pipeline's writes on the same database; mail servers answer from a queue on local disk
instead (Postfix's ``incoming``), and so does the listener now: it appends the message to the
spool and answers once the spool's fsync returns; a background drain (``SpoolDrain``) moves
what the spool holds into the database through ``RawInbox.put`` (the same documents, the same
deduplication by SHA-256), journaled, and only then forgets it here. On start, whatever the
spool holds is drained again: an entry the database already has (its ``_id`` is the spool's)
is not stored twice.

The spool is append-only segments (``<seq>.seg`` under ``<data_dir>/mail-spool``). Messages
arriving together are written together and share one fsync (group commit), plus the
directory's fsync when that write created the segment. Each entry is
``magic | meta length | body length | crc32(meta + body) | meta (JSON) | body``: a write torn
by a crash (never answered ``250``: its fsync had not returned) is found at start by its
length or checksum, and it and whatever follows it in that segment are left out, never half
imported. A segment whose every entry is in the database is deleted (the one being written
is emptied instead, so a quiet node keeps writing one file). After a failed write the
segment is cut back to its last whole entry and the next write starts a new one.

Room: ``max_bytes`` of entries not yet in the database; past it, or when the disk refuses a
write (ENOSPC, EIO), the listener answers 452 4.3.1 and the sending server retries later;
nothing accepted before is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo.errors import BulkWriteError, PyMongoError

from server.background import raise_if_stopping, stop
from server.mailbridge.inbox import RawInbox, Source
from server.store.database import new_id, utcnow

log = logging.getLogger(__name__)

MAGIC = b"PHS1"
HEAD = struct.Struct(">4sIQI")  # magic, meta length, body length, crc32 of meta and body
SEGMENT_BYTES = 8 << 20  # a new segment (and a directory fsync) after this much
WRITE_BATCH_BYTES = 32 << 20
DRAIN_BATCH = 64  # one group commit of the database takes up to 64 documents
DRAIN_BATCH_BYTES = 16 << 20
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
# A burst: this many messages accepted within the window. While one lasts the drain waits (up
# to HOLD_SECONDS, then not again until the burst is over), so that the listener does not
# share this node's CPU and its database with the drain and the pipeline behind it; the mail
# is on disk already, so waiting costs no safety, only the time to the record.
BURST_APPENDS = 24
BURST_WINDOW_SECONDS = 0.25
HOLD_SECONDS = 2.0
HOLD_STEP_SECONDS = 0.02
CLOSE_WAIT_SECONDS = 5.0
# The bytes of entries written by this process are kept in memory up to this much, so that
# the drain need not read them back (what is over it, or left by an earlier process, is read).
KEEP_BYTES = 64 << 20


class SpoolFull(Exception):
    """No room for the message: over the spool's size, or the disk refused the write."""


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    fd: int | None = None  # open for appending while this is the segment being written
    size: int = 0  # bytes of whole entries
    live: int = 0  # entries not yet in the database


@dataclass(frozen=True, slots=True)
class Entry:
    """One accepted message: where it is in the spool, and what the database will get."""

    segment: _Segment = field(compare=False)
    offset: int
    length: int  # of the whole entry
    id: str
    received_at: datetime
    source: Source


@dataclass(frozen=True, slots=True)
class Loaded:
    entry: Entry
    raw: bytes


def _encode(meta: dict[str, Any], raw: bytes) -> bytes:
    head = json.dumps(meta, separators=(",", ":")).encode()
    crc = zlib.crc32(raw, zlib.crc32(head))
    return HEAD.pack(MAGIC, len(head), len(raw), crc) + head + raw


def _meta(raw_id: str, received_at: datetime, source: Source) -> dict[str, Any]:
    return {
        "id": raw_id,
        "at": received_at.isoformat(),
        "kind": source.kind,
        "peer": source.peer,
        "rcpt": list(source.recipients),
    }


def _decode_meta(head: bytes) -> tuple[str, datetime, Source]:
    meta = json.loads(head)
    source = Source(str(meta["kind"]), peer=meta.get("peer"), recipients=tuple(meta["rcpt"]))
    at = datetime.fromisoformat(meta["at"])
    return str(meta["id"]), at if at.tzinfo else at.replace(tzinfo=UTC), source


class TornEntry(Exception):
    pass


def _read_entry(fd: int, offset: int, end: int) -> tuple[bytes, bytes, int]:
    """(meta, body, length) of the entry at ``offset``; ``TornEntry`` when it is not whole."""
    head = os.pread(fd, HEAD.size, offset)
    if len(head) < HEAD.size:
        raise TornEntry(f"{len(head)} bytes of an entry's head")
    magic, meta_len, body_len, crc = HEAD.unpack(head)
    length = HEAD.size + meta_len + body_len
    if magic != MAGIC or offset + length > end:
        raise TornEntry("no entry here, or one longer than what follows it")
    rest = os.pread(fd, meta_len + body_len, offset + HEAD.size)
    if len(rest) != meta_len + body_len or zlib.crc32(rest) != crc:
        raise TornEntry("its checksum does not match")
    return rest[:meta_len], rest[meta_len:], length


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._segments: dict[int, _Segment] = {}
        self._current: _Segment | None = None
        self._next_seq = 1
        self._queue: deque[Entry] = deque()  # on disk, not yet in the database, oldest first
        self._taken: set[str] = set()  # ids the drain is storing now
        self._pending: list[tuple[bytes, Entry, asyncio.Future[Entry]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.bytes = 0  # of entries not yet in the database, and of those being written
        self.ready = asyncio.Event()  # set while entries wait for the drain
        self.torn = 0  # torn entries found at start
        self.fsyncs = 0  # for tests: group commit shares them
        self._kept: dict[str, bytes] = {}
        self._queued: set[str] = set()  # the ids in ``_queue``
        self._appended: deque[float] = deque()  # when, in the last BURST_WINDOW_SECONDS
        self._kept_bytes = 0

    # start -----------------------------------------------------------------------------------

    def open(self) -> int:
        """Reads what an earlier process left (blocking; at start). Returns its entry count."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # mail is private, as the rest of the data directory
        found = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        for seq in found:
            segment = _Segment(seq, self._path(seq))
            self._segments[seq] = segment
            self._scan(segment)
            if not segment.live:
                self._forget(segment)
        self._next_seq = (found[-1] + 1) if found else 1
        return len(self._queue)  # ``ready`` is set by the drain's start, on the loop

    def _scan(self, segment: _Segment) -> None:
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            end = os.fstat(fd).st_size
            offset = 0
            while offset < end:
                try:
                    head, _body, length = _read_entry(fd, offset, end)
                    raw_id, at, source = _decode_meta(head)
                except (TornEntry, ValueError, KeyError, TypeError) as exc:
                    # Only a write whose fsync never returned (no 250) can be torn; it and
                    # anything after it in this segment is left out.
                    self.torn += 1
                    log.warning(
                        "mail spool: a torn entry in %s at byte %d (%s); the %d bytes from "
                        "there on are left out",
                        segment.path.name,
                        offset,
                        exc,
                        end - offset,
                    )
                    break
                self._queue.append(Entry(segment, offset, length, raw_id, at, source))
                self._queued.add(raw_id)
                segment.live += 1
                self.bytes += length
                offset += length
            segment.size = offset
        finally:
            os.close(fd)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.seg"

    # accepting -------------------------------------------------------------------------------

    @property
    def bursting(self) -> bool:
        now = time.monotonic()
        recent = sum(1 for t in self._appended if t >= now - BURST_WINDOW_SECONDS)
        return recent >= BURST_APPENDS

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def append(self, raw: bytes, source: Source) -> Entry:
        """Returns once ``raw`` is on disk (its fsync, and its directory's for a new segment);
        ``SpoolFull`` when there is no room, ``OSError`` when the write failed: then nothing of
        this message is kept."""
        raw_id = new_id()
        now = time.monotonic()
        self._appended.append(now)
        while self._appended and self._appended[0] < now - BURST_WINDOW_SECONDS:
            self._appended.popleft()
        received_at = utcnow()
        data = _encode(_meta(raw_id, received_at, source), raw)
        if self.bytes + len(data) > self.max_bytes:
            raise SpoolFull(f"the mail spool holds {self.bytes} of {self.max_bytes} bytes")
        self.bytes += len(data)
        placeholder = _Segment(0, self.directory)  # where it goes is known once it is written
        entry = Entry(placeholder, 0, len(data), raw_id, received_at, source)
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._pending.append((data, entry, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="mail-spool-write")
        # A sender gone meanwhile leaves its message in the batch: kept without a 250, and
        # the sending server's retry is stored once (the same bytes, the same SHA-256).
        placed = await asyncio.shield(future)
        if self._kept_bytes + len(raw) <= KEEP_BYTES and raw_id in self._queued:
            self._kept[raw_id] = raw
            self._kept_bytes += len(raw)
        return placed

    async def _write_all(self) -> None:
        await asyncio.sleep(0)  # the sessions whose data ended in the same read go together
        while self._pending:
            batch: list[tuple[bytes, Entry, asyncio.Future[Entry]]] = []
            size = 0
            while self._pending:
                if batch and size + len(self._pending[0][0]) > WRITE_BATCH_BYTES:
                    break
                batch.append(self._pending.pop(0))
                size += len(batch[-1][0])
            try:
                await self._write(batch)
            except BaseException as exc:
                failure = exc if isinstance(exc, Exception) else OSError("shutting down")
                for data, _entry, future in batch:
                    self.bytes -= len(data)
                    if not future.done():
                        future.set_exception(failure)
                if not isinstance(exc, Exception):
                    for data, _entry, future in self._pending:
                        self.bytes -= len(data)
                        if not future.done():
                            future.set_exception(failure)
                    self._pending.clear()
                    raise

    async def _write(self, batch: list[tuple[bytes, Entry, asyncio.Future[Entry]]]) -> None:
        segment = self._current
        # A large segment still holding mail is left to the drain (deleted once it is all in
        # the database); one whose mail is all there is emptied below instead.
        if segment is not None and segment.size >= SEGMENT_BYTES and segment.live:
            self._close_current()
            segment = None
        created = segment is None
        if segment is None:
            segment = _Segment(self._next_seq, self._path(self._next_seq))
            self._next_seq += 1
            self._segments[segment.seq] = segment
            self._current = segment
        # Emptied when all it held is in the database: a quiet node keeps one file.
        empty_first = not created and segment.live == 0 and segment.size > 0
        start = 0 if empty_first else segment.size
        try:
            await asyncio.to_thread(
                self._write_sync, segment, [d for d, _e, _f in batch], created, empty_first
            )
        except BaseException:
            # Cut back to the last whole entry (best effort: the next start finds a torn one
            # by its checksum anyway) and write the next batch to a new segment.
            with contextlib.suppress(OSError):
                if segment.fd is not None:
                    os.ftruncate(segment.fd, start)
            self._close_current()
            if segment.live == 0:
                self._forget(segment)
            raise
        self.fsyncs += 1
        offset = start
        for data, entry, future in batch:
            placed = Entry(segment, offset, len(data), entry.id, entry.received_at, entry.source)
            offset += len(data)
            self._queue.append(placed)
            self._queued.add(placed.id)
            segment.live += 1
            if not future.done():
                future.set_result(placed)
        segment.size = offset
        self.ready.set()

    def _write_sync(
        self, segment: _Segment, chunks: list[bytes], created: bool, empty_first: bool
    ) -> None:
        if segment.fd is None:
            segment.fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if empty_first:
            os.ftruncate(segment.fd, 0)
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        view = memoryview(data)
        while view:
            written = os.write(segment.fd, view)
            view = view[written:]
        os.fsync(segment.fd)
        if created:  # the new file's name is on disk too
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _close_current(self) -> None:
        segment, self._current = self._current, None
        if segment is not None and segment.fd is not None:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
            segment.fd = None

    def _forget(self, segment: _Segment) -> None:
        """Everything the segment held is in the database (or was never accepted)."""
        self._segments.pop(segment.seq, None)
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()

    # draining --------------------------------------------------------------------------------

    def take(self, limit: int, max_bytes: int) -> list[Entry]:
        """The oldest entries not being stored now (they stay in the spool until ``done``)."""
        found: list[Entry] = []
        size = 0
        for entry in self._queue:
            if len(found) >= limit or (found and size + entry.length > max_bytes):
                break
            if entry.id in self._taken:
                continue
            found.append(entry)
            size += entry.length
        self._taken.update(e.id for e in found)
        return found

    def give_back(self, entries: list[Entry]) -> None:
        self._taken.difference_update(e.id for e in entries)

    async def load(self, entries: list[Entry]) -> list[Loaded]:
        if all(e.id in self._kept for e in entries):
            return [Loaded(e, self._kept[e.id]) for e in entries]
        return await asyncio.to_thread(self._load_sync, entries)

    def _load_sync(self, entries: list[Entry]) -> list[Loaded]:
        loaded = []
        for entry in entries:
            fd = os.open(entry.segment.path, os.O_RDONLY)
            try:
                _head, body, _length = _read_entry(fd, entry.offset, entry.offset + entry.length)
            finally:
                os.close(fd)
            loaded.append(Loaded(entry, body))
        return loaded

    def done(self, entries: list[Entry]) -> None:
        """These are in the database, journaled: the spool forgets them."""
        ids = {e.id for e in entries}
        self._taken.difference_update(ids)
        kept: deque[Entry] = deque()
        for entry in self._queue:
            if entry.id in ids:
                self.bytes -= entry.length
                self._queued.discard(entry.id)
                raw = self._kept.pop(entry.id, None)
                if raw is not None:
                    self._kept_bytes -= len(raw)
                entry.segment.live -= 1
                if entry.segment.live == 0 and entry.segment is not self._current:
                    self._forget(entry.segment)
            else:
                kept.append(entry)
        self._queue = kept
        if not self._queue:
            self.ready.clear()

    async def close(self) -> None:
        """Let the write under way finish (its senders wait for their answer), then stop."""
        writer = self._writer
        if writer is not None and not writer.done():
            try:
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_WAIT_SECONDS)
            except Exception:
                log.warning("the last spool write did not finish in time", exc_info=True)
            await stop(writer)
        self._close_current()


def describe(exc: BaseException) -> str:
    """An error in words for the log, without any message's bytes (a bulk write error's
    details hold the documents it refused)."""
    if isinstance(exc, BulkWriteError):
        codes = sorted({e.get("code") for e in exc.details.get("writeErrors", [])} - {None})
        concern = bool(exc.details.get("writeConcernErrors"))
        return f"BulkWriteError (codes {codes}, write concern error: {concern})"
    text = str(exc)
    if isinstance(exc, (PyMongoError, OSError)):
        return f"{type(exc).__name__}: {text[:200]}"
    return type(exc).__name__


class SpoolDrain:
    """Moves the spool's entries into the database, oldest first, a batch at a time; on a
    failure (the database down) it tries again later, the entries staying in the spool."""

    def __init__(self, spool: Spool, inbox: RawInbox, stored: Callable[[], None]) -> None:
        self._spool = spool
        self._inbox = inbox
        self._stored = stored
        self._task: asyncio.Task[None] | None = None
        self._attempted = asyncio.Event()  # set after each batch tried, for ``settled``
        self.failing = False  # the last attempt failed; for tests and the log
        self.batches = 0
        self.held = 0.0  # seconds held back by bursts, for tests and the benchmark
        self._held_out = False  # held for HOLD_SECONDS in the burst under way

    def start(self) -> None:
        if self._spool.waiting:  # left by an earlier process
            self._spool.ready.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mail-spool-drain")

    async def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            await self._spool.ready.wait()
            await self._hold()
            entries = self._spool.take(DRAIN_BATCH, DRAIN_BATCH_BYTES)
            if not entries:
                await asyncio.sleep(0.01)
                continue
            try:
                await self._store(entries)
            except Exception as exc:
                raise_if_stopping()
                self._spool.give_back(entries)
                if not self.failing:
                    log.warning(
                        "mail spool: could not move %d messages into the database (%s); "
                        "they stay in the spool and are tried again",
                        len(entries),
                        describe(exc),
                    )
                self.failing = True
                self._attempted.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            except BaseException:
                self._spool.give_back(entries)
                raise
            if self.failing:
                log.warning("mail spool: the database takes messages again")
            self.failing = False
            delay = RETRY_FIRST_SECONDS
            self._spool.done(entries)
            self.batches += 1
            self._attempted.set()
            self._stored()

    async def _hold(self) -> None:
        """While a burst comes in, for up to ``HOLD_SECONDS``; a burst longer than that is a
        load to keep up with, drained beside it until it ends."""
        if not self._spool.bursting:
            self._held_out = False
            return
        if self._held_out:
            return
        began = time.monotonic()
        for _ in range(int(HOLD_SECONDS / HOLD_STEP_SECONDS)):  # a poll: no event says "over"
            if not self._spool.bursting:
                break
            await asyncio.sleep(HOLD_STEP_SECONDS)
        self.held += time.monotonic() - began
        self._held_out = self._spool.bursting

    async def _store(self, entries: list[Entry]) -> None:
        loaded = await self._spool.load(entries)
        # Side by side: the database's group commit takes them in one journaled insert.
        results = await asyncio.gather(
            *(
                self._inbox.put(
                    item.raw,
                    item.entry.source,
                    raw_id=item.entry.id,
                    received_at=item.entry.received_at,
                )
                for item in loaded
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def settled(self, timeout: float = 30.0) -> None:
        """Until the spool is empty (tests, tools); ``TimeoutError`` past ``timeout``."""
        async with asyncio.timeout(timeout):
            while self._spool.waiting:
                if self._task is None or self._task.done():
                    raise RuntimeError("the mail spool's drain is not running")
                self._attempted.clear()
                await self._attempted.wait()

    async def close(self) -> None:
        """Drain what the spool holds while the database takes it (up to a few seconds;
        what is left is drained at the next start), then stop."""
        if self._task is not None and not self.failing:
            with contextlib.suppress(TimeoutError):
                await self.settled(CLOSE_WAIT_SECONDS)
        await stop(self._task)
        self._task = None
