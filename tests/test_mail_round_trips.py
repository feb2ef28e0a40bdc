"""A reply's way from the stored raw message to its activity and its counter costs a fixed
number of database round trips per batch, whatever the history.

Every command the hub sends is counted (a pymongo ``CommandListener`` on its client, as in
``test_round_trips.py``) while a batch of replies by code, by thread and by sender is
processed: once with a short history, once after many more replies were delivered. The
pipeline is driven by hand (``drain``) so the count covers exactly the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import SecretStr
from pymongo import monitoring

from server.mailbridge import pipeline as pipeline_module
from server.mailbridge.inbox import RawInbox, Source
from server.mailbridge.models import MailSettingsUpdate
from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub, watched_store
from tests.test_hot_queries import plan_of
from tests.test_mail_bridge import Sink, mail_setup, send_from_deal
from tests.test_mail_bridge import sink as sink
from tests.test_mail_crm import mail, notices, plus_address

INBOX = "crm@portal.test"


class Commands(monitoring.CommandListener):
    """Every command, the mail collections' included (the pipeline is driven by hand here:
    no timed poll runs)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.updates: list[tuple[str, Any]] = []  # (collection, statement) of every update
        self.inserts: list[tuple[str, dict[str, Any]]] = []  # (collection, write concern)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = str(event.command.get(event.command_name))
        self.seen.append((event.command_name, collection))
        if event.command_name == "insert":
            self.inserts.append((collection, dict(event.command.get("writeConcern", {}))))
        if event.command_name == "update":
            self.updates.extend((collection, dict(u)) for u in event.command["updates"])

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def mark(self) -> int:
        return len(self.seen)


@pytest.fixture
async def counted(
    settings: Settings, store: Store, sink: Sink
) -> AsyncIterator[tuple[HubHarness, Commands]]:
    async with monitored_hub(settings, store, sink) as counted:
        yield counted


@pytest.fixture
async def counted_sole(
    settings: Settings, store: Store, sink: Sink
) -> AsyncIterator[tuple[HubHarness, Commands]]:
    """As on the embedded database (no database URL): the only node there can be."""
    async with monitored_hub(settings.model_copy(update={"mongodb_url": None}), store, sink) as c:
        yield c


@contextlib.asynccontextmanager
async def monitored_hub(
    settings: Settings, store: Store, sink: Sink, journal: bool = False
) -> AsyncIterator[tuple[HubHarness, Commands]]:
    """``journal``: every write asks for the journal, as the embedded database's URL does."""
    commands = Commands()
    configured = settings.model_copy(
        update={
            "smtp_relay_url": SecretStr(f"smtp://127.0.0.1:{sink.port}"),
            "domain": "portal.test",
        }
    )
    async with (
        watched_store(store, commands, journal=journal) as monitored,
        start_hub(configured, monitored) as hub,
    ):
        # The workers would claim what the test stores: it drives the pipeline itself.
        await hub.services.mail.pipeline.close()
        yield hub, commands


def replies(sent: EmailMessage, n: int, tag: str) -> list[bytes]:
    """``n`` replies to ``sent``: by code, by thread and by sender in turn."""
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            msg = mail(
                "Carl Client <client@example.test>",
                f"RE: {sent['Subject']}",
                f"{tag} {i}",
                to=plus_address(sent),
            )
        elif kind == 1:
            msg = mail(
                "Carl Client <client@example.test>",
                "Re: Your quote",
                f"{tag} {i}",
                In_Reply_To=str(sent["Message-ID"]),
                References=str(sent["Message-ID"]),
            )
        else:
            msg = mail("Carl Client <client@example.test>", "A question", f"{tag} {i}")
        out.append(msg.as_bytes())
    return out


async def store_all(hub: HubHarness, raws: list[bytes]) -> None:
    inbox = hub.services.mail.inbox
    await asyncio.gather(*(inbox.put(raw, Source("smtp", recipients=(INBOX,))) for raw in raws))


async def marked_sent(hub: HubHarness) -> None:
    for _ in range(200):
        sent = await hub.services.store["crm_activities"].find_one({"direction": "outgoing"})
        if sent is not None and sent["mail"].get("status") != "queued":
            await asyncio.sleep(0.2)  # its announcement, after the mark
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the mail was never marked sent")


async def quiet(hub: HubHarness) -> None:
    await asyncio.sleep(0.05)
    await hub.services.crm.counters.settled()
    await hub.services.streams.settled()
    await hub.services.im.settled()


async def batch_cost(
    hub: HubHarness, commands: Commands, sent: EmailMessage, tag: str
) -> Counter[tuple[str, str]]:
    await store_all(hub, replies(sent, pipeline_module.CLAIM_BATCH, tag))
    await quiet(hub)
    mark = commands.mark()
    done = await hub.services.mail.pipeline.drain()
    assert done == pipeline_module.CLAIM_BATCH
    await quiet(hub)
    return Counter(c for c in commands.seen[mark:] if c[1] in PER_REPLY or c[0] == "getMore")


# The collections a reply's way writes and reads. Left out: caches refreshed on their own
# clock (the CRM's access snapshot, users' documents, chats, the mail settings and keys)
# and the other loops (the outbox, the scheduler, the revocation poll).
PER_REPLY = frozenset(
    {
        "mail_raw",
        "crm_activities",
        "crm_records",
        "crm_history",
        "crm_counters",
        "events",
        "streams",
        "messages",
        "chats",
    }
)
# Reads whose cost would grow with what is stored: each must stay one query per batch (or
# per reply) however many messages, activities and events there are.
HISTORY_BOUND = (
    ("find", "mail_raw"),
    ("find", "crm_activities"),
    ("find", "crm_records"),
)


async def test_a_batch_of_replies_costs_the_same_round_trips_whatever_the_history(
    counted: tuple[HubHarness, Commands], sink: Sink
) -> None:
    hub, commands = counted
    ctx = await mail_setup(hub)
    sent = await send_from_deal(hub, ctx, sink)
    await marked_sent(hub)  # the outbox's own writes and announcement are not a reply's
    await batch_cost(hub, commands, sent, "warm")  # caches: keys, settings, zones, access
    small = await batch_cost(hub, commands, sent, "small")
    # A longer history, all on the same deal: 150 more open activities on it (more than a
    # cursor's first batch), raw messages and events.
    for n in range(6):
        await store_all(hub, replies(sent, 25, f"history{n}"))
        while await hub.services.mail.pipeline.drain():
            pass
    large = await batch_cost(hub, commands, sent, "large")
    report: dict[str, Any] = {"small": dict(small), "large": dict(large)}
    for key in HISTORY_BOUND:
        assert large[key] == small[key], (key, report)
    assert not any(command == "getMore" for command, _ in large), report
    # One batch of replies (by code, thread and sender, to one deal): the claim (3), their
    # earlier copies and what matching reads (one query per kind), one insert of the
    # activities, one write of the records' open counts, one insert of the history entries, the
    # events as their writer gathers them, one notice per record, the counters, the
    # outcomes in one write. It was 22 per reply, one reply after the other, then 8.4 with
    # the writes gathered by timing (one history entry and open count per reply).
    records = {result["record_id"] for result in await outcomes(hub)}
    for cost in (small, large):
        assert sum(cost.values()) <= 12 * pipeline_module.CLAIM_BATCH, report
        # Gathered by construction, not by when each reply reached its write.
        assert cost[("insert", "crm_activities")] == 1, report
        assert cost[("insert", "crm_history")] == 1, report
        assert len(records) == 2, records  # the deal (by code and thread), the contact
        assert cost[("update", "crm_records")] == 1, report  # their open counts, in one write
        assert cost[("insert", "messages")] <= len(records), report  # one notice per record


async def outcomes(hub: HubHarness) -> list[Any]:
    """The results of the replies delivered so far."""
    done = hub.services.store["mail_raw"].find({"status": "done"}, {"result": 1})
    return [d["result"] async for d in done]


async def test_the_batchs_lookups_use_a_full_index(
    counted: tuple[HubHarness, Commands], sink: Sink
) -> None:
    """The embedded database uses an index only when every field of the filter is in it:
    each of the batch's ``$in`` lookups names one indexed field (or an index's fields) and
    examines what it returns."""
    hub, _commands = counted
    ctx = await mail_setup(hub)
    sent = await send_from_deal(hub, ctx, sink)
    await store_all(hub, replies(sent, 24, "plans"))
    while await hub.services.mail.pipeline.drain():
        pass
    store = hub.services.store
    outgoing = await store["crm_activities"].find_one({"direction": "outgoing"})
    assert outgoing is not None
    done = [d async for d in store["mail_raw"].find({"status": "done"}, {"message_id": 1})]
    message_ids = [d["message_id"] for d in done[:8]]
    deal_id, contact_id = ctx["deal"]["id"], ctx["contact"]["id"]
    queries: list[tuple[str, str, Any, Any]] = [
        ("earlier copies", "message_id", store["mail_raw"], {"message_id": {"$in": message_ids}}),
        ("code activities", "_id_", store["crm_activities"], {"_id": {"$in": [outgoing["_id"]]}}),
        (
            "thread mail",
            "mail_message_id",
            store["crm_activities"],
            {"mail.message_id": {"$in": [outgoing["mail"]["message_id"], "<x@y>"]}},
        ),
        ("records", "_id_", store["crm_records"], {"_id": {"$in": [deal_id, contact_id]}}),
        (
            "open activities of records, indicators",
            "owner_open",
            store["crm_activities"],
            {"owner_id": {"$in": [deal_id, contact_id]}, "completed": False},
        ),
        (
            "senders",
            "email_keys",
            store["crm_records"],
            {"email_keys": {"$in": ["client@example.test", "nobody@example.test"]}},
        ),
        (
            "a record's open activities (indicator)",
            "owner",
            store["crm_activities"],
            {"owner_id": deal_id, "completed": False},
        ),
    ]
    for name, index, collection, query in queries:
        explained = await collection.find(query).explain()
        stage, used = plan_of(explained)
        assert used == index or (index == "_id_" and stage in ("IDHACK", "EXPRESS_IXSCAN")), (
            name,
            explained["queryPlanner"]["winningPlan"],
        )
        stats = explained.get("executionStats", {})
        examined, returned = stats.get("totalDocsExamined"), stats.get("nReturned")
        if isinstance(examined, int) and isinstance(returned, int) and "(" not in name:
            assert examined <= returned + 2, (name, examined, returned)


async def test_copies_of_one_message_in_one_batch_make_one_activity(
    counted: tuple[HubHarness, Commands], sink: Sink
) -> None:
    """The messages of a claim go side by side, but copies of one Message-ID (resent with
    other bytes) one after the other: the later copy sees the earlier one done."""
    hub, _commands = counted
    ctx = await mail_setup(hub)
    sent = await send_from_deal(hub, ctx, sink)
    await marked_sent(hub)
    same = "<same-reply@example.test>"
    copies = [
        mail(
            "Carl Client <client@example.test>",
            f"RE: {sent['Subject']}",
            f"copy {n}",
            to=plus_address(sent),
            message_id=same,
        ).as_bytes()
        for n in range(3)
    ]
    await store_all(hub, [*copies, *replies(sent, 3, "others")])
    assert await hub.services.mail.pipeline.drain() == 6
    outcomes = sorted(
        [d["status"] async for d in hub.services.store["mail_raw"].find({"message_id": same})]
    )
    assert outcomes == ["done", "duplicate", "duplicate"]
    store = hub.services.store
    assert await store["crm_activities"].count_documents({"mail.incoming_message_id": same}) == 1
    assert (
        await store["crm_activities"].count_documents(
            {"direction": "incoming", "owner_id": ctx["deal"]["id"]}
        )
        == 1 + 2  # the copy and the other replies by code and by thread
    )


async def test_on_the_embedded_database_a_raw_message_is_written_once_after_its_bytes(
    counted_sole: tuple[HubHarness, Commands], sink: Sink
) -> None:
    """The only node there can be keeps its claims in memory: processing a batch writes no
    claim and no renewal, only each message's outcome, on a document that no longer holds
    the bytes (they are a document of their own, inserted once and never updated)."""
    hub, commands = counted_sole
    ctx = await mail_setup(hub)
    sent = await send_from_deal(hub, ctx, sink)
    await marked_sent(hub)
    await batch_cost(hub, commands, sent, "warm")
    mark = len(commands.updates)
    cost = await batch_cost(hub, commands, sent, "sole")
    raw_updates = [u for name, u in commands.updates[mark:] if name == "mail_raw"]
    assert len(raw_updates) == pipeline_module.CLAIM_BATCH, raw_updates  # one outcome each
    for update in raw_updates:
        assert set(update["u"]["$set"]) >= {"status", "result", "processed_at"}, update
        assert "claimed_until" not in update["u"]["$set"], update
    assert not any(name == "mail_raw_data" for name, _u in commands.updates), cost
    # what waits (the batch, then none), the earlier copies by Message-ID
    assert cost[("find", "mail_raw")] == 3, cost
    store = hub.services.store
    assert await store["mail_raw"].count_documents({"data": {"$exists": True}}) == 0
    assert await store["mail_raw"].count_documents({"status": "done"}) == 2 * len(raw_updates)
    async for doc in store["mail_raw"].find({"status": "done"}):
        assert b"Carl Client" in await hub.services.mail.inbox.raw_of(doc)


def replies_by_code(sent: list[Any]) -> list[bytes]:
    """One reply from the client to each of ``sent`` (mail sent from the CRM), found by the
    code in its plus address."""
    return [
        mail(
            "Carl Client <client@example.test>",
            f"RE: {on['Subject']}",
            f"by code {n}",
            to=plus_address(on),
        ).as_bytes()
        for n, on in enumerate(sent)
    ]


async def test_a_batch_of_replies_to_one_record_makes_one_notice_naming_them(
    counted: tuple[HubHarness, Commands], sink: Sink
) -> None:
    """The responsible person is told once per record of a batch's new mail (one chat write,
    not one per reply), and the notice names each reply's sender and subject."""
    hub, _commands = counted
    ctx = await mail_setup(hub)
    sent = await send_from_deal(hub, ctx, sink)
    await marked_sent(hub)
    before = await notices(hub, ctx["mary_id"])
    by_code = replies_by_code([sent, sent, sent])
    await store_all(hub, by_code)
    assert await hub.services.mail.pipeline.drain() == 3
    await quiet(hub)
    new = (await notices(hub, ctx["mary_id"]))[len(before) :]
    assert len(new) == 1, new
    (told,) = new
    assert told.startswith(f"3 new emails on “{ctx['deal']['title']}”: "), told
    assert told.count(f"Carl Client: RE: {sent['Subject']}") == 3, told
    # one reply alone: the notice it always had
    await store_all(hub, replies(sent, 1, "alone"))
    assert await hub.services.mail.pipeline.drain() == 1
    await quiet(hub)
    (alone,) = (await notices(hub, ctx["mary_id"]))[len(before) + 1 :]
    assert alone.startswith("New email from Carl Client on "), alone


async def test_a_batch_of_replies_to_several_records_makes_one_notice_per_person(
    counted: tuple[HubHarness, Commands], sink: Sink
) -> None:
    """Replies of one batch to two deals of one person: one notice to them (in a burst the
    batch's replies mostly go to different records, and one notice per record was a message
    insert and its event per reply), each line naming its record."""
    hub, commands = counted
    ctx = await mail_setup(hub)
    other = await hub.request(
        "POST",
        "/api/v1/crm/deals",
        token=ctx["mary"],
        json={"title": "Second order", "contact_ids": [ctx["contact"]["id"]]},
    )
    assert other.status == 201, other.body
    sent = await send_from_deal(hub, ctx, sink)
    sent_other = await send_from_deal(hub, {**ctx, "deal": other.body}, sink)
    await marked_sent(hub)
    await quiet(hub)
    before = await notices(hub, ctx["mary_id"])
    by_code = replies_by_code([sent, sent_other, sent])
    await store_all(hub, by_code)
    mark = commands.mark()
    assert await hub.services.mail.pipeline.drain() == 3
    await quiet(hub)
    assert commands.seen[mark:].count(("insert", "messages")) == 1
    new = (await notices(hub, ctx["mary_id"]))[len(before) :]
    assert len(new) == 1, new
    (told,) = new
    assert told.startswith("3 new emails: "), told
    assert told.count("(on “Big order”)") == 2, told
    assert told.count("(on “Second order”)") == 1, told


async def test_the_mail_settings_run_out_once_for_all_who_ask(
    counted: tuple[HubHarness, Commands],
) -> None:
    """Every message of a batch asks for the mail settings: when the copy has run out they
    are read once for all of them (each read them again: 0.13 reads per reply in a burst),
    and a change made meanwhile is what the next caller gets."""
    hub, commands = counted
    mail_service = hub.services.mail
    await mail_service.settings()
    mail_service._cached = None  # run out
    mark = len(commands.seen)
    found = await asyncio.gather(*(mail_service.settings() for _ in range(8)))
    assert commands.seen[mark:].count(("find", "mail_settings")) == 1
    assert len({s.model_dump_json() for s in found}) == 1
    changed = await mail_service.update_settings(
        MailSettingsUpdate(create_leads=not found[0].create_leads)
    )
    assert (await mail_service.settings()).create_leads == changed.create_leads


class Writes(monitoring.CommandListener):
    """The inserts sent, in order, with the write concern each asked for."""

    def __init__(self) -> None:
        self.inserts: list[tuple[str, dict[str, Any], list[str]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            self.inserts.append(
                (
                    str(event.command["insert"]),
                    dict(event.command.get("writeConcern", {})),
                    [d["_id"] for d in event.command["documents"]],
                )
            )

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_raw_message_flushes_the_journal_once_after_its_bytes(store: Store) -> None:
    """Where every write is journaled (the embedded database's URL asks for it), the bytes
    go first without a flush of their own, and the queue documents' journaled insert after
    them flushes the log through both: one flush per group commit before the ``250``."""
    writes = Writes()
    async with watched_store(store, writes, journal=True) as journaled_store:
        await _flushes_once_after_its_bytes(journaled_store, writes)


async def test_a_large_raw_message_is_flushed_once_after_its_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message too large for a document goes to GridFS: its chunks and file document are
    written without a flush each, and the journaled insert of its queue document after them
    flushes the log through all of them before the ``250``."""
    monkeypatch.setattr("server.mailbridge.inbox.INLINE_LIMIT", 1024)
    writes = Writes()
    raw = b"Subject: large\r\n\r\n" + b"x" * 600_000 + b"\r\n"  # three chunks
    async with watched_store(store, writes, journal=True) as journaled_store:
        inbox = RawInbox(journaled_store)
        try:
            stored = await inbox.put(raw, Source("smtp"))
            assert stored.new
            names = [name for name, _concern, _ids in writes.inserts]
            assert names.count("mail_raw_files.chunks") == 1, names  # one insert_many
            assert names[-1] == "mail_raw", names
            for name, concern, _ids in writes.inserts[:-1]:
                assert name.startswith("mail_raw_files."), names
                assert not concern.get("j"), (name, concern)
            assert writes.inserts[-1][1].get("j") is True
            assert await inbox.raw_of({"_id": stored.id}) == raw
        finally:
            await inbox.close()


async def _flushes_once_after_its_bytes(journaled_store: Store, writes: Writes) -> None:
    inbox = RawInbox(journaled_store)
    try:
        raws = [f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() for n in range(6)]
        stored = await asyncio.gather(*(inbox.put(raw, Source("smtp")) for raw in raws))
        assert all(s.new for s in stored)
        bytes_at: dict[str, int] = {}
        queued_at: dict[str, int] = {}
        for position, (name, concern, ids) in enumerate(writes.inserts):
            if name == "mail_raw_data":
                assert not concern.get("j"), concern
                bytes_at.update(dict.fromkeys(ids, position))
            elif name == "mail_raw":
                assert concern.get("j") is True, concern
                queued_at.update(dict.fromkeys(ids, position))
        assert set(bytes_at) == set(queued_at) == {s.id for s in stored}
        assert all(bytes_at[i] < queued_at[i] for i in queued_at), writes.inserts
        assert inbox.commits.batches < len(raws)  # gathered: fewer flushes than messages
        for s, raw in zip(stored, raws, strict=True):
            assert await inbox.raw_of({"_id": s.id}) == raw
    finally:
        await inbox.close()
