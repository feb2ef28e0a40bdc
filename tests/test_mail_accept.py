"""The listener's 250 means "stored", not "parsed": a reply is stored (journaled, many
sessions' messages in one write) and answered, and the pipeline parses, matches and commits it
afterwards, once. A MIME bomb still gets its 552 before anything is stored
(``test_mail_bridge``, ``test_mail_e2e``); a kill right after the 250 loses nothing
(``test_mail_crash``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest

from server.mailbridge import parsing
from server.mailbridge.parsing import Limits, ParsedMail
from tests.harness import HubHarness
from tests.test_mail_bridge import Sink, mail_setup, settled
from tests.test_mail_bridge import mailhub as mailhub
from tests.test_mail_bridge import sink as sink

CONTACT = "client@example.test"  # mail_setup's contact: mail from it lands on the contact
INBOX = "crm@portal.test"


class Parses:
    """Counts the parser's reads of whole messages; while ``refuse`` is set, a read fails
    (as if the parser could not be reached): a 250 given then was given without one."""

    def __init__(self) -> None:
        self.calls = 0
        self.refuse = False
        self._real = parsing.from_message

    def __call__(self, message: Any, limits: Limits | None = None, nested: bool = False) -> Any:
        if not nested:
            self.calls += 1
            if self.refuse:
                raise AssertionError("parsed before the 250")
        return self._real(message, limits, nested)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[Parses]:
    counter = Parses()
    monkeypatch.setattr(parsing, "from_message", counter)
    yield counter


def reply(n: int, tag: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Carl Client <{CONTACT}>"
    msg["To"] = INBOX
    msg["Subject"] = f"About the order {tag}-{n}"
    msg["Message-ID"] = f"<{tag}-{n}-{uuid.uuid4().hex}@example.test>"
    msg.set_content(f"Question {tag}-{n}: when does it ship?\n\n-- \nCarl\n")
    msg.add_alternative(f"<p>Question {tag}-{n}: when does it ship?</p>", subtype="html")
    return msg.as_bytes()


async def incoming_on(hub: HubHarness, owner_id: str) -> list[dict[str, Any]]:
    return [
        a
        async for a in hub.services.store["crm_activities"].find(
            {"owner_id": owner_id, "direction": "incoming"}
        )
    ]


async def test_the_250_comes_before_any_parsing_and_the_pipeline_parses_each_once(
    mailhub: HubHarness, parses: Parses
) -> None:
    hub = mailhub
    ctx = await mail_setup(hub)
    await hub.services.mail.pipeline.close()  # nothing processes until the test says so
    parses.refuse = True
    raws = [reply(n, "early") for n in range(5)]
    port = hub.services.mail.ports["smtp"]
    answers = await asyncio.gather(
        *(
            aiosmtplib.send(
                raw, sender=CONTACT, recipients=[INBOX], hostname="127.0.0.1", port=port
            )
            for raw in raws
        )
    )
    assert all(not errors and "stored as" in text for errors, text in answers), answers
    assert parses.calls == 0
    await hub.services.mail.spool_drain.settled()  # the spool into the database: no parse
    assert parses.calls == 0
    raw = hub.services.store["mail_raw"]
    assert await raw.count_documents({"status": "pending"}) == len(raws)

    parses.refuse = False
    await settled(hub)  # the pipeline, driven here
    assert parses.calls == len(raws)  # each message parsed once, by the pipeline
    assert await raw.count_documents({"status": "done"}) == len(raws)
    activities = await incoming_on(hub, ctx["contact"]["id"])
    assert sorted(a["subject"] for a in activities) == sorted(
        f"About the order early-{n}" for n in range(5)
    )


SESSIONS = 24
PER_SESSION = 3
RESENT = 6  # sessions that also send another session's first message again (an MTA's retry)


async def test_many_concurrent_sessions_share_writes_and_each_message_is_processed_once(
    mailhub: HubHarness, sink: Sink, parses: Parses
) -> None:
    hub = mailhub
    ctx = await mail_setup(hub)
    port = hub.services.mail.ports["smtp"]
    raws = [
        [reply(s * PER_SESSION + k, "burst") for k in range(PER_SESSION)] for s in range(SESSIONS)
    ]
    answers: list[str] = []

    async def session(s: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        mine = list(raws[s])
        if s < RESENT:
            mine.append(raws[SESSIONS - 1 - s][0])
        for raw in mine:
            errors, text = await smtp.sendmail(CONTACT, [INBOX], raw)
            assert not errors
            answers.append(text)
        await smtp.quit()

    await asyncio.gather(*(session(s) for s in range(SESSIONS)))
    distinct = SESSIONS * PER_SESSION
    assert len(answers) == distinct + RESENT
    assert all(a.startswith("2.0.0 OK: stored as") for a in answers), answers[:3]
    # the spool's group commit: messages arriving together share an fsync
    assert hub.services.mail.spool.fsyncs < distinct + RESENT
    await hub.services.mail.spool_drain.settled()
    inbox = hub.services.mail.inbox
    # gathered: fewer journaled writes than messages, one document per distinct message
    assert inbox.commits.batches < inbox.commits.inserted == distinct
    await settled(hub)

    raw = hub.services.store["mail_raw"]
    assert await raw.count_documents({}) == distinct
    assert await raw.count_documents({"status": "done"}) == distinct
    assert await raw.count_documents({"copies": 1}) == RESENT
    activities = await incoming_on(hub, ctx["contact"]["id"])
    subjects = sorted(a["subject"] for a in activities)
    assert subjects == sorted(f"About the order burst-{n}" for n in range(distinct))
    assert parses.calls == distinct  # once each, after its 250; a copy is not read again
    contact = await hub.services.store["crm_records"].find_one({"_id": ctx["contact"]["id"]})
    assert contact is not None and contact["open_activities"] == distinct


def test_the_parser_counter_sees_real_parses() -> None:
    """The fixture's wrapper is what ``parse`` calls (so a count of 0 above is real)."""
    counter = Parses()
    original = parsing.from_message
    parsing.from_message = counter
    try:
        assert isinstance(parsing.parse(reply(0, "x")), ParsedMail)
    finally:
        parsing.from_message = original
    assert counter.calls == 1
