"""Group commit of messages on the real database: concurrent sends share their round trips,
each sender gets its own answer, a session's messages are stored in the order it submitted
them, and two nodes writing into one chat keep its ordinals unique and without gaps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import monitoring
from pymongo.errors import AutoReconnect

from server.directory.models import UserCreate
from server.directory.service import DirectoryService
from server.events.bus import InProcessBus
from server.events.models import Event
from server.events.streams import HEAD_RAISE_INTERVAL, Append, StreamLog
from server.im.check import ImCheck
from server.im.migration import number_messages
from server.im.models import SendMessage
from server.im.service import ImService
from server.im.writer import BOOKKEEPING_INTERVAL
from server.settings import Settings
from server.store.database import Document, Store
from server.web.problems import Problem


class Inserts(monitoring.CommandListener):
    def __init__(self) -> None:
        self.by_collection: dict[str, int] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            name = str(event.command["insert"])
            self.by_collection[name] = self.by_collection.get(name, 0) + 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@dataclass
class Node:
    """One hub's messenger: its own bus, stream log and writer, on the shared database."""

    store: Store
    bus: InProcessBus
    streams: StreamLog
    directory: DirectoryService
    im: ImService
    published: list[Event]

    async def close(self) -> None:
        await self.im.close()
        await self.streams.close()


def node(store: Store, settings: Settings) -> Node:
    bus = InProcessBus()
    streams = StreamLog(store, bus, retention_seconds=3600)
    directory = DirectoryService(store, streams, bus)
    published: list[Event] = []

    async def record(event: Event) -> None:
        published.append(event)

    bus.subscribe(record)
    return Node(
        store,
        bus,
        streams,
        directory,
        ImService(store, streams, directory, bus, settings),
        published,
    )


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"im_messages_per_second": 1000.0, "im_message_burst": 1000})


@pytest.fixture
async def counted_store(store: Store) -> AsyncIterator[tuple[Store, Inserts]]:
    inserts = Inserts()
    monitored = Store(store.url, store.db.name)
    monitored.client = type(store.client)(store.url, event_listeners=[inserts], tz_aware=True)
    monitored.db = monitored.client[store.db.name]
    await number_messages(monitored, "test")
    try:
        yield monitored, inserts
    finally:
        await monitored.client.close()


async def users(one: Node, *names: str) -> list[Document]:
    found = []
    for name in names:
        user = await one.directory.create_user(UserCreate(login=name, email=f"{name}@example.test"))
        found.append(await one.directory.user_document(user.id))
    return found


async def test_concurrent_sends_share_their_inserts_and_each_gets_its_answer(
    counted_store: tuple[Store, Inserts], fast: Settings
) -> None:
    store, inserts = counted_store
    one = node(store, fast)
    try:
        people = await users(one, *(f"u{i}" for i in range(9)))
        hub_user = people[0]
        dialogs = [(await one.im.open_private(p, hub_user["_id"]))["_id"] for p in people[1:]]
        first = await one.im.send(
            people[1], SendMessage(chat_id=dialogs[0], text="first", client_id="again")
        )
        await one.im.settled()
        # Each sender's chat and memberships cached, as a connected session has them: then no
        # send waits for the database before it is queued, and how many inserts they share
        # depends on the writer alone, not on when each sender's reads come back.
        for person, chat in zip(people[1:], dialogs, strict=True):
            await one.im.readable_chat(str(person["_id"]), chat)
            await one.im.member_streams(person)
        before = dict(inserts.by_collection)
        results = await asyncio.gather(
            *(
                one.im.send(p, SendMessage(chat_id=chat, text=f"from {p['login']}"))
                for p, chat in zip(people[1:], dialogs, strict=True)
            ),
            # a retry of a send stored before, and two copies of a new one in the same moment
            one.im.send(
                people[1], SendMessage(chat_id=dialogs[0], text="first", client_id="again")
            ),
            one.im.send(people[2], SendMessage(chat_id=dialogs[1], text="twice", client_id="x")),
            one.im.send(people[2], SendMessage(chat_id=dialogs[1], text="twice", client_id="x")),
        )
        await one.im.settled()
        messages = inserts.by_collection["messages"] - before.get("messages", 0)
        events = inserts.by_collection["events"] - before.get("events", 0)
        # eleven sends: the first takes the writer, the rest queue and go together
        assert messages <= 3 and events <= 3, inserts.by_collection
        for person, result in zip(people[1:], results[:8], strict=True):
            assert not result.duplicate
            assert result.messages[0].text == f"from {person['login']}"
        retried, twice_a, twice_b = results[8:]
        assert retried.duplicate and retried.messages[0].id == first.messages[0].id
        assert {twice_a.duplicate, twice_b.duplicate} == {False, True}
        assert twice_a.messages[0].id == twice_b.messages[0].id
        assert await store["messages"].count_documents({"dedup_key": {"$exists": True}}) == 2
        assert (await ImCheck(store).check()).clean
    finally:
        await one.close()


async def test_messages_are_stored_in_the_order_submitted(store: Store, fast: Settings) -> None:
    """A Jabber session submits a paste of forty lines, each without waiting for the one
    before to be stored: they are numbered, sequenced and published in that order."""
    await number_messages(store, "test")
    one = node(store, fast)
    try:
        alice, bob = await users(one, "alice", "bob")
        chat = (await one.im.open_private(alice, bob["_id"]))["_id"]
        pending = [
            await one.im.submit(alice, SendMessage(chat_id=chat, text=f"line {i}"))
            for i in range(40)
        ]
        results = await asyncio.gather(*pending)
        assert [r.messages[0].n for r in results] == list(range(1, 41))
        published = [e.data["message"]["text"] for e in one.published if e.type == "im.message"]
        assert published == [f"line {i}" for i in range(40)]
        seqs = [e.seq for e in one.published if e.type == "im.message"]
        assert seqs == sorted(seqs)
    finally:
        await one.close()


async def test_two_nodes_writing_into_one_chat_keep_its_ordinals(
    store: Store, fast: Settings
) -> None:
    """Each node numbers from what it knows; the one that loses a race for an ordinal reads
    the chat's head exactly and retries: 1..n, each once, and the counts right."""
    await number_messages(store, "test")
    one, two = node(store, fast), node(store, fast)
    try:
        alice, bob, carol = await users(one, "alice", "bob", "carol")
        chat = await one.im.create_group(alice, "Team", [bob["_id"], carol["_id"]])

        async def talk(where: Node, who: Document, count: int) -> None:
            for i in range(count):
                await where.im.send(who, SendMessage(chat_id=chat["_id"], text=f"{i}"))

        await asyncio.gather(
            talk(one, alice, 25), talk(two, bob, 25), talk(one, carol, 10), talk(two, carol, 10)
        )
        await one.im.settled()
        await two.im.settled()
        numbers = sorted([d["n"] async for d in store["messages"].find({"chat_id": chat["_id"]})])
        assert numbers == list(range(1, 71))
        report = await ImCheck(store).check()
        assert report.clean, report
        # A node that read nothing yet gives everyone what a recount gives: the messages by
        # others after their own last one (posting reads the chat).
        stored = [d async for d in store["messages"].find({"chat_id": chat["_id"]})]
        fresh = node(store, fast)
        try:
            for who in (alice, bob, carol):
                own = max(d["n"] for d in stored if d["author_id"] == who["_id"])
                expected = sum(1 for d in stored if d["n"] > own)
                counted = (await fresh.im.counters(who["_id"])).chats.get(chat["_id"], 0)
                assert counted == expected, who["login"]
        finally:
            await fresh.close()
    finally:
        await one.close()
        await two.close()


async def test_a_message_taken_back_under_another_nodes_message_counts_as_deleted(
    store: Store, fast: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node one stores message n but not its event; meanwhile node two numbers its own
    message n + 1. Node one takes n back (503): the ordinal cannot be given again, so it
    must count as deleted, or everyone's unread number in the chat is one too high."""
    await number_messages(store, "test")
    one, two = node(store, fast), node(store, fast)
    try:
        alice, bob, carol = await users(one, "alice", "bob", "carol")
        chat = (await one.im.create_group(alice, "Team", [bob["_id"], carol["_id"]]))["_id"]
        await one.im.send(alice, SendMessage(chat_id=chat, text="before"))
        await one.im.settled()
        held: list[asyncio.Future[Event]] = []
        holding = asyncio.Event()

        def hold(items: list[Append]) -> list[asyncio.Future[Event]]:
            futures = [asyncio.get_running_loop().create_future() for _ in items]
            held.extend(futures)
            holding.set()
            return futures

        monkeypatch.setattr(one.streams, "enqueue", hold)
        lost = await one.im.submit(alice, SendMessage(chat_id=chat, text="lost"))
        await asyncio.wait_for(holding.wait(), 10)  # stored as n = 2, its event on its way
        stored = await two.im.send(bob, SendMessage(chat_id=chat, text="kept"))
        assert stored.messages[0].n == 3
        for future in held:
            future.set_exception(RuntimeError("the event could not be stored"))
        with pytest.raises(Problem) as refused:
            await lost
        assert refused.value.status == 503
        await one.im.settled()
        await two.im.settled()
        assert [d["n"] async for d in store["messages"].find({"chat_id": chat})] == [1, 3]
        report = await ImCheck(store).check()
        assert report.clean, report
        fresh = node(store, fast)
        try:
            # carol: "before" and "kept" unread; the taken-back one is nobody's
            assert (await fresh.im.counters(carol["_id"])).chats[chat] == 2
        finally:
            await fresh.close()
    finally:
        await one.close()
        await two.close()


async def test_a_batch_the_database_refuses_is_answered_503_and_logged_without_its_text(
    store: Store, fast: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Senders whose messages could not be stored get 503 (a retry with the same client_id
    is safe), and the operator gets the cause: the error, not the messages' text."""
    one = node(store, fast)
    try:
        alice, bob = await users(one, "alice", "bob")
        chat = (await one.im.create_group(alice, "Team", [bob["_id"]]))["_id"]
        relaxed = store.relaxed

        class Refusing:
            def __init__(self, collection: Any) -> None:
                self._collection = collection

            def __getattr__(self, name: str) -> Any:
                return getattr(self._collection, name)

            async def insert_many(self, *_args: Any, **_kwargs: Any) -> None:
                raise AutoReconnect("connection closed by the database")

        def refusing(name: str) -> Any:
            found = relaxed(name)
            return Refusing(found) if name == "messages" else found

        monkeypatch.setattr(store, "relaxed", refusing)
        with caplog.at_level("WARNING", logger="server.im.writer"), pytest.raises(Problem) as no:
            await one.im.send(alice, SendMessage(chat_id=chat, text="the secret plan"))
        assert no.value.status == 503
        warned = [r.getMessage() for r in caplog.records if r.name == "server.im.writer"]
        assert any("storing 1 messages failed (AutoReconnect" in m for m in warned), warned
        assert not any("secret plan" in m for m in warned), warned
    finally:
        await one.close()


class Updates(monitoring.CommandListener):
    """The update statements sent, by collection (a bulk_write of n updates counts n)."""

    def __init__(self) -> None:
        self.by_collection: dict[str, int] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update":
            name = str(event.command["update"])
            count = len(event.command.get("updates") or ())
            self.by_collection[name] = self.by_collection.get(name, 0) + count

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_closed_loop_senders_update_each_chat_once_per_round_not_per_message(
    store: Store, fast: Settings
) -> None:
    """Eight senders, each in its own dialog, each sending when answered (the bench's 1:1
    scenario): a batch holds one message per chat, so the bookkeeping (the chat's count and
    preview, the author's read position) and the stream heads, written per batch, cost three
    updates per message, more than the two inserts. They are written once per round
    (BOOKKEEPING_INTERVAL, HEAD_RAISE_INTERVAL) for every message of the round."""
    updates = Updates()
    monitored = Store(store.url, store.db.name)
    monitored.client = type(store.client)(store.url, event_listeners=[updates], tz_aware=True)
    monitored.db = monitored.client[store.db.name]
    await number_messages(monitored, "test")
    one = node(monitored, fast)
    try:
        people = await users(one, *(f"s{i}" for i in range(9)))
        dialogs = [(await one.im.open_private(p, people[0]["_id"]))["_id"] for p in people[1:]]
        await one.im.settled()
        await one.streams.settled()
        before = dict(updates.by_collection)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def sender(person: Document, chat_id: str) -> None:
            for k in range(25):
                await one.im.send(person, SendMessage(chat_id=chat_id, text=f"m{k}"))

        await asyncio.gather(*(sender(p, c) for p, c in zip(people[1:], dialogs, strict=True)))
        await one.im.settled()
        await one.streams.settled()
        elapsed = loop.time() - started
        rounds = elapsed / BOOKKEEPING_INTERVAL + 2  # the last round waits out its interval
        sent = {k: v - before.get(k, 0) for k, v in updates.by_collection.items()}
        report = (sent, f"{elapsed:.2f}s for 200 messages")
        for collection in ("chats", "chat_members", "streams"):
            assert sent.get(collection, 0) <= len(dialogs) * rounds, report
        assert BOOKKEEPING_INTERVAL == HEAD_RAISE_INTERVAL
        chats = [d async for d in store["chats"].find({"_id": {"$in": dialogs}})]
        assert sorted(int(c["msg_count"]) for c in chats) == [25] * len(dialogs)
        assert (await ImCheck(store).check()).clean
    finally:
        await one.close()
        await monitored.client.close()


async def test_a_bookkeeping_round_due_during_a_batch_waits_until_the_batch_is_answered(
    store: Store, fast: Settings
) -> None:
    """A round (a message's chat count and preview, its author's read position) is due one
    interval after the last; at a light rate that moment fell anywhere, across the inserts of
    the next message, which the database then served after the round's updates. It waits
    for the batch being written and goes right after its answer (at most one more interval).
    """
    one = node(store, fast)
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    try:
        alice, bob = await users(one, "alice", "bob")
        chat_id = (await one.im.open_private(alice, bob["_id"]))["_id"]
        await one.im.send(alice, SendMessage(chat_id=chat_id, text="first"))
        bookkeeper = one.im._writer.bookkeeper
        await asyncio.sleep(0.05)
        assert bookkeeper.pending == 0  # its round went right after its answer
        rounds: list[float] = []
        write = bookkeeper._write

        async def timed(chats: dict[str, Any], members: dict[str, Any]) -> None:
            rounds.append(loop.time())
            await write(chats, members)

        bookkeeper._write = timed  # type: ignore[method-assign]
        await one.im.send(alice, SendMessage(chat_id=chat_id, text="second"))  # a round due
        due = loop.time() + BOOKKEEPING_INTERVAL
        append = one.streams._write

        async def held(batch: Any) -> Any:
            await gate.wait()
            return await append(batch)

        one.streams._write = held  # type: ignore[method-assign]
        third = asyncio.ensure_future(one.im.send(alice, SendMessage(chat_id=chat_id, text="3")))
        await asyncio.sleep(max(0.0, due - loop.time()) + BOOKKEEPING_INTERVAL / 2)
        assert rounds == [], "the round went while a message was being written"
        released = loop.time()
        gate.set()
        await third
        await one.im.settled()
        assert rounds and rounds[0] >= released, (rounds, released)
        chat = await store["chats"].find_one({"_id": chat_id})
        assert chat is not None and chat["msg_count"] == 3
    finally:
        gate.set()
        await one.close()
