"""The XMPP load generator: ``python -m bench.xmpp_loadgen`` reads one JSON command on stdin,
runs the three XMPP scenarios against one server and prints one JSON result on stdout.

The same code, with the same numbers, drives the hub and Prosody. Every client is a slixmpp
``ClientXMPP`` in this one asyncio process: STARTTLS on the c2s port (the servers' self-signed
certificates are not verified), SASL SCRAM-SHA-1 (its PBKDF2 from hashlib, not slixmpp's
Python loop), resource binding, initial presence.
Every loop is bounded in count and in time, and the only address used is the one given
(loopback).

Scenarios:

- ``logins``: ``logins`` full logins, ``login_parallel`` at a time, each client closed again
  once the server has answered a ping sent after its initial presence;
- ``latency``: one pair, the sender sends ``chat`` messages at ``rate``/s for ``seconds``;
- ``saturation``: ``pairs`` sender/receiver pairs, each sender keeping up to ``window``
  messages in flight for ``saturation_seconds``.

Latency is from just before a message is handed to slixmpp to its receipt by the receiving
client, both read from this process's monotonic clock (the send time travels in the body).
CPU use per scenario is measured here too: this process's, and that of the server ``pids``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import ssl
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from slixmpp import JID, ClientXMPP
from slixmpp.stanza import Message
from slixmpp.util.sasl.mechanisms import SCRAM

from bench.procs import CLOCK_TICKS, cpu_ticks

Results = dict[str, Any]

CONNECT_TIMEOUT = 30.0
DRAIN_SECONDS = 3.0


def _salted_password(self: Any, text: Any, salt: bytes, iterations: int) -> bytes:
    """SCRAM's Hi() (RFC 5802: PBKDF2 with HMAC), from hashlib's C code: slixmpp computes it
    in a Python loop, 75-80% of the generator's CPU per login (py-spy), so that with ten
    logins at a time the login figures measured the generator's queue, not the servers."""
    key = text if isinstance(text, bytes) else str(text).encode()
    return hashlib.pbkdf2_hmac(self.hash().name, key, salt, iterations)


SCRAM.Hi = _salted_password  # type: ignore[method-assign]


# One context for all clients (building one per client loads the CA store each time); the
# servers' certificates are self-signed, so they are not verified.
TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE


def summary(values: list[float]) -> Results:
    """p50/p90/p99/max in ms of latencies given in seconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

    return {
        "n": len(ordered),
        "mean": round(1000 * statistics.fmean(ordered), 3),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": round(1000 * ordered[-1], 3),
    }


class Client(ClientXMPP):
    """One client: connected, authenticated, bound and present once ``ready`` is done."""

    def __init__(self, jid: str, password: str) -> None:
        # The shared context given here: without it slixmpp builds a default one per client
        # and loads the system's CA store into it twice, about 60% of the generator's CPU
        # per login, which made the login figures the generator's queue more than the servers'.
        super().__init__(jid, password, ssl_context=TLS)
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.register_plugin("feature_mechanisms", {"use_mech": "SCRAM-SHA-1"})
        self.register_plugin("xep_0199")
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_body: Any = None
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("failed_auth", self._failed)
        self.add_event_handler("message", self._message)

    async def _started(self, _event: Any) -> None:
        self.send_presence()
        try:
            # In-order processing: the answer means the presence has been handled too.
            await self.plugin["xep_0199"].send_ping(
                JID(self.boundjid.domain), timeout=CONNECT_TIMEOUT
            )
        except Exception as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            return
        if not self.ready.done():
            self.ready.set_result(None)

    def _failed(self, _event: Any) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"authentication failed for {self.boundjid}"))

    def _message(self, msg: Message) -> None:
        if self.on_body is not None and msg["type"] == "chat":
            self.on_body(str(msg["body"]))

    async def login(self, host: str, port: int) -> None:
        self.connect(host, port)
        await asyncio.wait_for(self.ready, CONNECT_TIMEOUT)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.disconnect(wait=1.0), 5.0)
        except Exception:
            self.abort()


@dataclass
class Cpu:
    """CPU used during a scenario, in % of one core."""

    pids: dict[str, int]
    percent: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        wall0, own0 = time.monotonic(), time.process_time()
        ticks0 = {name: cpu_ticks(pid) for name, pid in self.pids.items()}
        yield
        seconds = max(time.monotonic() - wall0, 1e-6)
        self.percent["loadgen"] = round(100 * (time.process_time() - own0) / seconds, 1)
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                used = (cpu_ticks(pid) - ticks0[name]) / CLOCK_TICKS
                self.percent[name] = round(100 * used / seconds, 1)


class Generator:
    def __init__(self, command: Results) -> None:
        self.host: str = command["host"]
        self.port: int = int(command["port"])
        self.domain: str = command["domain"]
        self.users: list[str] = list(command["users"])
        self.password: str = command["password"]
        self.pids: dict[str, int] = {k: int(v) for k, v in command.get("pids", {}).items()}
        self.c = command

    def jid(self, login: str, resource: str = "bench") -> str:
        return f"{login}@{self.domain}/{resource}"

    async def logged_in(self, logins: list[str]) -> list[Client]:
        clients = [Client(self.jid(login), self.password) for login in logins]
        try:
            await asyncio.gather(*(c.login(self.host, self.port) for c in clients))
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients))
            raise
        return clients

    async def logins(self) -> Results:
        total, parallel = int(self.c["logins"]), int(self.c["login_parallel"])
        gate = asyncio.Semaphore(parallel)
        times: list[float] = []
        failures: list[str] = []

        async def one(k: int) -> None:
            async with gate:
                login = self.users[k % len(self.users)]
                client = Client(self.jid(login, f"login{k}"), self.password)
                start = time.monotonic()
                try:
                    await client.login(self.host, self.port)
                    times.append(time.monotonic() - start)
                except Exception as exc:
                    failures.append(repr(exc))
                await client.close()

        cpu = Cpu(self.pids)
        with cpu.measure():
            start = time.monotonic()
            await asyncio.gather(*(one(k) for k in range(total)))
            seconds = time.monotonic() - start
        # Closing is inside the window: the time per login slot includes its close.
        return {
            "logins": total,
            "parallel": parallel,
            "ok": len(times),
            "failed": len(failures),
            "failures": failures[:5],
            "seconds": round(seconds, 3),
            "logins_per_second": round(len(times) / seconds, 2),
            "login_ms": summary(times),
            "cpu_percent": cpu.percent,
        }

    async def pairs(
        self, pairs: int, duration: float, warmup: float, window: int, rate: float
    ) -> Results:
        """``pairs`` disjoint pairs; with ``rate`` > 0 each sender sends at that rate,
        otherwise it keeps ``window`` messages in flight."""
        logins = self.users[: 2 * pairs]
        clients = await self.logged_in(logins)
        senders, receivers = clients[0::2], clients[1::2]
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        sent = [0] * pairs
        received = [0] * pairs
        measured = [0]
        window_open = [asyncio.Event() for _ in range(pairs)]
        progress = asyncio.Event()
        # ids unique per phase and run: the hub deduplicates a sender's messages by id
        tag = f"b{os.getpid()}x{int(loop.time() * 1000)}"
        in_flight = [0] * pairs
        begin = loop.time()
        measure_from = begin + warmup
        stop_at = measure_from + duration

        def receiver(k: int) -> Any:
            def on_body(body: str) -> None:
                parts = body.split(" ", 2)
                if len(parts) < 2 or parts[0] != "bench":
                    return
                stamp = float(parts[1])
                now = loop.time()
                received[k] += 1
                in_flight[k] -= 1
                window_open[k].set()
                progress.set()
                if measure_from <= stamp < stop_at:
                    measured[0] += 1
                    latencies.append(now - stamp)

            return on_body

        for k, client in enumerate(receivers):
            client.on_body = receiver(k)

        async def send(k: int) -> None:
            client, to = senders[k], receivers[k].boundjid.bare
            n = 0
            while (now := loop.time()) < stop_at:
                if rate > 0:
                    due = begin + n / rate
                    if due > now:
                        await asyncio.sleep(due - now)
                        continue
                elif in_flight[k] >= window:
                    window_open[k].clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(window_open[k].wait(), max(0.0, stop_at - now))
                    continue
                n += 1
                in_flight[k] += 1
                sent[k] += 1
                msg = client.make_message(
                    mto=to, mbody=f"bench {loop.time():.6f} {k}-{n}", mtype="chat"
                )
                msg["id"] = f"{tag}-{k}-{n}"
                msg.send()

        cpu = Cpu(self.pids)
        try:
            with cpu.measure():
                await asyncio.gather(*(send(k) for k in range(pairs)))
                deadline = loop.time() + DRAIN_SECONDS
                while sum(received) < sum(sent) and (left := deadline - loop.time()) > 0:
                    progress.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(progress.wait(), left)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return {
            "pairs": pairs,
            "rate": rate,
            "window": window,
            "seconds": duration,
            "warmup": warmup,
            "sent": sum(sent),
            "received": sum(received),
            "lost": sum(sent) - sum(received),
            "delivered_per_second": round(measured[0] / duration, 2),
            "latency_ms": summary(latencies),
            "cpu_percent": cpu.percent,
        }


async def run(command: Results) -> Results:
    gen = Generator(command)
    out: Results = {"logins": await gen.logins()}
    out["latency"] = await gen.pairs(
        1, float(command["latency_seconds"]), float(command["warmup"]), 0, command["rate"]
    )
    out["saturation"] = await gen.pairs(
        int(command["pairs"]),
        float(command["saturation_seconds"]),
        float(command["warmup"]),
        int(command["window"]),
        0.0,
    )
    return out


def main() -> int:
    logging.basicConfig(level=logging.CRITICAL)
    command = json.loads(sys.stdin.read())
    result = asyncio.run(run(command))
    result["pid"] = os.getpid()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
