"""The one-time numbering of messages stored before unread counters were maintained: an existing
database keeps its unread numbers; the numbering survives a crash, runs on one node only,
and is done once."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from bson import ObjectId

from server.directory.service import DirectoryService
from server.events.bus import InProcessBus
from server.events.streams import StreamLog
from server.im.check import ImCheck
from server.im.migration import MARKER, number_messages
from server.im.models import SendMessage
from server.im.service import ImService
from server.settings import Settings
from server.store.database import Document, Store, utcnow


def oid(second: int, serial: int) -> str:
    """Ids in a known order (what ObjectIds of messages written over time look like)."""
    return str(ObjectId(f"{second:08x}{serial:016x}"))


async def old_database(store: Store) -> dict[str, Any]:
    """Chats, messages and memberships as the previous version wrote them."""
    now = utcnow()
    chats = [
        {"_id": "c-talk", "kind": "group", "member_ids": ["ann", "ben", "cat"]},
        {"_id": "c-quiet", "kind": "group", "member_ids": ["ann", "ben"]},  # no messages
        {"_id": "c-pair", "kind": "private", "member_ids": ["ann", "ben"]},
    ]
    for chat in chats:
        await store["chats"].insert_one(
            {
                **chat,
                "title": "",
                "owner_id": None,
                "workgroup_id": None,
                "created_at": now,
                "last_message": None,
                "last_message_at": None,
            }
        )
    talk = [
        ("ann", False),
        ("ben", False),
        ("ann", True),  # deleted
        ("cat", False),
        ("ben", False),
        (None, False),  # posted by the portal
        ("ann", False),
    ]
    pair = [("ann", False), ("ben", False), ("ben", True)]
    messages: dict[str, list[str]] = {"c-talk": [], "c-pair": []}
    serial = 0
    # written interleaved, as time went by: ids are in posting order within each chat
    for chat_id, items in (("c-talk", talk), ("c-pair", pair)):
        for author, deleted in items:
            serial += 1
            message_id = oid(1_700_000_000 + serial, serial)
            messages[chat_id].append(message_id)
            await store["messages"].insert_one(
                {
                    "_id": message_id,
                    "chat_id": chat_id,
                    "author_id": author,
                    "text": "" if deleted else f"text {serial}",
                    "created_at": now,
                    "edited_at": None,
                    "deleted": deleted,
                    "system": author is None,
                    "client_id": None,
                }
            )
    last = messages["c-talk"][-1]
    await store["chats"].update_one(
        {"_id": "c-talk"}, {"$set": {"last_message": {"id": last, "text": "text 7"}}}
    )
    # as the old version left them: posting put one's mark on one's message
    marks = {
        ("c-talk", "ann"): messages["c-talk"][6],  # her own, the last
        ("c-talk", "ben"): messages["c-talk"][4],  # his own fifth
        ("c-talk", "cat"): messages["c-talk"][3],  # her own fourth
        ("c-quiet", "ann"): None,
        ("c-quiet", "ben"): None,
        ("c-pair", "ann"): messages["c-pair"][0],
        ("c-pair", "ben"): messages["c-pair"][2],
    }
    for (chat_id, user), mark in marks.items():
        await store["chat_members"].insert_one(
            {
                "_id": f"{chat_id}|{user}",
                "chat_id": chat_id,
                "user_id": user,
                "joined_at": now,
                "last_read_id": mark,
            }
        )
    return messages


async def old_counts(store: Store, user: str) -> dict[str, int]:
    """How the previous version counted: after the mark by _id, not deleted, not one's own."""
    found: dict[str, int] = {}
    async for member in store["chat_members"].find({"user_id": user}):
        query: Document = {"chat_id": member["chat_id"], "deleted": False}
        count = 0
        async for message in store["messages"].find(query):
            mark = member.get("last_read_id")
            if (mark is None or message["_id"] > mark) and message.get("author_id") != user:
                count += 1
        if count:
            found[member["chat_id"]] = count
    return found


def service(settings: Settings, store: Store) -> ImService:
    bus = InProcessBus()
    streams = StreamLog(store, bus, retention_seconds=3600)
    return ImService(store, streams, DirectoryService(store, streams, bus), bus, settings)


async def test_an_existing_database_keeps_its_unread_numbers(
    settings: Settings, store: Store
) -> None:
    messages = await old_database(store)
    before = {user: await old_counts(store, user) for user in ("ann", "ben", "cat")}
    assert before == {
        "ann": {"c-pair": 1},  # ben's second (his third is deleted)
        "ben": {"c-talk": 2},  # the portal's, ann's last
        "cat": {"c-talk": 3},  # ben's fifth, the portal's, ann's last
    }
    assert await number_messages(store, "node-a") is True
    im = service(settings, store)
    for user, expected in before.items():
        assert (await im.counters(user)).chats == expected, user
    talk = [d async for d in store["messages"].find({"chat_id": "c-talk"}, sort=[("_id", 1)])]
    assert [d["n"] for d in talk] == [1, 2, 3, 4, 5, 6, 7]
    chat = await store["chats"].find_one({"_id": "c-talk"})
    assert chat is not None
    assert chat["msg_count"] == 7 and chat["deleted_ns"] == [3]
    assert chat["last_message"]["n"] == 7 and chat["last_message"]["id"] == messages["c-talk"][-1]
    quiet = await store["chats"].find_one({"_id": "c-quiet"})
    assert quiet is not None and quiet["msg_count"] == 0 and quiet["deleted_ns"] == []
    members = {m["_id"]: m["read_n"] async for m in store["chat_members"].find({})}
    assert members == {
        "c-talk|ann": 7,
        "c-talk|ben": 5,
        "c-talk|cat": 4,
        "c-quiet|ann": 0,
        "c-quiet|ben": 0,
        "c-pair|ann": 1,
        "c-pair|ben": 3,
    }
    assert (await ImCheck(store).check()).clean
    indexes = await store["messages"].index_information()
    assert indexes["chat_ordinal"]["unique"] is True
    # once: a second start reads the marker and changes nothing
    assert await number_messages(store, "node-b") is False


async def test_a_mark_left_behind_ones_own_message_moves_to_it(
    settings: Settings, store: Store
) -> None:
    """Two sends of one user racing in the old version could leave their read mark on the
    older: writing reads, so the mark moves to their newest message."""
    messages = await old_database(store)
    await store["chat_members"].update_one(
        {"_id": "c-talk|ann"}, {"$set": {"last_read_id": messages["c-talk"][2]}}
    )
    await number_messages(store, "node-a")
    member = await store["chat_members"].find_one({"_id": "c-talk|ann"})
    assert member is not None and member["read_n"] == 7


async def test_numbering_continues_after_a_crash_and_waits_out_a_dead_owner(
    settings: Settings, store: Store
) -> None:
    messages = await old_database(store)
    # a node died after numbering the first three messages of a chat, holding the lease
    for n, message_id in enumerate(messages["c-talk"][:3], start=1):
        await store["messages"].update_one({"_id": message_id}, {"$set": {"n": n}})
    await store.portal.insert_one(
        {"_id": MARKER, "owner": "dead-node", "lease_until": utcnow() - timedelta(seconds=1)}
    )
    # two nodes start at once: one takes the lease over and numbers, the other waits for it
    done = await asyncio.gather(
        number_messages(store, "node-a", poll_seconds=0.05),
        number_messages(store, "node-b", poll_seconds=0.05),
    )
    assert sorted(done) == [False, True]
    talk = [d async for d in store["messages"].find({"chat_id": "c-talk"}, sort=[("_id", 1)])]
    assert [d["n"] for d in talk] == [1, 2, 3, 4, 5, 6, 7]
    assert (await ImCheck(store).check()).clean
    marker = await store.portal.find_one({"_id": MARKER})
    assert marker is not None and marker["done_at"] is not None and marker["messages"] == 10


async def test_new_messages_follow_the_numbered_ones(settings: Settings, store: Store) -> None:
    await old_database(store)
    await number_messages(store, "node-a")
    im = service(settings, store)
    ann = {"_id": "ann", "is_active": True}
    sent = await im.send(ann, SendMessage(chat_id="c-talk", text="after the upgrade"))
    assert sent.messages[0].n == 8
    await im.settled()
    assert (await im.counters("cat")).chats == {"c-talk": 4}
    assert (await im.counters("ann")).chats == {"c-pair": 1}
    assert (await ImCheck(store).check()).clean
    await im.close()
