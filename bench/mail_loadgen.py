"""The SMTP load generator and the bare SMTP peer of the mail part (``bench/mail.py``).

``python -m bench.mail_loadgen send`` reads one JSON command on stdin, delivers the messages
of a manifest to one SMTP server and prints one JSON result on stdout. The same code, with
the same messages and the same connections, drives the hub's listener and the peer.

- ``connections`` SMTP sessions at once (aiosmtplib, no TLS), each sending up to
  ``per_session`` messages before it says QUIT and opens a new one; a session the server
  cuts off (``421``, a closed connection) is opened again and the message tried once more;
- ``mode: "burst"``: every message as fast as the sessions go; ``mode: "rate"``: message
  ``i`` is started no earlier than ``i / rate`` seconds after the start (open loop: a late
  message is sent at once, there is no catching up in bursts beyond ``connections``).

Times are read from ``time.time()`` (the wall clock, to compare with the timestamps the hub
writes) and ``time.perf_counter()`` (durations). Only the given address (loopback) is used,
and every loop is bounded by the manifest and by ``timeout``.

``python -m bench.mail_loadgen sink`` is the peer: an aiosmtpd server built with the hub
listener's own options (``server/mailbridge/ingress.py``) whose handler accepts every
recipient and discards every message. It prints ``{"port": N}`` and runs until its stdin
closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

Results = dict[str, Any]

CONNECT_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0
# what server/mailbridge/ingress.py gives aiosmtpd (the peer is built the same way)
HUB_MAX_BYTES = 25 * 1024 * 1024
HUB_IDLE_TIMEOUT = 60
HUB_COMMAND_CALL_LIMIT = 50


def load_manifest(path: Path) -> list[Results]:
    """``[{"file", "sender", "recipients"}]``; each message's bytes read once, up front."""
    entries: list[Results] = json.loads(path.read_text())
    for entry in entries:
        entry["raw"] = (path.parent / entry["file"]).read_bytes()
    return entries


class Sender:
    def __init__(self, cmd: Results, messages: list[Results]) -> None:
        self.host = str(cmd["host"])
        self.port = int(cmd["port"])
        self.connections = int(cmd["connections"])
        self.per_session = int(cmd.get("per_session", HUB_COMMAND_CALL_LIMIT))
        self.rate = float(cmd.get("rate") or 0.0)
        self.messages = messages
        self.next = 0
        self.started_wall = 0.0
        self.started = 0.0
        # per message: wall time started, wall time answered, the answer's code
        self.start_wall: list[float | None] = [None] * len(messages)
        self.end_wall: list[float | None] = [None] * len(messages)
        self.code: list[int | None] = [None] * len(messages)
        self.answer: list[str] = [""] * len(messages)
        self.sessions = 0
        self.cut_off = 0  # sessions the server ended in the middle (421, closed)
        self.retried = 0

    async def _open(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=COMMAND_TIMEOUT,
            start_tls=False,
            use_tls=False,
        )
        await smtp.connect(timeout=CONNECT_TIMEOUT)
        await smtp.ehlo()
        self.sessions += 1
        return smtp

    async def _close(self, smtp: aiosmtplib.SMTP | None) -> None:
        if smtp is None:
            return
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            if smtp.is_connected:
                await smtp.quit()
        smtp.close()

    async def _worker(self) -> None:
        smtp: aiosmtplib.SMTP | None = None
        in_session = 0
        try:
            while self.next < len(self.messages):
                i = self.next
                self.next += 1
                if self.rate > 0:
                    due = self.started + i / self.rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                message = self.messages[i]
                self.start_wall[i] = time.time()
                for attempt in range(2):
                    if smtp is None or in_session >= self.per_session:
                        await self._close(smtp)
                        smtp, in_session = await self._open(), 0
                    try:
                        in_session += 1
                        errors, text = await smtp.sendmail(
                            message["sender"], message["recipients"], message["raw"]
                        )
                    except aiosmtplib.SMTPResponseException as exc:
                        if exc.code == 421 and attempt == 0:
                            self.cut_off += 1
                            self.retried += 1
                            await self._close(smtp)
                            smtp = None
                            continue
                        self.code[i], self.answer[i] = exc.code, exc.message[:200]
                    except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                        await self._close(smtp)
                        smtp = None
                        if attempt == 0:
                            self.cut_off += 1
                            self.retried += 1
                            continue
                        self.code[i], self.answer[i] = 0, "disconnected"
                    else:
                        self.code[i] = 250 if not errors else 450
                        self.answer[i] = text[:200]
                    break
                self.end_wall[i] = time.time()
        finally:
            await self._close(smtp)

    async def run(self) -> Results:
        cpu = os.times()
        self.started_wall, self.started = time.time(), time.perf_counter()
        await asyncio.gather(*(self._worker() for _ in range(self.connections)))
        ended = time.perf_counter()
        used = os.times()
        cpu_seconds = used.user + used.system - cpu.user - cpu.system
        accepted = [i for i, c in enumerate(self.code) if c == 250]
        ends = [self.end_wall[i] for i in accepted]
        last = max((e for e in ends if e is not None), default=self.started_wall)
        seconds = last - self.started_wall
        codes: dict[str, int] = {}
        for c in self.code:
            codes[str(c)] = codes.get(str(c), 0) + 1
        refused = [
            {"index": i, "code": c, "answer": self.answer[i]}
            for i, c in enumerate(self.code)
            if c != 250
        ]
        return {
            "messages": len(self.messages),
            "bytes": sum(len(m["raw"]) for m in self.messages),
            "accepted": len(accepted),
            "codes": codes,
            "refused_examples": refused[:10],
            "connections": self.connections,
            "per_session": self.per_session,
            "rate": self.rate,
            "sessions": self.sessions,
            "cut_off": self.cut_off,
            "retried": self.retried,
            "started_wall": self.started_wall,
            "last_accepted_wall": last,
            "seconds": seconds,
            "wall_seconds": ended - self.started,
            "cpu_seconds": cpu_seconds,
            "accepted_per_second": len(accepted) / seconds if seconds > 0 else None,
            # per message, in manifest order: [started, answered] (wall clock) and the code
            "start_wall": self.start_wall,
            "end_wall": self.end_wall,
            "code": self.code,
        }


async def send(cmd: Results) -> Results:
    messages = load_manifest(Path(cmd["manifest"]))
    sender = Sender(cmd, messages)
    return await asyncio.wait_for(sender.run(), float(cmd.get("timeout", 900)))


class Discard:
    """Every recipient taken, every message thrown away."""

    def __init__(self) -> None:
        self.messages = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        return "250 2.0.0 OK: discarded"


async def sink() -> None:
    handler = Discard()

    def make() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=HUB_MAX_BYTES,
            enable_SMTPUTF8=True,
            hostname="bench.sink",
            ident="bench SMTP sink",
            timeout=HUB_IDLE_TIMEOUT,
            command_call_limit=HUB_COMMAND_CALL_LIMIT,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(make, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    # run until the driver closes our stdin (also when it dies)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mail_loadgen")
    parser.add_argument("role", choices=("send", "sink"))
    args = parser.parse_args()
    if args.role == "sink":
        asyncio.run(sink())
        return
    cmd = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(send(cmd))))


if __name__ == "__main__":
    main()
