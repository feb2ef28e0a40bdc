"""The benchmark's own rules: the history's chat plan and issue 14's verdicts."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from bench.history import chats_per_user, plan_chats
from bench.profiles import QUICK
from bench.runner import Run, Target
from bench.verdict import done_when, verdict


def test_plan_has_the_asked_chats_with_the_given_dialogs_first() -> None:
    first = [(2 * k, 2 * k + 1) for k in range(8)]
    plan = plan_chats(100, 1000, 200, 10, first)
    assert len(plan) == 1000
    dialogs = [c for c in plan if c.kind == "dialog"]
    groups = [c for c in plan if c.kind == "group"]
    assert len(dialogs) == 800 and len(groups) == 200
    assert [c.members for c in plan[:8]] == first
    pairs = {frozenset(c.members) for c in dialogs}
    assert len(pairs) == 800  # no dialog twice
    assert all(len(set(g.members)) == 10 for g in groups)
    spread = chats_per_user(plan, 100)
    assert spread["min"] >= 20  # everybody has many chats to count at connect
    assert plan == plan_chats(100, 1000, 200, 10, first)  # the same every run


def test_plan_refuses_what_the_users_cannot_have() -> None:
    with pytest.raises(ValueError):
        plan_chats(4, 10, 0, 2)  # 4 users have 6 dialogs at most
    with pytest.raises(ValueError):
        plan_chats(10, 5, 1, 20)  # a group larger than the company
    with pytest.raises(ValueError):
        plan_chats(10, 3, 2, 3, [(0, 1), (2, 3)])  # the given dialogs do not fit


def _side(connect: float, sat: dict[int, float], p99: dict[int, float], memory: float) -> Any:
    return {
        "direct_latency": {
            "latency_ms": {"p50": 2.0, "p99": 8.0},
            "lost": 0,
            "doubled": 0,
            "out_of_order": 0,
        },
        "fanout": {
            "connect_total": {"target": 1000, "per_second": connect, "connected": 1000},
            "per_idle_connection": {"server": memory},
            "steps": [
                {
                    "n": n,
                    "steady": {"latency_ms": {"p99": p99[n]}, "lost": 0, "doubled": 0},
                    "saturation": {"deliveries_per_second": sat[n], "lost": 0, "doubled": 0},
                }
                for n in sat
            ],
        },
    }


def _results() -> dict[str, Any]:
    hub = _side(1000.0, {100: 60_000.0, 1000: 80_000.0}, {100: 6.0, 1000: 60.0}, 20_000.0)
    hub["direct_saturation"] = {"deliveries_per_second": 700.0}
    hub["direct_saturation_history"] = {"deliveries_per_second": 690.0}
    hub["connect_history"] = {"total": {"per_second": 950.0, "connected": 1000}}
    ref = _side(1800.0, {100: 100_000.0, 1000: 76_000.0}, {100: 4.0, 1000: 33.0}, 26_000.0)
    stored = {"sent": 100, "stored": 100, "all_stored": True}
    return {
        "meta": {"profile": {"senders": 8, "fanout_ns": [100, 1000], "direct_rate": 20.0}},
        "hub": hub,
        "reference": ref,
        "db_ceiling": {"concurrent": {"ops_per_second": 800.0}},
        "db_ceiling_history": {"concurrent": {"ops_per_second": 800.0}},
        "history": {
            "seed": {"posted": 100_000, "target_messages": 100_000, "complete": True},
            "chats": {"total": 1000},
        },
        "xmpp": {
            "hub": {
                "saturation": {"delivered_per_second": 3000.0},
                "logins": {"login_ms": {"p50": 300.0}},
                "stored": stored,
            },
            "prosody": {
                "saturation": {"delivered_per_second": 9000.0},
                "logins": {"login_ms": {"p50": 350.0}},
                "stored": stored,
            },
        },
    }


def _verdicts(results: dict[str, Any]) -> list[str]:
    return [verdict(row) for row in done_when(results)]


def test_every_item_met_when_every_figure_is_within_its_target() -> None:
    rows = done_when(_results())
    assert [r["item"] for r in rows] == ["1", "1", "2", "2", "3", "3", "3", "3"] + ["4"] * 3 + [
        "5"
    ] * 3
    assert set(_verdicts(_results())) == {"met"}, rows


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("hub", "fanout", "connect_total", "per_second"), 800.0),  # 0.44x Node
        (("hub", "connect_history", "total", "per_second"), 850.0),  # 0.85x of empty
        (("hub", "direct_saturation_history", "deliveries_per_second"), 600.0),  # 0.75x
        (("hub", "direct_latency", "latency_ms", "p99"), 10.5),
        (("xmpp", "hub", "logins", "login_ms", "p50"), 400.0),
        (("xmpp", "hub", "stored", "all_stored"), False),
        (("history", "seed", "complete"), False),
    ],
)
def test_a_figure_past_its_target_is_not_met(path: tuple[str, ...], value: Any) -> None:
    results = copy.deepcopy(_results())
    node = results
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert "not met" in _verdicts(results)


def test_a_doubled_or_reordered_delivery_is_not_met() -> None:
    for fault in ("doubled", "out_of_order", "lost", "failed_messages"):
        results = copy.deepcopy(_results())
        results["hub"]["fanout"]["steps"][1]["saturation"][fault] = 1
        rows = [r for r in done_when(results) if "doubled" in r["what"]]
        assert [verdict(r) for r in rows] == ["not met"], fault


def test_a_part_not_run_is_not_applicable_not_met() -> None:
    results = _results()
    del results["xmpp"]
    marks = _verdicts(results)
    assert marks[-3:] == ["n/a", "n/a", "n/a"]
    assert "not met" not in marks


class _Connects:
    """The load generator's ``connect``, answered at once, each call noted."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.total = 0

    async def connect(self, _url: str, _auths: Any, count: int, **_options: Any) -> Any:
        self.events.append("connect")
        self.total += count
        return {"connected": count, "total": self.total, "seconds": 0.01, "failures": {}}


async def test_a_connect_series_reads_the_history_size_once_not_before_each_step() -> None:
    """The count scans the stored messages and events (seconds at a full history): read
    before each step, it spread the with-history series' steps out further than the empty
    history's, past the hub's cache time to live (docs/benchmarks.md, h14-hist6)."""
    events: list[str] = []

    async def stored() -> dict[str, int]:
        events.append("stored")
        return {"messages": 7, "events": 9}

    target = Target("hub", "http://127.0.0.1:1", {}, [], [], {}, stored=stored)
    run = Run(replace(QUICK, settle=0.0), lambda _text: None)
    series = await run.connect_series(target, _Connects(events), "with history")  # type: ignore[arg-type]
    steps = series["steps"]
    assert len(steps) == len(QUICK.fanout_ns) > 1
    assert events == ["stored"] + ["connect"] * len(steps)
    assert all(s["connect"]["stored_before"] == {"messages": 7, "events": 9} for s in steps)
