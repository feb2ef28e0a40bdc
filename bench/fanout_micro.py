"""The Socket.IO transport alone: ``python -m bench.fanout_micro [--n 1000] [--messages 200]``.

The hub runs in this process on a real (in-memory) SecantusDB; ``bench/node/fanout-micro.js``
opens N raw websockets to it (no socket.io-client, so that the clients cost little) and
counts what arrives. Events are then handed to the hub as the bus would hand them
(``Hub._on_event``), with no database write and no HTTP request in between: what is measured
is the broadcast path (encoding, writing to N sockets) and, for connections, the set-up.

Printed: connections/s and the hub's CPU per connection (``snapshot`` counts a connection
ready, as in the benchmark), RSS per idle connection, then for each round of messages the
deliveries/s (N x messages / time from the first publish to the last receipt), the hub's CPU
per delivery, and anything lost, doubled or out of order. Not part of ``python -m bench``:
a tool for working on ``server/channels``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from server.app import create_app
from server.directory.models import UserCreate
from server.events.models import Event
from server.services import SERVICES
from server.settings import Settings
from server.store.database import Store
from server.store.embedded import find_executable, free_loopback_port, mongodb_url
from server.web.limits import http_runner

NODE_DIR = Path(__file__).resolve().parent / "node"
ROOM = "bench:all"
DATABASE_OPTIONS = ("--storage-path", ":memory:", "--log-level", "WARNING")


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clients:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> Clients:
        process = await asyncio.create_subprocess_exec(
            shutil.which("node") or "node",
            str(NODE_DIR / "fanout-micro.js"),
            cwd=NODE_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 600)
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"clients: {reply}")
        return reply


def start_database() -> tuple[subprocess.Popen[bytes], str]:
    port = free_loopback_port()
    process = subprocess.Popen(
        [find_executable(), "--host", "127.0.0.1", "--port", str(port), *DATABASE_OPTIONS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = mongodb_url("127.0.0.1", port)
    client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=500)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.admin.command("ping")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    client.close()
    return process, url


async def transport_only(svc: Any) -> None:
    """Every data call of the connect path answered from memory: what is left is the
    transport's and the hub's own bookkeeping."""
    hub = svc.hub
    sessions: dict[str, Any] = {}
    session_for = svc.auth.session_for

    async def cached_session(token: str) -> Any:
        if token not in sessions:
            sessions[token] = await session_for(token)
        return sessions[token]

    async def snapshot(conn: Any) -> dict[str, Any]:
        return {"streams": {s: 0 for s in conn.streams}}

    async def nothing(*args: Any, **kwargs: Any) -> Any:
        return {}

    async def no_streams(user: Any) -> list[str]:
        return []

    svc.auth.session_for = cached_session
    hub._snapshot = snapshot
    hub._catch_up = nothing
    hub.member_streams = no_streams
    hub._presence.connected = nothing
    hub._presence.own_view = nothing
    hub._snapshot_parts.pop("counters", None)


async def run(args: argparse.Namespace) -> None:
    db, url = start_database()
    tmp = Path(tempfile.mkdtemp(prefix="fanout-micro-"))
    settings = Settings(
        mongodb_url=url,
        mongodb_database=f"m_{uuid.uuid4().hex[:8]}",
        http_port=0,
        data_dir=tmp / "var",
        xmpp_port=0,
        xmpp_tls_port=0,
        smtp_port=0,
        socket_max_connections_per_user=100_000,
        http_max_connections_per_address=100_000,
    )
    store = Store(url, settings.mongodb_database)
    await store.ensure_indexes()
    app = create_app(settings, store)
    runner = http_runner(app, settings)
    await runner.setup()
    from aiohttp import web

    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    svc = app[SERVICES]
    tokens = []
    for i in range(args.users):
        user = await svc.directory.create_user(
            UserCreate(login=f"u{i}", email=f"u{i}@example.test", password="micro-bench-password")
        )
        tokens.append(await svc.auth.issue_token(user.id))
    if args.transport_only:
        await transport_only(svc)
    clients = await Clients.start()
    try:
        await asyncio.sleep(1)
        if args.tracemalloc:
            tracemalloc.start(args.tracemalloc)
            before = tracemalloc.take_snapshot()
        rss0, cpu0 = rss_kib(), cpu()
        reply = await clients.call(
            cmd="connect", url=base, tokens=tokens, count=args.n, parallel=args.parallel
        )
        spent = cpu() - cpu0
        await asyncio.sleep(1)
        rss1 = rss_kib()
        if args.tracemalloc:
            after = tracemalloc.take_snapshot()
            key = {1: "lineno", 0: "filename"}.get(args.tracemalloc, "traceback")
            if args.by_file:
                key = "filename"
            stats = after.compare_to(before, key)
            print(f"traced: +{sum(s.size_diff for s in stats) / args.n / 1024:.1f} KiB/conn")
            for stat in stats[:40]:
                print(f"{stat.size_diff / args.n:8.0f} B/conn {stat.count_diff / args.n:6.1f}")
                for line in stat.traceback.format()[-2 * args.tracemalloc :]:
                    print("      ", line)
            tracemalloc.stop()
        print(
            f"connect {args.n}: {reply['per_second']:.0f}/s (p50 {reply['p50_ms']:.1f} ms), "
            f"hub CPU {spent / args.n * 1000:.2f} ms per connection, "
            f"RSS +{(rss1 - rss0) / args.n:.1f} KiB per connection, failures {reply['failures']}"
        )
        hub = svc.hub
        for sid in list(hub._connections):
            await hub.sio.enter_room(sid, ROOM)
        payload = {"message": {"id": "x" * 24, "text": "y" * args.size, "author_id": "z" * 24}}
        seq = 0
        for round_no in range(args.rounds):
            await clients.call(cmd="reset")
            start_wall, start_cpu = time.perf_counter(), cpu()
            for _ in range(args.messages):
                seq += 1
                await hub._on_event(Event(ROOM, seq, "bench", payload, datetime.now(UTC)))
                if args.rate:
                    await asyncio.sleep(1 / args.rate)
            published = time.perf_counter()
            published_cpu = cpu()
            result = await clients.call(cmd="expect", count=args.messages, timeout=120)
            # the last receipt, on the Node side's clock, relative to its answer
            since_last = (result["now_ms"] - result["last_at_ms"]) / 1000
            wall = time.perf_counter() - start_wall - since_last
            spent = cpu() - start_cpu
            deliveries = args.messages * result["readers"]
            print(
                f"round {round_no}: {args.messages} x {result['readers']} = {deliveries} "
                f"deliveries in {wall * 1000:.0f} ms: {deliveries / wall:,.0f}/s; "
                f"publishing took {(published - start_wall) * 1000:.0f} ms "
                f"({(published_cpu - start_cpu) / deliveries * 1e6:.1f} us CPU per delivery), "
                f"hub CPU {spent / deliveries * 1e6:.1f} us per delivery; "
                f"lost {result['lost']}, doubled {result['extra']}, "
                f"out of order {result['disorder']}, closed {result['closed']}"
            )
    finally:
        await clients.call(cmd="exit")
        await runner.cleanup()
        await store.client.drop_database(settings.mongodb_database)
        await store.close()
        db.terminate()
        db.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_micro", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="connections")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=50, help="connects at a time")
    parser.add_argument("--messages", type=int, default=200, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=100, help="characters of text per message")
    parser.add_argument(
        "--transport-only",
        action="store_true",
        help="connect without the database: auth, snapshot and catch-up answered from memory",
    )
    parser.add_argument(
        "--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace what connects allocate"
    )
    parser.add_argument("--by-file", action="store_true", help="tracemalloc: group by file")
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s (0: back to back)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
