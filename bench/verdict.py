"""Issue 14's "done when" list, checked against the figures of one run.

Each item is a ratio (or a bound) computed from ``results`` exactly as the tables show it, the
target the issue sets, and whether it is met. An item whose figures are not in the run (a part
not run, a phase that failed) is "n/a", never "met". The history items count as met only when
the whole history was seeded: a ratio measured on a smaller history does not show what the
issue asks.
"""

from __future__ import annotations

from typing import Any

Results = dict[str, Any]
Row = dict[str, Any]


def _get(data: Any, *path: str | int) -> Any:
    for key in path:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def _ratio(ours: Any, theirs: Any) -> float | None:
    if ours is None or theirs is None or float(theirs) == 0:
        return None
    return float(ours) / float(theirs)


def _step(side: Results, n: int) -> Results:
    for step in _get(side, "fanout", "steps") or []:
        if int(step.get("n", -1)) == n:
            return dict(step)
    return {}


def _row(
    item: str,
    what: str,
    value: float | None,
    target: str,
    met: bool | None,
    shown: str,
    note: str = "",
) -> Row:
    return {
        "item": item,
        "what": what,
        "value": value,
        "shown": shown if value is not None else "n/a",
        "target": target,
        "met": met if value is not None else None,
        "note": note,
    }


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _history_note(results: Results) -> tuple[bool, str]:
    """Whether the run's history is the full target, and a note saying what it was."""
    seed = _get(results, "history", "seed") or {}
    chats = _get(results, "history", "chats", "total")
    if not seed:
        return False, "no history phase"
    text = f"{seed.get('posted', 0):,} messages seeded in {chats or 0:,} chats"
    if not seed.get("complete"):
        text += f" (target {seed.get('target_messages', 0):,}: history incomplete)"
    return bool(seed.get("complete")), text


def publish_phases(results: Results) -> list[Results]:
    """Every phase of the hub's in which messages were published and their receipts counted."""
    hub = results.get("hub", {})
    phases = [
        hub.get("direct_latency"),
        hub.get("direct_saturation"),
        hub.get("direct_saturation_history"),
    ]
    for step in _get(hub, "fanout", "steps") or []:
        phases += [step.get("steady"), step.get("saturation")]
    return [phase for phase in phases if phase]


def delivery_faults(results: Results) -> dict[str, int] | None:
    phases = publish_phases(results)
    if not phases:
        return None
    keys = ("lost", "doubled", "out_of_order", "unexpected_deliveries", "failed_messages")
    faults = {key: sum(int(phase.get(key) or 0) for phase in phases) for key in keys}
    faults["phases"] = len(phases)
    faults["connections_lost"] = max(int(phase.get("connections_lost") or 0) for phase in phases)
    return faults


def done_when(results: Results) -> list[Row]:
    p = _get(results, "meta", "profile") or {}
    hub, ref = results.get("hub", {}), results.get("reference", {})
    rows: list[Row] = []
    full_history, history_text = _history_note(results)

    # 1. connection set-up
    hc, rc = _get(hub, "fanout", "connect_total") or {}, _get(ref, "fanout", "connect_total") or {}
    top = hc.get("target") or max(p.get("fanout_ns") or [0])
    value = _ratio(hc.get("per_second"), rc.get("per_second"))
    capped = " (capped: " + f"{hc.get('connected')} of {top})" if hc.get("capped") else ""
    rows.append(
        _row(
            "1",
            f"connection set-up, hub / Node socket.io, 0 -> {top} connections, empty history",
            value,
            ">= 0.5x",
            value is not None and value >= 0.5 and not hc.get("capped"),
            _x(value),
            f"{_num(hc.get('per_second'))} vs {_num(rc.get('per_second'))} connections/s" + capped,
        )
    )
    hh = _get(hub, "connect_history", "total") or {}
    value = _ratio(hh.get("per_second"), hc.get("per_second"))
    capped = f"; capped: {hh.get('connected')} of {top}" if hh.get("capped") else ""
    rows.append(
        _row(
            "1",
            "connection set-up with history / on the empty history (hub)",
            value,
            ">= 0.9x",
            value is not None and value >= 0.9 and full_history and not hh.get("capped"),
            _x(value),
            f"{_num(hh.get('per_second'))} vs {_num(hc.get('per_second'))} connections/s; "
            + history_text
            + capped,
        )
    )

    # 2. 1:1 throughput against the database ceiling
    senders = p.get("senders", 0)
    for label, sat_key, ceiling_key, needs_history in (
        ("empty history", "direct_saturation", "db_ceiling", False),
        ("with history", "direct_saturation_history", "db_ceiling_history", True),
    ):
        mps = _get(hub, sat_key, "deliveries_per_second")
        ceiling = _get(results, ceiling_key, "concurrent", "ops_per_second")
        value = _ratio(mps, ceiling)
        met = value is not None and value >= 0.8 and (full_history or not needs_history)
        rows.append(
            _row(
                "2",
                f"1:1 throughput, {senders} senders / database ceiling, {senders} workers, "
                f"the hub's client, {label}",
                value,
                ">= 0.8x",
                met,
                _x(value),
                f"{_num(mps)} msg/s vs {_num(ceiling)} ops/s"
                + (f"; {history_text}" if needs_history else ""),
            )
        )

    # 3. fan-out
    ns = sorted(p.get("fanout_ns") or [])
    if ns:
        for n, bound in ((ns[-1], 1.0), (ns[0], 0.5)):
            hd = _get(_step(hub, n), "saturation", "deliveries_per_second")
            rd = _get(_step(ref, n), "saturation", "deliveries_per_second")
            value = _ratio(hd, rd)
            rows.append(
                _row(
                    "3",
                    f"fan-out deliveries/s at saturation, hub / Node, N = {n}",
                    value,
                    f">= {bound:.1f}x",
                    value is not None and value >= bound,
                    _x(value),
                    f"{_num(hd)} vs {_num(rd)} deliveries/s",
                )
            )
        ratios = []
        for n in ns:
            ratios.append(
                (
                    n,
                    _ratio(
                        _get(_step(hub, n), "steady", "latency_ms", "p99"),
                        _get(_step(ref, n), "steady", "latency_ms", "p99"),
                    ),
                )
            )
        known = [r for _, r in ratios if r is not None]
        worst = max(known) if len(known) == len(ratios) else None
        rows.append(
            _row(
                "3",
                "fan-out latency p99 at the light fixed rate, hub / Node (worst N)",
                worst,
                "<= 2.0x",
                worst is not None and worst <= 2.0,
                _x(worst),
                ", ".join(f"N = {n}: {_x(r)}" for n, r in ratios),
            )
        )
    faults = delivery_faults(results)
    if faults is not None:
        bad = sum(
            faults[k]
            for k in ("lost", "doubled", "out_of_order", "unexpected_deliveries", "failed_messages")
        )
        rows.append(
            _row(
                "3",
                "deliveries lost / doubled / out of order (every 1:1 and fan-out phase of the hub)",
                float(bad),
                "0 (and every POST 2xx)",
                bad == 0,
                f"{faults['lost']} / {faults['doubled']} / {faults['out_of_order']}",
                f"{faults['phases']} phases; unexpected receipts {faults['unexpected_deliveries']}"
                f", POSTs not 2xx {faults['failed_messages']}, connections closed by the server "
                f"{faults['connections_lost']}",
            )
        )
    else:
        rows.append(_row("3", "deliveries lost / doubled / out of order", None, "0", None, ""))

    # 4. 1:1 latency and memory
    lat = _get(hub, "direct_latency", "latency_ms") or {}
    rlat = _get(ref, "direct_latency", "latency_ms") or {}
    rate = p.get("direct_rate", 0)
    for key, bound in (("p50", 3.0), ("p99", 10.0)):
        v = lat.get(key)
        rows.append(
            _row(
                "4",
                f"1:1 latency {key} at {rate:g} msg/s (POST to receipt)",
                None if v is None else float(v),
                f"<= {bound:g} ms",
                v is not None and float(v) <= bound,
                f"{_num(v, 2)} ms",
                f"Node socket.io {_num(rlat.get(key), 2)} ms",
            )
        )
    hm = _get(hub, "fanout", "per_idle_connection", "server")
    rm = _get(ref, "fanout", "per_idle_connection", "server")
    value = _ratio(hm, rm)
    rows.append(
        _row(
            "4",
            f"memory per idle connection, hub / Node, at N = {ns[-1] if ns else '?'}",
            value,
            "<= 1.0x",
            value is not None and value <= 1.0,
            _x(value),
            f"{_kib(hm)} vs {_kib(rm)} (server process)",
        )
    )

    # 5. XMPP
    x = results.get("xmpp", {})
    hs, ps = _get(x, "hub", "saturation") or {}, _get(x, "prosody", "saturation") or {}
    hx, px = hs.get("delivered_per_second"), ps.get("delivered_per_second")
    stored_all = bool(_get(x, "hub", "stored", "all_stored")) and bool(
        _get(x, "prosody", "stored", "all_stored")
    )
    value = _ratio(hx, px)
    rows.append(
        _row(
            "5",
            "XMPP messages/s at saturation, every message stored, hub / Prosody (mod_mam)",
            value,
            ">= 0.3x",
            value is not None and value >= 0.3 and stored_all,
            _x(value),
            f"{_num(hx)} vs {_num(px)} msg/s; "
            + _stored_note(_get(x, "hub", "stored"), _get(x, "prosody", "stored")),
        )
    )
    rest = _get(hub, "direct_saturation", "deliveries_per_second")
    value = _ratio(hx, rest)
    rows.append(
        _row(
            "5",
            f"XMPP messages/s at saturation / the hub's REST 1:1 rate ({senders} senders, "
            "empty history)",
            value,
            ">= 1.0x",
            value is not None and value >= 1.0,
            _x(value),
            f"{_num(hx)} vs {_num(rest)} msg/s",
        )
    )
    hl, pl = _get(x, "hub", "logins", "login_ms", "p50"), _get(x, "prosody", "logins", "login_ms")
    pl50 = _get(pl, "p50")
    value = _ratio(hl, pl50)
    rows.append(
        _row(
            "5",
            "XMPP one login p50, hub / Prosody",
            value,
            "<= 1.0x",
            value is not None and value <= 1.0,
            _x(value),
            f"{_num(hl)} vs {_num(pl50)} ms",
        )
    )
    return rows


def _stored_note(hub: Any, prosody: Any) -> str:
    def one(name: str, s: Any) -> str:
        if not s:
            return f"{name}: not counted"
        return f"{name} stored {s.get('stored', 0):,} of {s.get('sent', 0):,}"

    return one("hub", hub) + ", " + one("Prosody", prosody)


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):,.{digits}f}"


def _kib(value: Any) -> str:
    return "n/a" if value is None else f"{float(value) / 1024:,.1f} KiB"


def verdict(row: Row) -> str:
    if row.get("met") is None:
        return "n/a"
    return "met" if row["met"] else "not met"
