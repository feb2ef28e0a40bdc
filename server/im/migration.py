"""Numbering the messages stored before unread counters were maintained. One-time.

Messages gained their ordinal in the chat (``n``), chats ``msg_count`` and ``deleted_ns``,
memberships ``read_n``. A database from before gets them here, at start, before anything is
served: per chat, the messages in ``_id`` order (the order the messenger used) are numbered
1, 2, 3...; ``msg_count`` is the last; ``deleted_ns`` the deleted ones; each member's
``read_n`` is the number of their ``last_read_id`` - or of their own newest message, if that
is later (posting moves the read mark to one's message; a race in the old code could leave it
behind). Unread numbers therefore stay what they were.

- **Once**: a marker document (``portal``, ``_id: migration:im-ordinals``) says it is done;
  every later start reads only that.
- **One node**: the marker is claimed with a lease, renewed as the work goes on; other nodes
  starting meanwhile wait for it to be done (or take the lease over once it runs out).
- **Crash-safe and idempotent**: a chat is numbered in ``_id`` order with ordered writes, so
  what a crash leaves is a numbered prefix, continued from its highest number; the counts are
  set, not added.
- Then the unique index ``(chat_id, n)`` is created (it could not exist while messages had
  no ``n``).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.errors import DuplicateKeyError

from server.store.database import Document, Store, utcnow

log = logging.getLogger(__name__)

MARKER = "migration:im-ordinals"
LEASE = timedelta(minutes=5)
WRITE_BATCH = 1000
ORDINAL_INDEX = IndexModel(
    [("chat_id", ASCENDING), ("n", ASCENDING)], unique=True, name="chat_ordinal"
)


class MigrationLost(RuntimeError):
    """Another node took the migration over (this one was too slow to renew its lease)."""


async def number_messages(store: Store, owner: str, *, poll_seconds: float = 1.0) -> bool:
    """Make sure the messages are numbered; True when this call did the work."""
    waited = False
    while True:
        marker = await store.portal.find_one({"_id": MARKER})
        if marker is not None and marker.get("done_at") is not None:
            await store["messages"].create_indexes([ORDINAL_INDEX])  # same spec: a no-op
            return False
        if await _claim(store, owner, marker):
            break
        if not waited:
            log.info("waiting for another node to number the stored messages")
            waited = True
        await asyncio.sleep(poll_seconds)
    started = time.monotonic()
    chats, messages = await _number_all(store, owner)
    await store["messages"].create_indexes([ORDINAL_INDEX])
    await store.portal.update_one(
        {"_id": MARKER, "owner": owner},
        {"$set": {"done_at": utcnow(), "chats": chats, "messages": messages}},
    )
    log.info(
        "messages numbered for maintained unread counters: %s messages in %s chats, %.1f s",
        messages,
        chats,
        time.monotonic() - started,
    )
    return True


async def _claim(store: Store, owner: str, marker: Document | None) -> bool:
    now = utcnow()
    if marker is None:
        try:
            await store.portal.insert_one(
                {"_id": MARKER, "owner": owner, "lease_until": now + LEASE, "started_at": now}
            )
        except DuplicateKeyError:
            return False
        return True
    if marker.get("lease_until") is None or marker["lease_until"] > now:
        return False
    taken = await store.portal.update_one(
        {"_id": MARKER, "lease_until": marker["lease_until"]},
        {"$set": {"owner": owner, "lease_until": now + LEASE}},
    )
    if taken.modified_count:
        log.warning("taking over the numbering of messages from %s", marker.get("owner"))
    return bool(taken.modified_count)


async def _renew(store: Store, owner: str) -> None:
    renewed = await store.portal.update_one(
        {"_id": MARKER, "owner": owner}, {"$set": {"lease_until": utcnow() + LEASE}}
    )
    if not renewed.matched_count:
        raise MigrationLost("another node took over numbering the messages")


async def _by_chat(store: Store) -> AsyncIterator[tuple[str, list[Document]]]:
    """Each chat's messages in ``_id`` order (the ``chat_order`` index's order)."""
    current: str | None = None
    docs: list[Document] = []
    async for doc in store["messages"].find(
        {},
        projection={"chat_id": True, "n": True, "author_id": True, "deleted": True},
        sort=[("chat_id", ASCENDING), ("_id", ASCENDING)],
    ):
        if doc["chat_id"] != current:
            if current is not None:
                yield current, docs
            current, docs = doc["chat_id"], []
        docs.append(doc)
    if current is not None:
        yield current, docs


async def _number_all(store: Store, owner: str) -> tuple[int, int]:
    chats = messages = 0
    last_renewal = time.monotonic()
    async for chat_id, docs in _by_chat(store):
        await _number_chat(store, chat_id, docs)
        chats += 1
        messages += len(docs)
        if time.monotonic() - last_renewal > 10:
            await _renew(store, owner)
            last_renewal = time.monotonic()
            log.info("numbering messages: %s chats, %s messages so far", chats, messages)
    # Chats without messages, members of them.
    await store["chats"].update_many(
        {"msg_count": {"$exists": False}}, {"$set": {"msg_count": 0, "deleted_ns": []}}
    )
    await store["chat_members"].update_many({"read_n": {"$exists": False}}, {"$set": {"read_n": 0}})
    return chats, messages


async def _number_chat(store: Store, chat_id: str, docs: list[Document]) -> None:
    top = max((int(d["n"]) for d in docs if isinstance(d.get("n"), int)), default=0)
    updates: list[UpdateOne] = []
    for doc in docs:
        if not isinstance(doc.get("n"), int):
            top += 1
            doc["n"] = top
            updates.append(UpdateOne({"_id": doc["_id"]}, {"$set": {"n": top}}))
    for start in range(0, len(updates), WRITE_BATCH):
        # Ordered: a crash leaves a numbered prefix, which the next run continues.
        await store["messages"].bulk_write(updates[start : start + WRITE_BATCH], ordered=True)
    ids = [str(d["_id"]) for d in docs]
    number = {str(d["_id"]): int(d["n"]) for d in docs}
    own: dict[str, int] = {}
    for doc in docs:
        author = doc.get("author_id")
        if author is not None:
            own[author] = max(own.get(author, 0), int(doc["n"]))
    member_updates: list[UpdateOne] = []
    async for member in store["chat_members"].find(
        {"chat_id": chat_id}, projection={"user_id": True, "last_read_id": True}
    ):
        last = member.get("last_read_id")
        read_n = 0
        if last is not None:
            read_n = number.get(last, 0)
            if not read_n:  # not one of the chat's messages: those up to it were read
                before = bisect.bisect_right(ids, last)
                read_n = number[ids[before - 1]] if before else 0
        read_n = max(read_n, own.get(member["user_id"], 0))
        member_updates.append(UpdateOne({"_id": member["_id"]}, {"$set": {"read_n": read_n}}))
    for start in range(0, len(member_updates), WRITE_BATCH):
        await store["chat_members"].bulk_write(
            member_updates[start : start + WRITE_BATCH], ordered=False
        )
    deleted = sorted(int(d["n"]) for d in docs if d.get("deleted"))
    chat_set: dict[str, Any] = {"msg_count": top, "deleted_ns": deleted}
    await store["chats"].update_one({"_id": chat_id}, {"$set": chat_set})
    # The preview shown in the dialog list is of the last message posted: give it its number.
    await store["chats"].update_one(
        {"_id": chat_id, "last_message.id": ids[-1]}, {"$set": {"last_message.n": number[ids[-1]]}}
    )
