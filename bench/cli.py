"""``python -m bench [--quick] [--no-doc] [--keep] [--only socketio|xmpp|crm|mail|soak]
[--set FIELD=NUMBER]``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import verdict
from bench.procs import REPO, BenchError, ensure_node_modules
from bench.profiles import FULL, QUICK, with_settings
from bench.report import (
    CRM_BEGIN,
    CRM_END,
    MAIL_BEGIN,
    MAIL_END,
    XMPP_BEGIN,
    XMPP_END,
    crm_markdown,
    mail_markdown,
    markdown,
    update_doc,
    xmpp_markdown,
)
from bench.runner import DEFAULT_PARTS, PARTS, Run, machine_busy
from bench.soak import SOAK_BEGIN, SOAK_END, soak_markdown

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOC = REPO / "docs" / "benchmarks.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of 5-7 minutes (small N, a small history, short phases)",
    )
    doc = parser.add_mutually_exclusive_group()
    doc.add_argument(
        "--no-doc", action="store_true", help="do not update docs/benchmarks.md (full run)"
    )
    doc.add_argument(
        "--doc", action="store_true", help="update docs/benchmarks.md even after --quick"
    )
    parser.add_argument("--keep", action="store_true", help="keep the hub's data directory")
    parser.add_argument(
        "--only",
        choices=PARTS,
        help="run one part: socketio (hub vs Node socket.io), xmpp (hub vs Prosody), crm "
        "(CRM counters with up to a million open activities) or mail (CRM replies over SMTP "
        "against a bare aiosmtpd) or soak (two nodes on Redis: a bounded load run with every "
        "message accounted for, one node against two); crm, mail and soak are not part of the "
        "default run",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=NUMBER",
        help="change one size of the profile (bench/profiles.py), e.g. --set mail_replies=3000; "
        "may be repeated",
    )
    parser.add_argument(
        "--hub-db-options",
        default="",
        metavar="OPTIONS",
        help="experiment: start the hub's database here and let the hub reach it through "
        "PORTALHUB_MONGODB_URL with these URL options (e.g. retryWrites=false); "
        "the results then do not go into docs/benchmarks.md",
    )
    parser.add_argument(
        "--no-client-deflate",
        action="store_true",
        help="experiment: clients do not offer permessage-deflate (browsers do); "
        "the results then do not go into docs/benchmarks.md",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profile = with_settings(QUICK if args.quick else FULL, args.set)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"bench [{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    parts = (args.only,) if args.only else DEFAULT_PARTS
    try:
        if "socketio" in parts:
            ensure_node_modules(sys.stderr)
        busy = machine_busy(2.0)
        if busy > 30:
            say(f"warning: other processes use {busy:.0f}% of a core; the figures will be low")
        run = Run(
            profile,
            say,
            hub_db_options=args.hub_db_options,
            client_deflate=not args.no_client_deflate,
        )
        results = asyncio.run(run.run(keep=args.keep, parts=parts))
        results["meta"]["settings"] = list(args.set)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    RESULTS_DIR.mkdir(exist_ok=True)
    payload = json.dumps(results, indent=2, sort_keys=True)
    stamp = results["meta"]["date"].replace(":", "").replace("-", "")
    experiment = bool(args.hub_db_options or args.no_client_deflate)
    name = profile.name + ("-experiment" if experiment else "")
    latest = RESULTS_DIR / "latest.json"
    if not experiment:
        merged = results
        if args.only and latest.exists():
            # one part: the other part's figures stay in latest.json as they were
            merged = json.loads(latest.read_text())
            merged.update({k: v for k, v in results.items() if k != "meta"})
            merged.setdefault("meta_parts", {})[args.only] = results["meta"]
            merged["done_when"] = verdict.done_when(merged)
        latest.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    (RESULTS_DIR / f"{name}-{stamp}.json").write_text(payload + "\n")
    blocks: list[tuple[str, str | None, str | None]] = []
    if "socketio" in parts:
        blocks.append((markdown(results), None, None))
    if "xmpp" in parts:
        blocks.append((xmpp_markdown(results), XMPP_BEGIN, XMPP_END))
    if "crm" in parts:
        blocks.append((crm_markdown(results), CRM_BEGIN, CRM_END))
    if "mail" in parts:
        blocks.append((mail_markdown(results), MAIL_BEGIN, MAIL_END))
    if "soak" in parts:
        blocks.append((soak_markdown(results), SOAK_BEGIN, SOAK_END))
    for block, _, _ in blocks:
        print(block)
    say(f"results in {RESULTS_DIR}")
    if experiment:
        return 0
    aborted = results.get("crm", {}).get("aborted")
    if aborted:
        say(f"crm: the run was aborted ({aborted}); its block stays as it was")
        blocks = [b for b in blocks if b[1] != CRM_BEGIN]
    if (not args.quick and not args.no_doc) or args.doc:
        for block, begin, end in blocks:
            if update_doc(DOC, block, begin, end):
                say(f"updated a results block of {DOC}")
            else:
                say(f"{DOC} lacks the results markers {begin or ''}: paste the block by hand")
    problems = []
    for part in ("crm", "mail", "soak"):
        for text in results.get(part, {}).get("problems", []):
            problems.append(text)
            say(f"{part} problem: {text}")
    return 1 if problems or aborted else 0
