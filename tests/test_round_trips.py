"""The hot paths cost a fixed number of database round trips, whatever the history.

Every command the hub sends is counted (a pymongo ``CommandListener`` on its client): a
Socket.IO connect (first, with nothing cached, and again) and a message sent, with one chat
and ten messages, then with fifty chats and a thousand messages. The counts must not grow.

A connect may queue work for the CRM counters' flusher (numbers never counted, or past a
time-driven change, are brought up to date and pushed). That work is counted apart from the
connect's own commands: by the context it runs in, not by when it happens to land.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import monitoring

from server.events.models import Event
from server.im.models import SendMessage
from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub, watched_store
from tests.xmpp_client import xmpp_login

# Work on its own clock, not per request: the revocation poll, the node registry, the
# scheduler; the CRM's settings, which CrmConfig reads at most every two seconds.
BACKGROUND = {"revocations", "nodes", "schedule", "crm_settings"}


# The mail workers look for claimable mail on a timer, whatever the requests do: how many of
# their looks fall into a window says how long the window was, not what a request cost.
ON_THEIR_OWN_CLOCK = frozenset({"mail_raw"})


# Set in the CRM counters' flusher: its commands (and those of the tasks it gathers, which
# inherit the context) are the CRM's, whichever request queued the work.
IN_CRM_FLUSH: contextvars.ContextVar[bool] = contextvars.ContextVar("in_crm_flush", default=False)


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.crm: list[bool] = []  # per command seen: issued by the CRM counters' flusher

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = event.command.get(event.command_name)
        if not isinstance(collection, str):  # endSessions and the like name no collection
            collection = ""
        if collection in ON_THEIR_OWN_CLOCK:
            return
        self.seen.append((event.command_name, collection))
        self.crm.append(IN_CRM_FLUSH.get())

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def mark(self) -> int:
        return len(self.seen)

    def since(self, mark: int, crm: bool = False) -> Counter[tuple[str, str]]:
        """The commands since ``mark``: the requests' own, or with ``crm`` the flusher's."""
        return Counter(
            c
            for c, by_crm in zip(self.seen[mark:], self.crm[mark:], strict=True)
            if c[1] not in BACKGROUND and by_crm is crm
        )


@pytest.fixture
async def counted(settings: Settings, store: Store) -> AsyncIterator[tuple[HubHarness, Commands]]:
    commands = Commands()
    monitored = Store(store.url, store.db.name)
    monitored.client = type(store.client)(store.url, event_listeners=[commands], tz_aware=True)
    monitored.db = monitored.client[store.db.name]
    # Caches held for the whole test: what is counted is what a cached path costs, and a
    # loaded machine (CI) stretching a test past the default lifetime made a repeated XMPP
    # login re-read (1 failure in 11 runs); the cold paths empty the caches themselves.
    fast = settings.model_copy(
        update={
            "im_messages_per_second": 10_000.0,
            "im_message_burst": 10_000,
            "cache_ttl_seconds": 600.0,
        }
    )
    try:
        async with start_hub(fast, monitored) as hub:
            counters = hub.services.crm.counters
            apply = counters._apply

            async def labelled(work: Any) -> None:
                IN_CRM_FLUSH.set(True)  # this task's own context: the flusher's
                await apply(work)

            counters._apply = labelled  # type: ignore[method-assign]
            yield hub, commands
    finally:
        await monitored.client.close()


async def quiet(hub: HubHarness) -> None:
    """Let the writes that follow a request (bookkeeping, heads) land."""
    await asyncio.sleep(0.05)
    await hub.services.im.settled()
    await hub.services.crm.counters.settled()
    await hub.services.streams.settled()


async def history(hub: HubHarness, chats: int, messages: int) -> tuple[str, str, str]:
    """Alice in ``chats`` chats with ``messages`` messages between them; returns her token,
    bob's token and a chat id."""
    alice_id, alice = await hub.create_user(f"alice{chats}")
    bob_id, bob = await hub.create_user(f"bob{chats}")
    chat_ids = []
    for n in range(chats):
        created = await hub.request(
            "POST", "/api/v1/im/chats", token=bob, json={"title": f"c{n}", "member_ids": [alice_id]}
        )
        chat_ids.append(created.body["id"])
    bob_doc = await hub.services.directory.user_document(bob_id)
    for start in range(0, messages, 100):
        await asyncio.gather(
            *(
                hub.services.im.send(
                    bob_doc, SendMessage(chat_id=chat_ids[i % chats], text=f"m{i}")
                )
                for i in range(start, min(messages, start + 100))
            )
        )
    await quiet(hub)
    return alice, bob, chat_ids[0]


async def connect_cost(
    hub: HubHarness, commands: Commands, token: str
) -> tuple[Counter[Any], Counter[Any]]:
    """What one connect costs: its own commands, and those of the CRM work it queued."""
    mark = commands.mark()
    client = await hub.connect(token)
    await client.wait_for("snapshot")
    await client.wait_for("counters.changed")  # the session's last step, after catching up
    await quiet(hub)
    cost, crm = commands.since(mark), commands.since(mark, crm=True)
    await client.close()
    # going offline (after the presence grace) writes last_seen: not the next one's cost
    await asyncio.sleep(hub.services.settings.presence_grace_seconds + 0.3)
    await quiet(hub)
    return cost, crm


async def send_cost(hub: HubHarness, commands: Commands, token: str, chat_id: str) -> Counter[Any]:
    await hub.request(  # the token, the user, the chat cached by a first send
        "POST", "/api/v1/im/messages", token=token, json={"chat_id": chat_id, "text": "warm"}
    )
    await quiet(hub)
    mark = commands.mark()
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=token, json={"chat_id": chat_id, "text": "counted"}
    )
    assert resp.status == 201, resp.body
    await quiet(hub)
    return commands.since(mark)


async def test_connect_and_send_cost_the_same_round_trips_whatever_the_history(
    counted: tuple[HubHarness, Commands],
) -> None:
    hub, commands = counted
    svc = hub.services
    small = await history(hub, chats=1, messages=10)
    large = await history(hub, chats=50, messages=1000)
    _, someone = await hub.create_user("someone")
    costs = {}
    for name, (alice, bob, chat_id) in (("small", small), ("large", large)):
        # Nothing cached: as after a restart. Then what all users share (the directory, the
        # CRM's settings) is read by someone else's connect, as it would be on a busy node.
        for forget in (svc.directory, svc.auth, svc.im, svc.tasks):
            forget.forget_all()
        await connect_cost(hub, commands, someone)
        first = await connect_cost(hub, commands, alice)
        again = await connect_cost(hub, commands, alice)
        send = await send_cost(hub, commands, bob, chat_id)
        costs[name] = (first, again, send)
    (small_first, small_again, small_send), (large_first, large_again, large_send) = (
        costs["small"],
        costs["large"],
    )
    report = {
        name: {
            "first": dict(first[0]),
            "first, CRM work queued": dict(first[1]),
            "again": dict(again[0]),
            "again, CRM work queued": dict(again[1]),
            "send": dict(send),
        }
        for name, (first, again, send) in costs.items()
    }
    assert large_first == small_first, report
    assert large_again == small_again, report
    assert large_send == small_send, report
    # A warm connect reads no message, counts nothing and leaves the CRM nothing to do; a
    # send writes each document once.
    assert not any(collection == "messages" for _, collection in large_again[0]), report
    assert sum(large_again[0].values()) <= 4, report
    assert not large_again[1], report
    assert large_send == Counter(
        {
            ("insert", "messages"): 1,
            ("insert", "events"): 1,
            ("update", "chats"): 1,  # msg_count and preview
            ("update", "chat_members"): 1,  # the author's read position
            ("update", "streams"): 1,  # the chat stream's head
        }
    ), report
    # A first connect: the token, the user (twice), the memberships and their chats, the
    # stored task counters, the CRM's stored numbers, presence: 7 commands (10 when the task
    # counters were counted on read, one query per role, 2026-12-07).
    own, crm = large_first
    assert not any(collection == "messages" for _, collection in own), report
    assert sum(own.values()) <= 7, report
    # The task counters are read stored (stored, zero, when the user was made), not counted.
    assert own[("find", "task_counters")] == 1, report
    assert not any(collection in ("tasks", "task_views") for _, collection in own), report
    # And no CRM counting: a new user's numbers were stored (zero) when the user was made.
    assert not crm, report


async def test_a_warm_connect_reads_no_head_of_a_chat_nobody_wrote_in(
    counted: tuple[HubHarness, Commands],
) -> None:
    """A chat with no event yet (a group just made) has no head in memory: every connect of
    every member read its head document again. What the read said is kept a while, so a
    member's second connect costs what it costs in a chat with messages: nothing (the
    CRM's numbers, stored when the user was made, are kept from the first)."""
    hub, commands = counted
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    created = await hub.request(
        "POST", "/api/v1/im/chats", token=bob, json={"title": "quiet", "member_ids": [alice_id]}
    )
    assert created.status == 201, created.body
    await quiet(hub)
    first, _ = await connect_cost(hub, commands, alice)
    again, _ = await connect_cost(hub, commands, alice)
    assert first[("find", "streams")] == 1, dict(first)
    assert again == Counter(), dict(again)


async def test_going_online_reads_no_blocklist_of_web_only_colleagues(
    counted: tuple[HubHarness, Commands],
) -> None:
    """A presence change reaches the Jabber sessions of the user's colleagues, each checked
    against the colleague's blocklist. Colleagues with no Jabber session get nothing, so
    their blocklists are not read (one read per colleague, at each change, before)."""
    hub, commands = counted
    colleagues = []
    for n in range(3):  # online on the web (a change is told to online colleagues only)
        _, token = await hub.create_user(f"colleague{n}")
        colleagues.append(await hub.connect(token))
        await colleagues[-1].wait_for("snapshot")
    _, alice = await hub.create_user("alice")
    await asyncio.sleep(hub.services.settings.presence_grace_seconds + 0.3)
    await quiet(hub)
    mark = commands.mark()
    client = await hub.connect(alice)
    await client.wait_for("snapshot")
    await client.wait_for("counters.changed")
    await asyncio.sleep(hub.services.settings.presence_grace_seconds + 0.3)
    await quiet(hub)
    seen = commands.since(mark)
    for one in [client, *colleagues]:
        await one.close()
    assert len(await colleagues[0].wait_for("presence.changed", 2)) >= 2  # alice's came
    assert ("find", "blocklists") not in seen, dict(seen)


async def test_an_xmpp_login_made_again_sends_no_command_before_its_close(
    counted: tuple[HubHarness, Commands],
) -> None:
    """A Jabber client that logs in again (a phone back on the network) is checked against
    the credentials this node keeps, and finds its blocklist, presence and counters cached:
    its login costs the database nothing, roster included (the bench's clients ask for none,
    real ones at every login)."""
    hub, commands = counted
    await hub.create_user("alice")
    await quiet(hub)
    costs = []
    for _ in range(2):
        mark = commands.mark()
        client = await xmpp_login(hub, "alice", mechanism="SCRAM-SHA-1")
        await quiet(hub)
        costs.append(commands.since(mark))
        client.disconnect()
        await asyncio.sleep(hub.services.settings.presence_grace_seconds + 0.3)
        await quiet(hub)
    first, again = costs
    # By login (SCRAM), by id (the session's profile), the presence manual state, and the
    # colleagues' list (the directory's, emptied when alice was created): each once.
    assert first[("find", "users")] <= 4, dict(first)
    assert again == Counter(), dict(again)


async def test_first_connects_of_one_moment_share_their_reads(
    counted: tuple[HubHarness, Commands],
) -> None:
    """A connect burst after a restart is every user's first connect at once: their tokens,
    users, memberships, stored task counters, presence and CRM numbers are read by one query
    per kind per round (``BatchLoad``), not one per connect. The token read is held a moment so that
    the burst's connects meet there, as they meet at the database under load."""
    hub, commands = counted
    svc = hub.services
    users = [await hub.create_user(f"burst{i}") for i in range(8)]
    _, someone = await hub.create_user("someone")
    for forget in (svc.directory, svc.auth, svc.im, svc.tasks):
        forget.forget_all()
    one, _ = await connect_cost(hub, commands, someone)  # also reads what all users share
    reads = svc.auth._token_reads
    read_tokens = reads._load_many

    async def held(hashes: list[str]) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return await read_tokens(hashes)

    reads._load_many = held
    mark = commands.mark()
    clients = await asyncio.gather(*(hub.connect(token) for _, token in users))
    await asyncio.gather(*(client.wait_for("counters.changed") for client in clients))
    await quiet(hub)
    burst = commands.since(mark)
    for client in clients:
        await client.close()
    report = {"one": sorted(one.items()), "burst of 8": sorted(burst.items())}
    # Read by each user's first connect (one's others are what all users share).
    kinds = [
        ("find", k) for k in ("tokens", "users", "chat_members", "task_counters", "crm_counters")
    ]
    kinds.append(("find", "streams"))  # the user's own stream head: nobody wrote in it yet
    assert burst[("find", "tokens")] <= 2, report
    for kind in kinds:
        # One by one, eight connects made eight times one's reads of each kind.
        assert 0 < burst[kind] < len(users) * one[kind], report
    assert sum(burst[k] for k in kinds) <= len(users) * sum(one[k] for k in kinds) / 2, report


class Writes(monitoring.CommandListener):
    """The writes, in order, as they start and as they are acknowledged:
    (started or acknowledged, command, collection, whether it asked for the journal)."""

    WRITES = frozenset({"insert", "update", "delete", "findAndModify", "bulkWrite"})

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, bool]] = []
        self._started: dict[int, tuple[str, str, bool]] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in self.WRITES:
            return
        collection = str(event.command.get(event.command_name))
        journal = bool(event.command.get("writeConcern", {}).get("j"))
        self._started[event.request_id] = (event.command_name, collection, journal)
        self.seen.append(("started", event.command_name, collection, journal))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        write = self._started.pop(event.request_id, None)
        if write is not None:
            self.seen.append(("acknowledged", *write))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._started.pop(event.request_id, None)


async def test_a_message_is_flushed_once_by_its_last_write_before_it_is_published(
    settings: Settings, store: Store
) -> None:
    """The embedded database's URL asks every write for the journal, and each journaled write
    is a flush of its log (an fsync, about a millisecond on the benchmark's disk, in front of
    the message). A message's path to its recipients and its 201 has one: the insert of its
    event, sent once the unjournaled insert of the message was acknowledged, so that the flush
    covers the message too (the database's log is one stream, flushed through the last
    record). The bookkeeping comes after the publication."""
    writes = Writes()
    async with (
        watched_store(store, writes, journal=True) as journaled,
        start_hub(settings, journaled) as hub,
    ):
        alice_id, _alice = await hub.create_user("alice")
        _bob_id, bob = await hub.create_user("bob")
        created = await hub.request(
            "POST", "/api/v1/im/chats", token=bob, json={"title": "c", "member_ids": [alice_id]}
        )
        chat_id = created.body["id"]
        warm = {"chat_id": chat_id, "text": "warm"}  # the token, the user, the chat cached
        assert (
            await hub.request("POST", "/api/v1/im/messages", token=bob, json=warm)
        ).status == 201
        await quiet(hub)
        published: list[int] = []  # writes seen when the message's event was published

        async def on_event(event: Event) -> None:
            if event.type == "im.message" and event.data["message"]["text"] == "counted":
                published.append(len(writes.seen))

        hub.services.bus.subscribe(on_event)
        mark = len(writes.seen)
        counted = {"chat_id": chat_id, "text": "counted"}
        resp = await hub.request("POST", "/api/v1/im/messages", token=bob, json=counted)
        assert resp.status == 201, resp.body
        await quiet(hub)
    assert len(published) == 1, writes.seen[mark:]
    others = BACKGROUND | ON_THEIR_OWN_CLOCK  # pollers' writes, on their own clocks
    path = [w for w in writes.seen[mark : published[0]] if w[2] not in others]
    assert path == [
        ("started", "insert", "messages", False),
        ("acknowledged", "insert", "messages", False),
        ("started", "insert", "events", True),
        ("acknowledged", "insert", "events", True),
    ], writes.seen[mark:]
    # The bookkeeping is still written, after the publication.
    after = {w[2] for w in writes.seen[published[0] :] if w[0] == "started"}
    assert {"chats", "chat_members", "streams"} <= after, writes.seen[mark:]


async def test_a_burst_reads_its_users_memberships_in_one_reply(
    counted: tuple[HubHarness, Commands], store: Store
) -> None:
    """Eight users' first connects of one moment read their memberships by one query. With
    history (27-47 chats a user) those are about 300 rows, and the database's first reply
    holds 101: each such read took one more round trip (getMore) on the burst's way."""
    hub, commands = counted
    state = hub.services.im._state
    await store["chat_members"].insert_many(
        [
            {"_id": f"c{c}|u{u}", "chat_id": f"c{c}", "user_id": f"u{u}", "read_n": c}
            for u in range(8)
            for c in range(40)
        ]
    )
    state.forget_all()
    mark = commands.mark()
    found = await asyncio.gather(*(state.member_map(f"u{u}") for u in range(8)))
    assert [len(m) for m in found] == [40] * 8
    assert found[3]["c7"].read_n == 7
    assert commands.since(mark) == Counter({("find", "chat_members"): 1})
