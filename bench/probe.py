"""Phases of ``make bench`` on their own, repeated, hubs side by side with the reference.

``python -m bench.probe [--hub NAME=PATH ...] [--rounds 3]
[--phases latency,connect,fanout,saturation] [--fanout-n 100,1000]``

The 1:1 latency phase (one sender at ``direct_rate`` for ``direct_seconds``, one receiver),
the connection set-up series (0 -> the largest fan-out N, ``connect_parallel`` under way, ready
on ``snapshot``) and the fan-out (``fanout``: ``Run.fanout`` for the Ns of ``--fanout-n``: the
connect series up to the largest, then for each N from the largest down its steady phase and
its saturated one) and the 1:1 saturation (``saturation``: ``Run.direct_saturation``, the
``senders`` each sending when answered, empty history) of the full profile, run exactly as
``bench/runner.py`` runs them (the same methods, the same load generator), against one or more
hubs and the Node reference, in turns: each round measures every server once, one after the
other. So two versions of the hub (a
checkout of the code before a change, given by ``--hub before=/tmp/base``, and this tree) and
the reference are measured under the same machine load, and the ratios come from one run.
Nothing goes to ``docs/benchmarks.md`` or ``bench/results``; the figures are printed, and
written as JSON with ``--json``.

``--history``: before the rounds, give each hub the history of the full run (``bench/history.py``:
``history_chats`` chats among the users, ``history_messages`` messages sent through the REST
API), so that connect is measured with each user in as many chats as ``make bench`` has them;
``--set history_messages=2000`` keeps the seeding short (the chats per user are what a connect
pays for, not the messages stored). ``--cold``: before each connect series, wait until the
hub's in-process copies have run out, as ``make bench``'s with-history series meets them (it
comes some 45 s after the seeding); without it the first step reads what the seeding has just
cached.

``--py-spy DIR``: record each hub and its database with py-spy during each phase (collapsed
stacks per hub, process, phase and round, 250 samples/s, idle threads left out; the fan-out's
connect, steady and saturated phases each in a file of its own), to see what a message, a
delivery or a connect costs each of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import history
from bench.fixtures import make_fixtures
from bench.loadgen import LoadGen
from bench.procs import REPO, BenchError, ensure_node_modules, start_hub, start_reference
from bench.profiles import FULL, Profile, with_settings
from bench.runner import Run, Target, hub_target, reference_target

PHASES = ("latency", "connect")
ALL_PHASES = (*PHASES, "fanout", "saturation")
_SPY: list[str] = []  # the py-spy executable, found before the run


def paired_arguments(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The options every paired probe takes (this one and ``bench.xmpp_probe``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--hub",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a hub to measure, run from the checkout at PATH (default: this tree as 'hub')",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=NUMBER")
    parser.add_argument("--py-spy", default="", metavar="DIR")
    parser.add_argument("--json", default="", metavar="FILE")
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = paired_arguments("python -m bench.probe", __doc__)
    parser.add_argument("--phases", default=",".join(PHASES), help=", ".join(ALL_PHASES))
    parser.add_argument(
        "--fanout-n",
        default="100,1000",
        metavar="N,N",
        help="the fan-out phase's Ns (of the profile's: "
        + ",".join(map(str, FULL.fanout_ns))
        + ")",
    )
    parser.add_argument(
        "--history",
        action="store_true",
        help="seed each hub with the history of the full run first (its size: --set history_*)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="before each connect series, wait until the hub's in-process copies have run "
        "out (cache_ttl_seconds + cache_stale_seconds): in make bench the with-history series "
        "comes some 45 s after the seeding, and meets them cold",
    )
    return parser.parse_args(argv)


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise BenchError("--py-spy needs py-spy (pip install py-spy into the virtualenv)")
    return found


async def _spy(pid: int, out: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        _SPY[0],
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _spies(directory: str, target: Target, label: str) -> list[asyncio.subprocess.Process]:
    """py-spy on the hub and its database (both Python) for one phase, when asked for."""
    if not directory or "db" not in target.pids:
        return []
    spies = []
    for role, pid in target.pids.items():
        out = Path(directory) / f"{target.name}-{label}-{role}.txt"
        spies.append(await _spy(pid, out))
    return spies


async def _stop_spies(spies: list[asyncio.subprocess.Process]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        await spy.wait()


class SpiedRun(Run):
    """``Run`` with py-spy on the hub during each of its phases (with ``--py-spy``): the
    fan-out method runs several phases (connects, steady and saturated per N), each recorded
    apart, named after the phase and the round (``fan-out-1000-saturated-4-1``: N = 1000,
    window 4, round 1)."""

    def __init__(self, profile: Profile, say: Any, spy_dir: str) -> None:
        super().__init__(profile, say)
        self.spy_dir = spy_dir
        self.round = 0

    @contextlib.asynccontextmanager
    async def _phase(
        self, target: Target, name: str, stored: dict[str, int] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        words = name.partition(": ")[2].replace(",", "").replace("->", "").split()
        label = "-".join(w for w in words if w not in {"to", "msg/s", "(window"}).strip(")")
        spies = await _spies(self.spy_dir, target, f"{label}-{self.round}")
        try:
            async with super()._phase(target, name, stored) as info:
                yield info
        finally:
            await _stop_spies(spies)


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.2f} (" + ", ".join(f"{v:.2f}" for v in values) + ")"


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    profile = with_settings(FULL, args.set)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(ALL_PHASES))
    if unknown:
        raise BenchError(f"--phases: unknown {', '.join(unknown)}")
    ns = tuple(sorted(int(n) for n in args.fanout_n.split(",") if n))
    if "fanout" in phases and not set(ns) <= set(profile.fanout_ns):
        raise BenchError(f"--fanout-n: choose among {profile.fanout_ns}")
    # Run.fanout over these Ns alone, each with the profile's own rate
    fan_profile = replace(
        profile, fanout_ns=ns, fanout_rates=tuple(profile.fanout_rate(n) for n in ns)
    )
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"probe [{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    run = Run(profile, say)
    fan_run = SpiedRun(fan_profile, say, args.py_spy)
    fan_run.meter = run.meter  # one CPU table
    hubs = [tuple(h.split("=", 1)) for h in args.hub] or [("hub", str(REPO))]
    targets: list[Target] = []
    stops: list[Any] = []
    dirs: list[Path] = []
    # per hub: seconds after which every in-process copy a connect reads has run out
    cold_waits: dict[str, float] = {}
    loadgen = await LoadGen.start()
    try:
        for name, path in hubs:
            data_dir = Path(tempfile.mkdtemp(prefix=f"portalhub-probe-{name}-"))
            dirs.append(data_dir)
            hub = await start_hub(data_dir, repo=Path(path))
            stops.append(hub.stop)
            fx = await make_fixtures(hub.url, profile.users, profile.senders)
            target = hub_target(hub.url, {"server": hub.pid, "db": hub.db_pid}, hub.db_url, fx)
            target.name = name
            targets.append(target)
            settings = hub.settings()
            cold_waits[name] = settings.cache_ttl_seconds + settings.cache_stale_seconds + 1.0
            say(f"{name}: pid {hub.pid} (db {hub.db_pid}) from {path}, fixtures ready")
            if args.history:
                seeded = await history.make(loadgen, hub.url, fx, profile, say, target.stored)
                say(f"{name}: history seeded, stored {seeded['stored_after']}")
        reference = await start_reference()
        stops.append(reference.stop)
        targets.append(
            reference_target(reference.url, reference.pid, profile.senders, profile.users)
        )
        results: dict[str, Any] = {t.name: {p: [] for p in phases} for t in targets}
        for round_ in range(args.rounds):
            for target in targets:
                # the CPU table: this server's processes (and the load generator), by role
                run.meter.pids = {"bench": os.getpid(), "loadgen": loadgen.pid, **target.pids}
                if "latency" in phases:
                    spies = await _spies(args.py_spy, target, f"latency-{round_ + 1}")
                    reply = await run.direct_latency(target, loadgen)
                    await _stop_spies(spies)
                    results[target.name]["latency"].append(reply)
                    lat, http = reply["latency_ms"], reply["http_ms"]
                    say(
                        f"round {round_ + 1} {target.name} latency p50 {lat['p50']:.2f} "
                        f"p99 {lat['p99']:.2f} ms, POST p50 {http['p50']:.2f} ms, "
                        f"lost {reply['lost']} doubled {reply['doubled']} "
                        f"out of order {reply['out_of_order']}"
                    )
                if "saturation" in phases:
                    spies = await _spies(args.py_spy, target, f"saturation-{round_ + 1}")
                    reply = await run.direct_saturation(target, loadgen)
                    await _stop_spies(spies)
                    results[target.name]["saturation"].append(reply)
                    say(
                        f"round {round_ + 1} {target.name} 1:1 saturation "
                        f"{float(reply['deliveries_per_second'] or 0):.1f} msg/s, "
                        f"lost {reply['lost']} (load {os.getloadavg()[0]:.2f})"
                    )
                if "connect" in phases:
                    if args.cold and target.name in cold_waits:
                        await asyncio.sleep(cold_waits[target.name])
                    spies = await _spies(args.py_spy, target, f"connect-{round_ + 1}")
                    series = await run.connect_series(target, loadgen, "")
                    await _stop_spies(spies)
                    await loadgen.disconnect()
                    await asyncio.sleep(profile.settle)
                    results[target.name]["connect"].append(series)
                    total = series["total"]
                    say(
                        f"round {round_ + 1} {target.name} connect 0 -> {total['target']}: "
                        f"{total['per_second'] or 0:.1f}/s, failures {total['failures']}"
                    )
                if "fanout" in phases:
                    fan_run.round = round_ + 1
                    fan = await fan_run.fanout(target, loadgen)
                    results[target.name]["fanout"].append(fan)
                    for step in fan["steps"]:
                        steady, sat = step["steady"], step["saturation"]
                        lat = steady["latency_ms"]
                        say(
                            f"round {round_ + 1} {target.name} fan-out to {step['n']}: "
                            f"{sat['deliveries_per_second']:,.0f} deliveries/s, steady p50 "
                            f"{lat['p50']:.2f} p99 {lat['p99']:.2f} ms, lost "
                            f"{steady['lost'] + sat['lost']} doubled "
                            f"{steady['doubled'] + sat['doubled']} out of order "
                            f"{steady['out_of_order'] + sat['out_of_order']}"
                        )
        return {"profile": profile.as_dict(), "results": results, "cpu": run.meter.phases}
    finally:
        await loadgen.close()
        for stop in stops:
            await stop()
        for data_dir in dirs:
            shutil.rmtree(data_dir, ignore_errors=True)


def _fanout_figures(rounds: list[Any]) -> list[tuple[int, list[float], list[float], list[float]]]:
    """Per N, one value per round: saturated deliveries/s, steady p99 (ms), and the server
    process's CPU per delivery when saturated (us; less sensitive to a busy machine than
    the rate)."""
    by_n: dict[int, tuple[list[float], list[float], list[float]]] = {}
    for fan in rounds:
        for step in fan["steps"]:
            sat, p99, cpu = by_n.setdefault(int(step["n"]), ([], [], []))
            rate = float(step["saturation"]["deliveries_per_second"] or 0)
            sat.append(rate)
            p99.append(float(step["steady"]["latency_ms"]["p99"]))
            server = float(step["saturation"].get("cpu_percent", {}).get("server", 0))
            cpu.append(server * 1e4 / rate if rate else 0.0)
    return [(n, *by_n[n]) for n in sorted(by_n)]


def report(out: dict[str, Any]) -> str:
    results = out["results"]
    reference = results.get("reference", {})
    lines = []
    for name, phases in results.items():
        if "latency" in phases:
            p50 = [r["latency_ms"]["p50"] for r in phases["latency"]]
            p99 = [r["latency_ms"]["p99"] for r in phases["latency"]]
            http = [r["http_ms"]["p50"] for r in phases["latency"]]
            lines.append(f"{name}: 1:1 latency p50 ms {summary(p50)}")
            lines.append(f"{name}: 1:1 latency p99 ms {summary(p99)}")
            lines.append(f"{name}: POST answered p50 ms {summary(http)}")
            if name != "reference" and reference.get("latency"):
                ref = [r["latency_ms"]["p50"] for r in reference["latency"]]
                ratios = [a / b for a, b in zip(p50, ref, strict=False)]
                lines.append(f"{name}: p50 / reference p50, per round {summary(ratios)}")
        for n, sat, p99, cpu in _fanout_figures(phases.get("fanout", [])):
            lines.append(f"{name}: fan-out to {n} deliveries/s {summary(sat)}")
            lines.append(f"{name}: fan-out to {n} steady p99 ms {summary(p99)}")
            lines.append(f"{name}: fan-out to {n} server CPU us per delivery {summary(cpu)}")
            if name != "reference" and reference.get("fanout"):
                for rn, rsat, rp99, _ in _fanout_figures(reference["fanout"]):
                    if rn == n:
                        up = [a / b for a, b in zip(sat, rsat, strict=False) if b]
                        lines.append(f"{name}: fan-out to {n} / reference, per round {summary(up)}")
                        ratio = [a / b for a, b in zip(p99, rp99, strict=False) if b]
                        lines.append(f"{name}: fan-out to {n} p99 / reference {summary(ratio)}")
        if "connect" in phases:
            rates = [float(s["total"]["per_second"] or 0) for s in phases["connect"]]
            lines.append(f"{name}: connections/s 0 -> N {summary(rates)}")
            if name != "reference" and reference.get("connect"):
                ref = [float(s["total"]["per_second"] or 0) for s in reference["connect"]]
                ratios = [a / b for a, b in zip(rates, ref, strict=False) if b]
                lines.append(f"{name}: / reference, per round {summary(ratios)}")
    busy = [p for p in out["cpu"] if p.percent]
    for phase in busy:
        shares = ", ".join(f"{k} {v:.0f}" for k, v in sorted(phase.percent.items()))
        lines.append(f"cpu % of a core, {phase.name} ({phase.seconds:.0f} s): {shares}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    ensure_node_modules(sys.stderr)
    if args.py_spy:
        _SPY.append(_py_spy())
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    try:
        out = asyncio.run(probe(args))
    except BenchError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    print(report(out))
    if args.json:
        cpu = [{"name": p.name, "seconds": p.seconds, "percent": p.percent} for p in out["cpu"]]
        Path(args.json).write_text(json.dumps({**out, "cpu": cpu}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
