"""Results as markdown tables: printed after a run and kept in docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench import verdict

Results = dict[str, Any]

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"
XMPP_BEGIN = "<!-- bench:xmpp:begin -->"
XMPP_END = "<!-- bench:xmpp:end -->"


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):,.{digits}f}"


def _ms(value: Any) -> str:
    if value is None:
        return "n/a"
    v = float(value)
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _lat(summary: Results | None, keys: tuple[str, ...] = ("p50", "p99", "max")) -> str:
    if not summary or not summary.get("n"):
        return "n/a"
    return " / ".join(_ms(summary.get(k)) for k in keys) + " ms"


def _ratio(ours: Any, theirs: Any) -> str:
    if ours is None or theirs is None or float(theirs) == 0:
        return "n/a"
    r = float(ours) / float(theirs)
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def _kib(value: Any) -> str:
    return "n/a" if value is None else f"{float(value) / 1024:,.1f} KiB"


def _mib(value: Any) -> str:
    return "n/a" if value is None else f"{float(value) / 1024 / 1024:,.1f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _steps(side: Results) -> dict[int, Results]:
    return {int(s["n"]): s for s in side.get("fanout", {}).get("steps", [])}


def done_when_rows(results: Results) -> list[list[str]]:
    rows = results.get("done_when") or verdict.done_when(results)
    out = []
    for row in rows:
        mark = verdict.verdict(row)
        out.append(
            [
                row["item"],
                row["what"],
                row["shown"] + (f" ({row['note']})" if row.get("note") else ""),
                row["target"],
                f"**{mark}**" if mark == "not met" else mark,
            ]
        )
    return out


def _ceiling_label(results: Results) -> str:
    client = _get(results, "db_ceiling", "sequential", "client") or {}
    concern = client.get("write_concern")
    parts = [f"write concern {concern}" if concern else "pymongo's default write concern"]
    parts.append(f"retryWrites {'on' if client.get('retry_writes') else 'off'}")
    return ", ".join(parts)


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def summary_rows(results: Results) -> list[list[str]]:
    hub, ref = results.get("hub", {}), results.get("reference", {})
    p = results["meta"]["profile"]
    rows: list[list[str]] = []
    hl, rl = hub.get("direct_latency", {}), ref.get("direct_latency", {})
    hlat, rlat = hl.get("latency_ms", {}), rl.get("latency_ms", {})
    rows.append(
        [
            f"1:1 latency p50 / p99 / max, {p['direct_rate']:g} msg/s "
            f"for {p['direct_seconds']:g} s",
            _lat(hlat),
            _lat(rlat),
            f"p50 {_ratio(hlat.get('p50'), rlat.get('p50'))}, "
            f"p99 {_ratio(hlat.get('p99'), rlat.get('p99'))}",
        ]
    )
    rows.append(
        [
            "1:1 POST answered, p50 / p99",
            _lat(hl.get("http_ms"), ("p50", "p99")),
            _lat(rl.get("http_ms"), ("p50", "p99")),
            "",
        ]
    )
    k = p["senders"]
    for label, ceiling_key, sat_key in (
        ("empty history", "db_ceiling", "direct_saturation"),
        ("with history", "db_ceiling_history", "direct_saturation_history"),
    ):
        ceiling = results.get(ceiling_key, {})
        seq = _get(ceiling, "sequential", "ops_per_second")
        conc = _get(ceiling, "concurrent", "ops_per_second")
        if not ceiling and not hub.get(sat_key):
            continue
        rows.append(
            [
                f"database ceiling ($inc + insert_one) ops/s, 1 / {k} workers, the hub's "
                f"client ({_ceiling_label(results)}), {label}",
                f"{_num(seq)} / {_num(conc)}",
                "",
                "",
            ]
        )
        mps = _get(hub, sat_key, "deliveries_per_second")
        rows.append(
            [
                f"1:1 throughput, {k} senders in own dialogs (messages/s delivered), {label}",
                _num(mps),
                "",
                f"of the DB ceiling with {k} / 1 workers: {_ratio(mps, conc)} / {_ratio(mps, seq)}",
            ]
        )
    hsteps, rsteps = _steps(hub), _steps(ref)
    for n in p["fanout_ns"]:
        hs, rs = hsteps.get(n, {}), rsteps.get(n, {})
        hsat, rsat = hs.get("saturation", {}), rs.get("saturation", {})
        hd, rd = hsat.get("deliveries_per_second"), rsat.get("deliveries_per_second")
        rows.append(
            [
                f"fan-out to {n}: deliveries/s, saturated (≤{p['window']} msgs in flight)",
                _num(hd),
                _num(rd),
                _ratio(hd, rd),
            ]
        )
        hst, rst = hs.get("steady", {}), rs.get("steady", {})
        hlat, rlat = hst.get("latency_ms", {}), rst.get("latency_ms", {})
        rate = p["fanout_rates"][p["fanout_ns"].index(n)]
        rows.append(
            [
                f"fan-out to {n}: latency p50 / p99 / max at {rate:g} msg/s",
                _lat(hlat),
                _lat(rlat),
                f"p50 {_ratio(hlat.get('p50'), rlat.get('p50'))}, "
                f"p99 {_ratio(hlat.get('p99'), rlat.get('p99'))}",
            ]
        )
    hm = hub.get("fanout", {}).get("per_idle_connection", {})
    rm = ref.get("fanout", {}).get("per_idle_connection", {})
    top = max(p["fanout_ns"])
    rows.append(
        [
            f"memory per idle connection, server process, (RSS - baseline) / {top}",
            _kib(hm.get("server")),
            _kib(rm.get("server")),
            _ratio(hm.get("server"), rm.get("server")),
        ]
    )
    rows.append(
        [
            "memory per idle connection, hub's database child",
            _kib(hm.get("db")),
            "",
            "",
        ]
    )
    hc = _get(hub, "fanout", "connect_total") or {}
    rc = _get(ref, "fanout", "connect_total") or {}
    rows.append(
        [
            f"connection set-up, 0 -> {top} connections ({p['connect_parallel']} under way, "
            "ready on `snapshot`), empty history (connections/s)",
            _connect_cell(hc),
            _connect_cell(rc),
            _ratio(hc.get("per_second"), rc.get("per_second")),
        ]
    )
    hh = _get(hub, "connect_history", "total") or {}
    if hh:
        stored = hh.get("stored_before", {})
        rows.append(
            [
                f"connection set-up, 0 -> {top} connections, with history "
                f"({_count(stored.get('messages'))} messages stored) (connections/s)",
                _connect_cell(hh),
                "",
                f"of the empty history: {_ratio(hh.get('per_second'), hc.get('per_second'))}",
            ]
        )
    return rows


def _count(value: Any) -> str:
    return "?" if value is None else f"{int(value):,}"


def _connect_cell(total: Results) -> str:
    if not total:
        return "n/a"
    text = _num(total.get("per_second"), 1)
    setup = []
    if total.get("capped"):
        setup.append(f"stopped at {total.get('connected')} after {_num(total.get('seconds'))} s")
    failed = sum(int(v) for v in (total.get("failures") or {}).values())
    if failed:
        setup.append(f"{failed} failed")
    return text + (f" ({', '.join(setup)})" if setup else "")


def connect_rows(results: Results) -> list[list[str]]:
    """Every step of every connection series: how many, how fast, how long one took."""
    rows: list[list[str]] = []
    series = [
        ("hub", "empty history", _get(results, "hub", "fanout")),
        ("hub", "with history", _get(results, "hub", "connect_history")),
        ("reference", "", _get(results, "reference", "fanout")),
    ]
    for side, label, s in series:
        if not s:
            continue
        for step in s.get("steps", []):
            c = step.get("connect", {})
            failed = sum(int(v) for v in (c.get("failures") or {}).values())
            rows.append(
                [
                    side,
                    label,
                    f"{step['connected_total'] - c.get('connected', 0)} -> "
                    f"{step['connected_total']}",
                    _num(c.get("per_second"), 1),
                    _lat(c.get("setup_ms"), ("p50", "p99", "max")),
                    str(failed) + (" (stopped: time)" if c.get("capped") else ""),
                    _kib(step.get("memory", {}).get("per_connection", {}).get("server")),
                ]
            )
    return rows


def fanout_rows(results: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    for side in ("hub", "reference"):
        for n, step in sorted(_steps(results.get(side, {})).items()):
            for kind in ("steady", "saturation"):
                r = step.get(kind, {})
                lat = r.get("latency_ms", {})
                rows.append(
                    [
                        side,
                        str(n),
                        kind,
                        _num(r.get("messages_per_second"), 1),
                        _num(r.get("deliveries_per_second")),
                        _ms(lat.get("p50")),
                        _ms(lat.get("p90")),
                        _ms(lat.get("p99")),
                        _ms(lat.get("max")),
                        _faults(r),
                        _ms(r.get("http_ms", {}).get("p50")),
                    ]
                )
    return rows


def _faults(r: Results) -> str:
    """lost / doubled / out of order, over every accepted message of the phase."""
    if "doubled" not in r:
        return f"{r.get('lost_deliveries', 'n/a')} / n/a / n/a"
    text = f"{r.get('lost', 0)} / {r.get('doubled', 0)} / {r.get('out_of_order', 0)}"
    extra = []
    if r.get("unexpected_deliveries"):
        extra.append(f"{r['unexpected_deliveries']} unexpected")
    if r.get("failed_messages"):
        extra.append(f"{r['failed_messages']} POSTs failed")
    return text + (f" ({', '.join(extra)})" if extra else "")


def direct_rows(results: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    for side in ("hub", "reference"):
        for key in ("direct_latency", "direct_saturation", "direct_saturation_history"):
            r = results.get(side, {}).get(key)
            if not r:
                continue
            lat = r.get("latency_ms", {})
            rows.append(
                [
                    side,
                    r.get("phase", key).split(": ", 1)[-1],
                    _num(r.get("deliveries_per_second"), 1),
                    _ms(lat.get("p50")),
                    _ms(lat.get("p99")),
                    _faults(r),
                    _ms(r.get("http_ms", {}).get("p50")),
                ]
            )
    return rows


def memory_rows(results: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    for side in ("hub", "reference"):
        fanout = results.get(side, {}).get("fanout", {})
        base = fanout.get("baseline_rss", {})
        for role in base:
            cells = [side, role, f"{base[role] / 2**20:,.1f}"]
            for step in fanout.get("steps", []):
                mem = step["memory"]
                cells.append(
                    f"{mem['rss'][role] / 2**20:,.1f} ({_kib(mem['per_connection'][role])})"
                )
            rows.append(cells)
    return rows


def _ends(timeline: list[int] | None) -> str:
    if not timeline:
        return "n/a"
    inner = timeline[:-1] if len(timeline) > 2 else timeline  # the last second may be partial
    return f"{inner[0]:,} → {inner[-1]:,}"


def history_rows(results: Results) -> list[list[str]]:
    """What the hub had stored when each phase started, and how its rate moved in the phase."""
    rows: list[list[str]] = []
    for key in ("db_ceiling", "db_ceiling_history"):
        for c in results.get(key, {}).values():
            rows.append(
                [
                    f"database ceiling, {c['workers']} worker(s), {c.get('history', '')}",
                    "",
                    _num(c["ops_per_second"]),
                    _ends(c.get("timeline")),
                ]
            )
    hub = results.get("hub", {})
    phases: list[Results] = [
        hub.get("direct_latency", {}),
        hub.get("direct_saturation", {}),
        hub.get("direct_saturation_history", {}),
    ]
    for step in _steps(hub).values():
        phases += [step.get("steady", {}), step.get("saturation", {})]
    for r in phases:
        if not r:
            continue
        stored = r.get("stored_before", {})
        rows.append(
            [
                r.get("phase", "?"),
                f"{stored.get('messages', 'n/a')} / {stored.get('events', 'n/a')}",
                _num(r.get("deliveries_per_second", r.get("per_second")), 1),
                _ends(r.get("timeline")),
            ]
        )
    return rows


def seeding_rows(results: Results) -> list[list[str]]:
    """The history's seeding, round by round: the rate as the history grew."""
    rows: list[list[str]] = []
    for k, r in enumerate(_get(results, "history", "seed", "rounds") or []):
        stored = r.get("stored_before", {})
        rows.append(
            [
                str(k + 1),
                _count(stored.get("messages")),
                f"{int(r.get('posted', 0)):,}",
                str(r.get("failed", 0)),
                _num(r.get("seconds"), 1),
                _num(r.get("per_second")),
                _lat(r.get("http_ms"), ("p50", "p99")),
            ]
        )
    return rows


def history_summary(results: Results) -> list[str]:
    h = results.get("history")
    if not h:
        return []
    p = results["meta"]["profile"]
    seed, chats = h.get("seed", {}), h.get("chats", {})
    per_user = chats.get("per_user", {})
    stored = h.get("stored_after", {})
    status = ", ".join(f"{k}: {v:,}" for k, v in sorted(seed.get("http_status", {}).items()))
    text = (
        f"History, seeded through the REST API after the empty-history phases: "
        f"{chats.get('total', 0):,} chats ({chats.get('dialogs', 0):,} dialogs, "
        f"{chats.get('groups', 0):,} groups of {chats.get('group_size', 0)}; each user in "
        f"{per_user.get('min', 0):.0f}-{per_user.get('max', 0):.0f} of them, "
        f"opened in {_num(chats.get('seconds'), 1)} s), then "
        f"{seed.get('posted', 0):,} of {seed.get('target_messages', 0):,} messages "
        f"with {seed.get('parallel', 0)} POSTs in flight in {_num(seed.get('seconds'))} s: "
        f"**{_num(seed.get('per_second'))} messages/s** (answers: {status or 'none'}). "
        f"Stored afterwards: {_count(stored.get('messages'))} messages, "
        f"{_count(stored.get('events'))} events."
    )
    if not seed.get("complete"):
        why = f"; {seed['problem']}" if seed.get("problem") else ""
        text += (
            f" **Seeding stopped before the target** (history_max_seconds = "
            f"{p.get('history_max_seconds', 0):g} s{why}): the with-history figures are for "
            "the history shown."
        )
    return [
        text,
        "",
        _table(
            ["round", "stored before", "sent", "failed", "s", "msg/s", "POST p50 / p99"],
            seeding_rows(results),
        ),
        "",
    ]


def cpu_rows(results: Results) -> list[list[str]]:
    names = ["hub", "db", "reference", "loadgen", "bench", "other"]
    rows = []
    for phase in results.get("cpu_phases", []):
        pct = phase["percent"]
        rows.append(
            [phase["name"], f"{phase['seconds']:.0f}"]
            + [f"{pct[k]:.0f}" if k in pct else "" for k in names]
        )
    return rows


def command_line(meta: Results) -> str:
    parts = ["python -m bench"]
    p = meta["profile"]
    if p["name"] == "quick":
        parts.append("--quick")
    if meta.get("parts") and list(meta["parts"]) != ["socketio", "xmpp"]:
        parts += ["--only", ",".join(meta["parts"])]
    parts += [f"--set {s}" for s in meta.get("settings", [])]
    return " ".join(parts)


def markdown(results: Results) -> str:
    meta = results["meta"]
    machine, versions, p = meta["machine"], meta["versions"], meta["profile"]
    parts = [
        f"Run of {meta['date']} (`{command_line(meta)}`, profile `{p['name']}`, "
        f"{meta.get('seconds', 0):.0f} s), "
        f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in meta['loadavg_start'])}, other processes busy "
        f"{meta.get('busy_before_start_percent', 0):.0f}% of a core just before.",
        "",
        *(
            [
                "**Experiment, not the hub as shipped:** "
                + (
                    f"the hub reached its database with URL options `{meta['hub_db_options']}`. "
                    if meta.get("hub_db_options")
                    else ""
                )
                + (
                    "Clients did not offer permessage-deflate."
                    if meta.get("client_deflate") is False
                    else ""
                ),
                "",
            ]
            if meta.get("hub_db_options") or meta.get("client_deflate") is False
            else []
        ),
        "Issue 14's \"done when\", from this run (items 6 and 7, the guarantees' tests and "
        "the documents, are not measured here):",
        "",
        _table(["#", "done when", "measured", "target", "verdict"], done_when_rows(results)),
        "",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ". Ratios are Portal Hub / Node socket.io (or / the database ceiling).",
        "",
        _table(["measurement", "Portal Hub", "Node socket.io", "ratio"], summary_rows(results)),
        "",
        *history_summary(results),
        "Connection set-up, step by step (ready = the client got its `snapshot`; the "
        "reference sends its `snapshot` as soon as the client has joined its room), the time "
        "one connection took, and (RSS - baseline) / connections after the step:",
        "",
        _table(
            ["server", "history", "connections", "per s", "one: p50 / p99 / max", "failed", "RSS"],
            connect_rows(results),
        ),
        "",
        "1:1 phases (`lost / doubled / out of order` over every accepted message of the "
        "phase, warm-up included, after the drain):",
        "",
        _table(
            [
                "server",
                "phase",
                "delivered/s",
                "p50",
                "p99",
                "lost / doubled / out of order",
                "http p50",
            ],
            direct_rows(results),
        ),
        "",
        "Fan-out detail (latency from just before the publishing POST to each receipt, ms; "
        "`http` is the POST's own answer time; `lost / doubled / out of order` counted at "
        "every client over every accepted message of the phase, warm-up included, after the "
        "drain):",
        "",
        _table(
            [
                "server",
                "N",
                "phase",
                "msgs/s",
                "deliveries/s",
                "p50",
                "p90",
                "p99",
                "max",
                "lost / doubled / out of order",
                "http p50",
            ],
            fanout_rows(results),
        ),
        "",
        "History: messages / events the hub had stored when a phase began, and the rate "
        "(ops/s or deliveries/s) over the phase, with its first and last whole second:",
        "",
        _table(["phase", "stored before", "rate", "first → last second"], history_rows(results)),
        "",
        "Memory: RSS in MiB with no client, then with N idle clients connected (before any "
        "message was published to them), and in brackets (RSS - baseline) / N:",
        "",
        _table(
            ["server", "process", "no client"] + [f"N = {n}" for n in p["fanout_ns"]],
            memory_rows(results),
        ),
        "",
        "CPU during each phase, % of one core (the machine has "
        f"{machine['cores']}; `other` is everything else running on it):",
        "",
        _table(
            ["phase", "s", "hub", "db", "reference", "loadgen", "bench", "other"],
            cpu_rows(results),
        ),
    ]
    return "\n".join(parts) + "\n"


def update_doc(path: Path, block: str, begin: str | None = None, end: str | None = None) -> bool:
    """Replace a results block of ``path`` (by default the Socket.IO one); False when the
    file has no such markers."""
    begin, end = begin or BEGIN, end or END
    if not path.exists():
        return False
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        return False
    path.write_text(pattern.sub(lambda _: f"{begin}\n{block}{end}", text, count=1))
    return True


def _cpu(side: Results, key: str) -> str:
    pct = side.get(key, {}).get("cpu_percent", {})
    return " / ".join(f"{name} {value:.0f}" for name, value in sorted(pct.items()))


def _stored_cell(part: Results) -> str:
    s = part.get("stored")
    if not s:
        return "n/a"
    return f"{s.get('stored', 0):,} of {s.get('sent', 0):,}"


def xmpp_rows(x: Results, rest: Results | None = None) -> list[list[str]]:
    """``rest``: the hub's REST 1:1 saturation phase of the same run, when it ran."""
    hub, pro = x.get("hub", {}), x.get("prosody", {})
    hl, pl = hub.get("logins", {}), pro.get("logins", {})
    ht, pt = hub.get("latency", {}), pro.get("latency", {})
    hs, ps = hub.get("saturation", {}), pro.get("saturation", {})
    htl, ptl = ht.get("latency_ms", {}), pt.get("latency_ms", {})
    hsl, psl = hs.get("latency_ms", {}), ps.get("latency_ms", {})
    return [
        [
            f"logins/s: {pl.get('logins', 0)} full logins, {pl.get('parallel', 0)} at a time "
            "(STARTTLS, SCRAM-SHA-1, bind, presence, ping answered)",
            f"{_num(hl.get('logins_per_second'), 1)} ({hl.get('failed', 0)} failed)",
            f"{_num(pl.get('logins_per_second'), 1)} ({pl.get('failed', 0)} failed)",
            _ratio(hl.get("logins_per_second"), pl.get("logins_per_second")),
        ],
        [
            "one login, p50 / p99 / max",
            _lat(hl.get("login_ms")),
            _lat(pl.get("login_ms")),
            f"p50 {_ratio(hl.get('login_ms', {}).get('p50'), pl.get('login_ms', {}).get('p50'))}",
        ],
        [
            f"1:1 latency p50 / p99 / max, {_num(pt.get('rate'))} msg/s "
            f"for {_num(pt.get('seconds'))} s",
            _lat(htl),
            _lat(ptl),
            f"p50 {_ratio(htl.get('p50'), ptl.get('p50'))}, "
            f"p99 {_ratio(htl.get('p99'), ptl.get('p99'))}",
        ],
        [
            f"messages/s delivered, {ps.get('pairs', 0)} pairs, "
            f"≤{ps.get('window', 0)} in flight each, {_num(ps.get('seconds'))} s",
            _num(hs.get("delivered_per_second")),
            _num(ps.get("delivered_per_second")),
            _ratio(hs.get("delivered_per_second"), ps.get("delivered_per_second")),
        ],
        [
            "messages stored (the hub: in its one history; Prosody: archived by mod_mam, each "
            "in both users' archives) of those sent, latency and saturation phases",
            _stored_cell(hub),
            _stored_cell(pro),
            "",
        ],
        [
            "the hub's REST 1:1 rate, same run (Socket.IO part: "
            f"{(rest or {}).get('phase', 'not run').split(': ', 1)[-1]}), messages/s",
            _num((rest or {}).get("deliveries_per_second")),
            "",
            "XMPP / REST "
            + _ratio(hs.get("delivered_per_second"), (rest or {}).get("deliveries_per_second")),
        ],
        [
            "latency at saturation, p50 / p99 / max",
            _lat(hsl),
            _lat(psl),
            f"p50 {_ratio(hsl.get('p50'), psl.get('p50'))}",
        ],
        [
            "lost (sent - received, after 3 s of drain): logins+latency / saturation",
            f"{ht.get('lost', 'n/a')} / {hs.get('lost', 'n/a')}",
            f"{pt.get('lost', 'n/a')} / {ps.get('lost', 'n/a')}",
            "",
        ],
        [
            "RSS at the end, server process (the hub's database child not included)",
            _mib(hub.get("rss_end", {}).get("server")),
            _mib(pro.get("rss_end", {}).get("server")),
            "",
        ],
    ]


def xmpp_markdown(results: Results) -> str:
    meta, x = results["meta"], results.get("xmpp", {})
    machine = meta["machine"]
    hub, pro = x.get("hub", {}), x.get("prosody", {})
    cpu_rows = [
        [label, _cpu(hub, key), _cpu(pro, key)]
        for label, key in (
            ("logins", "logins"),
            ("1:1 latency", "latency"),
            ("saturation", "saturation"),
        )
    ]
    parts = [
        f"Run of {meta['date']} (`{command_line(meta)}`, profile `{meta['profile']['name']}`), "
        f"{machine['cores']} cores "
        f"({machine['cpu']}), load average at start "
        f"{' / '.join(f'{v:.2f}' for v in meta['loadavg_start'])}. Prosody "
        f"{x.get('prosody_version', '?')} with mod_mam ("
        + ", ".join(f"`{k} = {v}`" for k, v in (x.get("prosody_archive") or {}).items())
        + f"), slixmpp {meta['versions'].get('slixmpp', '?')}, "
        f"Python {meta['versions']['python']}. Ratios are Portal Hub / Prosody.",
        "",
        _table(
            ["measurement", "Portal Hub", "Prosody", "ratio"],
            xmpp_rows(x, results.get("hub", {}).get("direct_saturation")),
        ),
        "",
        "CPU during each scenario, % of one core (`loadgen` is the slixmpp generator, `db` the "
        "hub's database child):",
        "",
        _table(["scenario", "Portal Hub run", "Prosody run"], cpu_rows),
    ]
    return "\n".join(parts) + "\n"


CRM_BEGIN = "<!-- bench:crm:begin -->"
CRM_END = "<!-- bench:crm:end -->"


def _s(value: Any) -> str:
    if value is None:
        return "n/a"
    v = float(value)
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s" if v < 100 else f"{v:.0f} s"


def _times(value: Any) -> str:
    if value is None:
        return "n/a"
    v = float(value)
    return f"{v:.2f}x" if v < 10 else f"{v:,.0f}x"


def crm_rows(c: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    by_size = {r["open_activities"]: r for r in c.get("ratios", {}).get("check_vs_live", [])}
    for size in c.get("sizes", []):
        lat = size.get("latency", {})
        check = size.get("check", {})
        ratio = by_size.get(size["open_activities"], {})
        lost = sum(lat.get(k, {}).get("lost", 0) for k in ("create", "complete"))
        wrong = sum(lat.get(k, {}).get("wrong", 0) for k in ("create", "complete"))
        rows.append(
            [
                f"{size['open_activities']:,}",
                f"{size.get('deals', 0):,}",
                f"{c.get('users', 0)} ({c.get('connected', 0)})",
                _lat(lat.get("all", {}).get("latency_ms"), ("p50", "p99")),
                _lat(lat.get("create", {}).get("latency_ms"), ("p50", "p99")),
                _lat(lat.get("complete", {}).get("latency_ms"), ("p50", "p99")),
                f"{lat.get('all', {}).get('changes', 0)} / {lost} / {wrong}",
                f"{_s(check.get('seconds'))} ({_s(check.get('wall_seconds'))})",
                f"{check.get('users_with_differences', '?')} / "
                f"{check.get('stale_activities', '?')} / {check.get('stale_records', '?')}",
                _times(ratio.get("check_over_p50")),
            ]
        )
    return rows


def crm_detail_rows(c: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    for size in c.get("sizes", []):
        seed = size.get("seed", {})
        repair = size.get("repair", {})
        lat = size.get("latency", {}).get("all", {})
        rss = size.get("rss", {})
        rows.append(
            [
                f"{size['open_activities']:,}",
                f"{seed.get('open_activities', 0):,} + {seed.get('completed_activities', 0):,} "
                f"completed, {seed.get('deals', 0):,} deals in {_s(seed.get('seconds'))} "
                f"({_num(seed.get('documents_per_second'))}/s)",
                f"{_s(repair.get('seconds'))}, {repair.get('users_with_differences', '?')} users",
                _lat(lat.get("http_ms"), ("p50", "p99")),
                _lat(lat.get("busy_ms"), ("p50", "p99")),
                _s(size.get("check", {}).get("cli_cpu_seconds")),
                f"{_mib(rss.get('hub'))} / {_mib(rss.get('db'))}",
                _mib(size.get("db_bytes")),
            ]
        )
    return rows


def crm_cpu_rows(c: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    for size in c.get("sizes", []):
        for label, part in (
            ("seeding", size.get("seed", {})),
            ("counters check --repair", size.get("repair", {})),
            ("changes", size.get("latency", {})),
            ("counters check", size.get("check", {})),
        ):
            pct = part.get("cpu_percent", {})
            rows.append(
                [f"{size['open_activities']:,}", label]
                + [f"{pct[k]:.0f}" if k in pct else "" for k in ("hub", "db", "bench", "other")]
            )
    return rows


def _query_order(label: str) -> tuple[int, int, str]:
    """A record type's four counts in the hub's order, then the other queries."""
    kinds = ["incoming", "overdue", "due", "idle records"]
    record_type, _, kind = label.partition(": ")
    if kind in kinds:
        return (0 if record_type == "deal" else 1, kinds.index(kind), label)
    if label.startswith(("live:", "wake-up:")):
        return (-1, 0 if label.startswith("live:") else 1, label)
    others = ["indicators", "whole collection"]
    return (2, next((i for i, k in enumerate(others) if k in label), len(others)), label)


def crm_query_rows(c: Results) -> tuple[list[str], list[list[str]]]:
    sizes = c.get("sizes", [])
    header = ["query"]
    for size in sizes:
        n = f"{size['open_activities']:,}"
        header += [f"{n}: ms (counted)", f"{n}: plan, keys / documents read"]
    labels: list[str] = []
    for size in sizes:
        labels += [k for k in size.get("queries", {}) if k not in labels]
    rows = []
    for label in sorted(labels, key=_query_order):
        cells = [label]
        for size in sizes:
            q = size.get("queries", {}).get(label)
            if not q:
                cells += ["n/a", "n/a"]
                continue
            cells.append(f"{_ms(q['ms'])} ({q['documents']:,})")
            if q.get("plan"):
                cells.append(
                    f"{q['plan']}, {_num(q.get('keys_examined'))} / {_num(q.get('docs_examined'))}"
                )
            else:
                cells.append("")
        rows.append(cells)
    return header, rows


def crm_markdown(results: Results) -> str:
    meta, c = results["meta"], results.get("crm", {})
    machine = meta["machine"]
    p = meta["profile"]
    big = c.get("ratios", {}).get("largest_vs_smallest", {})
    problems = c.get("problems", [])
    parts = [
        f"Run of {meta['date']} (`python -m bench --only crm"
        f"{' --quick' if p['name'] == 'quick' else ''}`, profile `{p['name']}`, "
        f"{meta.get('seconds', 0):.0f} s), {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in meta['loadavg_start'])}. Python "
        f"{meta['versions']['python']}, python-socketio {meta['versions']['python-socketio']}, "
        f"pymongo {meta['versions']['pymongo']}, secantusdb {meta['versions']['secantusdb']}. "
        f"{c.get('users', 0)} users (time zone {c.get('time_zone', '?')}), "
        f"{c.get('connected', 0)} connected; {p['crm_changes']} changes per size after "
        f"{p['crm_warmup_changes']} of warm-up, one at a time, each once the hub and its "
        "database were idle again. Latency: from just before the request to the "
        "`counters.changed` with the user's new `crm.deal.incoming` at their client.",
        "",
        _table(
            [
                "open activities",
                "deals",
                "users (connected)",
                "counter update p50 / p99",
                "incoming call created (POST)",
                "activity completed (PATCH)",
                "changes / lost / wrong",
                "`counters check` (CLI wall)",
                "check: differing users / stale activities / stale records",
                "check / live p50",
            ],
            crm_rows(c),
        ),
        "",
    ]
    if big:
        parts += [
            f"Scaling, {big['large']:,} against {big['small']:,} open activities "
            f"({_times(big.get('size'))} the data): counter update latency p50 "
            f"{_times(big.get('latency_p50'))}, p99 {_times(big.get('latency_p99'))}; "
            f"`counters check` {_times(big.get('check'))}.",
            "",
        ]
    parts += [
        "Set-up and resources at each size: what was inserted (open + completed activities, "
        "deals) and how fast; `counters check --repair` storing the numbers of the users the "
        "new data changed (the hub recounts a user only after a change touching them); the "
        "change requests' own answer time; each change's busy time (from the request until "
        "the hub and its database used under 20% of a core over 100 ms, at which point the "
        "next change was sent); the CPU time of the `counters check` process (the database's "
        "share is in the CPU table below); RSS of the hub / its database after the check; "
        "the database's files:",
        "",
        _table(
            [
                "open activities",
                "seeded",
                "check --repair",
                "POST/PATCH answered p50 / p99",
                "busy per change p50 / p99",
                "`counters check` CPU",
                "RSS hub / db",
                "db on disk",
            ],
            crm_detail_rows(c),
        ),
        "",
        "The database queries of one user's recount (the first connected user, type `deal`, "
        "and `lead` where the user has nothing), each run alone after the changes: median of "
        "5 runs, how many documents each counts, and the database's plan (`explain`) with "
        "the index keys and documents it reads:",
        "",
        _table(*crm_query_rows(c)),
        "",
        "CPU, % of one core (in the two check phases `other` is mostly the `counters check` "
        "process itself):",
        "",
        _table(["open activities", "phase", "hub", "db", "bench", "other"], crm_cpu_rows(c)),
    ]
    if problems:
        parts += ["", "**Problems found:**", "", *(f"- {text}" for text in problems)]
    return "\n".join(parts) + "\n"


MAIL_BEGIN = "<!-- bench:mail:begin -->"
MAIL_END = "<!-- bench:mail:end -->"


def _rate(value: Any) -> str:
    if value is None:
        return "n/a"
    v = float(value)
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _pct_of(value: Any) -> str:
    if value is None:
        return "n/a"
    v = 100 * float(value)
    return f"{v:.1f}%" if v < 10 else f"{v:.0f}%"


def mail_rows(m: Results) -> list[list[str]]:
    hub, peer, r = m.get("hub", {}), m.get("peer", {}), m.get("ratios", {})
    committed = hub.get("committed", {})
    runs = ", ".join(_rate(x) for x in peer.get("runs", []))
    return [
        [
            "accepted (`250`: the raw message on disk, in the spool), msg/s",
            _rate(hub.get("accepted_per_second")),
            f"{_rate(peer.get('accepted_per_second'))} (median of {runs})",
            _pct_of(r.get("accepted")),
        ],
        [
            "matched and committed (the activity on its record), msg/s",
            _rate(committed.get("per_second")),
            "",
            _pct_of(r.get("committed")),
        ],
        [
            "counted (the users' pushed incoming numbers complete), msg/s",
            _rate(committed.get("counted_per_second")),
            "",
            _pct_of(r.get("counted")),
        ],
        [
            "committed, each quarter of the replies in turn, msg/s",
            " / ".join(_rate(q) for q in committed.get("quarters_per_second", [])),
            "",
            "",
        ],
        [
            "last commit after the last `250`; from `250` to committed p50 / p99",
            f"{_s(committed.get('behind_acceptance_seconds'))}; "
            + " / ".join(
                _s((committed.get("answered_to_committed_ms") or {}).get(k, 0) / 1000)
                for k in ("p50", "p99")
            ),
            "",
            "",
        ],
    ]


def _kinds(part: Results) -> list[str]:
    return [_lat(part.get(k, {}).get("latency_ms"), ("p50", "p99")) for k in KINDS]


KINDS = ("code", "thread", "sender")


def mail_latency_rows(m: Results) -> list[list[str]]:
    rows = []
    loaded = m.get("loaded") or {}
    for label, part in (
        ("quiet, before the throughput phase", m.get("quiet")),
        ("quiet, after the throughput phase", m.get("quiet_after")),
        (
            f"under load: replies to the other users offered at "
            f"{_rate(loaded.get('offered_rate'))}/s",
            m.get("loaded"),
        ),
    ):
        if not part:
            continue
        a = part.get("all", {})
        rows.append(
            [
                label,
                f"{part.get('stored_raw', 0):,}",
                str(a.get("replies", 0)),
                _lat(a.get("latency_ms"), ("p50", "p99", "max")),
                _lat(a.get("accepted_ms"), ("p50", "p99")),
                *_kinds(part),
                str(a.get("lost", 0)),
            ]
        )
    return rows


def mail_db_rows(m: Results, top: int = 8) -> tuple[list[str], list[list[str]]]:
    phases = [
        (
            f"one at a time, {m.get('quiet', {}).get('stored_raw', 0):,} stored",
            m.get("quiet", {}).get("database", {}),
        ),
        (
            f"one at a time, {m.get('quiet_after', {}).get('stored_raw', 0):,} stored",
            m.get("quiet_after", {}).get("database", {}),
        ),
        ("throughput", m.get("hub", {}).get("database", {})),
    ]
    phases = [(label, db) for label, db in phases if db]
    header = ["per reply"] + [f"{label}: ops / ms" for label, _ in phases]
    rows = []
    kinds = ("query", "insert", "update", "delete", "command")
    rows.append(
        ["operations: " + " / ".join(kinds)]
        + [
            " / ".join(f"{db.get('ops_per_reply', {}).get(k, 0):.1f}" for k in kinds)
            + f" (all {sum(db.get('ops_per_reply', {}).get(k, 0) for k in kinds):.1f})"
            for _, db in phases
        ]
    )
    names: list[str] = []
    for _, db in reversed(phases):
        names += [c["collection"] for c in db.get("collections", [])[:top]]
    for name in dict.fromkeys(names):
        cells = [f"`{name}`"]
        for _, db in phases:
            c = next((c for c in db.get("collections", []) if c["collection"] == name), None)
            cells.append(f"{c['ops_per_reply']:.1f} / {c['ms_per_reply']:.1f}" if c else "n/a")
        rows.append(cells)
    rows.append(
        ["all collections, ms"]
        + [f"{sum(c['ms_per_reply'] for c in db.get('collections', [])):.1f}" for _, db in phases]
    )
    return header, rows


def mail_cpu_rows(results: Results) -> list[list[str]]:
    rows = []
    for phase in results.get("cpu_phases", []):
        if not phase["name"].startswith("mail: "):
            continue
        pct = phase["percent"]
        rows.append(
            [phase["name"][len("mail: ") :], f"{phase['seconds']:.1f}"]
            + [
                f"{pct[k]:.0f}" if k in pct else ""
                for k in ("hub", "db", "loadgen", "peer", "bench", "other")
            ]
        )
    return rows


def mail_markdown(results: Results) -> str:
    meta, m = results["meta"], results.get("mail", {})
    machine, p, v = meta["machine"], meta["profile"], meta["versions"]
    hub, verify = m.get("hub", {}), m.get("verify", {})
    mix = ", ".join(f"{w}/{sum(x[1] for x in p['mail_mix'])} by {k}" for k, w in p["mail_mix"])
    settings = "".join(f" --set {s}" for s in meta.get("settings", []))
    parts = [
        f"Run of {meta['date']} (`python -m bench --only mail"
        f"{' --quick' if p['name'] == 'quick' else ''}{settings}`, profile `{p['name']}`, "
        f"{meta.get('seconds', 0):.0f} s), {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in meta['loadavg_start'])}, other processes busy "
        f"{meta.get('busy_before_start_percent', 0):.0f}% of a core just before. Python "
        f"{v['python']}, aiosmtpd {v.get('aiosmtpd', '?')}, aiosmtplib {v.get('aiosmtplib', '?')}, "
        f"python-socketio {v['python-socketio']}, secantusdb {v['secantusdb']}. "
        f"{m.get('users', 0)} users, {m.get('setup', {}).get('records', 0)} deals with a "
        f"contact each, one mail sent from each deal through the relay. "
        f"Throughput: {hub.get('messages', 0):,} replies ({_kib(hub.get('mean_bytes'))} on "
        f"average, every {p['mail_attachment_every']}th with a "
        f"{p['mail_attachment_bytes'] // 1000} KB attachment; {mix}) over "
        f"{hub.get('connections', 0)} SMTP sessions at once, {hub.get('per_session', 0)} "
        f"messages per session.",
        "",
        _table(["throughput", "Portal Hub", "bare aiosmtpd", "hub / bare"], mail_rows(m)),
        "",
        "Reply-to-counter latency: from just before the SMTP connection is opened to the "
        "`counters.changed` showing the responsible user's incoming number one higher, at "
        "their client; `250` is the SMTP answer to the message's data. Quiet: each reply "
        "once the hub and its database were idle. Stored: raw messages the hub held when "
        "the phase began:",
        "",
        _table(
            [
                "replies one at a time",
                "stored",
                "replies",
                "to the counter p50 / p99 / max",
                "`250` p50 / p99",
                "by code",
                "by thread",
                "by sender",
                "lost",
            ],
            mail_latency_rows(m),
        ),
        "",
    ]
    how = verify.get("matched_by", {})
    parts += [
        f"Every reply accounted for, through the API: {verify.get('replies', 0):,} sent, "
        f"{verify.get('found', 0):,} found on the users' activities; lost "
        f"{verify.get('lost', '?')}, duplicated {verify.get('duplicated', '?')}, on another "
        f"record {verify.get('misplaced', '?')}, unexpected {verify.get('unexpected', '?')}, "
        f"unmatched list {verify.get('unmatched', '?')}. Matched as written: "
        + "; ".join(
            f"{kind}: " + ", ".join(f"{n:,} by {k}" for k, n in sorted(counts.items()))
            for kind, counts in sorted(how.items())
        )
        + ".",
        "",
        "The database's own counters (`serverStatus` operations, `top` time per collection), "
        "per reply, over the two quiet phases and the throughput phase (with several "
        "operations in flight, `top`'s times overlap):",
        "",
        _table(*mail_db_rows(m)),
        "",
    ]
    queries = m.get("queries", {})
    if queries:
        stored = queries.get("stored", {})
        sizes = queries.get("mean_bytes", {})
        parts += [
            "The pipeline's queries for one reply, each run alone at the end of the run "
            f"({stored.get('mail_raw', 0):,} raw messages of "
            f"{_kib(sizes.get('mail_raw'))} on average stored, "
            f"{stored.get('crm_activities', 0):,} activities of "
            f"{_kib(sizes.get('crm_activities'))}, {stored.get('crm_records', 0):,} records), "
            "median of 5, with the database's plan and the index keys and documents it read:",
            "",
            _table(
                ["query", "ms", "plan", "keys / documents read"],
                [
                    [
                        label,
                        _ms(q.get("ms")),
                        str(q.get("plan", "")),
                        f"{_num(q.get('keys_examined'))} / {_num(q.get('docs_examined'))}",
                    ]
                    for label, q in queries.get("queries", {}).items()
                ],
            ),
            "",
        ]
    parts += [
        "CPU, % of one core (`loadgen`: the SMTP client process; `peer`: the bare aiosmtpd "
        "server; `bench`: this process with the Socket.IO clients and the relay):",
        "",
        _table(
            ["phase", "seconds", "hub", "db", "loadgen", "peer", "bench", "other"],
            mail_cpu_rows(results),
        ),
    ]
    problems = m.get("problems", [])
    if problems:
        parts += ["", "**Problems found:**", "", *(f"- {text}" for text in problems)]
    return "\n".join(parts) + "\n"
