"""The mail spool over real SMTP: the 250 once the message is fsynced on the node's disk, the
database filled from there by the drain, and nothing lost or doubled on the way: a drain cut
short, a database that fails, a spool out of room or a disk that refuses the write, a torn
entry. (The hub killed right after a 250 is ``test_mail_crash.py``; a database stopped while
mail comes in is there too.)"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from pymongo.errors import ServerSelectionTimeoutError

from server.mailbridge import spool as spool_module
from server.mailbridge.inbox import RawInbox
from server.mailbridge.spool import HEAD, Spool, SpoolDrain
from tests.harness import HubHarness
from tests.test_mail_accept import CONTACT, INBOX, incoming_on, reply
from tests.test_mail_bridge import mail_setup, settled
from tests.test_mail_bridge import mailhub as mailhub
from tests.test_mail_bridge import sink as sink


async def send(hub: HubHarness, raw: bytes) -> str:
    """The 250's text (aiosmtplib raises on a refusal)."""
    port = hub.services.mail.ports["smtp"]
    errors, text = await aiosmtplib.send(
        raw, sender=CONTACT, recipients=[INBOX], hostname="127.0.0.1", port=port
    )
    assert not errors
    return text


async def refused_code(hub: HubHarness, raw: bytes) -> int:
    port = hub.services.mail.ports["smtp"]
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await aiosmtplib.send(
            raw, sender=CONTACT, recipients=[INBOX], hostname="127.0.0.1", port=port
        )
    return refused.value.code


def padded(n: int, size: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Carl Client <{CONTACT}>"
    msg["To"] = INBOX
    msg["Subject"] = f"About the order full-{n}"
    msg.set_content(f"Question full-{n}\n" + ("x" * 70 + "\n") * (size // 71))
    return msg.as_bytes()


def segments(spool: Spool) -> list[Path]:
    return sorted(spool.directory.glob("*.seg"))


async def test_the_250_is_the_spool_and_the_drain_fills_the_database(
    mailhub: HubHarness,
) -> None:
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    await mail.spool_drain.close()  # nothing reaches the database until the test says so
    raws = [reply(n, "spooled") for n in range(4)]
    answers = [await send(hub, raw) for raw in raws]
    assert all("stored as" in a for a in answers)
    raw = hub.services.store["mail_raw"]
    assert await raw.count_documents({}) == 0
    assert mail.spool.waiting == 4
    # on disk: another process reading the directory finds all four, whole
    again = Spool(mail.spool.directory, 1 << 30)
    assert await asyncio.to_thread(again.open) == 4 and again.torn == 0

    mail.spool_drain.start()
    await mail.spool_drain.settled()
    await settled(hub)
    assert mail.spool.waiting == 0 and mail.spool.bytes == 0
    docs = [d async for d in raw.find({}, {"status": 1})]
    assert sorted(d["_id"] for d in docs) == sorted(a.split()[-1] for a in answers)
    assert {d["status"] for d in docs} == {"done"}
    assert len(await incoming_on(hub, ctx["contact"]["id"])) == 4
    # the one segment is emptied, not left growing, once all of it is in the database: the
    # next write starts it again
    [segment] = segments(mail.spool)
    before = segment.stat().st_size
    await send(hub, reply(5, "spooled"))
    assert segments(mail.spool) == [segment] and 0 < segment.stat().st_size < before / 3


async def test_a_message_in_both_the_spool_and_the_database_is_processed_once(
    mailhub: HubHarness,
) -> None:
    """The drain stored it and the process died before the spool forgot it: the next drain
    finds it by its id, neither a second document nor a copy."""
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    await mail.spool_drain.close()
    answer = await send(hub, reply(1, "twice"))
    entries = mail.spool.take(10, 1 << 30)
    assert len(entries) == 1
    [loaded] = await mail.spool.load(entries)
    await mail.inbox.put(
        loaded.raw, entries[0].source, raw_id=entries[0].id, received_at=entries[0].received_at
    )
    mail.spool.give_back(entries)
    # as after a restart: a new spool on the same directory, drained into the database
    reopened = Spool(mail.spool.directory, 1 << 30)
    assert await asyncio.to_thread(reopened.open) == 1
    # the hub's node as after a restart: this spool and its drain (the listener's old spool
    # still lists what it wrote; it is dropped here)
    mail.spool, mail.spool_drain = reopened, SpoolDrain(reopened, mail.inbox, mail.pipeline.wake)
    mail.spool_drain.start()
    await mail.spool_drain.settled()
    await settled(hub)
    raw = hub.services.store["mail_raw"]
    docs = [d async for d in raw.find({})]
    assert [d["_id"] for d in docs] == [answer.split()[-1]]
    assert docs[0]["status"] == "done" and "copies" not in docs[0]
    assert await hub.services.store["mail_raw_data"].count_documents({}) == 1  # bytes kept
    assert len(await incoming_on(hub, ctx["contact"]["id"])) == 1
    assert segments(reopened) == [] or all(p.stat().st_size == 0 for p in segments(reopened))


async def test_a_database_that_fails_leaves_the_mail_in_the_spool_until_it_takes_it(
    mailhub: HubHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    monkeypatch.setattr(spool_module, "RETRY_FIRST_SECONDS", 0.05)
    real_put = RawInbox.put
    down = True
    attempts = 0

    async def put(self: RawInbox, *args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        if down:
            attempts += 1
            raise ServerSelectionTimeoutError("no database at 127.0.0.1")
        return await real_put(self, *args, **kwargs)

    monkeypatch.setattr(RawInbox, "put", put)
    raws = [reply(n, "down") for n in range(3)]
    with caplog.at_level(logging.WARNING, logger="server.mailbridge.spool"):
        for raw in raws:
            assert "stored as" in await send(hub, raw)  # accepted with the database down
        for _ in range(200):
            if attempts >= 3:
                break
            await asyncio.sleep(0.02)
        assert attempts >= 3 and mail.spool_drain.failing
        assert mail.spool.waiting == 3
        down = False
        await mail.spool_drain.settled()
    await settled(hub)
    assert await hub.services.store["mail_raw"].count_documents({"status": "done"}) == 3
    assert len(await incoming_on(hub, ctx["contact"]["id"])) == 3
    said = [r.getMessage() for r in caplog.records]
    assert any("could not move" in s and "ServerSelectionTimeoutError" in s for s in said), said
    assert any("takes messages again" in s for s in said), said
    # one warning for the outage, not one per attempt, and never a message's text
    assert sum("could not move" in s for s in said) == 1
    assert not any("when does it ship" in s for s in said)


async def test_a_full_spool_answers_452_and_keeps_what_it_accepted(
    mailhub: HubHarness,
) -> None:
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    await mail.spool_drain.close()
    big = [padded(n, 300_000) for n in range(4)]
    mail.spool.max_bytes = 1 << 20  # room for three of these
    for raw in big[:3]:
        await send(hub, raw)
    assert await refused_code(hub, big[3]) == 452
    assert mail.spool.waiting == 3
    mail.spool_drain.start()
    await mail.spool_drain.settled()
    await send(hub, big[3])  # the sender's retry, now that there is room
    await mail.spool_drain.settled()
    await settled(hub)
    assert await hub.services.store["mail_raw"].count_documents({"status": "done"}) == 4
    assert len(await incoming_on(hub, ctx["contact"]["id"])) == 4


async def test_a_disk_refusing_the_write_answers_452_and_loses_nothing_accepted(
    mailhub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    await mail.spool_drain.close()
    await send(hub, reply(0, "before"))
    real_fsync = os.fsync
    failing = {errno.ENOSPC, errno.EIO}

    def fsync(fd: int) -> None:
        if failing:
            raise OSError(failing.pop(), "the disk refuses")
        real_fsync(fd)

    monkeypatch.setattr("server.mailbridge.spool.os.fsync", fsync)
    assert await refused_code(hub, reply(1, "refused")) == 452
    assert await refused_code(hub, reply(2, "refused")) == 452
    monkeypatch.undo()
    await send(hub, reply(3, "after"))
    # what got no 250 is not in the spool; the segment cut back, the next one written anew
    reopened = Spool(mail.spool.directory, 1 << 30)
    assert await asyncio.to_thread(reopened.open) == 2 and reopened.torn == 0
    mail.spool_drain.start()
    await mail.spool_drain.settled()
    await settled(hub)
    subjects = sorted(a["subject"] for a in await incoming_on(hub, ctx["contact"]["id"]))
    assert subjects == ["About the order after-3", "About the order before-0"]


async def test_a_torn_entry_is_found_and_nothing_of_it_is_imported(
    mailhub: HubHarness, caplog: pytest.LogCaptureFixture
) -> None:
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    await mail.spool_drain.close()
    for n in range(3):
        await send(hub, reply(n, "torn"))
    [segment] = segments(mail.spool)
    size = segment.stat().st_size
    data = bytearray(segment.read_bytes())
    # the second entry's body damaged (its checksum no longer matches), and the third entry
    # cut short as a write a crash interrupted would leave it
    first = HEAD.unpack_from(data, 0)
    second_at = HEAD.size + first[1] + first[2]
    second = HEAD.unpack_from(data, second_at)
    data[second_at + HEAD.size + second[1] + 10] ^= 0xFF
    segment.write_bytes(bytes(data[: size - 40]))
    reopened = Spool(mail.spool.directory, 1 << 30)
    with caplog.at_level(logging.WARNING, logger="server.mailbridge.spool"):
        assert await asyncio.to_thread(reopened.open) == 1
    assert reopened.torn == 1
    assert any("torn entry" in r.getMessage() for r in caplog.records)
    # the hub's node as after a restart: this spool and its drain (the listener's old spool
    # still lists what it wrote; it is dropped here)
    mail.spool, mail.spool_drain = reopened, SpoolDrain(reopened, mail.inbox, mail.pipeline.wake)
    mail.spool_drain.start()
    await mail.spool_drain.settled()
    await settled(hub)
    assert await hub.services.store["mail_raw"].count_documents({}) == 1
    subjects = [a["subject"] for a in await incoming_on(hub, ctx["contact"]["id"])]
    assert subjects == ["About the order torn-0"]
    assert not segment.exists()  # all it held that was whole is in the database


async def test_full_segments_are_deleted_once_drained_and_the_spool_stays_small(
    mailhub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    await mail.spool_drain.close()
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 1000)  # a new one every 2 messages
    for n in range(6):
        await send(hub, reply(n, "segments"))
    assert len(segments(mail.spool)) >= 3
    again = Spool(mail.spool.directory, 1 << 30)
    assert await asyncio.to_thread(again.open) == 6 and again.torn == 0
    mail.spool_drain.start()
    await mail.spool_drain.settled()
    await settled(hub)
    assert len(segments(mail.spool)) == 1  # the one being written; the others deleted
    await send(hub, reply(6, "segments"))  # written from the start of the emptied one
    assert await asyncio.to_thread(Spool(mail.spool.directory, 1 << 30).open) == 1
    await mail.spool_drain.settled()
    await settled(hub)
    assert len(await incoming_on(hub, ctx["contact"]["id"])) == 7


async def test_a_burst_holds_the_drain_back_for_a_bounded_time(
    mailhub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While mail pours in, the drain waits (the listener keeps the node to itself), but not
    for longer than HOLD_SECONDS: a burst that lasts is drained beside it."""
    hub = mailhub
    mail = hub.services.mail
    ctx = await mail_setup(hub)
    monkeypatch.setattr(spool_module, "BURST_APPENDS", 3)
    monkeypatch.setattr(spool_module, "BURST_WINDOW_SECONDS", 8.0)  # "bursting" for 8 s
    monkeypatch.setattr(spool_module, "HOLD_SECONDS", 0.3)
    for n in range(4):
        await send(hub, reply(n, "burst"))
    assert mail.spool.bursting
    await mail.spool_drain.settled()
    assert mail.spool.bursting  # drained while the burst still lasts: the hold ended
    assert 0.25 <= mail.spool_drain.held < 2.0
    await settled(hub)
    assert len(await incoming_on(hub, ctx["contact"]["id"])) == 4
