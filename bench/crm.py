"""The CRM part: live counter updates with up to a million open activities, against the time
of a full recount (``portalhub counters check``) on the same data, in the same run.

One hub on a fresh data directory. ``crm_users`` users are created through the API (their
time zone one where it is about noon, see ``crm_seed.midday_zone``); an actor holding the
Chief executive CRM role changes activities on their deals. Then, for each size of
``crm_sizes`` (the data set grows from one to the next):

1. deals and activities are inserted straight into the database (``bench/crm_seed.py``);
2. ``portalhub counters check --repair --json`` stores every user's numbers for the new data
   (the hub keeps numbers by differences from the changes it makes; seeded documents are
   none of those); its report must find no stale copy of a counted field in what was seeded;
3. ``crm_connected`` of the users connect over Socket.IO. The counters each gets at
   connection (its snapshot) must equal the stored ones (all four record types) and the
   incoming calls and idle deals seeded for the user;
4. the actor makes ``crm_changes`` changes, one at a time, alternately creating an incoming
   call on a connected user's deal (``POST /api/v1/crm/activities``: the user's incoming
   number goes up by one) and completing one of the seeded incoming activities of a
   connected user (``PATCH /api/v1/crm/activities/{id}`` ``{"completed": true}``: down by
   one). Latency: from just before the request to the ``counters.changed`` carrying the new
   ``crm.deal.incoming`` at the user's client. The next change waits until the hub and its
   database are idle again; that moment gives each change's busy time;
5. the clients disconnect, the queries of one user's recount are timed and explained
   (``bench/crm_queries.py``), and ``portalhub counters check --json`` runs against the
   running hub's database (timed); it must find no difference and no stale copy.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import socketio

from bench.crm_queries import query_times, stored_counters
from bench.crm_seed import Seeder, midday_zone
from bench.fixtures import ADMIN_LOGIN, ADMIN_PASSWORD, BENCH_PASSWORD, Api, User, _bounded
from bench.procs import (
    REPO,
    BenchError,
    CpuMeter,
    Hub,
    clean_env,
    cpu_ticks,
    rss_bytes,
    start_hub,
)
from bench.profiles import Profile

Results = dict[str, Any]
Say = Callable[[str], None]

PUSH_TIMEOUT = 30.0  # seconds a change may take to reach its user's client
IDLE_WINDOW = 0.1  # the hub and its database are idle when, over this many seconds, ...
IDLE_TICKS = 2  # ... they used at most this many clock ticks together (20% of a core)
IDLE_TIMEOUT = 120.0
GIVE_UP_AFTER = 5  # consecutive changes of one kind without a push: that kind is not pushed
CHECK_TIMEOUT = 3600.0
# the CLI not importing because the server code is being edited: try again for this long
CHECK_RETRY_SECONDS = 1800.0
UNSETTLED_TREE = ("ImportError", "ModuleNotFoundError", "SyntaxError", "NameError")


def summary(values: list[float]) -> Results:
    """n, mean, p50, p90, p99, max (nearest rank) of ``values``."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


class Watch:
    """One connected user: their pushed ``crm.deal`` numbers, merged as the web client does,
    and the changes waiting for a push."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.sio = socketio.AsyncClient(reconnection=False)
        self.deal: dict[str, Any] = {}
        self.first: dict[str, Any] | None = None  # the crm numbers sent at connection
        self.pushes = 0
        self.ready = asyncio.Event()
        self._waiting: list[asyncio.Future[tuple[float, int]]] = []
        self.sio.on("snapshot", self._snapshot)
        self.sio.on("counters.changed", self._changed)

    async def _snapshot(self, data: Any) -> None:
        """The numbers the client starts from; the pushes after it carry only changes."""
        counters = data.get("counters") if isinstance(data, dict) else None
        crm = counters.get("crm") if isinstance(counters, dict) else None
        if not isinstance(crm, dict):
            return
        if self.first is None:
            self.first = crm
        deal = crm.get("deal")
        if isinstance(deal, dict):
            self.deal.update(deal)
        self.ready.set()

    async def _changed(self, data: Any) -> None:
        at = time.perf_counter()
        crm = data.get("crm") if isinstance(data, dict) else None
        if not isinstance(crm, dict):
            return
        self.pushes += 1
        if self.first is None:
            self.first = crm
        deal = crm.get("deal")
        if isinstance(deal, dict):
            self.deal.update(deal)
            if "incoming" in deal:
                waiting, self._waiting = self._waiting, []
                for future in waiting:
                    if not future.done():
                        future.set_result((at, int(deal["incoming"])))
        self.ready.set()

    def incoming_push(self) -> asyncio.Future[tuple[float, int]]:
        """The arrival time and value of the next push carrying ``crm.deal.incoming``."""
        future: asyncio.Future[tuple[float, int]] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return future

    async def connect(self, url: str) -> None:
        await self.sio.connect(
            url, auth={"token": self.user.token}, transports=["websocket"], wait_timeout=30
        )
        # the snapshot carries every counter
        await asyncio.wait_for(self.ready.wait(), 60)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@dataclass
class Change:
    kind: str  # "create" | "complete"
    user: str
    latency_ms: float | None
    http_ms: float
    busy_ms: float | None  # until the hub and its database were idle again
    expected: int
    pushed: int | None


@dataclass
class Changes:
    samples: list[Change] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)

    def results(self, warmup: int) -> Results:
        measured = self.samples[warmup:]
        out: Results = {"changes": len(measured), "warmup": warmup, "given_up": self.given_up}
        for kind in ("all", "create", "complete"):
            mine = [s for s in measured if kind in ("all", s.kind)]
            out[kind] = {
                "latency_ms": summary([s.latency_ms for s in mine if s.latency_ms is not None]),
                "http_ms": summary([s.http_ms for s in mine]),
                "busy_ms": summary([s.busy_ms for s in mine if s.busy_ms is not None]),
                "changes": len(mine),
                "lost": sum(1 for s in mine if s.latency_ms is None),
                "wrong": sum(1 for s in mine if s.pushed is not None and s.pushed != s.expected),
            }
        return out


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CrmBench:
    def __init__(self, profile: Profile, say: Say, meter: CpuMeter) -> None:
        self.p = profile
        self.say = say
        self.meter = meter
        self.problems: list[str] = []
        self.started = datetime.now(UTC)

    async def _users(self, api: Api, admin: User) -> tuple[list[str], list[User], User]:
        """All users (ids), the connected ones logged in, and the actor (a Chief executive)."""
        p = self.p
        zone = midday_zone(self.started)
        logins = [f"crm{i:03d}" for i in range(p.crm_users)]

        def create(login: str) -> Callable[[], Any]:
            body = {
                "login": login,
                "email": f"{login}@bench.test",
                "password": BENCH_PASSWORD,
                "time_zone": zone,
            }
            return lambda: api.call("POST", "/users", body, admin.token)

        created = await _bounded(4, [create(login) for login in [*logins, "crmactor"]])
        ids = [str(u["id"]) for u in created[:-1]]
        step = max(1, p.crm_users // p.crm_connected)
        chosen = logins[::step][: p.crm_connected]

        def log_in(login: str) -> Callable[[], Any]:
            return lambda: api.login(login, BENCH_PASSWORD)

        connected: list[User] = await _bounded(4, [log_in(login) for login in chosen])
        actor = await api.login("crmactor", BENCH_PASSWORD)
        await api.call(
            "PUT",
            "/crm/roles",
            {"role": "chief", "subject_kind": "user", "subject_id": actor.id},
            admin.token,
        )
        self.say(f"crm: {len(ids)} users in time zone {zone}, {len(connected)} to connect")
        return ids, connected, actor

    async def _connect(self, hub: Hub, users: list[User]) -> list[Watch]:
        watches = [Watch(u) for u in users]
        await asyncio.gather(*(w.connect(hub.url) for w in watches))
        return watches

    async def _check_initial(
        self, hub: Hub, watches: list[Watch], seeder: Seeder, size: int
    ) -> Results:
        """The numbers each client got at connection (its snapshot) against the stored ones
        (all four record types) and what was seeded for its user."""
        stored = await asyncio.to_thread(stored_counters, hub.db_url, [w.user.id for w in watches])
        wrong: list[str] = []
        for w in watches:
            first = w.first or {}
            want = {"incoming": seeder.incoming_of[w.user.id], "idle": seeder.idle_of[w.user.id]}
            got = {k: first.get("deal", {}).get(k) for k in want}
            if got != want:
                wrong.append(f"{w.user.login}: pushed {got}, seeded {want}")
            if first != stored.get(w.user.id):
                wrong.append(f"{w.user.login}: pushed {first}, stored {stored.get(w.user.id)}")
        if wrong:
            self.problems.append(
                f"{size:,} open activities: the counters sent at connection differ from the "
                f"seeded or stored ones: " + "; ".join(wrong[:5])
            )
        return {"users": len(watches), "differing": len(wrong), "examples": wrong[:5]}

    async def _idle(self, hub: Hub) -> float:
        """Wait until the hub and its database are idle; the moment (perf_counter) they were
        last seen busy."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        last = time.perf_counter()
        ticks = cpu_ticks(hub.pid) + cpu_ticks(hub.db_pid)
        while time.monotonic() < deadline:
            await asyncio.sleep(IDLE_WINDOW)
            now = cpu_ticks(hub.pid) + cpu_ticks(hub.db_pid)
            if now - ticks <= IDLE_TICKS:
                return last
            ticks, last = now, time.perf_counter()
        raise BenchError(f"the hub was still busy {IDLE_TIMEOUT:g} s after a change")

    async def _changes(
        self, hub: Hub, api: Api, actor: User, watches: list[Watch], seeder: Seeder, size: int
    ) -> Changes:
        p = self.p
        total = p.crm_warmup_changes + p.crm_changes
        per_user = total // (2 * len(watches)) + 2
        to_complete = {
            w.user.id: await asyncio.to_thread(seeder.open_incoming, w.user.id, per_user)
            for w in watches
        }
        rng = seeder.rng
        out = Changes()
        misses = {"create": 0, "complete": 0}
        for n in range(total):
            kind = "create" if n % 2 == 0 else "complete"
            if kind in out.given_up:
                kind = "create" if kind == "complete" else "complete"
                if kind in out.given_up:
                    break
            watch = watches[(n // 2) % len(watches)]
            uid = watch.user.id
            if kind == "complete" and not to_complete[uid]:
                kind = "create"
            before = int(watch.deal.get("incoming", 0))
            expected = before + 1 if kind == "create" else before - 1
            push = watch.incoming_push()
            started = time.perf_counter()
            if kind == "create":
                body = {
                    "owner_type": "deal",
                    # a deal with open activities: the user's idle number stays as it is
                    "owner_id": rng.choice(seeder.busy_of[uid]),
                    "type": "call",
                    "direction": "incoming",
                    "subject": f"bench incoming call {n}",
                }
                await api.call("POST", "/crm/activities", body, actor.token)
            else:
                activity = to_complete[uid].pop()
                await api.call(
                    "PATCH", f"/crm/activities/{activity}", {"completed": True}, actor.token
                )
            answered = time.perf_counter()
            seeder.incoming_of[uid] += 1 if kind == "create" else -1
            try:
                at, pushed = await asyncio.wait_for(push, PUSH_TIMEOUT)
            except TimeoutError:
                sample = Change(kind, uid, None, (answered - started) * 1000, None, expected, None)
                misses[kind] += 1
                if misses[kind] >= GIVE_UP_AFTER and kind not in out.given_up:
                    out.given_up.append(kind)
                    self.problems.append(
                        f"{size:,} open activities: {GIVE_UP_AFTER} {kind} changes in a row "
                        f"brought no counters.changed with crm.deal.incoming within "
                        f"{PUSH_TIMEOUT:g} s; no more {kind} changes were made"
                    )
            else:
                misses[kind] = 0
                sample = Change(
                    kind,
                    uid,
                    (at - started) * 1000,
                    (answered - started) * 1000,
                    None,
                    expected,
                    pushed,
                )
            busy_until = await self._idle(hub)
            sample.busy_ms = (busy_until - started) * 1000
            out.samples.append(sample)
            pause = p.crm_change_interval - (time.perf_counter() - started)
            if pause > 0:
                await asyncio.sleep(pause)
        return out

    async def _cli_check(self, hub: Hub, repair: bool) -> tuple[bytes, bytes, int, float, float]:
        """One run of the CLI: its output, exit code, wall time and CPU time."""
        # ``python -m server`` from the checkout, as the hub is started (procs.start_hub): the
        # ``portalhub`` script imports the package the virtualenv was installed from, which
        # in a second worktree is another checkout's code.
        env = clean_env({"PORTALHUB_DATA_DIR": str(hub.data_dir), "PORTALHUB_LOG_LEVEL": "WARNING"})
        started = time.perf_counter()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "counters",
            "check",
            "--json",
            *(["--repair"] if repair else []),
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), CHECK_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise BenchError(f"portalhub counters check took over {CHECK_TIMEOUT:g} s") from None
        wall = time.perf_counter() - started
        # the CLI is the only child process that ends meanwhile
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        return out, err, process.returncode or 0, wall, cpu

    async def _counters_check(self, hub: Hub, size: int, repair: bool = False) -> Results:
        """``portalhub counters check --json``, the real CLI, against the running hub. With
        ``repair`` it stores the recounted numbers: differences are then expected, stale
        copies of counted fields never.

        The CLI imports the server code as it is on disk now, not as the running hub loaded
        it: when others are editing it and it does not import, the check is tried again."""
        deadline = time.monotonic() + CHECK_RETRY_SECONDS
        attempts = 0
        while True:
            attempts += 1
            out, err, code, wall, cpu = await self._cli_check(hub, repair)
            try:
                report: Results = json.loads(out)
                break
            except ValueError:
                text = err.decode(errors="replace")
                if time.monotonic() < deadline and any(e in text for e in UNSETTLED_TREE):
                    last = text.strip().splitlines()[-1]
                    self.say(f"crm: the CLI does not import ({last}); trying again")
                    await asyncio.sleep(20)
                    continue
                raise BenchError(
                    f"portalhub counters check failed (exit {code}):\n{text[-2000:]}"
                ) from None
        report["attempts"] = attempts
        differences = report.pop("differences", {})
        report["differences_examples"] = dict(list(differences.items())[:3])
        report["exit_code"] = code
        report["wall_seconds"] = wall
        report["cli_cpu_seconds"] = cpu
        fields = ["stale_activities", "stale_records"]
        if not repair:
            fields.insert(0, "users_with_differences")
        bad = {k: report.get(k) for k in fields if report.get(k) != 0}
        if bad:
            self.problems.append(
                f"{size:,} open activities: counters check{' --repair' if repair else ''} "
                f"reported {bad} "
                f"(examples: {json.dumps(report['differences_examples'])[:600]})"
            )
        return report

    async def _size(
        self,
        hub: Hub,
        api: Api,
        actor: User,
        connected: list[User],
        seeder: Seeder,
        size: int,
    ) -> Results:
        p = self.p
        out: Results = {"open_activities": size}
        grow = size - seeder.open_activities
        deals = max(1, round(grow / p.crm_activities_per_deal))
        self.say(f"crm: seeding {grow:,} open activities on {deals:,} deals")
        with self.meter.phase(f"crm {size:,}: seeding") as cpu:
            grown = await asyncio.to_thread(seeder.grow, grow, deals)
        out["seed"] = {
            "deals": grown.deals,
            "open_activities": grown.open_activities,
            "completed_activities": grown.completed_activities,
            "seconds": grown.seconds,
            "documents_per_second": grown.documents_per_second,
            "cpu_percent": _pct(cpu.percent),
        }
        out["deals"] = seeder.deals
        out["completed_activities"] = seeder.completed_activities
        self.say(
            f"crm: {grown.seconds:.0f} s ({grown.documents_per_second:,.0f} documents/s); "
            "storing everyone's numbers (counters check --repair)"
        )
        with self.meter.phase(f"crm {size:,}: counters check --repair") as cpu:
            out["repair"] = await self._counters_check(hub, size, repair=True)
        out["repair"]["cpu_percent"] = _pct(cpu.percent)
        watches = await self._connect(hub, connected)
        try:
            out["initial"] = await self._check_initial(hub, watches, seeder, size)
            self.say(f"crm: {len(watches)} clients connected; {p.crm_changes} changes")
            with self.meter.phase(f"crm {size:,}: changes") as cpu:
                changes = await self._changes(hub, api, actor, watches, seeder, size)
            out["latency"] = changes.results(p.crm_warmup_changes)
            out["latency"]["cpu_percent"] = _pct(cpu.percent)
        finally:
            await asyncio.gather(*(w.close() for w in watches))
        first = connected[0].id
        out["queries"] = await asyncio.to_thread(
            query_times, hub.db_url, first, midday_zone(self.started), seeder.busy_of[first][0]
        )
        lat = out["latency"]["all"]["latency_ms"]
        busy = out["latency"]["all"]["busy_ms"]
        self.say(
            f"crm: latency p50 {lat.get('p50', 0):.1f} ms, p99 {lat.get('p99', 0):.1f} ms, "
            f"busy p50 {busy.get('p50', 0):.0f} ms; running portalhub counters check"
        )
        with self.meter.phase(f"crm {size:,}: counters check") as cpu:
            out["check"] = await self._counters_check(hub, size)
        out["check"]["cpu_percent"] = _pct(cpu.percent)
        self.say(
            f"crm: counters check {out['check']['wall_seconds']:.1f} s "
            f"(its own {out['check'].get('seconds', 0):.1f} s)"
        )
        out["rss"] = {"hub": rss_bytes(hub.pid), "db": rss_bytes(hub.db_pid)}
        out["db_bytes"] = _du(hub.data_dir / "db")
        return out

    async def run(self, keep: bool) -> Results:
        p = self.p
        data_dir = Path(tempfile.mkdtemp(prefix="portalhub-bench-crm-"))
        self.say(f"crm: starting the hub on {data_dir}")
        hub = await start_hub(data_dir)
        self.meter.pids.update(hub=hub.pid, db=hub.db_pid)
        results: Results = {
            "users": p.crm_users,
            "connected": p.crm_connected,
            "sizes": [],
            "problems": self.problems,
        }
        try:
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                api = Api(session, hub.url)
                admin = await api.login(ADMIN_LOGIN, ADMIN_PASSWORD)
                started = time.monotonic()
                ids, connected, actor = await self._users(api, admin)
                results["users_seconds"] = time.monotonic() - started
                results["time_zone"] = midday_zone(self.started)
                seeder = Seeder(hub.db_url, ids, self.started)
                for size in sorted(p.crm_sizes):
                    try:
                        results["sizes"].append(
                            await self._size(hub, api, actor, connected, seeder, size)
                        )
                    except BenchError as exc:
                        # what was measured so far is kept (results/*.json), not published
                        results["aborted"] = f"{size:,} open activities: {exc}"
                        self.say(f"crm: aborted at {results['aborted']}")
                        break
        finally:
            await hub.stop()
            self.meter.pids.pop("hub", None)
            self.meter.pids.pop("db", None)
            if keep:
                self.say(f"crm: kept {data_dir}")
            else:
                shutil.rmtree(data_dir, ignore_errors=True)
        results["ratios"] = ratios(results["sizes"])
        return results


def _pct(percent: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in percent.items()}


def ratios(sizes: list[Results]) -> Results:
    """(a) the largest size against the smallest; (b) at each size, the full recount against
    one live update."""
    out: Results = {"largest_vs_smallest": {}, "check_vs_live": []}

    def lat(size: Results, key: str) -> float | None:
        value = size.get("latency", {}).get("all", {}).get("latency_ms", {}).get(key)
        return None if value is None else float(value)

    for size in sizes:
        check = size.get("check", {}).get("seconds")
        p50, p99 = lat(size, "p50"), lat(size, "p99")
        out["check_vs_live"].append(
            {
                "open_activities": size["open_activities"],
                "check_seconds": check,
                "check_over_p50": check * 1000 / p50 if check and p50 else None,
                "check_over_p99": check * 1000 / p99 if check and p99 else None,
            }
        )
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        cell: Results = {
            "small": small["open_activities"],
            "large": large["open_activities"],
            "size": large["open_activities"] / small["open_activities"],
        }
        for key in ("p50", "p99"):
            a, b = lat(small, key), lat(large, key)
            cell[f"latency_{key}"] = b / a if a and b else None
        a, b = small.get("check", {}).get("seconds"), large.get("check", {}).get("seconds")
        cell["check"] = b / a if a and b else None
        out["largest_vs_smallest"] = cell
    return out


async def run(profile: Profile, say: Say, meter: CpuMeter, keep: bool = False) -> Results:
    return await CrmBench(profile, say, meter).run(keep)
