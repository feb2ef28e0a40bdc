"""One benchmark run: the hub and the Node reference under the same load, one after the other."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import crm, dbceiling, history, mail, soak, verdict, xmpp
from bench.fixtures import Fixtures, make_fixtures
from bench.loadgen import LoadGen, Reply
from bench.procs import (
    CLOCK_TICKS,
    HUB_LIMITS,
    NODE_DIR,
    CpuMeter,
    machine_ticks,
    node_version,
    rss_bytes,
    start_hub,
    start_reference,
)
from bench.profiles import Profile
from server.settings import Settings

Results = dict[str, Any]
Say = Callable[[str], None]
PARTS = ("socketio", "xmpp", "crm", "mail", "soak")
# what a run without --only measures: the CRM part seeds a million activities and takes
# about a quarter of an hour, so it runs only when asked for; so does the mail part
DEFAULT_PARTS = ("socketio", "xmpp")


async def _no_gc() -> None:
    return None


async def _nothing_stored() -> dict[str, int]:
    return {}


@dataclass
class Target:
    """A server under test, as the scenarios see it."""

    name: str
    url: str
    pids: dict[str, int]  # "server", and "db" for the hub
    # per dialog: (sender for the load generator, receiver's auth object)
    dialogs: list[tuple[dict[str, Any], dict[str, str]]]
    fanout_auths: list[dict[str, str]]
    fanout_sender: dict[str, Any]
    gc: Callable[[], Awaitable[None]] = _no_gc
    # the server's history size (messages, events) at the start of a phase
    stored: Callable[[], Awaitable[dict[str, int]]] = _nothing_stored
    results: Results = field(default_factory=dict)

    def rss(self) -> dict[str, int]:
        return {role: rss_bytes(pid) for role, pid in self.pids.items()}


def hub_target(url: str, pids: dict[str, int], db_url: str, fx: Fixtures) -> Target:
    post = f"{url}/api/v1/im/messages"

    async def stored() -> dict[str, int]:
        return await asyncio.to_thread(dbceiling.stored, db_url)

    def sender(token: str, chat_id: str) -> dict[str, Any]:
        return {
            "url": post,
            "headers": {"Authorization": f"Bearer {token}"},
            "body": {"chat_id": chat_id},
        }

    return Target(
        name="hub",
        url=url,
        pids=pids,
        dialogs=[
            (sender(d.sender.token, d.chat_id), {"token": d.receiver.token}) for d in fx.dialogs
        ],
        fanout_auths=[{"token": u.token} for u in fx.users],
        fanout_sender=sender(fx.group_owner.token, fx.group_chat_id),
        stored=stored,
    )


def reference_target(url: str, pid: int, dialogs: int, users: int) -> Target:
    post = f"{url}/publish"

    async def gc() -> None:
        async with aiohttp.ClientSession() as session, session.post(f"{url}/gc") as response:
            await response.read()

    return Target(
        name="reference",
        url=url,
        pids={"server": pid},
        dialogs=[
            ({"url": post, "body": {"room": f"dm-{k}"}}, {"token": f"r{k}", "room": f"dm-{k}"})
            for k in range(dialogs)
        ],
        fanout_auths=[{"token": f"u{i}", "room": "chat"} for i in range(users)],
        fanout_sender={"url": post, "body": {"room": "chat"}},
        gc=gc,
    )


class Run:
    def __init__(
        self, profile: Profile, say: Say, hub_db_options: str = "", client_deflate: bool = True
    ) -> None:
        self.profile = profile
        self.say = say
        self.hub_db_options = hub_db_options
        self.client_deflate = client_deflate
        self.meter = CpuMeter()

    @contextlib.asynccontextmanager
    async def _phase(
        self, target: Target, name: str, stored: dict[str, int] | None = None
    ) -> AsyncIterator[Results]:
        """One measured phase: the history size before it (``stored``, if read already), the
        CPU used during it."""
        before = stored if stored is not None else await target.stored()
        info: Results = {"phase": name, "stored_before": before}
        self.say(name)
        with self.meter.phase(name) as cpu:
            yield info
        info["cpu_percent"] = {k: round(v, 1) for k, v in cpu.percent.items()}

    async def direct_latency(self, target: Target, loadgen: LoadGen) -> Reply:
        p = self.profile
        sender, receiver = target.dialogs[0]
        await loadgen.connect(target.url, [receiver], 1, deflate=self.client_deflate)
        async with self._phase(
            target, f"{target.name}: 1:1 latency at {p.direct_rate:g}/s"
        ) as info:
            reply = await loadgen.publish(
                mode="rate",
                senders=[sender],
                rate=p.direct_rate,
                duration=p.direct_seconds,
                warmup=p.warmup,
                expect=1,
            )
        await loadgen.disconnect()
        return {**reply, **info}

    async def direct_saturation(
        self, target: Target, loadgen: LoadGen, history: str = "empty history"
    ) -> Reply:
        p = self.profile
        dialogs = target.dialogs[: p.senders]
        receivers = [receiver for _, receiver in dialogs]
        await loadgen.connect(target.url, receivers, len(dialogs), deflate=self.client_deflate)
        name = f"{target.name}: 1:1 saturation, {len(dialogs)} senders, {history}"
        async with self._phase(target, name) as info:
            reply = await loadgen.publish(
                mode="closed",
                senders=[sender for sender, _ in dialogs],
                duration=p.saturation_seconds,
                warmup=p.warmup,
                expect=1,
            )
        await loadgen.disconnect()
        return {**reply, **info}

    async def connect_series(self, target: Target, loadgen: LoadGen, history: str) -> Results:
        """Idle clients connected in steps up to the largest N (``connect_parallel`` under way
        at a time, ready on ``snapshot``), RSS after each step; within
        ``connect_max_seconds`` for the whole series. The clients stay connected."""
        p = self.profile
        # Read once for the whole series (connecting stores nothing): SecantusDB counts the
        # messages and the events by reading them (about 1.4 s for 129,000 and 133,000 in the
        # quiet full run of 2026-12-07 03:14), and read before each step it put the third step
        # of the with-history series 10.0 s after the first (the empty history's: 7.3 s), past
        # the hub's cache time to live: every user's background refreshes landed in it, and in
        # no step of the empty series (docs/benchmarks.md, h14-hist6).
        stored = await target.stored()
        await asyncio.sleep(p.settle)
        await target.gc()
        baseline = target.rss()
        connected = 0
        spent = 0.0
        steps: list[Results] = []
        for n in sorted(p.fanout_ns):
            budget = p.connect_max_seconds - spent
            if budget <= 0:
                break
            name = f"{target.name}: connect {connected} -> {n}"
            name += f", {history}" if history else ""
            async with self._phase(target, name, stored) as info:
                reply = await loadgen.connect(
                    target.url,
                    target.fanout_auths,
                    n - connected,
                    parallel=p.connect_parallel,
                    deflate=self.client_deflate,
                    max_seconds=budget,
                )
            spent += float(reply["seconds"])
            await asyncio.sleep(p.settle)
            await target.gc()
            rss = target.rss()
            total = int(reply["total"])
            steps.append(
                {
                    "n": n,
                    "connected_total": total,
                    "connect": {**reply, **info},
                    "memory": {
                        "rss": rss,
                        "added": total - connected,
                        "per_connection": {
                            role: (rss[role] - baseline[role]) / max(total, 1) for role in rss
                        },
                    },
                }
            )
            connected = total
            if reply.get("capped"):
                break
        seconds = sum(float(s["connect"]["seconds"]) for s in steps)
        made = sum(int(s["connect"]["connected"]) for s in steps)
        failures: dict[str, int] = {}
        for step in steps:
            for why, count in step["connect"].get("failures", {}).items():
                failures[why] = failures.get(why, 0) + int(count)
        top = max(p.fanout_ns)
        return {
            "history": history,
            "baseline_rss": baseline,
            "steps": steps,
            "total": {
                "target": top,
                "connected": made,
                "seconds": seconds,
                "per_second": made / seconds if seconds > 0 else None,
                "failures": failures,
                "capped": made < top,
                "parallel": p.connect_parallel,
                "stored_before": steps[0]["connect"].get("stored_before", {}) if steps else {},
            },
        }

    async def fanout(self, target: Target, loadgen: LoadGen, history: str = "") -> Results:
        """Memory and connection set-up first (``connect_series``), then fan-out from the
        largest N down, closing clients between the steps."""
        p = self.profile
        series = await self.connect_series(target, loadgen, history)
        by_n = {int(s["n"]): s for s in series["steps"]}
        connected = int(series["steps"][-1]["connected_total"]) if series["steps"] else 0
        for n in sorted(by_n, reverse=True):
            step = by_n[n]
            if connected > n:
                await loadgen.disconnect(keep=n)
                connected = n
                await asyncio.sleep(p.settle)
            # what the connect series managed (all N unless it ran out of time)
            expect = min(n, connected)
            rate = p.fanout_rate(n)
            async with self._phase(
                target, f"{target.name}: fan-out to {n}, {rate:g} msg/s"
            ) as info:
                reply = await loadgen.publish(
                    mode="rate",
                    senders=[target.fanout_sender],
                    rate=rate,
                    duration=p.fanout_seconds,
                    warmup=p.warmup,
                    expect=expect,
                )
            step["steady"] = {**reply, **info, "rate": rate, "expect": expect}
            name = f"{target.name}: fan-out to {n}, saturated (window {p.window})"
            async with self._phase(target, name) as info:
                reply = await loadgen.publish(
                    mode="window",
                    senders=[target.fanout_sender],
                    window=p.window,
                    duration=p.fanout_saturation_seconds,
                    warmup=p.warmup,
                    expect=expect,
                )
            step["saturation"] = {**reply, **info, "expect": expect}
        await loadgen.disconnect()
        await asyncio.sleep(p.settle)
        steps = series["steps"]
        top = steps[-1]["memory"]["per_connection"] if steps else {}
        return {
            "baseline_rss": series["baseline_rss"],
            "steps": steps,
            "per_idle_connection": top,
            "connect_total": series["total"],
        }

    async def ceiling(self, settings: Settings, history: str) -> Results:
        """The database ceiling, 1 and ``senders`` workers, through a client built as the
        hub builds its own (``bench/dbceiling.py``)."""
        p = self.profile
        out: Results = {}
        for label, workers in (("sequential", 1), ("concurrent", p.senders)):
            phase = f"database ceiling, {workers} worker(s), {history}"
            self.say(phase)
            with self.meter.phase(phase) as cpu:
                result = await dbceiling.measure(settings, workers, p.ceiling_seconds)
            out[label] = {
                "workers": workers,
                "history": history,
                "client": result.client,
                "ops": result.ops,
                "seconds": result.seconds,
                "ops_per_second": result.ops_per_second,
                "timeline": result.timeline,
                "cpu_percent": {k: round(v, 1) for k, v in cpu.percent.items()},
            }
        return out

    async def run_hub(self, results: Results, keep: bool) -> None:
        p = self.profile
        data_dir = Path(tempfile.mkdtemp(prefix="portalhub-bench-"))
        self.say(f"starting the hub on {data_dir}")
        hub = await start_hub(data_dir, self.hub_db_options)
        loadgen: LoadGen | None = None
        try:
            self.meter.pids.update(hub=hub.pid, db=hub.db_pid)
            self.say(f"hub pid {hub.pid} at {hub.url}, database pid {hub.db_pid}")
            settings = hub.settings()
            fx = await make_fixtures(hub.url, p.users, p.senders)
            self.say(f"fixtures: {len(fx.users)} users, dialogs, a group chat in {fx.seconds:.1f}s")
            results["fixtures"] = {"users": len(fx.users), "seconds": fx.seconds}
            target = hub_target(hub.url, {"server": hub.pid, "db": hub.db_pid}, hub.db_url, fx)
            loadgen = await LoadGen.start()
            self.meter.pids["loadgen"] = loadgen.pid
            hr = target.results
            # empty history
            hr["direct_latency"] = await self.direct_latency(target, loadgen)
            results["db_ceiling"] = await self.ceiling(settings, "empty history")
            hr["direct_saturation"] = await self.direct_saturation(target, loadgen)
            hr["fanout"] = await self.fanout(target, loadgen, "empty history")
            # with history: seeded through the API, then the same measurements again
            self.say(history.estimate(p, hr["direct_saturation"].get("deliveries_per_second")))
            with self.meter.phase("hub: history seeded through the API") as cpu:
                results["history"] = await history.make(
                    loadgen, hub.url, fx, p, self.say, target.stored
                )
            results["history"]["cpu_percent"] = {k: round(v, 1) for k, v in cpu.percent.items()}
            results["db_ceiling_history"] = await self.ceiling(settings, "with history")
            hr["direct_saturation_history"] = await self.direct_saturation(
                target, loadgen, "with history"
            )
            hr["connect_history"] = await self.connect_series(target, loadgen, "with history")
            await loadgen.disconnect()
            hr["stored_end"] = await target.stored()
            results["hub"] = hr
        finally:
            if loadgen is not None:
                await loadgen.close()
                self.meter.pids.pop("loadgen", None)
            await hub.stop()
            self.meter.pids.pop("hub", None)
            self.meter.pids.pop("db", None)
            if keep:
                self.say(f"kept {data_dir}")
            else:
                shutil.rmtree(data_dir, ignore_errors=True)

    async def run_reference(self, results: Results) -> None:
        p = self.profile
        reference = await start_reference()
        loadgen: LoadGen | None = None
        try:
            self.meter.pids["reference"] = reference.pid
            self.say(f"reference pid {reference.pid} at {reference.url}")
            target = reference_target(reference.url, reference.pid, p.senders, p.users)
            loadgen = await LoadGen.start()
            self.meter.pids["loadgen"] = loadgen.pid
            target.results["direct_latency"] = await self.direct_latency(target, loadgen)
            target.results["fanout"] = await self.fanout(target, loadgen)
            results["reference"] = target.results
        finally:
            if loadgen is not None:
                await loadgen.close()
                self.meter.pids.pop("loadgen", None)
            await reference.stop()
            self.meter.pids.pop("reference", None)

    async def run(self, keep: bool = False, parts: tuple[str, ...] = DEFAULT_PARTS) -> Results:
        started = time.monotonic()
        results: Results = {"meta": metadata(self.profile)}
        results["meta"]["hub_db_options"] = self.hub_db_options
        results["meta"]["client_deflate"] = self.client_deflate
        results["meta"]["parts"] = list(parts)
        if "socketio" in parts:
            await self.run_hub(results, keep)
            await self.run_reference(results)
        if "xmpp" in parts:
            results["xmpp"] = await xmpp.run(self.profile, self.say)
            results["meta"]["versions"]["prosody"] = results["xmpp"]["prosody_version"]
            results["meta"]["versions"]["slixmpp"] = _version("slixmpp")
        if "crm" in parts:
            results["crm"] = await crm.run(self.profile, self.say, self.meter, keep)
        if "mail" in parts:
            results["mail"] = await mail.run(self.profile, self.say, self.meter, keep)
            results["meta"]["versions"]["aiosmtpd"] = _version("aiosmtpd")
            results["meta"]["versions"]["aiosmtplib"] = _version("aiosmtplib")
        if "soak" in parts:
            results["soak"] = await soak.run(self.profile, self.say, self.meter, keep)
            results["meta"]["versions"]["redis"] = _version("redis")
        results["done_when"] = verdict.done_when(results)
        results["cpu_phases"] = [asdict(phase) for phase in self.meter.phases]
        results["meta"]["seconds"] = time.monotonic() - started
        results["meta"]["loadavg_end"] = os.getloadavg()
        return results


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _node_package(name: str) -> str:
    try:
        meta = json.loads((NODE_DIR / "node_modules" / name / "package.json").read_text())
        return str(meta["version"])
    except (OSError, ValueError, KeyError):
        return "?"


def machine_busy(seconds: float = 3.0) -> float:
    """CPU in use on the whole machine over ``seconds``, in % of one core."""
    busy0, _ = machine_ticks()
    time.sleep(seconds)
    busy1, _ = machine_ticks()
    return 100.0 * (busy1 - busy0) / CLOCK_TICKS / seconds


def metadata(profile: Profile) -> Results:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": profile.as_dict(),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": round(_memory_gib(), 1),
            "kernel": platform.release(),
        },
        "versions": {
            "python": sys.version.split()[0],
            "node": node_version().strip(),
            "aiohttp": _version("aiohttp"),
            "python-socketio": _version("python-socketio"),
            "python-engineio": _version("python-engineio"),
            "pymongo": _version("pymongo"),
            "secantusdb": _version("secantusdb"),
            "socket.io": _node_package("socket.io"),
            "socket.io-client": _node_package("socket.io-client"),
        },
        "hub_env": HUB_LIMITS,
        "loadavg_start": os.getloadavg(),
        "busy_before_start_percent": round(machine_busy(), 1),
    }
