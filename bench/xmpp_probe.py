"""The XMPP part of ``make bench`` on its own, repeated, hubs side by side with Prosody.

``python -m bench.xmpp_probe [--hub NAME=PATH ...] [--rounds 3] [--set FIELD=NUMBER]``

Each round runs the XMPP part exactly as ``bench/xmpp.py`` runs it (a fresh hub on a fresh data
directory, the same slixmpp generator, the same scenarios of the full profile: logins, 1:1
latency, saturation) against every hub given, then against Prosody with mod_mam, one after the
other. So two versions of the hub (a checkout of the code before a change, given by
``--hub before=/tmp/base``, and this tree) and Prosody are measured under the same machine
load, and the ratios come from one round. Nothing goes to ``docs/benchmarks.md`` or
``bench/results``; the figures are printed, and written as JSON with ``--json``.

``--py-spy DIR``: record each hub and its database with py-spy during the generator's run
(raw collapsed stacks per hub, process and round, 250 samples/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench import xmpp
from bench.probe import _SPY, _py_spy, _spy, _stop_spies, paired_arguments, summary
from bench.procs import REPO, BenchError
from bench.profiles import FULL, with_settings

Results = dict[str, Any]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = paired_arguments("python -m bench.xmpp_probe", __doc__)
    parser.add_argument("--no-prosody", action="store_true", help="the hubs only")
    return parser.parse_args(argv)


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def figures(result: Results) -> dict[str, float]:
    """What a run is judged by: saturation messages/s, one login p50, 1:1 latency p50."""
    return {
        "msg_per_s": float(result["saturation"]["delivered_per_second"]),
        "login_p50_ms": float(result["logins"]["login_ms"].get("p50", 0.0)),
        "latency_p50_ms": float(result["latency"]["latency_ms"].get("p50", 0.0)),
        "all_stored": bool(result["stored"]["all_stored"]),
        "lost": int(result["latency"]["lost"]) + int(result["saturation"]["lost"]),
        "failed_logins": int(result["logins"]["failed"]),
    }


def cpu_figures(result: Results) -> dict[str, dict[str, float]]:
    """CPU in % of a core during saturation, and CPU milliseconds per login of each process
    during the logins (less at the mercy of the machine's load than a login's wall time)."""
    logins = result["logins"]
    per_login = {
        role: round(10 * percent * float(logins["seconds"]) / max(1, int(logins["ok"])), 2)
        for role, percent in logins.get("cpu_percent", {}).items()
    }
    return {"cpu": result["saturation"]["cpu_percent"], "login_cpu_ms": per_login}


async def probe(args: argparse.Namespace) -> Results:
    profile = with_settings(FULL, args.set)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"xprobe [{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    hubs = [tuple(h.split("=", 1)) for h in args.hub] or [("hub", str(REPO))]
    rounds: list[Results] = []
    for round_ in range(1, args.rounds + 1):
        this: Results = {"load_at_start": _load()}
        for name, path in hubs:

            @contextlib.asynccontextmanager
            async def spying(
                pids: dict[str, int], label: str = f"{name}-{round_}"
            ) -> AsyncIterator[None]:
                spies = []
                if args.py_spy:
                    for role, pid in pids.items():
                        spies.append(await _spy(pid, Path(args.py_spy) / f"{label}-{role}.txt"))
                try:
                    yield
                finally:
                    await _stop_spies(spies)

            result = await xmpp.run_hub(profile, say, repo=Path(path), during=spying)
            this[name] = {**figures(result), **cpu_figures(result)}
            say(f"round {round_} {name}: {json.dumps(this[name])} (load {_load()})")
        if not args.no_prosody:
            result = await xmpp.run_prosody(profile, say)
            this["prosody"] = {**figures(result), **cpu_figures(result)}
            say(f"round {round_} prosody: {json.dumps(this['prosody'])} (load {_load()})")
        this["load_at_end"] = _load()
        rounds.append(this)
    return {"profile": profile.as_dict(), "hubs": [h[0] for h in hubs], "rounds": rounds}


def report(out: Results) -> str:
    rounds = out["rounds"]
    lines = [f"loads at round start: {', '.join(r['load_at_start'] for r in rounds)}"]
    for name in [*out["hubs"], "prosody"]:
        if name not in rounds[0]:
            continue
        rates = [r[name]["msg_per_s"] for r in rounds]
        logins = [r[name]["login_p50_ms"] for r in rounds]
        lines.append(f"{name}: saturation msg/s {summary(rates)}")
        lines.append(f"{name}: one login p50 ms {summary(logins)}")
        latency = [r[name]["latency_p50_ms"] for r in rounds]
        lines.append(f"{name}: 1:1 latency p50 ms {summary(latency)}")
        lines.append(
            f"{name}: all stored {all(r[name]['all_stored'] for r in rounds)}, lost "
            f"{sum(r[name]['lost'] for r in rounds)}, failed logins "
            f"{sum(r[name]['failed_logins'] for r in rounds)}"
        )
        if name != "prosody" and "prosody" in rounds[0]:
            rate_ratio = [r[name]["msg_per_s"] / r["prosody"]["msg_per_s"] for r in rounds]
            login_ratio = [r[name]["login_p50_ms"] / r["prosody"]["login_p50_ms"] for r in rounds]
            lines.append(f"{name}: msg/s / Prosody, per round {summary(rate_ratio)}")
            lines.append(f"{name}: login p50 / Prosody, per round {summary(login_ratio)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.py_spy:
        _SPY.append(_py_spy())
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    try:
        out = asyncio.run(probe(args))
    except BenchError as exc:
        print(f"xmpp_probe: {exc}", file=sys.stderr)
        return 1
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
