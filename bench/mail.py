"""The mail part: CRM replies over SMTP into the hub, matched to their records and committed,
against a bare aiosmtpd server that only accepts, measured with the same client in the run.

One hub (``serve --demo``) on a fresh data directory, its relay an aiosmtpd sink in this
process, its mail listener on a free port. Through the API, as in real use:

1. ``mail_users`` users each create ``mail_records_per_user`` contacts (one address each)
   and as many deals (one contact each), and send one mail from every deal
   (``POST /api/v1/crm/deals/{id}/emails``). The relay sink keeps what the hub sent: the
   replies are written to those copies (their ``Reply-To`` with the reply code, their
   ``Message-ID``, their text to quote).
2. Every user connects over Socket.IO (python-socketio, websocket transport) and follows
   their ``counters.changed``.
3. **Latency, quiet.** ``mail_latency_replies`` replies (after ``mail_latency_warmup``), one
   at a time, to the records of the first user: each over its own SMTP session, the next
   once the hub and its database are idle again. From just before the SMTP connection is
   opened to the ``counters.changed`` showing that user's incoming number for the record's
   type one higher.
4. **Throughput.** ``mail_replies`` replies to everyone's records, written beforehand,
   delivered by ``bench/mail_loadgen.py`` (its own process) over ``mail_connections``
   SMTP sessions at once, ``mail_per_session`` messages each. Accepted: answered ``250``
   (the raw message is on the hub's disk: fsynced in its mail spool). Committed: the
   incoming activity is on the record (its ``created_at``, read back through the API).
   Counted: the sum of the users' pushed incoming numbers reached its final value.
5. **The peer.** ``python -m bench.mail_loadgen sink``: aiosmtpd built with the hub
   listener's options, whose handler accepts and discards. The generator delivers the same
   throughput messages to it, with the same sessions, ``mail_peer_runs`` times (the median
   run counts).
6. **Latency, quiet again**: ``mail_latency_after`` replies as in 3, now with the
   throughput's mail stored.
7. **Latency under load.** The generator offers replies to the other users' records at
   ``mail_load_fraction`` of the committed rate just measured, while ``mail_loaded_probes``
   replies go to the first user's records as in 3, one every ``mail_probe_interval``
   seconds (later when the one before has not arrived yet).
8. **Every reply accounted for.** Each reply carries a reference of its own in its new text,
   which the hub puts in the activity's description. Every user's open email activities are
   listed (``GET /api/v1/crm/activities?type=email``): each reply must be there once, on
   its record (the deal for a reply by code or thread, the contact for a mail matched by
   sender), matched the way it was written. Lost, duplicated and misplaced replies, and the
   unmatched list (``GET /api/v1/mail/unmatched``), are reported; any of them is a problem
   of the run.
9. **The database**: its operation counters and per-collection time (``top``) around each
   phase, and at the end the pipeline's queries for one reply, each timed alone with its
   plan (``bench/mail_queries.py``).

The replies are what mail programs send: text and HTML with the quoted history, every
``mail_attachment_every``-th with an attachment of ``mail_attachment_bytes``; by the
``mail_mix``: to the ``Reply-To`` plus-address with the code in the subject (matched by
code), to the plain inbox with ``In-Reply-To``/``References`` only (by thread), or a new mail
from the contact's address (by sender, onto the contact).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pymongo
import socketio
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.crm import summary
from bench.fixtures import ADMIN_LOGIN, ADMIN_PASSWORD, BENCH_PASSWORD, Api, User, _bounded
from bench.mail_queries import pipeline_queries
from bench.procs import (
    REPO,
    BenchError,
    CpuMeter,
    CpuPhase,
    Hub,
    cpu_ticks,
    rss_bytes,
    start_hub,
    stop_process,
)
from bench.profiles import Profile

Results = dict[str, Any]
Say = Callable[[str], None]

INBOX = "crm@crm.bench.test"
PUSH_TIMEOUT = 30.0  # seconds a reply may take to reach its user's counter (quiet)
IDLE_WINDOW = 0.1  # the hub and its database are idle when, over this many seconds, ...
IDLE_TICKS = 2  # ... they used at most this many clock ticks together (20% of a core)
IDLE_TIMEOUT = 120.0
COUNT_TIMEOUT = 600.0  # after the last 250, for the counters to show every reply
GIVE_UP_AFTER = 5  # latency replies in a row without a push: the phase stops
REF = re.compile(r"bench-ref ([A-Z]\d{6})")

FIRST = ["Carl", "Anna", "Boris", "Dana", "Emil", "Fiona", "Gustav", "Hanna", "Igor", "Julia"]
LAST = ["Client", "Meyer", "Novak", "Olsen", "Petrov", "Quinn", "Rossi", "Svensson", "Tanaka"]
SENTENCES = [
    "Thanks for the quote, the numbers look right to us.",
    "Could you send the updated price list before Friday?",
    "We would like to go ahead with the second option.",
    "Our finance team asks whether the payment terms can be 45 days.",
    "Please call me tomorrow morning, I am in the office from nine.",
    "The delivery address has changed, see the signature below.",
    "I have forwarded this to our technical lead for a second look.",
    "Can we add two more licences to the same order?",
    "The invoice from last month is still open on our side, is that right?",
    "Looking forward to the meeting next week.",
]
HISTORY = [
    "As discussed on the phone, here is the summary of the points we agreed on.",
    "The first delivery would be in two batches, the rest at the end of the quarter.",
    "Prices are valid for thirty days from the date of this offer.",
    "Installation and training are included, travel costs are not.",
    "Let me know if anything in the attached terms needs a change.",
    "Our support hours are Monday to Friday, eight to six.",
]


# the relay -----------------------------------------------------------------------------------


@dataclass
class Relay:
    """The hub's outgoing relay: an aiosmtpd sink in this process that keeps every message
    by its Message-ID."""

    port: int = 0
    received: dict[str, EmailMessage] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.received[str(msg["Message-ID"]).strip()] = msg
        self.arrived.set()
        return "250 OK"


# the records and the replies -----------------------------------------------------------------


@dataclass
class Thread:
    """A deal, its contact, and the mail the hub sent from the deal (as the relay got it)."""

    owner: User
    deal_id: str
    contact_id: str
    name: str
    address: str
    title: str
    sent: EmailMessage | None = None
    code: str = ""
    message_id: str = ""


@dataclass
class Reply:
    ref: str  # "T000123": the reference in its new text
    kind: str  # code | thread | sender
    thread: Thread
    sender: str
    recipients: list[str]
    raw: bytes

    @property
    def record(self) -> tuple[str, str]:
        """Where it must land: (type, id)."""
        if self.kind == "sender":
            return "contact", self.thread.contact_id
        return "deal", self.thread.deal_id


def kinds(profile: Profile, n: int, rng: random.Random) -> list[str]:
    """``n`` reply kinds in the proportions of ``mail_mix``, shuffled."""
    weights = dict(profile.mail_mix)
    total = sum(weights.values())
    out: list[str] = []
    for kind, weight in weights.items():
        out += [kind] * round(n * weight / total)
    while len(out) < n:
        out.append(next(iter(weights)))
    out = out[:n]
    rng.shuffle(out)
    return out


def _original_text(thread: Thread) -> str:
    return (
        f"Hello {thread.name.split()[0]},\n\n"
        f"please find our offer for {thread.title} below.\n\n"
        + "\n".join(HISTORY)
        + "\n\nBest regards,\nthe sales team\n"
    )


def _quoted(lines: list[str]) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in lines)


def _html(paragraphs: list[str], quoted: list[str] | None, quote_header: str) -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    if quoted is not None:
        inner = "<br>".join(quoted)
        body += f'<div class="gmail_quote">{quote_header}<blockquote>{inner}</blockquote></div>'
    return f"<html><body>{body}</body></html>"


def build_reply(
    profile: Profile, ref: str, kind: str, thread: Thread, rng: random.Random, attach: bool
) -> Reply:
    assert thread.sent is not None
    sent = thread.sent
    new = rng.sample(SENTENCES, rng.randint(2, 5))
    new.append(f"For our files: bench-ref {ref}.")
    signature = [f"{thread.name}", f"Purchasing, {thread.address.split('@')[1]}", "+49 30 1234567"]
    msg = EmailMessage()
    msg["From"] = f"{thread.name} <{thread.address}>"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=thread.address.split("@")[1])
    msg["X-Mailer"] = "bench-mail 1.0"
    subject = str(sent["Subject"])
    quoted: list[str] | None = None
    quote_header = ""
    if kind == "sender":
        msg["To"] = INBOX
        msg["Subject"] = f"Question about {thread.title} ({ref})"
        recipients = [INBOX]
    else:
        # older turns of the conversation under the mail being answered
        earlier = [rng.choice(HISTORY + SENTENCES) for _ in range(rng.randint(10, 60))]
        quoted = [*_original_text(thread).splitlines(), "", *(f"> {e}" for e in earlier)]
        quote_header = f"On {sent['Date']}, {sent['From']} wrote:"
        msg["In-Reply-To"] = thread.message_id
        msg["References"] = thread.message_id
        if kind == "code":
            reply_to = str(sent["Reply-To"].addresses[0].addr_spec)
            msg["To"] = reply_to
            msg["Subject"] = f"RE: {subject}"
            recipients = [reply_to]
        else:  # thread: the mail program dropped the Reply-To and the subject's code
            msg["To"] = INBOX
            msg["Subject"] = "RE: " + re.sub(r"\s*\[CRM-[^\]]*\]", "", subject)
            recipients = [INBOX]
    text = " ".join(new) + "\n\n-- \n" + "\n".join(signature)
    if quoted is not None:
        text += f"\n\n{quote_header}\n{_quoted(quoted)}\n"
    msg.set_content(text)
    msg.add_alternative(_html([*new, "<br>".join(signature)], quoted, quote_header), subtype="html")
    if attach:
        data = rng.randbytes(profile.mail_attachment_bytes)
        msg.add_attachment(data, maintype="application", subtype="pdf", filename=f"offer-{ref}.pdf")
    return Reply(ref, kind, thread, thread.address, recipients, msg.as_bytes())


def write_manifest(directory: Path, replies: list[Reply]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for reply in replies:
        name = f"{reply.ref}.eml"
        (directory / name).write_bytes(reply.raw)
        entries.append({"file": name, "sender": reply.sender, "recipients": reply.recipients})
    manifest = directory / "manifest.json"
    manifest.write_text(json.dumps(entries))
    return manifest


# the users' counters -------------------------------------------------------------------------


class Watch:
    """One connected user's pushed CRM numbers, merged as the web client does."""

    def __init__(self, user: User, changed: Callable[[], None]) -> None:
        self.user = user
        self.sio = socketio.AsyncClient(reconnection=False)
        self.numbers: dict[str, dict[str, Any]] = {}
        self.pushes = 0
        self.ready = asyncio.Event()
        self._changed_cb = changed
        self._waiting: list[tuple[str, int, asyncio.Future[float]]] = []
        self.sio.on("snapshot", self._snapshot)
        self.sio.on("counters.changed", self._changed)

    def incoming(self, record_type: str) -> int:
        return int(self.numbers.get(record_type, {}).get("incoming", 0))

    def total(self) -> int:
        return self.incoming("deal") + self.incoming("contact")

    async def _snapshot(self, data: Any) -> None:
        """The numbers to start from: a push carries only what changed since the snapshot
        (or the last push), so nothing may come at all until a reply arrives."""
        crm = data.get("counters", {}).get("crm") if isinstance(data, dict) else None
        if isinstance(crm, dict):
            self.numbers = {t: dict(n) for t, n in crm.items() if isinstance(n, dict)}
        self.ready.set()
        self._changed_cb()

    async def _changed(self, data: Any) -> None:
        at = time.perf_counter()
        crm = data.get("crm") if isinstance(data, dict) else None
        if not isinstance(crm, dict):
            return
        self.pushes += 1
        for record_type, part in crm.items():
            if isinstance(part, dict):
                self.numbers.setdefault(record_type, {}).update(part)
        still = []
        for record_type, value, future in self._waiting:
            if future.done():
                continue
            if self.incoming(record_type) >= value:
                future.set_result(at)
            else:
                still.append((record_type, value, future))
        self._waiting = still
        self.ready.set()
        self._changed_cb()

    def reach(self, record_type: str, value: int) -> asyncio.Future[float]:
        """The arrival time of the push that brings ``record_type``'s incoming to ``value``."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting.append((record_type, value, future))
        return future

    async def connect(self, url: str) -> None:
        await self.sio.connect(
            url, auth={"token": self.user.token}, transports=["websocket"], wait_timeout=30
        )
        await asyncio.wait_for(self.ready.wait(), 60)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


# one reply at a time -------------------------------------------------------------------------


@dataclass
class Probe:
    kind: str
    latency_ms: float | None  # to the counter push
    accepted_ms: float | None  # to the 250
    busy_ms: float | None = None  # until the hub and its database were idle again (quiet)
    error: str = ""


async def deliver_one(port: int, reply: Reply) -> tuple[float, float | None, str]:
    """One SMTP session for one reply: (started, 250 at, error) on the perf_counter clock."""
    started = time.perf_counter()
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, timeout=60, start_tls=False, use_tls=False
    )
    try:
        await smtp.connect()
        errors, _ = await smtp.sendmail(reply.sender, reply.recipients, reply.raw)
        accepted = time.perf_counter()
        if errors:
            return started, None, f"refused recipients {errors}"
        try:
            await smtp.quit()
        except aiosmtplib.SMTPException:
            smtp.close()
        return started, accepted, ""
    except aiosmtplib.SMTPException as exc:
        smtp.close()
        return started, None, f"{type(exc).__name__}: {exc}"


def probe_results(probes: list[Probe], warmup: int) -> Results:
    measured = probes[warmup:]
    out: Results = {"replies": len(measured), "warmup": warmup}
    for kind in ("all", "code", "thread", "sender"):
        mine = [p for p in measured if kind in ("all", p.kind)]
        out[kind] = {
            "replies": len(mine),
            "latency_ms": summary([p.latency_ms for p in mine if p.latency_ms is not None]),
            "accepted_ms": summary([p.accepted_ms for p in mine if p.accepted_ms is not None]),
            "busy_ms": summary([p.busy_ms for p in mine if p.busy_ms is not None]),
            "lost": sum(1 for p in mine if p.latency_ms is None),
        }
    out["errors"] = [p.error for p in measured if p.error][:5]
    return out


# the benchmark -------------------------------------------------------------------------------


def _pct(percent: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in percent.items()}


def _own_cpu(phase: CpuPhase, gen: Results) -> None:
    """The generator's CPU (it has exited when the phase ends, so the meter counted it in
    ``other``): from its own report, moved out of ``other``."""
    seconds = gen.get("cpu_seconds")
    if seconds is None or phase.seconds <= 0:
        return
    share = 100.0 * float(seconds) / phase.seconds
    phase.percent["loadgen"] = share
    phase.percent["other"] = max(0.0, phase.percent.get("other", 0.0) - share)


def _wall(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def db_top(db_url: str) -> Results:
    """The database's operation counters and its time per collection (``top``)."""
    client = _client(db_url)
    try:
        status = client.admin.command("serverStatus")
        top = client.admin.command("top")
    finally:
        client.close()
    return {
        "ops": dict(status.get("opcounters", {})),
        "top": {
            ns: {"us": int(v["total"]["time"]), "count": int(v["total"]["count"])}
            for ns, v in top.get("totals", {}).items()
            if isinstance(v, dict) and "total" in v
        },
    }


def _client(db_url: str) -> pymongo.MongoClient[Results]:
    return pymongo.MongoClient(db_url, serverSelectionTimeoutMS=10_000)


def stored_raw(db_url: str) -> int:
    """Raw messages the hub holds (every one received: nothing is pruned)."""
    client = _client(db_url)
    try:
        return int(client["portalhub"]["mail_raw"].estimated_document_count())
    finally:
        client.close()


def top_delta(before: Results, after: Results, replies: int) -> Results:
    """Per reply: database operations by kind, and by collection with the time spent."""
    ops = {
        k: (int(v) - int(before["ops"].get(k, 0))) / replies
        for k, v in after["ops"].items()
        if isinstance(v, int)
    }
    collections = []
    for ns, a in after["top"].items():
        b = before["top"].get(ns, {"us": 0, "count": 0})
        count = a["count"] - b["count"]
        if count <= 0:
            continue
        collections.append(
            {
                "collection": ns.split(".", 1)[-1],
                "ops_per_reply": count / replies,
                "ms_per_reply": (a["us"] - b["us"]) / 1000 / replies,
            }
        )
    collections.sort(key=lambda c: -float(c["ms_per_reply"]))
    return {"ops_per_reply": ops, "collections": collections}


class MailBench:
    def __init__(self, profile: Profile, say: Say, meter: CpuMeter) -> None:
        self.p = profile
        self.say = say
        self.meter = meter
        self.problems: list[str] = []
        self.rng = random.Random(20261124)
        self.replies: list[Reply] = []  # every reply sent to the hub, whatever the phase
        self.watches: list[Watch] = []
        self._count_changed = asyncio.Event()
        self.work = Path(tempfile.mkdtemp(prefix="portalhub-bench-mail-"))
        self._created: dict[str, float] = {}  # reference -> its activity's created_at

    # set-up ------------------------------------------------------------------------------

    async def _records(self, api: Api, admin: User, relay: Relay) -> list[list[Thread]]:
        """The users, their contacts and deals, and one mail sent from every deal."""
        p = self.p
        logins = [f"mail{i:03d}" for i in range(p.mail_users)]

        def create(login: str) -> Callable[[], Any]:
            body = {"login": login, "email": f"{login}@bench.test", "password": BENCH_PASSWORD}
            return lambda: api.call("POST", "/users", body, admin.token)

        def log_in(login: str) -> Callable[[], Any]:
            return lambda: api.login(login, BENCH_PASSWORD)

        await _bounded(4, [create(login) for login in logins])
        users: list[User] = await _bounded(4, [log_in(login) for login in logins])

        async def thread_of(user: User, n: int) -> Thread:
            first, last = FIRST[n % len(FIRST)], LAST[(n // len(FIRST)) % len(LAST)]
            address = f"{first.lower()}.{last.lower()}{n}@client{n % 13}.bench.test"
            contact = await api.call(
                "POST",
                "/crm/contacts",
                {"first_name": first, "last_name": f"{last} {n}", "emails": [{"value": address}]},
                user.token,
            )
            title = f"Order {n:04d} for client {n % 13}"
            deal = await api.call(
                "POST", "/crm/deals", {"title": title, "contact_ids": [contact["id"]]}, user.token
            )
            return Thread(
                user, str(deal["id"]), str(contact["id"]), f"{first} {last} {n}", address, title
            )

        async def send(thread: Thread) -> None:
            sent = await api.call(
                "POST",
                f"/crm/deals/{thread.deal_id}/emails",
                {
                    "to": [thread.address],
                    "subject": f"Your quote: {thread.title}",
                    "text": _original_text(thread),
                },
                thread.owner.token,
            )
            (email_out,) = sent["emails"]
            thread.code, thread.message_id = str(email_out["code"]), str(email_out["message_id"])

        jobs: list[Callable[[], Any]] = []
        for u, user in enumerate(users):
            for k in range(p.mail_records_per_user):
                n = u * p.mail_records_per_user + k

                def job(user: User = user, n: int = n) -> Any:
                    return thread_of(user, n)

                jobs.append(job)
        threads: list[Thread] = await _bounded(4, jobs)
        # The first mail alone: on a fresh hub, concurrent first sends race to create the
        # reply-code key, and most of them fail (500, KeyError in CodeKeys._load).
        await send(threads[0])

        def send_job(thread: Thread) -> Callable[[], Any]:
            return lambda: send(thread)

        await _bounded(4, [send_job(t) for t in threads[1:]])
        deadline = time.monotonic() + 120
        while not all(t.message_id in relay.received for t in threads):
            if time.monotonic() > deadline:
                missing = sum(1 for t in threads if t.message_id not in relay.received)
                raise BenchError(f"the relay did not get {missing} of {len(threads)} sent mails")
            relay.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relay.arrived.wait(), 5)
        for thread in threads:
            thread.sent = relay.received[thread.message_id]
            if thread.code not in str(thread.sent["Reply-To"]):
                raise BenchError(f"the relayed mail of deal {thread.deal_id} lacks its code")
        by_user: dict[str, list[Thread]] = {}
        for thread in threads:
            by_user.setdefault(thread.owner.id, []).append(thread)
        return [by_user[u.id] for u in users]

    def _make(self, prefix: str, threads: list[Thread], n: int) -> list[Reply]:
        """``n`` replies on ``threads`` (round-robin), in the mix, references ``prefix``..."""
        p = self.p
        start = sum(1 for r in self.replies if r.ref.startswith(prefix))
        out = []
        for i, kind in enumerate(kinds(p, n, self.rng)):
            number = start + i
            ref = f"{prefix}{number:06d}"
            attach = p.mail_attachment_every > 0 and number % p.mail_attachment_every == 0
            thread = threads[number % len(threads)]
            out.append(build_reply(p, ref, kind, thread, self.rng, attach))
        return out

    def _counted(self) -> int:
        return sum(w.total() for w in self.watches)

    async def _idle(self, hub: Hub) -> float:
        deadline = time.monotonic() + IDLE_TIMEOUT
        last = time.perf_counter()
        ticks = cpu_ticks(hub.pid) + cpu_ticks(hub.db_pid)
        while time.monotonic() < deadline:
            await asyncio.sleep(IDLE_WINDOW)
            now = cpu_ticks(hub.pid) + cpu_ticks(hub.db_pid)
            if now - ticks <= IDLE_TICKS:
                return last
            ticks, last = now, time.perf_counter()
        raise BenchError(f"the hub was still busy {IDLE_TIMEOUT:g} s after a reply")

    # phases ------------------------------------------------------------------------------

    async def _probe(self, port: int, watch: Watch, reply: Reply, timeout: float) -> Probe:
        record_type = reply.record[0]
        push = watch.reach(record_type, watch.incoming(record_type) + 1)
        self.replies.append(reply)
        started, accepted, error = await deliver_one(port, reply)
        accepted_ms = (accepted - started) * 1000 if accepted is not None else None
        if error:
            push.cancel()
            return Probe(reply.kind, None, accepted_ms, error=error)
        try:
            at = await asyncio.wait_for(push, timeout)
        except TimeoutError:
            return Probe(reply.kind, None, accepted_ms, error="no counters.changed")
        return Probe(reply.kind, (at - started) * 1000, accepted_ms)

    async def _quiet_latency(
        self,
        hub: Hub,
        port: int,
        watch: Watch,
        threads: list[Thread],
        prefix: str,
        replies_n: int,
        warmup: int,
    ) -> Results:
        """``warmup`` + ``replies_n`` replies one at a time, each once the hub and its
        database are idle; with the database's counters over the phase."""
        replies = self._make(prefix, threads, warmup + replies_n)
        stored = await asyncio.to_thread(stored_raw, hub.db_url)
        db_before = await asyncio.to_thread(db_top, hub.db_url)
        probes: list[Probe] = []
        misses = 0
        when = "before" if prefix == "Q" else "after"
        with self.meter.phase(f"mail: latency, quiet, {when} the throughput") as cpu:
            for reply in replies:
                started = time.perf_counter()
                probe = await self._probe(port, watch, reply, PUSH_TIMEOUT)
                busy_until = await self._idle(hub)
                probe.busy_ms = (busy_until - started) * 1000
                probes.append(probe)
                misses = misses + 1 if probe.latency_ms is None else 0
                if misses >= GIVE_UP_AFTER:
                    self.problems.append(
                        f"quiet latency: {GIVE_UP_AFTER} replies in a row brought no counter "
                        f"push within {PUSH_TIMEOUT:g} s ({probe.error}); the phase stopped"
                    )
                    break
        db_after = await asyncio.to_thread(db_top, hub.db_url)
        out = probe_results(probes, warmup)
        out["database"] = top_delta(db_before, db_after, max(1, len(probes)))
        out["cpu_percent"] = _pct(cpu.percent)
        out["stored_raw"] = stored
        return out

    @contextlib.asynccontextmanager
    async def _generator(
        self,
    ) -> AsyncIterator[Callable[[Results, float], Coroutine[Any, Any, Results]]]:
        """``bench/mail_loadgen.py send`` started (and known to the CPU meter) before the
        phase that runs it: yields the function that gives it its command."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.mail_loadgen",
            "send",
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.meter.pids["loadgen"] = process.pid

        async def run(cmd: Results, timeout: float) -> Results:
            out, err = await asyncio.wait_for(
                process.communicate(json.dumps({**cmd, "timeout": timeout}).encode()),
                timeout + 30,
            )
            if process.returncode != 0:
                raise BenchError(f"the SMTP load generator failed:\n{err.decode()[-2000:]}")
            result: Results = json.loads(out)
            return result

        try:
            yield run
        finally:
            self.meter.pids.pop("loadgen", None)
            await stop_process(process)

    def _command(self, port: int, manifest: Path, rate: float = 0.0) -> Results:
        p = self.p
        return {
            "host": "127.0.0.1",
            "port": port,
            "manifest": str(manifest),
            "connections": p.mail_connections,
            "per_session": p.mail_per_session,
            "rate": rate,
        }

    async def _wait_counted(self, target: int, timeout: float) -> float | None:
        """The wall time the users' pushed incoming numbers summed to ``target``."""
        deadline = time.monotonic() + timeout
        while self._counted() < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._count_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._count_changed.wait(), min(remaining, 1.0))
        return time.time()

    async def _throughput(self, hub: Hub, port: int, everyone: list[Thread]) -> Results:
        p = self.p
        replies = self._make("T", everyone, p.mail_replies)
        manifest = write_manifest(self.work / "throughput", replies)
        size = sum(len(r.raw) for r in replies)
        self.say(
            f"mail: {len(replies)} replies ({size / len(replies) / 1024:.1f} KiB on average) "
            f"over {p.mail_connections} SMTP sessions to the hub"
        )
        before = self._counted()
        self.replies += replies
        stored = await asyncio.to_thread(stored_raw, hub.db_url)
        db_before = await asyncio.to_thread(db_top, hub.db_url)
        async with self._generator() as generator:
            with self.meter.phase("mail: throughput, hub") as cpu:
                counting = asyncio.create_task(
                    self._wait_counted(before + len(replies), COUNT_TIMEOUT)
                )
                gen = await generator(self._command(port, manifest), COUNT_TIMEOUT)
                accepted = int(gen["accepted"])
                if accepted < len(replies):
                    # refused ones never count: stop waiting for them
                    counting.cancel()
                    counted = await self._wait_counted(before + accepted, COUNT_TIMEOUT)
                else:
                    counted = await counting
                await self._idle(hub)
        db_after = await asyncio.to_thread(db_top, hub.db_url)
        gen["database"] = top_delta(db_before, db_after, max(1, accepted))
        _own_cpu(cpu, gen)
        gen["cpu_percent"] = _pct(cpu.percent)
        gen["counted_wall"] = counted
        gen["manifest"] = str(manifest)
        gen["mean_bytes"] = size / len(replies)
        gen["stored_raw"] = {"before": stored, "after": stored + accepted}
        if counted is None:
            self.problems.append(
                f"throughput: the users' counters did not show all {accepted} accepted replies "
                f"within {COUNT_TIMEOUT:g} s (they showed {self._counted() - before})"
            )
        return gen

    async def _peer(self, manifest: Path) -> Results:
        """The bare aiosmtpd server, ``mail_peer_runs`` times with the same messages; the run
        with the median acceptance rate, and every run's rate."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.mail_loadgen",
            "sink",
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,  # it exits when this closes, whatever happens to us
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        runs: list[Results] = []
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            port = int(json.loads(line)["port"])
            self.meter.pids["peer"] = process.pid
            for k in range(self.p.mail_peer_runs):
                async with self._generator() as generator:
                    name = f"mail: throughput, bare aiosmtpd ({k + 1})"
                    with self.meter.phase(name) as cpu:
                        gen = await generator(self._command(port, manifest), COUNT_TIMEOUT)
                _own_cpu(cpu, gen)
                gen["cpu_percent"] = _pct(cpu.percent)
                for key in ("start_wall", "end_wall", "code"):
                    gen.pop(key, None)
                runs.append(gen)
        finally:
            self.meter.pids.pop("peer", None)
            if process.stdin is not None:
                process.stdin.close()
            await stop_process(process)
        ordered = sorted(runs, key=lambda r: float(r.get("accepted_per_second") or 0))
        median = dict(ordered[len(ordered) // 2])
        median["runs"] = [r.get("accepted_per_second") for r in runs]
        return median

    async def _loaded_latency(
        self,
        hub: Hub,
        port: int,
        watch: Watch,
        mine: list[Thread],
        others: list[Thread],
        rate: float,
    ) -> Results:
        p = self.p
        lead = 2.0  # the background runs alone this long before the first probe
        seconds = lead + p.mail_loaded_probes * p.mail_probe_interval + 2.0
        background = self._make("B", others, max(1, round(rate * seconds)))
        manifest = write_manifest(self.work / "background", background)
        probes_replies = self._make("L", mine, p.mail_loaded_probes)
        self.replies += background
        before = self._counted()
        probes: list[Probe] = []
        stored = await asyncio.to_thread(stored_raw, hub.db_url)
        async with self._generator() as generator:
            with self.meter.phase(f"mail: latency under load ({rate:.0f}/s)") as cpu:
                gen_task = asyncio.create_task(
                    generator(self._command(port, manifest, rate), COUNT_TIMEOUT)
                )
                await asyncio.sleep(lead)
                started = time.perf_counter()
                for i, reply in enumerate(probes_replies):
                    pause = started + i * p.mail_probe_interval - time.perf_counter()
                    if pause > 0:
                        await asyncio.sleep(pause)
                    if gen_task.done():
                        break
                    probes.append(await self._probe(port, watch, reply, PUSH_TIMEOUT * 4))
                gen = await gen_task
                counted = await self._wait_counted(
                    before + int(gen["accepted"]) + len(probes), COUNT_TIMEOUT
                )
                await self._idle(hub)
        # probes never sent (the background ended first) are no replies of the run
        unsent = {r.ref for r in probes_replies[len(probes) :]}
        self.replies = [r for r in self.replies if r.ref not in unsent]
        if unsent:
            self.problems.append(
                f"latency under load: the background ended before {len(unsent)} of the probes"
            )
        out = probe_results(probes, 0)
        out["offered_rate"] = rate
        out["stored_raw"] = stored
        out["background"] = {
            k: gen[k]
            for k in ("messages", "accepted", "seconds", "accepted_per_second", "codes", "cut_off")
        }
        out["counted"] = counted is not None
        _own_cpu(cpu, gen)
        out["cpu_percent"] = _pct(cpu.percent)
        return out

    async def _verify(self, api: Api, admin: User, users: list[User]) -> Results:
        """Every reply once, on its record, through the API; the unmatched list."""
        found: dict[str, list[Results]] = {}
        unknown = 0
        for user in users:
            offset = 0
            while True:
                query = f"type=email&status=open&limit=500&offset={offset}"
                data = await api.get(f"/crm/activities?{query}", user.token)
                page = data["activities"]
                for activity in page:
                    if activity["direction"] != "incoming":
                        continue
                    hit = REF.search(activity.get("description") or "")
                    if hit is None:
                        unknown += 1
                        continue
                    found.setdefault(hit.group(1), []).append(activity)
                if len(page) < 500:
                    break
                offset += 500
        lost, duplicated, misplaced = [], [], []
        how: dict[str, dict[str, int]] = {}
        created: dict[str, float] = {}
        for reply in self.replies:
            seen = found.get(reply.ref, [])
            if not seen:
                lost.append(reply.ref)
                continue
            if len(seen) > 1:
                duplicated.append(reply.ref)
            activity = seen[0]
            if (activity["owner_type"], activity["owner_id"]) != reply.record:
                misplaced.append(reply.ref)
            match = (activity.get("mail") or {}).get("match") or "?"
            how.setdefault(reply.kind, {}).setdefault(match, 0)
            how[reply.kind][match] += 1
            created[reply.ref] = _wall(activity["created_at"])
        expected = {r.ref for r in self.replies}
        extra = sorted(set(found) - expected)
        unmatched = await api.get("/mail/unmatched", admin.token)
        unmatched_n = len(unmatched.get("mails", []))
        out = {
            "replies": len(self.replies),
            "found": sum(1 for r in self.replies if r.ref in found),
            "lost": len(lost),
            "duplicated": len(duplicated),
            "misplaced": len(misplaced),
            "unexpected": len(extra) + unknown,
            "unmatched": unmatched_n,
            "matched_by": how,
            "examples": {
                "lost": lost[:5],
                "duplicated": duplicated[:5],
                "misplaced": misplaced[:5],
            },
        }
        bad = {k: out[k] for k in ("lost", "duplicated", "misplaced", "unexpected", "unmatched")}
        if any(bad.values()):
            self.problems.append(f"replies not accounted for: {bad} ({out['examples']})")
        wrong_how = {kind: counts for kind, counts in how.items() if set(counts) - {kind, "?"}}
        if wrong_how:
            self.problems.append(f"replies matched another way than written for: {wrong_how}")
        self._created = created
        return out

    def _committed(self, gen: Results, prefix: str) -> Results:
        """Committed rate and time to commit, from the activities' ``created_at``."""
        created = self._created
        refs = [r.ref for r in self.replies if r.ref.startswith(prefix)]
        times = [created[ref] for ref in refs if ref in created]
        if not times:
            return {}
        start = float(gen["started_wall"])
        last = max(times)
        seconds = last - start
        ends = gen.get("end_wall") or []
        after_250 = [
            (created[ref] - ends[i]) * 1000
            for i, ref in enumerate(refs)
            if ref in created and i < len(ends) and ends[i] is not None
        ]
        counted = gen.get("counted_wall")
        # the rate through the run: each quarter of the commits over the time it took
        ordered = sorted(times)
        quarters, previous = [], start
        for k in range(4):
            chunk = ordered[k * len(ordered) // 4 : (k + 1) * len(ordered) // 4]
            if chunk:
                quarters.append(len(chunk) / max(chunk[-1] - previous, 1e-3))
                previous = chunk[-1]
        return {
            "committed": len(times),
            "quarters_per_second": quarters,
            "seconds": seconds,
            "per_second": len(times) / seconds if seconds > 0 else None,
            "behind_acceptance_seconds": last - float(gen["last_accepted_wall"]),
            "answered_to_committed_ms": summary(after_250),
            "counted_seconds": counted - start if counted else None,
            "counted_per_second": len(times) / (counted - start) if counted else None,
        }

    async def run(self, keep: bool) -> Results:
        p = self.p
        relay = Relay()
        loop = asyncio.get_running_loop()
        relay_server = await loop.create_server(lambda: SMTP(relay), "127.0.0.1", 0)
        relay.port = relay_server.sockets[0].getsockname()[1]
        data_dir = self.work / "hub"
        data_dir.mkdir()
        self.say(f"mail: starting the hub on {data_dir}, relay on port {relay.port}")
        hub = await start_hub(
            data_dir,
            extra_env={
                "PORTALHUB_CRM_INBOX": INBOX,
                "PORTALHUB_SMTP_RELAY_URL": f"smtp://127.0.0.1:{relay.port}",
            },
        )
        self.meter.pids.update(hub=hub.pid, db=hub.db_pid)
        results: Results = {"problems": self.problems, "users": p.mail_users}
        try:
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                api = Api(session, hub.url)
                admin = await api.login(ADMIN_LOGIN, ADMIN_PASSWORD)
                info = await api.get("/mail/info", admin.token)
                port = int(info["smtp_port"])
                started = time.monotonic()
                with self.meter.phase("mail: set-up") as cpu:
                    per_user = await self._records(api, admin, relay)
                everyone = [t for threads in per_user for t in threads]
                results["setup"] = {
                    "seconds": time.monotonic() - started,
                    "records": len(everyone),
                    "sent": len(relay.received),
                    "cpu_percent": _pct(cpu.percent),
                }
                self.say(
                    f"mail: {p.mail_users} users, {len(everyone)} deals and contacts, "
                    f"{len(relay.received)} mails sent through the relay in "
                    f"{results['setup']['seconds']:.1f}s"
                )
                users = [threads[0].owner for threads in per_user]
                self.watches = [Watch(u, self._count_changed.set) for u in users]
                await asyncio.gather(*(w.connect(hub.url) for w in self.watches))
                first = self.watches[0]
                self.say(f"mail: {len(self.watches)} users connected; quiet latency")
                quiet = await self._quiet_latency(
                    hub,
                    port,
                    first,
                    per_user[0],
                    "Q",
                    p.mail_latency_replies,
                    p.mail_latency_warmup,
                )
                results["quiet"] = quiet
                lat = quiet["all"]["latency_ms"]
                self.say(
                    f"mail: quiet latency p50 {lat.get('p50', 0):.0f} ms, "
                    f"p99 {lat.get('p99', 0):.0f} ms; throughput"
                )
                hub_gen = await self._throughput(hub, port, everyone)
                manifest = Path(hub_gen.pop("manifest"))
                # committed, read back below; a first estimate for the background rate
                counted = hub_gen.get("counted_wall")
                rough = (
                    hub_gen["accepted"] / (counted - hub_gen["started_wall"])
                    if counted
                    else hub_gen["accepted_per_second"]
                )
                self.say(
                    f"mail: hub accepted {hub_gen['accepted_per_second']:.0f}/s, "
                    f"counted {rough:.0f}/s; the peer"
                )
                peer_gen = await self._peer(manifest)
                self.say(f"mail: bare aiosmtpd accepted {peer_gen['accepted_per_second']:.0f}/s")
                if p.mail_latency_after:
                    self.say(f"mail: quiet latency again, {p.mail_latency_after} replies")
                    results["quiet_after"] = await self._quiet_latency(
                        hub, port, first, per_user[0], "A", p.mail_latency_after, 0
                    )
                if p.mail_loaded_probes:
                    rate = max(1.0, rough * p.mail_load_fraction)
                    self.say(f"mail: latency under load, background {rate:.0f}/s")
                    results["loaded"] = await self._loaded_latency(
                        hub,
                        port,
                        first,
                        per_user[0],
                        [t for threads in per_user[1:] for t in threads],
                        rate,
                    )
                self.say("mail: accounting for every reply")
                results["verify"] = await self._verify(api, admin, users)
                hub_gen["committed"] = self._committed(hub_gen, "T")
                results["queries"] = await asyncio.to_thread(
                    pipeline_queries, hub.db_url, users[0].id
                )
                results["rss"] = {"hub": rss_bytes(hub.pid), "db": rss_bytes(hub.db_pid)}
                results["pushes"] = sum(w.pushes for w in self.watches)
            for gen in (hub_gen, peer_gen):
                for key in ("start_wall", "end_wall", "code"):
                    gen.pop(key, None)
            results["hub"] = hub_gen
            results["peer"] = peer_gen
            results["ratios"] = ratios(hub_gen, peer_gen)
        except BaseException:
            errors = [
                line
                for line in (data_dir / "hub.log").read_text(errors="replace").splitlines()
                if " ERROR " in line or line.startswith(("Traceback", "  File", "KeyError"))
            ]
            if errors:
                self.say("mail: the hub logged:\n" + "\n".join(errors[-30:]))
            raise
        finally:
            await asyncio.gather(*(w.close() for w in self.watches), return_exceptions=True)
            await hub.stop()
            relay_server.close()
            self.meter.pids.pop("hub", None)
            self.meter.pids.pop("db", None)
            if keep:
                self.say(f"mail: kept {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        return results


def ratios(hub: Results, peer: Results) -> Results:
    theirs = peer.get("accepted_per_second")
    committed = hub.get("committed", {})

    def over(ours: Any) -> float | None:
        return float(ours) / float(theirs) if ours and theirs else None

    return {
        "accepted": over(hub.get("accepted_per_second")),
        "committed": over(committed.get("per_second")),
        "counted": over(committed.get("counted_per_second")),
    }


async def run(profile: Profile, say: Say, meter: CpuMeter, keep: bool = False) -> Results:
    return await MailBench(profile, say, meter).run(keep)
