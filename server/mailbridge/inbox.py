"""Raw incoming mail, stored before anything is done with it.

Both ways in (the SMTP/LMTP listener and the IMAP collector) hand the raw bytes here first;
the listener answers 250 and the collector moves on only once this write is on disk: it is
journaled (``groupcommit.py``), as is the answer for a copy already stored. The pipeline then
claims stored messages with a lease (``leases.py``), so a crash at any point leaves the
message to be processed again: nothing accepted is lost.

A message's bytes are a document of their own in ``mail_raw_data`` (same ``_id``), written
once and never updated; the ``mail_raw`` document beside it holds the queue's state (the
lease, the outcome) and is updated as the message is processed: an update there no longer
rewrites 13+ KiB of bytes. (Messages stored by older versions keep theirs inline in
``data``.)

The same message arriving twice is stored once: the SHA-256 of the bytes is unique, and so
is (mailbox, UIDVALIDITY, UID) for IMAP. A resent copy with other bytes but the same
Message-ID is caught by the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import Binary
from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError

from server.mailbridge.leases import LEASE, orphaned
from server.store.database import Document, Store, new_id, utcnow
from server.store.groupcommit import GroupCommit, GroupUpdate, journaled

INLINE_LIMIT = 8 * 1024 * 1024  # larger messages go to GridFS (a document holds 16 MB)
HASH_ON_LOOP_BYTES = 1 << 20  # hashed in a thread above this (about a millisecond a MiB)


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # "smtp", "lmtp", "imap", "api"
    mailbox_id: str | None = None
    uidvalidity: int | None = None
    uid: int | None = None
    peer: str | None = None
    recipients: tuple[str, ...] = ()

    def imap_key(self) -> str | None:
        if self.kind != "imap" or self.uid is None:
            return None
        return f"{self.mailbox_id}|{self.uidvalidity}|{self.uid}"


@dataclass(frozen=True, slots=True)
class Stored:
    id: str
    new: bool


class RawInbox:
    def __init__(self, store: Store) -> None:
        self._store = store
        # A large message's chunks, like the bytes of a small one, are flushed by the
        # journaled insert of its queue document after them: no flush per chunk.
        self._files = AsyncGridFSBucket(store.relaxed_db(), bucket_name="mail_raw_files")
        # The bytes' insert needs no flush of its own: the journaled insert of the queue
        # documents right after it flushes the database's log through it. (With the
        # client's journaled default it flushed too: two log flushes before each ``250``.)
        self.commits = GroupCommit(store["mail_raw"], companions=store.relaxed("mail_raw_data"))
        # The outcomes of messages processed side by side: one bulk write for those ready
        # together.
        self.outcomes = GroupUpdate(store["mail_raw"])

    @property
    def collection(self) -> Any:
        return self._store["mail_raw"]

    @property
    def bytes_collection(self) -> Any:
        return self._store["mail_raw_data"]

    async def close(self) -> None:
        await self.commits.close()
        await self.outcomes.close()

    async def put(
        self,
        raw: bytes,
        source: Source,
        raw_id: str | None = None,
        received_at: datetime | None = None,
    ) -> Stored:
        """Stores ``raw``; returns once it is on disk (or its copy stored before is).

        ``raw_id`` and ``received_at``: the message's id and arrival as the mail spool gave
        them (``spool.py``); the spool drained again after a crash finds its own message
        stored by its id and does not count it as a copy."""
        if len(raw) > HASH_ON_LOOP_BYTES:
            digest = await asyncio.to_thread(_sha256, raw)
        else:
            digest = _sha256(raw)
        key = source.imap_key()
        if len(raw) > INLINE_LIMIT or key is not None:
            # Looked up first where a copy is likely (IMAP collects what it may have
            # collected before, or what came by SMTP) or costly to store again; otherwise the
            # unique indexes on the SHA-256 and the IMAP key find a copy at the insert,
            # without a read per message.
            existing = await self.collection.find_one({"sha256": digest}, {"_id": 1, "imap_key": 1})
            if existing is not None and raw_id is not None and existing["_id"] == raw_id:
                return await self._own_again(raw_id)
            if existing is not None:
                return await self._copy_of(existing, digest, source, key)
            if key is not None:
                seen = await self.collection.find_one({"imap_key": key}, {"_id": 1})
                if seen is not None:
                    return await self._again(seen["_id"])
        doc: Document = {
            "_id": raw_id or new_id(),
            "sha256": digest,
            "size": len(raw),
            "received_at": received_at or utcnow(),
            "status": "pending",
            "attempts": 0,
            # Not before: arrival, then a lease's end or a retry time. The claim filters on
            # indexed fields only (the embedded database scans the collection otherwise).
            "claimed_until": utcnow(),
            "source": {
                "kind": source.kind,
                "mailbox_id": source.mailbox_id,
                "uidvalidity": source.uidvalidity,
                "uid": source.uid,
                "peer": source.peer,
                "recipients": list(source.recipients),
            },
        }
        if key is not None:
            doc["imap_key"] = key
        file_id = None
        data: Document | None = None
        if len(raw) <= INLINE_LIMIT:
            data = {"_id": doc["_id"], "data": Binary(raw)}
        else:
            # Not journaled by itself: the journaled insert of the document after it flushes
            # the database's log through these chunks too.
            file_id = await self._files.upload_from_stream(f"{digest}.eml", raw)
            doc["file_id"] = file_id
        try:
            await self.commits.insert(doc, len(raw) if file_id is None else 1024, data)
        except DuplicateKeyError:
            # The same bytes (or the same IMAP message) stored meanwhile by another path.
            if file_id is not None:
                await self._files.delete(file_id)
            # One indexed field per read: with an ``$or`` the embedded database scans.
            found = await self.collection.find_one({"sha256": digest}, {"_id": 1, "imap_key": 1})
            if found is not None and raw_id is not None and found["_id"] == raw_id:
                return await self._own_again(raw_id)
            if found is not None:
                return await self._copy_of(found, digest, source, key)
            if key is not None:
                found = await self.collection.find_one({"imap_key": key}, {"_id": 1})
            if found is None:
                raise
            return await self._again(found["_id"])
        return Stored(doc["_id"], True)

    async def _copy_of(
        self, existing: Document, digest: str, source: Source, key: str | None
    ) -> Stored:
        if key is not None and existing.get("imap_key") != key:
            # The same bytes again, now in an IMAP folder (the SMTP copy came first, or
            # another folder's): the hub has the mail; this copy is moved or deleted like
            # any delivered mail, so it is recorded as a duplicate at its UID.
            await self._imap_copy(existing["_id"], digest, source, key)
        return await self._again(existing["_id"])

    async def _imap_copy(self, original_id: str, digest: str, source: Source, key: str) -> None:
        """A document for an IMAP message whose bytes are stored already: no bytes of its own,
        the outcome ``duplicate`` at once, found by its mailbox's collector to move it."""
        now = utcnow()
        doc: Document = {
            "_id": new_id(),
            # the unique key of the bytes is the original's; this one is keyed by its UID
            "sha256": f"{digest}|{key}",
            "imap_key": key,
            "size": 0,
            "received_at": now,
            "processed_at": now,
            "status": "duplicate",
            "result": {"of": original_id, "reason": "the same bytes were stored already"},
            "claimed_until": now,
            "source": {
                "kind": source.kind,
                "mailbox_id": source.mailbox_id,
                "uidvalidity": source.uidvalidity,
                "uid": source.uid,
                "recipients": [],
            },
        }
        with contextlib.suppress(DuplicateKeyError):  # recorded by an earlier collection
            await journaled(self.collection).insert_one(doc)

    async def _again(self, raw_id: str) -> Stored:
        """A copy stored before: answered only once that copy is on disk too. It may be
        another session's, whose journaled write has not returned yet; a journaled write
        made now flushes the log through it (and counts the copies)."""
        await journaled(self.collection).update_one({"_id": raw_id}, {"$inc": {"copies": 1}})
        return Stored(raw_id, False)

    async def _own_again(self, raw_id: str) -> Stored:
        """The spool's message stored before (a drain cut short by a crash): not a copy. A
        journaled write still, so that it is on disk before the spool forgets it."""
        await journaled(self.collection).update_one(
            {"_id": raw_id}, {"$set": {"spooled_again_at": utcnow()}}
        )
        return Stored(raw_id, False)

    async def raw_of(self, doc: Document) -> bytes:
        if "data" not in doc and "file_id" not in doc:
            own = await self.bytes_collection.find_one({"_id": doc["_id"]})
            if own is not None:
                return bytes(own["data"])
            # stored by an older version (inline), or read without its bytes
            doc = await self.collection.find_one({"_id": doc["_id"]}) or doc
        if "data" in doc:
            return bytes(doc["data"])
        stream = await self._files.open_download_stream(doc["file_id"])
        return bytes(await stream.read())

    async def with_bytes(self, docs: list[Document]) -> list[Document]:
        """``docs`` with the bytes kept apart (``mail_raw_data``) read into their ``data``,
        one query for the lot; those without any (GridFS, older ones) are read by
        ``raw_of``."""
        ids = [d["_id"] for d in docs if "data" not in d and "file_id" not in d]
        if ids:
            found = {
                d["_id"]: d["data"] async for d in self.bytes_collection.find({"_id": {"$in": ids}})
            }
            for doc in docs:
                if doc["_id"] in found:
                    doc["data"] = found[doc["_id"]]
        return docs

    async def waiting(self, limit: int, held: set[str]) -> list[Document]:
        """Up to ``limit`` of the messages waiting longest, leaving out ``held`` (those this
        node is processing), with their bytes; no write. For the embedded database, where this
        node is the only one: its leases are the ``held`` it keeps in memory (a process that
        died held nothing then, so its messages are taken at once at the next start). Filtered
        on the claim index only (the embedded database scans the collection otherwise): the
        held ones are left out here."""
        found = [
            d
            async for d in self.collection.find(
                {"status": "pending", "claimed_until": {"$lt": utcnow()}}
            ).limit(limit + len(held))
            if d["_id"] not in held
        ]
        return await self.with_bytes(found[:limit])

    async def claim(self, node: str) -> Document | None:
        """The oldest message waiting (or whose processing lease ran out), leased to
        ``node``."""
        found = await self.claim_some(node, 1)
        return found[0] if found else None

    async def claim_some(
        self, node: str, limit: int, holding: set[str] | None = None
    ) -> list[Document]:
        """Up to ``limit`` of the messages waiting longest (or whose processing lease ran
        out), leased to ``node``, with their bytes; none when another node took them first.
        ``holding``: the caller's set of what it holds, which gets the ids before the lease
        is written (so that a stop cancelling this call in the middle still gives them back)
        and keeps only those leased.

        Three reads and writes for the lot, none a findAndModify: the embedded database
        answers one of those by scanning the whole collection (the raw bytes of every message
        kept), which made each claim cost more the more mail had come in."""
        now = utcnow()
        # No sort: the index (status, claimed_until) yields the longest-waiting first, and a
        # sort would read every pending message.
        waiting = [
            d["_id"]
            async for d in self.collection.find(
                {"status": "pending", "claimed_until": {"$lt": now}}, {"_id": 1}
            ).limit(limit)
        ]
        if not waiting:
            return []
        token = new_id()
        held = holding if holding is not None else set()
        held.update(waiting)  # before the lease: a stop cancelling this call gives them back
        # ``_id`` first, and two conditions with operators: the database then looks the few
        # messages up by ``_id`` rather than walking every pending one.
        result = await self.collection.update_many(
            {"_id": {"$in": waiting}, "claimed_until": {"$lt": now}, "status": "pending"},
            {
                "$set": {"claimed_until": now + LEASE, "claimed_by": node, "claim": token},
                "$inc": {"attempts": 1},
            },
        )
        claimed = (
            {
                d["_id"]: d
                async for d in self.collection.find({"_id": {"$in": waiting}, "claim": token})
            }
            if result.modified_count
            else {}
        )
        held.difference_update(i for i in waiting if i not in claimed)  # another node's
        return await self.with_bytes([claimed[i] for i in waiting if i in claimed])

    async def renew(self, raw_id: str, node: str) -> bool:
        return await self.renew_some([raw_id], node)

    async def renew_some(self, raw_ids: list[str], node: str) -> bool:
        """The leases of messages still being processed; False when all were lost."""
        if not raw_ids:
            return True
        result = await self.collection.update_many(
            {"_id": {"$in": raw_ids}, "claimed_by": node, "status": "pending"},
            {"$set": {"claimed_until": utcnow() + LEASE}},
        )
        return bool(result.matched_count)

    async def give_back(self, raw_ids: list[str], node: str) -> None:
        """This node stops: the messages it holds may be taken at once, here or elsewhere."""
        if raw_ids:
            await self.collection.update_many(
                {"_id": {"$in": raw_ids}, "claimed_by": node, "status": "pending"},
                {"$set": {"claimed_until": utcnow()}, "$unset": {"claimed_by": ""}},
            )

    async def take_orphans(self, node: str, sole_node: bool) -> int:
        """At start-up: the leases of a process that died (see ``leases.orphaned``) end now."""
        if not sole_node:
            return 0
        now = utcnow()
        # Filtered on the claim index only (the embedded database scans otherwise): what is
        # leased or waiting for a retry; the holder is checked here.
        held = [
            d["_id"]
            async for d in self.collection.find(
                {"status": "pending", "claimed_until": {"$gt": now}}, {"claimed_by": 1}
            )
            if orphaned(d.get("claimed_by"), node, sole_node)
        ]
        if held:
            await self.collection.update_many(
                {"_id": {"$in": held}, "status": "pending"},
                {"$set": {"claimed_until": now}, "$unset": {"claimed_by": ""}},
            )
        return len(held)

    async def upgrade(self) -> None:
        """Messages stored by an older version waited with no time at all."""
        await self.collection.update_many(
            {"status": "pending", "claimed_until": None}, {"$set": {"claimed_until": utcnow()}}
        )

    async def finish(
        self, raw_id: str, status: str, result: Document, message_id: str | None = None
    ) -> None:
        await self.finish_many([(raw_id, status, result, message_id)])

    async def finish_many(self, outcomes: list[tuple[str, str, Document, str | None]]) -> None:
        """Messages' outcomes; those of one batch (given together) in one write."""
        ops = []
        for raw_id, status, result, message_id in outcomes:
            done: Document = {"status": status, "result": result, "processed_at": utcnow()}
            if message_id:
                done["message_id"] = message_id
            ops.append(
                UpdateOne(
                    {"_id": raw_id}, {"$set": done, "$unset": {"claimed_by": "", "claim": ""}}
                )
            )
        if len(ops) == 1:
            await self.outcomes.update(ops[0])
        elif ops:
            await self.collection.bulk_write(ops, ordered=False)

    async def release(self, raw_id: str, error: str, retry_at: datetime) -> None:
        """Processing failed: tried again at ``retry_at`` (by any node: no holder)."""
        await self.collection.update_one(
            {"_id": raw_id},
            {
                "$set": {"claimed_until": retry_at, "last_error": error},
                "$unset": {"claimed_by": ""},
            },
        )

    async def prune(self, older_than: datetime) -> int:
        """Drop the bytes of mail that reached its outcome before ``older_than``: the
        document stays, so its keys (SHA-256, IMAP key) keep catching duplicates. Mail still
        waiting for an admin (unmatched, refused) keeps its bytes."""
        pruned = 0
        query = {
            "status": {"$nin": ["pending", "unmatched", "refused"]},
            "processed_at": {"$lt": older_than},
            "pruned_at": {"$exists": False},
        }
        async for doc in self.collection.find(query, {"file_id": 1}).limit(10_000):
            if "file_id" in doc:
                with contextlib.suppress(NoFile):
                    await self._files.delete(doc["file_id"])
            await self.bytes_collection.delete_one({"_id": doc["_id"]})
            await self.collection.update_one(
                {"_id": doc["_id"]},
                {"$unset": {"data": "", "file_id": ""}, "$set": {"pruned_at": utcnow()}},
            )
            pruned += 1
        return pruned
