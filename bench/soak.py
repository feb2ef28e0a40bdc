"""The soak part: several nodes sharing one database and Redis, a bounded load run with every
message accounted for, memory and file descriptors sampled, and one node against two.

1. A ``redis-server`` of its own (no persistence) on a free port; node A (``serve --demo`` on a
   fresh data directory, with its embedded SecantusDB), ``PORTALHUB_REDIS_URL`` set.
2. ``soak_users`` users (through the API), grouped in chats of ``soak_group_size`` and in
   1:1 dialogs (user 2k with 2k+1): every user is in one group chat and one dialog.
3. ``soak_clients`` Socket.IO clients in ``bench/soak_loadgen.py`` (a process of its own),
   ``soak_clients / soak_users`` per user, all connected to node A.
4. **One node**: the offered rate steps through ``soak_rates`` (``soak_step_seconds`` each),
   messages to the chats in turn, through A. A step is sustained when the generator kept the
   rate, every copy arrived, and the delivery latency's p99 stayed under ``soak_p99_ms``; the
   ramp stops at the first step that is not.
5. Node B starts on A's database (``PORTALHUB_MONGODB_URL``) and Redis; every other client
   moves to it (it reconnects with ``since``). **Two nodes**: the same ramp, the messages
   posted through A and B in turn.
6. **Soak**: ``soak_seconds`` on both nodes at ``soak_load_fraction`` of the highest rate both
   configurations sustained.
7. Throughout, every ``soak_sample_seconds``: each process's RSS, open fds and CPU, and each
   node's ``/metrics`` (connections, fan-out histogram, queue depths). After the first
   ``soak_warmup_fraction`` of the soak, the least-squares slope of RSS and fds.
8. **Accounting** over the whole run: every stored message, every connection of every member
   of its chat, exactly once and in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench.fixtures import ADMIN_LOGIN, ADMIN_PASSWORD, BENCH_PASSWORD, Api, User, _bounded
from bench.procs import (
    CLOCK_TICKS,
    HUB_LIMITS,
    REPO,
    BenchError,
    CpuMeter,
    clean_env,
    cpu_ticks,
    free_port,
    start_hub,
    stop_process,
)
from bench.profiles import Profile

Results = dict[str, Any]
Say = Callable[[str], None]

SOAK_BEGIN = "<!-- bench:soak:begin -->"
SOAK_END = "<!-- bench:soak:end -->"
RSS_SLOPE_LIMIT = 1.0  # MB/min: below this, "no growth" (a shrinking process does not grow)
FD_SLOPE_LIMIT = 1.0  # fds/min
# processes that keep what the run adds: their growth is the data, not a leak
EXPECTED_GROWTH = {
    "db": "stores every message (not judged)",
    "loadgen": "keeps every receipt (not judged)",
}
METRIC = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+|\+Inf|NaN)$")


# processes -----------------------------------------------------------------------------------


async def start_redis(log_file: IO[bytes], timeout: float = 30.0) -> tuple[Any, int]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        shutil.which("redis-server") or "/usr/bin/redis-server",
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            if line.startswith(b"+PONG"):
                return process, port
        except (OSError, TimeoutError):
            pass
        if process.returncode is not None or time.monotonic() > deadline:
            await stop_process(process)
            raise BenchError("redis-server did not start")
        await asyncio.sleep(0.2)


async def start_node(
    data_dir: Path, env: dict[str, str], timeout: float = 180.0
) -> tuple[Any, int, IO[bytes]]:
    """A second node (``serve``, no demo seeding) on the first one's database."""
    port = free_port()
    log_path = data_dir / "hub.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed by the caller
    overrides = {
        **HUB_LIMITS,
        "PORTALHUB_DATA_DIR": str(data_dir),
        "PORTALHUB_HTTP_PORT": str(port),
        "PORTALHUB_HOST": "127.0.0.1",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "server", "serve"),
        cwd=REPO,
        env=clean_env(overrides),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while b"Portal Hub is running" not in log_path.read_bytes():
        if process.returncode is not None or time.monotonic() > deadline:
            await stop_process(process)
            log_file.close()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"node B did not start (exit {process.returncode}):\n{tail}")
        await asyncio.sleep(0.2)
    return process, port, log_file


class SoakGen:
    """``bench/soak_loadgen.py``, one JSON line per command."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> SoakGen:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.soak_loadgen",
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        return cls(process)

    async def call(self, cmd: Results, timeout: float) -> Results:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.process.stdin.drain()
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"soak load generator: no answer to {cmd['cmd']}") from None
        if not line:
            raise BenchError(f"soak load generator exited ({self.process.returncode})")
        reply: Results = json.loads(line)
        if "error" in reply:
            raise BenchError(f"soak load generator: {reply['error']}")
        return reply

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(BenchError, ConnectionError):
                await self.call({"cmd": "exit"}, timeout=60)
            await stop_process(self.process, timeout=10)


# sampling ------------------------------------------------------------------------------------


def proc_status(pid: int) -> tuple[float, int]:
    """(VmRSS in MB, open fds) of ``pid``."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
                break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        match = METRIC.match(line.strip())
        if match is None:
            continue
        name, labels, value = match.groups()
        parsed = dict(re.findall(r'([a-z_]+)="([^"]*)"', labels or ""))
        out.setdefault(name, []).append((parsed, float(value)))
    return out


def bucket_quantile(delta: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (cumulative ``(le, count)``)."""
    if not delta or delta[-1][1] <= 0:
        return None
    target = q * delta[-1][1]
    for le, count in delta:
        if count >= target:
            return le
    return None


class Sampler:
    def __init__(self, every: float) -> None:
        self.every = every
        self.pids: dict[str, int] = {}
        self.nodes: dict[str, str] = {}  # role -> base URL
        self.phase = "setup"
        self.samples: list[Results] = []
        self._ticks: dict[str, tuple[float, int]] = {}
        self._buckets: dict[str, list[tuple[float, float]]] = {}
        self._started = time.monotonic()

    async def _scrape(self, session: aiohttp.ClientSession, role: str, url: str) -> Results:
        async with session.get(f"{url}/metrics") as response:
            families = parse_metrics(await response.text())
        out: Results = {}
        out["connections"] = sum(v for labels, v in families.get("portalhub_connections", []))
        out["queues"] = {
            labels.get("queue", "?"): v for labels, v in families.get("portalhub_queue_depth", [])
        }
        buckets = sorted(
            (float(labels["le"]), v)
            for labels, v in families.get("portalhub_fanout_seconds_bucket", [])
        )
        before = self._buckets.get(role)
        self._buckets[role] = buckets
        if before is not None and len(before) == len(buckets):
            delta = [(le, v - b) for (le, v), (_, b) in zip(buckets, before, strict=True)]
            out["fanout_count"] = delta[-1][1] if delta else 0
            p50, p99 = bucket_quantile(delta, 0.5), bucket_quantile(delta, 0.99)
            out["fanout_p50_ms"] = None if p50 is None else p50 * 1000
            out["fanout_p99_ms"] = None if p99 is None else p99 * 1000
        return out

    async def sample(self, session: aiohttp.ClientSession) -> None:
        now = time.monotonic()
        entry: Results = {"t": round(now - self._started, 1), "phase": self.phase, "procs": {}}
        for role, pid in list(self.pids.items()):
            try:
                rss, fds = proc_status(pid)
                ticks = cpu_ticks(pid)
            except OSError:
                continue
            cpu = None
            if role in self._ticks:
                t0, k0 = self._ticks[role]
                cpu = 100.0 * (ticks - k0) / CLOCK_TICKS / max(now - t0, 1e-6)
            self._ticks[role] = (now, ticks)
            entry["procs"][role] = {"rss_mb": round(rss, 1), "fds": fds, "cpu": cpu}
        entry["metrics"] = {}
        for role, url in list(self.nodes.items()):
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                entry["metrics"][role] = await self._scrape(session, role, url)
        self.samples.append(entry)

    async def sample_now(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await self.sample(session)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self.sample(session)
                await asyncio.sleep(self.every)


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / sxx


def _verdict(rss_slope: float | None, fd_slope: float | None) -> str:
    if rss_slope is None or fd_slope is None:
        return "too few samples"
    return "no growth" if rss_slope < RSS_SLOPE_LIMIT and fd_slope < FD_SLOPE_LIMIT else "growth"


def trends(samples: list[Results], warmup_fraction: float) -> Results:
    soak = [s for s in samples if s["phase"] == "soak"]
    if not soak:
        return {}
    t0, t1 = soak[0]["t"], soak[-1]["t"]
    after = [s for s in soak if s["t"] >= t0 + warmup_fraction * (t1 - t0)]
    out: Results = {}
    roles = sorted({r for s in after for r in s["procs"]})
    for role in roles:
        rss = [(s["t"], s["procs"][role]["rss_mb"]) for s in after if role in s["procs"]]
        fds = [(s["t"], s["procs"][role]["fds"]) for s in after if role in s["procs"]]
        cpu = [s["procs"][role]["cpu"] for s in after if s["procs"].get(role, {}).get("cpu")]
        rs, fs = slope_per_minute(rss), slope_per_minute(fds)
        out[role] = {
            "samples": len(rss),
            "rss_first_mb": rss[0][1] if rss else None,
            "rss_last_mb": rss[-1][1] if rss else None,
            "rss_max_mb": max(v for _, v in rss) if rss else None,
            "rss_slope_mb_per_min": rs,
            "fds_first": fds[0][1] if fds else None,
            "fds_last": fds[-1][1] if fds else None,
            "fds_max": max(v for _, v in fds) if fds else None,
            "fds_slope_per_min": fs,
            "cpu_mean": sum(cpu) / len(cpu) if cpu else None,
            "verdict": EXPECTED_GROWTH.get(role, _verdict(rs, fs)),
        }
    return out


# seeding -------------------------------------------------------------------------------------


async def seed(url: str, users: int, group_size: int, parallel: int = 4) -> Results:
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        api = Api(session, url)
        admin = await api.login(ADMIN_LOGIN, ADMIN_PASSWORD)
        logins = [f"soak{i:04d}" for i in range(users)]

        def create(login: str) -> Any:
            body = {"login": login, "email": f"{login}@soak.test", "password": BENCH_PASSWORD}
            return lambda: api.call("POST", "/users", body, admin.token)

        def log_in(login: str) -> Any:
            return lambda: api.login(login, BENCH_PASSWORD)

        await _bounded(parallel, [create(login) for login in logins])
        people: list[User] = await _bounded(parallel, [log_in(login) for login in logins])
        chats: list[Results] = []  # {chat_id, members: [user index]}
        for g in range(0, users, group_size):
            members = list(range(g, min(g + group_size, users)))
            if len(members) < 2:
                continue
            body = {"title": f"soak group {g // group_size}", "member_ids": []}
            body["member_ids"] = [people[i].id for i in members[1:]]
            chat = await api.call("POST", "/im/chats", body, people[members[0]].token)
            chats.append({"chat_id": str(chat["id"]), "members": members, "kind": "group"})
        for k in range(0, users - 1, 2):
            chat = await api.call(
                "POST", "/im/dialogs", {"user_id": people[k + 1].id}, people[k].token
            )
            chats.append({"chat_id": str(chat["id"]), "members": [k, k + 1], "kind": "dialog"})
    return {"people": people, "chats": chats, "seconds": time.monotonic() - started}


# the run -------------------------------------------------------------------------------------


def sustained(step: Results, p99_ms: float) -> bool:
    return bool(
        step["missing"] == 0
        and step["p99_ms"] is not None
        and step["p99_ms"] < p99_ms
        and step["sent_per_second"] is not None
        and step["sent_per_second"] >= 0.95 * step["rate"]
    )


async def run(profile: Profile, say: Say, meter: CpuMeter, keep: bool) -> Results:
    p = profile
    base = Path(tempfile.mkdtemp(prefix="portalhub-soak-"))
    dir_a, dir_b = base / "a", base / "b"
    dir_a.mkdir()
    dir_b.mkdir()
    redis_log = open(base / "redis.log", "wb")  # noqa: SIM115 - closed below
    results: Results = {"profile": {k: v for k, v in p.as_dict().items() if "soak" in k}}
    sampler = Sampler(p.soak_sample_seconds)
    sampling: asyncio.Task[None] | None = None
    redis = hub = gen = None
    node_b: tuple[Any, int, IO[bytes]] | None = None
    try:
        redis, redis_port = await start_redis(redis_log)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        common = {"PORTALHUB_REDIS_URL": redis_url, "PORTALHUB_DRAIN_SECONDS": "0"}
        say(f"soak: redis-server pid {redis.pid} on port {redis_port}; starting node A")
        hub = await start_hub(dir_a, extra_env=common)
        node_a = hub.url
        pids = {"hub_a": hub.pid, "db": hub.db_pid, "redis": redis.pid}
        meter.pids.update(pids)
        sampler.pids.update(pids)
        sampler.nodes["hub_a"] = node_a
        sampling = asyncio.create_task(sampler.run())
        sampler.phase = "seed"
        fx = await seed(node_a, p.soak_users, p.soak_group_size)
        people, chats = fx["people"], fx["chats"]
        say(f"soak: {len(people)} users, {len(chats)} chats in {fx['seconds']:.1f}s")
        results["seed"] = {"users": len(people), "chats": len(chats), "seconds": fx["seconds"]}
        member_of: dict[int, list[str]] = {}
        for chat in chats:
            for i in chat["members"]:
                member_of.setdefault(i, []).append(chat["chat_id"])
        clients = [
            {"token": people[j % len(people)].token, "chats": member_of[j % len(people)]}
            for j in range(p.soak_clients)
        ]
        per_user = p.soak_clients / len(people)
        send_chats = [
            {
                "chat_id": c["chat_id"],
                "tokens": [people[i].token for i in c["members"]],
            }
            for c in chats
        ]
        fanout = [len(c["members"]) * per_user for c in chats]
        results["topology"] = {
            "clients": p.soak_clients,
            "clients_per_user": per_user,
            "groups": sum(1 for c in chats if c["kind"] == "group"),
            "dialogs": sum(1 for c in chats if c["kind"] == "dialog"),
            "mean_copies_per_message": sum(fanout) / len(fanout),
        }
        gen = await SoakGen.start()
        meter.pids["loadgen"] = gen.process.pid
        sampler.pids["loadgen"] = gen.process.pid
        await gen.call({"cmd": "setup", "clients": clients}, timeout=60)
        sampler.phase = "connect"
        say(f"soak: connecting {p.soak_clients} clients to node A")
        with meter.phase(f"soak: connect {p.soak_clients} to node A") as cpu:
            reply = await gen.call(
                {"cmd": "connect", "moves": [[j, node_a] for j in range(p.soak_clients)]},
                timeout=1800,
            )
        results["connect"] = {**reply, "cpu_percent": _round(cpu.percent)}
        say(f"soak: {reply['connected']} connected in {reply['seconds']:.1f}s")
        if reply["failed"]:
            raise BenchError(f"{reply['failed']} clients could not connect")

        async def ramp(config: str, urls: list[str]) -> list[Results]:
            steps: list[Results] = []
            # warm-up, not measured (but accounted for): one message per chat, through each node
            sampler.phase = f"warm-up {config}"
            await gen.call(
                {
                    "cmd": "publish",
                    "label": f"warm-up {config}",
                    "rate": min(p.soak_rates),
                    "duration": len(send_chats) / min(p.soak_rates),
                    "drain": 15,
                    "urls": urls,
                    "chats": send_chats,
                },
                timeout=len(send_chats) / min(p.soak_rates) + 200,
            )
            for rate in p.soak_rates:
                name = f"{config}, {rate:g} msg/s"
                sampler.phase = f"ramp {config}"
                say(f"soak: {name}")
                with meter.phase(f"soak: {name}") as cpu:
                    step = await gen.call(
                        {
                            "cmd": "publish",
                            "label": f"{config}-{rate:g}",
                            "rate": rate,
                            "duration": p.soak_step_seconds,
                            "drain": 15,
                            "urls": urls,
                            "chats": send_chats,
                        },
                        timeout=p.soak_step_seconds + 200,
                    )
                step["cpu_percent"] = _round(cpu.percent)
                step["sustained"] = sustained(step, p.soak_p99_ms)
                step.pop("timeline", None)
                steps.append(step)
                say(
                    f"soak:   {step['deliveries_per_second']:.0f} deliveries/s, p50 "
                    f"{step['p50_ms']} ms, p99 {step['p99_ms']} ms, missing {step['missing']}"
                    f", {'sustained' if step['sustained'] else 'NOT sustained'}"
                )
                if not step["sustained"]:
                    break
            return steps

        results["one_node"] = await ramp("one node", [node_a])
        sampler.phase = "start B"
        say("soak: starting node B on node A's database")
        node_b = await start_node(
            dir_b,
            {
                **common,
                "PORTALHUB_MONGODB_URL": hub.db_url,
                "PORTALHUB_MONGODB_DATABASE": "portalhub",
            },
        )
        url_b = f"http://127.0.0.1:{node_b[1]}"
        meter.pids["hub_b"] = node_b[0].pid
        sampler.pids["hub_b"] = node_b[0].pid
        sampler.nodes["hub_b"] = url_b
        moves = [[j, url_b] for j in range(1, p.soak_clients, 2)]
        sampler.phase = "move"
        with meter.phase(f"soak: move {len(moves)} clients to node B") as cpu:
            reply = await gen.call({"cmd": "connect", "moves": moves}, timeout=1800)
        results["move"] = {**reply, "cpu_percent": _round(cpu.percent)}
        say(f"soak: {reply['connected']} clients moved to node B in {reply['seconds']:.1f}s")
        if reply["failed"]:
            raise BenchError(f"{reply['failed']} clients could not move to node B")
        results["two_nodes"] = await ramp("two nodes", [node_a, url_b])

        def best(steps: list[Results]) -> float:
            good = [s["rate"] for s in steps if s["sustained"]]
            return max(good) if good else 0.0

        one, two = best(results["one_node"]), best(results["two_nodes"])
        results["scale"] = {
            "one_node_rate": one,
            "two_nodes_rate": two,
            "ratio": (two / one) if one else None,
            "ramp_capped": max(one, two) == max(p.soak_rates),
        }
        rate = p.soak_load_fraction * (min(one, two) or min(p.soak_rates))
        sampler.phase = "soak"
        say(f"soak: {p.soak_seconds:g} s on two nodes at {rate:g} msg/s")
        with meter.phase(f"soak: {p.soak_seconds:g} s at {rate:g} msg/s, two nodes") as cpu:
            soak = await gen.call(
                {
                    "cmd": "publish",
                    "label": "soak",
                    "rate": rate,
                    "duration": p.soak_seconds,
                    "drain": 30,
                    "urls": [node_a, url_b],
                    "chats": send_chats,
                },
                timeout=p.soak_seconds + 300,
            )
        soak["cpu_percent"] = _round(cpu.percent)
        results["soak"] = soak
        await sampler.sample_now()
        sampler.phase = "end"
        results["accounting"] = await gen.call({"cmd": "account"}, timeout=600)
        acc = results["accounting"]
        say(
            f"soak: accounting: sent {acc['sent']}, expected {acc['expected']}, delivered "
            f"{acc['delivered']}, missing {acc['missing']}, duplicated {acc['duplicated']}, "
            f"out of order {acc['out_of_order']}, reconnects {acc['reconnects']}"
        )
    finally:
        if sampling is not None:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        results["samples"] = sampler.samples
        results["trends"] = trends(sampler.samples, p.soak_warmup_fraction)
        if gen is not None:
            await gen.close()
        for role in ("loadgen", "hub_a", "hub_b", "db", "redis"):
            meter.pids.pop(role, None)
        if node_b is not None:
            await stop_process(node_b[0])
            node_b[2].close()
        if hub is not None:
            await hub.stop()
        if redis is not None:
            await stop_process(redis)
        redis_log.close()
        if keep:
            say(f"soak: kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    results["problems"] = problems(results)
    return results


def problems(results: Results) -> list[str]:
    out = []
    acc = results.get("accounting", {})
    for key in ("missing", "duplicated", "out_of_order", "unexpected", "post_failed"):
        if acc.get(key):
            out.append(f"{acc[key]} {key.replace('_', ' ')}")
    for role in ("hub_a", "hub_b"):
        trend = results.get("trends", {}).get(role)
        if trend and trend["verdict"] == "growth":
            out.append(
                f"{role}: RSS {trend['rss_slope_mb_per_min']:+.2f} MB/min, fds "
                f"{trend['fds_slope_per_min']:+.2f}/min after warm-up"
            )
    return out


def _round(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


# the report ----------------------------------------------------------------------------------


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _cpu(percent: dict[str, float]) -> str:
    order = ("hub_a", "hub_b", "db", "redis", "loadgen", "bench", "other")
    return ", ".join(f"{k} {percent[k]:.0f}" for k in order if k in percent)


def soak_markdown(results: Results) -> str:
    s = results["soak"]
    meta = results["meta"]
    prof = s["profile"]
    top = s["topology"]
    acc = s.get("accounting", {})
    lines = [
        f"Run of {meta['date']} ({meta['profile']['name']} profile, "
        f"`python -m bench --only soak"
        + "".join(f" --set {x}" for x in meta.get("settings", []))
        + f"`), {meta['machine']['cores']} cores ({meta['machine']['cpu']}), "
        f"{meta['machine']['memory_gib']} GiB; {meta['busy_before_start_percent']}% of a core "
        "busy before the start.",
        "",
        f"{s['seed']['users']} users, {top['groups']} group chats of "
        f"{prof['soak_group_size']} and {top['dialogs']} dialogs; {top['clients']:,} "
        f"Socket.IO clients ({top['clients_per_user']:g} per user), "
        f"{top['mean_copies_per_message']:.0f} copies per message on average. Connecting "
        f"them to node A: {s['connect']['seconds']:.0f} s "
        f"({s['connect']['per_second']:.0f}/s); moving half to node B (with `since`): "
        f"{s['move']['seconds']:.0f} s ({s['move']['per_second']:.0f}/s).",
        "",
        "**Scale-out**: the same clients and the same offered rates, first all on node A, "
        "then half of them on node B (messages posted through both). A step is sustained when "
        f"every copy arrived, p99 < {prof['soak_p99_ms']:g} ms and the rate was kept; the "
        "ramp stops at the first step that is not. CPU in % of one core (200 = the machine).",
        "",
        "| nodes | offered msg/s | sent msg/s | deliveries/s | p50 | p99 | max | missing "
        "| sustained | CPU: hub A, hub B, db, redis, loadgen, bench, other |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for label, key in (("1", "one_node"), ("2", "two_nodes")):
        for step in s[key]:
            lines.append(
                f"| {label} | {step['rate']:g} | {_f(step['sent_per_second'], 1)} "
                f"| {_f(step['deliveries_per_second'])} | {_f(step['p50_ms'], 1)} ms "
                f"| {_f(step['p99_ms'], 1)} ms | {_f(step['max_ms'], 0)} ms | {step['missing']} "
                f"| {'yes' if step['sustained'] else '**no**'} | {_cpu(step['cpu_percent'])} |"
            )
    sc = s["scale"]
    lines += [
        "",
        f"Highest sustained rate: one node {sc['one_node_rate']:g} msg/s, two nodes "
        f"{sc['two_nodes_rate']:g} msg/s: **two/one = "
        f"{_f(sc['ratio'], 2)}x**"
        + (
            " (a configuration sustained the ramp's top step: a bound only)"
            if sc["ramp_capped"]
            else ""
        )
        + ".",
        "",
    ]
    soak = s["soak"]
    lines += [
        f"**Soak**: {soak['rate']:g} msg/s for {prof['soak_seconds']:g} s on two nodes: "
        f"{_f(soak['sent_per_second'], 1)} msg/s sent, {_f(soak['deliveries_per_second'])} "
        f"deliveries/s, latency p50 {_f(soak['p50_ms'], 1)} ms, p99 {_f(soak['p99_ms'], 1)} ms, "
        f"max {_f(soak['max_ms'])} ms; worst 10 s window p99 "
        f"{_f(max((w['p99_ms'] or 0.0 for w in soak.get('timeline', [])), default=None), 1)} ms"
        f"; CPU {_cpu(soak['cpu_percent'])}.",
        "",
        "| whole run | sent | expected deliveries | delivered | missing | duplicated "
        "| out of order | reconnects | resyncs | failed POSTs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| | {_f(acc.get('sent'))} | {_f(acc.get('expected'))} | {_f(acc.get('delivered'))} "
        f"| {_f(acc.get('missing'))} | {_f(acc.get('duplicated'))} "
        f"| {_f(acc.get('out_of_order'))} | {_f(acc.get('reconnects'))} "
        f"| {_f(acc.get('resyncs'))} | {_f(acc.get('post_failed'))} |",
        "",
        f"Memory and file descriptors during the soak, after its first "
        f"{prof['soak_warmup_fraction']:.0%} (sampled every {prof['soak_sample_seconds']:g} s; "
        f'"no growth": RSS slope < {RSS_SLOPE_LIMIT:g} MB/min and fd slope < '
        f"{FD_SLOPE_LIMIT:g}/min; a falling count is not growth):",
        "",
        "| process | samples | RSS first → last (max) | RSS slope | fds first → last (max) "
        "| fd slope | CPU mean | verdict |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for role, t in s["trends"].items():
        lines.append(
            f"| {role} | {t['samples']} | {_f(t['rss_first_mb'], 1)} → {_f(t['rss_last_mb'], 1)} "
            f"({_f(t['rss_max_mb'], 1)}) MB | {_f(t['rss_slope_mb_per_min'], 2)} MB/min "
            f"| {t['fds_first']} → {t['fds_last']} ({t['fds_max']}) "
            f"| {_f(t['fds_slope_per_min'], 2)}/min | {_f(t['cpu_mean'])}% | {t['verdict']} |"
        )
    windows = [
        w
        for w in s["samples"]
        if w["phase"] == "soak" and any("fanout_p99_ms" in m for m in w["metrics"].values())
    ]
    if windows:
        lines += [
            "",
            "The nodes' own view during the soak (`/metrics` every sample: open connections, "
            "fan-out from store to emit as the upper bound of the histogram bucket, the replay "
            "buffer and the stream append queue), first, middle and last sample:",
            "",
            "| t (s) | node | connections | fan-out emits | fan-out p50 ≤ | p99 ≤ "
            "| replay buffer | appends queued |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        windows = windows[1:] or windows  # the first sample's window began before the soak
        for w in (windows[0], windows[len(windows) // 2], windows[-1]):
            for role, m in sorted(w["metrics"].items()):
                q = m.get("queues", {})
                lines.append(
                    f"| {w['t']:.0f} | {role} | {_f(m.get('connections'))} "
                    f"| {_f(m.get('fanout_count'))} | {_f(m.get('fanout_p50_ms'), 1)} ms "
                    f"| {_f(m.get('fanout_p99_ms'), 1)} ms | {_f(q.get('hub_replay_buffer'))} "
                    f"| {_f(q.get('stream_appends'))} |"
                )
    if s.get("problems"):
        lines += ["", "**Problems**: " + "; ".join(s["problems"]) + "."]
    return "\n".join(lines) + "\n"
