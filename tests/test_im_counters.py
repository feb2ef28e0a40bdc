"""Maintained unread counters against their specification, on the real database.

The specification is the old count: a member's unread messages in a chat are the messages
after their read mark (``last_read_id``), not deleted, not their own. Random sequences of posts
(single, and bursts that go in one group-committed batch, retries with one client_id among
them), reads (to any message, older ones included), edits, deletes and system notices, by
three users in a group, two dialogs and the notice chats: after every step the maintained
numbers - as this node's caches give them, as the database holds them (a new service with no
cache), and as ``ImCheck`` recounts them - equal the recount, and every chat's ordinals run
1..n without a gap.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from server.directory.models import UserCreate
from server.directory.service import DirectoryService
from server.events.bus import InProcessBus
from server.events.streams import StreamLog
from server.im.check import ImCheck
from server.im.migration import number_messages
from server.im.models import SendMessage
from server.im.service import ImService
from server.settings import Settings
from server.store.database import Document, Store
from server.web.problems import Problem

USERS = ("ann", "ben", "cat")
CHATS = ("group", "ann-ben", "ben-cat")
POST = st.tuples(
    st.just("post"),
    st.sampled_from(USERS),
    st.sampled_from(CHATS),
    st.one_of(st.none(), st.sampled_from(["c1", "c2"])),  # a client_id seen before: a retry
)
OPS = st.one_of(
    POST,
    st.tuples(st.just("burst"), st.lists(POST, min_size=2, max_size=6)),
    st.tuples(st.just("read"), st.sampled_from(USERS), st.sampled_from(CHATS), st.integers(0, 40)),
    st.tuples(st.just("edit"), st.integers(0, 40)),
    st.tuples(st.just("delete"), st.integers(0, 40)),
    st.tuples(st.just("notice"), st.sampled_from(USERS)),
)


class World:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.settings = settings
        self.bus = InProcessBus()
        self.streams = StreamLog(store, self.bus, retention_seconds=3600)
        self.directory = DirectoryService(store, self.streams, self.bus)
        self.im = ImService(store, self.streams, self.directory, self.bus, settings)
        self.users: dict[str, Document] = {}
        self.chats: dict[str, str] = {}
        self.sent = 0

    async def setup(self) -> None:
        await number_messages(self.store, "test")
        for name in USERS:
            user = await self.directory.create_user(
                UserCreate(login=name, email=f"{name}@example.test")
            )
            self.users[name] = await self.directory.user_document(user.id)
        ann, ben, cat = (self.users[n] for n in USERS)
        group = await self.im.create_group(ann, "Group", [ben["_id"], cat["_id"]])
        self.chats["group"] = group["_id"]
        self.chats["ann-ben"] = (await self.im.open_private(ann, ben["_id"]))["_id"]
        self.chats["ben-cat"] = (await self.im.open_private(ben, cat["_id"]))["_id"]

    def member(self, user: str, chat: str) -> bool:
        return chat == "group" or user in chat.split("-")

    async def post(self, user: str, chat: str, client_id: str | None) -> None:
        if not self.member(user, chat):
            return
        self.sent += 1
        request = SendMessage(chat_id=self.chats[chat], text=f"m{self.sent}", client_id=client_id)
        await self.im.send(self.users[user], request)

    async def messages(self, chat_id: str | None = None) -> list[Document]:
        query: Document = {"chat_id": chat_id} if chat_id else {}
        return [d async for d in self.store["messages"].find(query, sort=[("_id", 1)])]

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "post":
            await self.post(*op[1:])
        elif kind == "burst":
            await asyncio.gather(*(self.post(*post[1:]) for post in op[1]))
        elif kind == "read":
            _, user, chat, k = op
            found = await self.messages(self.chats[chat])
            if found and self.member(user, chat):
                target = found[k % len(found)]  # older than the mark too: changes nothing
                await self.im.mark_read(self.users[user], self.chats[chat], target["_id"])
        elif kind in ("edit", "delete"):
            found = [m for m in await self.messages() if m.get("author_id") and not m["deleted"]]
            if not found:
                return
            target = found[op[1] % len(found)]
            author = next(u for u in self.users.values() if u["_id"] == target["author_id"])
            if kind == "edit":
                await self.im.edit(author, target["_id"], target["text"] + " (edited)")
            else:
                await self.im.delete(author, target["_id"])
        elif kind == "notice":
            await self.im.post_system_notice(self.users[op[1]]["_id"], "a notice")

    async def recount(self, user_id: str) -> dict[str, int]:
        """The specification: after the read mark (_id order), not deleted, not one's own."""
        unread: dict[str, int] = {}
        async for member in self.store["chat_members"].find({"user_id": user_id}):
            last = member.get("last_read_id")
            count = 0
            for message in await self.messages(member["chat_id"]):
                if last is not None and message["_id"] <= last:
                    continue
                if not message["deleted"] and message.get("author_id") != user_id:
                    count += 1
            if count:
                unread[member["chat_id"]] = count
        return unread

    async def compare(self) -> None:
        await self.im.settled()
        fresh = ImService(self.store, self.streams, self.directory, InProcessBus(), self.settings)
        for name, user in self.users.items():
            expected = await self.recount(user["_id"])
            cached = await self.im.counters(user["_id"])
            stored = await fresh.counters(user["_id"])
            assert cached.chats == expected, (name, "cached", cached.chats, expected)
            assert stored.chats == expected, (name, "stored", stored.chats, expected)
            assert cached.unread == sum(expected.values())
        report = await ImCheck(self.store).check()
        assert report.clean, report
        by_chat: dict[str, list[int]] = {}
        for message in await self.messages():
            by_chat.setdefault(message["chat_id"], []).append(message["n"])
        for chat_id, numbers in by_chat.items():
            assert sorted(numbers) == list(range(1, len(numbers) + 1)), chat_id
            chat = await self.store["chats"].find_one({"_id": chat_id})
            assert chat is not None and chat["msg_count"] == len(numbers)


async def run(settings: Settings, ops: list[tuple[Any, ...]]) -> None:
    assert settings.mongodb_url is not None
    store = Store(settings.mongodb_url.get_secret_value(), f"t_{uuid.uuid4().hex[:12]}")
    await store.ensure_indexes()
    world = World(settings, store)
    try:
        await world.setup()
        await world.compare()
        for op in ops:
            try:
                await world.apply(op)
            except Problem as problem:
                assert problem.status in (403, 404), problem  # e.g. a deleted message
            await world.compare()
    finally:
        await world.im.close()
        await world.streams.close()
        await store.client.drop_database(store.db.name)
        await store.close()


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"im_messages_per_second": 1000.0, "im_message_burst": 1000})


@hypothesis_settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(OPS, min_size=4, max_size=16))
def test_maintained_unread_counters_equal_a_recount_after_every_step(
    fast_settings: Settings, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(run(fast_settings, ops))


async def test_deleted_and_own_messages_never_count(settings: Settings, store: Store) -> None:
    """The cases the property test may or may not draw, pinned: a deletion after the reader's
    mark, one before it, one's own message after others' unread ones."""
    fast = settings.model_copy(update={"im_messages_per_second": 1000.0, "im_message_burst": 1000})
    world = World(fast, store)
    try:
        await world.setup()
        chat = world.chats["group"]
        ann, ben, cat = (world.users[n]["_id"] for n in USERS)
        for author in ("ann", "ben", "ann"):
            await world.post(author, "group", None)
        first, _second, third = await world.messages(chat)
        assert (await world.im.counters(cat)).chats == {chat: 3}
        await world.im.mark_read(world.users["cat"], chat, first["_id"])
        assert (await world.im.counters(cat)).chats == {chat: 2}
        await world.im.delete(world.users["ann"], third["_id"])  # after cat's mark
        assert (await world.im.counters(cat)).chats == {chat: 1}
        await world.im.delete(world.users["ann"], first["_id"])  # before it
        assert (await world.im.counters(cat)).chats == {chat: 1}
        await world.post("cat", "group", None)  # writing reads
        assert (await world.im.counters(cat)).chats == {}
        assert (await world.im.counters(ben)).chats == {chat: 1}  # cat's; ann's third is gone
        assert (await world.im.counters(ann)).chats == {chat: 1}
        await world.compare()
    finally:
        await world.im.close()
        await world.streams.close()
