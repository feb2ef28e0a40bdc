"""A chat's history page reads a bounded range of its messages, whatever the chat's length.

The embedded database fetches every document of an index range before it sorts and limits,
so a page is read from a range closed on both sides (``ImService.history``): these tests
check what the database examined for each page, and that the pages are what an unbounded
read by id gives, including where ordinals and ids disagree and where ordinals have gaps.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from bson import ObjectId

from server.im.models import HistoryQuery, SendMessage
from server.im.service import ORDINAL_GAP, PAGE_REACHES
from server.settings import Settings
from server.store.database import Document, Store, id_at
from tests.harness import FindsOn, HubHarness, start_hub, watched_store
from tests.index_rule import served_by_index

LIMIT = 50
# What a bounded page may examine: its reach, the page itself, an ordinal gap's worth.
EXAMINED_AT_MOST = (PAGE_REACHES[0] + 1) * LIMIT + ORDINAL_GAP


@pytest.fixture
async def watched(settings: Settings, store: Store) -> AsyncIterator[tuple[HubHarness, FindsOn]]:
    finds = FindsOn("messages")
    fast = settings.model_copy(
        update={"im_messages_per_second": 10_000.0, "im_message_burst": 10_000}
    )
    async with watched_store(store, finds) as monitored, start_hub(fast, monitored) as hub:
        yield hub, finds


async def naive(store: Store, chat_id: str, query: HistoryQuery) -> list[str]:
    """The page as an unbounded read by id gives it (oldest first, as ``history`` answers)."""
    id_range: Document = {}
    if query.before:
        id_range["$lt"] = query.before
    if query.after:
        id_range["$gt"] = query.after
    filters: Document = {"chat_id": chat_id, **({"_id": id_range} if id_range else {})}
    newest_first = query.after is None
    docs = await (
        store["messages"]
        .find(filters, {"_id": 1}, sort=[("_id", -1 if newest_first else 1)], limit=query.limit)
        .to_list()
    )
    ids = [d["_id"] for d in docs]
    return list(reversed(ids)) if newest_first else ids


async def group_of_two(hub: HubHarness, title: str) -> tuple[Document, str]:
    """Bob (who posts) and his group chat with Alice."""
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    bob = await hub.services.directory.user_document(bob_id)
    chat = await hub.services.im.create_group(bob, title, [alice_id])
    return bob, chat["_id"]


async def test_a_page_of_a_long_chat_examines_a_bounded_range(
    watched: tuple[HubHarness, FindsOn],
) -> None:
    hub, finds = watched
    svc = hub.services
    bob, chat_id = await group_of_two(hub, "long")
    for start in range(0, 700, 100):
        await asyncio.gather(
            *(
                svc.im.send(bob, SendMessage(chat_id=chat_id, text=f"m{i}", client_id=f"c{i}"))
                for i in range(start, start + 100)
            )
        )
    await svc.im.settled()
    store = svc.store
    by_n = {
        d["n"]: d["_id"]
        async for d in store["messages"].find({"chat_id": chat_id}, {"n": 1, "_id": 1})
    }
    assert len(by_n) == 700
    # one node: ids in the order of the ordinals (made as each message is queued)
    assert [by_n[n] for n in sorted(by_n)] == sorted(by_n.values())
    queries = [
        HistoryQuery(limit=LIMIT),  # the newest page, as a chat opens
        HistoryQuery(before=by_n[400], limit=LIMIT),  # scrolling back
        HistoryQuery(after=by_n[100], limit=LIMIT),  # reading forward
        HistoryQuery(after=by_n[100], before=by_n[120], limit=LIMIT),
        HistoryQuery(before=by_n[30], limit=LIMIT),  # near the start: little to read anyway
        HistoryQuery(after=by_n[680], limit=LIMIT),  # near the end
    ]
    for query in queries:
        mark = len(finds.seen)
        page = await svc.im.history(bob, chat_id, query)
        sent = finds.seen[mark:]
        assert sent, query
        assert [m.id for m in page] == await naive(store, chat_id, query), query
        for find in sent:
            assert await finds.examined(store, find) <= EXAMINED_AT_MOST, (query, find)
    # A day's page: the day's messages by their ids, the time checked on what was read
    day = page[0].created_at.date()
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    for query in (
        HistoryQuery(day=day, limit=LIMIT),
        HistoryQuery(day=day, before=by_n[400], limit=LIMIT),
        HistoryQuery(day=day, after=by_n[100], limit=LIMIT),
    ):
        mark = len(finds.seen)
        got = [m.id for m in await svc.im.history(bob, chat_id, query)]
        assert finds.seen[mark:]
        for find in finds.seen[mark:]:
            assert served_by_index("messages", find["filter"]), find
        on_day: Document = {
            "chat_id": chat_id,
            "created_at": {"$gte": midnight, "$lt": midnight + timedelta(1)},
        }
        if query.before:
            on_day["_id"] = {"$lt": query.before}
        if query.after:
            on_day["_id"] = {"$gt": query.after}
        expected = [
            d["_id"]
            for d in await store["messages"]
            .find(on_day, {"_id": 1})
            .sort("_id", -1 if query.after is None else 1)
            .limit(LIMIT)
            .to_list()
        ]
        assert got == (list(reversed(expected)) if query.after is None else expected), query
    # A time bound from the archive (no message of the chat): still the right page.
    moment = id_at(page[0].created_at + timedelta(seconds=1))
    for query in (HistoryQuery(before=moment, limit=LIMIT), HistoryQuery(after=moment)):
        page = await svc.im.history(bob, chat_id, query)
        assert [m.id for m in page] == await naive(store, chat_id, query), query


async def test_pages_are_right_where_ordinals_and_ids_disagree_or_have_gaps(
    watched: tuple[HubHarness, FindsOn],
) -> None:
    """Another node's message can have a later ordinal and an earlier id, and a send taken
    back leaves an ordinal unused: the pages still hold the messages nearest by id."""
    hub, _finds = watched
    svc = hub.services
    bob, chat_id = await group_of_two(hub, "disorder")
    await svc.im.send(bob, SendMessage(chat_id=chat_id, text="first", client_id="first"))
    await svc.im.settled()
    store = svc.store
    template = await store["messages"].find_one({"chat_id": chat_id})
    assert template is not None
    await store["messages"].delete_many({"chat_id": chat_id})
    rng = random.Random(7)
    count = 600
    ids = sorted(str(ObjectId()) for _ in range(count))
    # ordinals follow ids but for neighbours swapped within windows of 5, and some unused
    ordinals = list(range(1, count + 1))
    for start in range(0, count, 5):
        window = ordinals[start : start + 5]
        rng.shuffle(window)
        ordinals[start : start + 5] = window
    gaps = set(range(300, 330)) | {rng.randrange(1, count) for _ in range(40)}
    docs = [
        {**template, "_id": ident, "n": n, "dedup_key": f"{chat_id}|{ident}", "text": ident}
        for ident, n in zip(ids, ordinals, strict=True)
        if n not in gaps
    ]
    await store["messages"].insert_many(docs)
    await store["chats"].update_one({"_id": chat_id}, {"$set": {"msg_count": count}})
    svc.im._state.chat_changed(chat_id)
    stored = [d["_id"] for d in docs]
    for position in [*range(0, len(stored), 37), len(stored) - 1]:
        for query in (
            HistoryQuery(before=stored[position], limit=LIMIT),
            HistoryQuery(after=stored[position], limit=LIMIT),
            HistoryQuery(before=stored[position], limit=7),
            HistoryQuery(after=stored[position], limit=7),
        ):
            page = await svc.im.history(bob, chat_id, query)
            assert [m.id for m in page] == await naive(store, chat_id, query), query
    page = await svc.im.history(bob, chat_id, HistoryQuery(limit=LIMIT))
    assert [m.id for m in page] == stored[-LIMIT:]
