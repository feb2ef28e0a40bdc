"""Every query on the hot paths (connect, send, read, replay) is served by an index on the
embedded database, which uses an index only when every field of the filter is in it
(`explain()`); and the documents it examines do not grow with the history.

Run with ``-s`` to see the plans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from pymongo.asynchronous.cursor import AsyncCursor

from server.events.streams import BY_ID, HEAD_LAG_WINDOW, stored_since
from server.im.models import SendMessage
from server.im.rules import chat_stream
from server.settings import Settings
from server.store.database import Document, Store, utcnow
from server.tasks.counters import UNFINISHED
from tests.harness import HubHarness, start_hub


def plan_of(explained: Document) -> tuple[str, str | None]:
    """(stage, index name) of the winning plan's access."""
    stage = explained["queryPlanner"]["winningPlan"]
    while "inputStage" in stage and stage["stage"] in ("FETCH", "SORT", "LIMIT", "PROJECTION"):
        stage = stage["inputStage"]
    return stage["stage"], stage.get("indexName")


@pytest.fixture
async def fast_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    """A hub that lets one user post hundreds of messages in a moment (the history)."""
    fast = settings.model_copy(
        update={"im_messages_per_second": 10_000.0, "im_message_burst": 10_000}
    )
    async with start_hub(fast, store) as hub:
        yield hub


async def test_hot_queries_use_an_index_and_examine_what_they_return(fast_hub: HubHarness) -> None:
    hub = fast_hub
    svc = hub.services
    alice_id, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    bob = await svc.directory.user_document(bob_id)
    chats = []
    for n in range(20):
        chat = await svc.im.create_group(bob, f"c{n}", [alice_id])
        chats.append(chat["_id"])
    for start in range(0, 600, 100):
        await asyncio.gather(
            *(
                svc.im.send(
                    bob,
                    SendMessage(chat_id=chats[i % 20], text=f"m{i}", client_id=f"c{i}"),
                )
                for i in range(start, start + 100)
            )
        )
    await svc.im.settled()
    await svc.streams.settled()
    store = svc.store
    chat = chats[3]
    message = await store["messages"].find_one({"chat_id": chat, "n": 5})
    assert message is not None
    token_doc = await store.tokens.find_one({"user_id": alice_id})
    assert token_doc is not None and alice

    # alice's history of tasks: a recount of her task counters reads the open one
    await store["tasks"].insert_many(
        [
            {
                "responsible_id": alice_id,
                "author_id": bob_id,
                "participant_ids": [bob_id, alice_id],
                "status": 5 if n else 2,
            }
            for n in range(12)
        ]
    )

    queries: list[tuple[str, str, Callable[[], AsyncCursor[Document]]]] = [
        # connect: the token, the user, memberships, their chats, the heads of their streams
        ("tokens by hash", "_id_", lambda: store.tokens.find({"_id": token_doc["_id"]})),
        ("users by id", "_id_", lambda: store.users.find({"_id": {"$in": [alice_id, bob_id]}})),
        ("memberships", "user", lambda: store["chat_members"].find({"user_id": alice_id})),
        ("chats by id", "_id_", lambda: store["chats"].find({"_id": {"$in": chats}})),
        (
            "stream heads",
            "_id_",
            lambda: store.streams.find({"_id": {"$in": [chat_stream(c) for c in chats]}}),
        ),
        ("task counters", "_id_", lambda: store["task_counters"].find({"_id": alice_id})),
        # a recount of the stored task counters: the unfinished tasks of one role
        (
            "unfinished tasks by role",
            "responsible_status",
            lambda: store["tasks"].find(
                {"responsible_id": alice_id, "status": {"$in": UNFINISHED}}
            ),
        ),
        (
            "unfinished tasks helped with",
            "participants_status",
            lambda: store["tasks"].find(
                {"participant_ids": alice_id, "status": {"$in": UNFINISHED}}
            ),
        ),
        # a task list; a full count of task counters
        (
            "tasks by role",
            "responsible_status",
            lambda: store["tasks"].find({"responsible_id": bob_id}),
        ),
        ("task views", "user", lambda: store["task_views"].find({"user_id": alice_id})),
        ("CRM numbers", "_id_", lambda: store["crm_counters"].find({"_id": alice_id})),
        # replay: what a client missed on a stream
        (
            "replay",
            "stream_seq",
            lambda: store.events.find(
                {"stream": chat_stream(chat), "seq": {"$gt": 25}}, sort=[("seq", 1)], limit=5001
            ),
        ),
        # send: a chat's last ordinal read exactly after a lost race; a retry's first attempt
        (
            "chat head",
            "chat_ordinal",
            lambda: store["messages"].find(
                {"chat_id": chat, "n": {"$gt": 28}}, sort=[("n", -1)], limit=1
            ),
        ),
        (
            "earlier send",
            "dedup_sparse",
            lambda: store["messages"].find({"dedup_key": message["dedup_key"]}),
        ),
        (
            "its event (the chat's events, newest first)",
            "stream_seq",
            lambda: store.events.find(
                {"stream": chat_stream(chat), "seq": {"$gt": 0}}, sort=[("seq", -1)], limit=200
            ),
        ),
        (
            "stream head after a lost race",
            "stream_seq",
            lambda: store.events.find(
                {"stream": chat_stream(chat), "seq": {"$gt": 28}}, sort=[("seq", -1)], limit=1
            ),
        ),
        # read: the message's ordinal; a deletion's members
        ("message by id", "_id_", lambda: store["messages"].find({"_id": message["_id"]})),
        ("chat's members", "chat", lambda: store["chat_members"].find({"chat_id": chat})),
        # the bus's recovery: events stored lately, whose heads may not be written yet
        (
            "recent events",
            "_id_",
            lambda: store.events.find(stored_since(utcnow() - HEAD_LAG_WINDOW), hint=BY_ID),
        ),
    ]
    report: list[tuple[str, str, str | None, Any, Any]] = []
    for name, index, query in queries:
        explained = await query().explain()
        stage, used = plan_of(explained)
        stats = explained.get("executionStats", {})
        examined, returned = stats.get("totalDocsExamined"), stats.get("nReturned")
        report.append((name, stage, used, examined, returned))
        assert used == index or (index == "_id_" and stage in ("IDHACK", "EXPRESS_IXSCAN")), (
            name,
            explained["queryPlanner"]["winningPlan"],
        )
        if isinstance(examined, int) and isinstance(returned, int) and name != "recent events":
            # the sorted lookups may read a few around the range; never the history
            assert examined <= returned + 5, (name, examined, returned)
    print()
    for name, stage, used, examined, returned in report:
        print(
            f"  {name:<32} {stage:<8} {used or '':<14} examined {examined!s:<5} returned {returned}"
        )
    assert timedelta(seconds=1) < HEAD_LAG_WINDOW


async def test_own_message_lookups_by_client_id_use_an_index(fast_hub: HubHarness) -> None:
    """A correction or retraction from a Jabber client names the message by the id or
    origin-id it sent it with (XEP-0308, XEP-0424): each lookup is whole in an index and
    reads the message, not the chat's history."""
    from server.im.models import MessageOrigin
    from server.xmpp.modules.messages import own_lookups

    hub = fast_hub
    svc = hub.services
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    bob = await svc.directory.user_document(bob_id)
    chat = await svc.im.create_group(bob, "room", [alice_id])
    await asyncio.gather(
        *(
            svc.im.send(
                bob,
                SendMessage(chat_id=chat["_id"], text=f"m{i}", client_id=f"c{i}"),
                origin=MessageOrigin(id=str(i % 50), origin_id=f"o{i}"),
            )
            for i in range(300)
        )
    )
    await svc.im.settled()
    messages = svc.store["messages"]
    for ident in ("7", "o123"):
        for query in own_lookups(bob_id, chat["_id"], ident):
            explained = await messages.find(query, sort=[("_id", -1)], limit=1).explain()
            _, used = plan_of(explained)
            assert used == "origin_keys_sparse", (
                query,
                explained["queryPlanner"],
            )
            examined = explained.get("executionStats", {}).get("totalDocsExamined")
            if isinstance(examined, int):
                assert examined <= 10, (query, examined)
