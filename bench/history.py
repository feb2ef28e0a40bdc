"""A company's chat history, made through the hub's own REST API as fast as the hub takes it.

The benchmark measures connection set-up and 1:1 throughput on an empty history first, then
gives the bench users a history and measures them again. The history is ``history_chats``
chats among the users (``history_groups`` group chats, the rest private dialogs, the 1:1
senders' dialogs among them) with ``history_messages`` messages spread evenly over them,
each written by a member of its chat in turn, so that every user has unread messages in
every chat. Nothing goes into the database by a side door: chats are opened with
``POST /api/v1/im/dialogs`` and ``POST /api/v1/im/chats``, messages are sent with
``POST /api/v1/im/messages`` by the load generator (``seed`` command), ``history_parallel``
requests in flight, in rounds of ``history_round_seconds`` so that the progress and the rate
can be reported as the history grows.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.fixtures import Api, Fixtures, _bounded
from bench.loadgen import LoadGen
from bench.procs import BenchError
from bench.profiles import Profile

Results = dict[str, Any]
Say = Callable[[str], None]


@dataclass(frozen=True)
class ChatPlan:
    kind: str  # "dialog" or "group"
    members: tuple[int, ...]  # indexes into the users; the first opens (owns) the chat


def plan_chats(
    users: int,
    chats: int,
    groups: int,
    group_size: int,
    first_dialogs: Sequence[tuple[int, int]] = (),
) -> list[ChatPlan]:
    """``chats`` chats among ``users`` users: ``first_dialogs``, then more dialogs between
    users ever further apart (each user in about as many as any other), then ``groups``
    group chats of ``group_size`` members chosen at random (the same choice every run)."""
    dialogs = chats - groups
    if groups < 0 or dialogs < len(first_dialogs):
        raise ValueError(f"{chats} chats, {groups} of them groups, leave too few dialogs")
    if groups and not 2 <= group_size <= users:
        raise ValueError(f"a group of {group_size} among {users} users")
    if dialogs > users * (users - 1) // 2:
        raise ValueError(f"{users} users have at most {users * (users - 1) // 2} dialogs")
    plan: list[ChatPlan] = []
    seen: set[tuple[int, int]] = set()

    def add(a: int, b: int) -> None:
        key = (min(a, b), max(a, b))
        if a != b and key not in seen and len(plan) < dialogs:
            seen.add(key)
            plan.append(ChatPlan("dialog", (a, b)))

    for a, b in first_dialogs:
        add(a, b)
    distance = 1
    while len(plan) < dialogs:
        for a in range(users):
            add(a, (a + distance) % users)
        distance += 1
    for j in range(groups):
        members = random.Random(j).sample(range(users), group_size)
        plan.append(ChatPlan("group", tuple(members)))
    return plan


def chats_per_user(plan: Sequence[ChatPlan], users: int) -> dict[str, float]:
    counts = [0] * users
    for chat in plan:
        for member in chat.members:
            counts[member] += 1
    return {"min": min(counts), "mean": sum(counts) / users, "max": max(counts)}


async def create_chats(
    base_url: str, fx: Fixtures, plan: Sequence[ChatPlan], parallel: int = 8
) -> list[dict[str, Any]]:
    """The planned chats, opened through the API by their first member; for each, its id
    and its members' tokens (for the ``seed`` command)."""
    users = fx.users
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = Api(session, base_url)

        def job(k: int, chat: ChatPlan) -> Callable[[], Awaitable[dict[str, Any]]]:
            owner = users[chat.members[0]]
            if chat.kind == "dialog":
                body: dict[str, Any] = {"user_id": users[chat.members[1]].id}
                return lambda: api.call("POST", "/im/dialogs", body, owner.token)
            body = {
                "title": f"history {k}",
                "member_ids": [users[m].id for m in chat.members[1:]],
            }
            return lambda: api.call("POST", "/im/chats", body, owner.token)

        made = await _bounded(parallel, [job(k, chat) for k, chat in enumerate(plan)])
    return [
        {"chat_id": str(doc["id"]), "tokens": [users[m].token for m in chat.members]}
        for doc, chat in zip(made, plan, strict=True)
    ]


async def seed(
    loadgen: LoadGen,
    base_url: str,
    chats: list[dict[str, Any]],
    profile: Profile,
    say: Say,
    stored: Callable[[], Awaitable[dict[str, int]]],
) -> Results:
    """``history_messages`` messages into ``chats`` through ``POST /api/v1/im/messages``,
    in rounds; stops early (and says so) after ``history_max_seconds``."""
    p = profile
    url = base_url.rstrip("/") + "/api/v1/im/messages"
    total = p.history_messages
    started = time.monotonic()
    rounds: list[Results] = []
    posted = failed = done = 0
    status: dict[str, int] = {}
    problem = ""
    while done < total:
        left = p.history_max_seconds - (time.monotonic() - started)
        if left <= 0:
            break
        before = await stored()
        reply = await loadgen.call(
            {
                "cmd": "seed",
                "url": url,
                "chats": chats,
                "start": done,
                "count": total - done,
                "parallel": p.history_parallel,
                "max_seconds": min(p.history_round_seconds, left),
            },
            timeout=min(p.history_round_seconds, left) + 180,
        )
        done = int(reply["next"])
        posted += int(reply["posted"])
        failed += int(reply["failed"])
        for key, n in reply.get("http_status", {}).items():
            status[key] = status.get(key, 0) + int(n)
        rounds.append(
            {
                "stored_before": before,
                "posted": reply["posted"],
                "failed": reply["failed"],
                "seconds": reply["seconds"],
                "per_second": reply["per_second"],
                "http_ms": reply["http_ms"],
            }
        )
        elapsed = time.monotonic() - started
        rate = float(reply["per_second"])
        eta = (total - done) / rate if rate > 0 else float("inf")
        say(
            f"history: {done:,} / {total:,} messages sent ({failed:,} failed), "
            f"{rate:,.0f} msg/s in the last {reply['seconds']:.0f} s, "
            f"{posted / elapsed:,.0f} msg/s so far"
            + (f", about {eta / 60:.1f} min left" if done < total else "")
        )
        if failed > max(100, total // 100):
            problem = f"{failed:,} messages refused (statuses {status}); seeding stopped"
            say(f"history: {problem}")
            break
    seconds = time.monotonic() - started
    complete = done >= total
    if not complete:
        say(
            f"history: stopped after {seconds:.0f} s (history_max_seconds) with {posted:,} of "
            f"{total:,} messages; the history phases measure that history instead"
        )
    return {
        "target_messages": total,
        "posted": posted,
        "failed": failed,
        "complete": complete,
        "seconds": seconds,
        "per_second": posted / seconds if seconds > 0 else 0.0,
        "parallel": p.history_parallel,
        "http_status": status,
        "rounds": rounds,
        "problem": problem,
    }


def estimate(profile: Profile, rate: float | None) -> str:
    """A line saying how long seeding will take at ``rate`` msg/s."""
    p = profile
    cap = f"at most {p.history_max_seconds / 60:.0f} min (history_max_seconds)"
    if not rate:
        return f"history: {p.history_messages:,} messages in {p.history_chats:,} chats, {cap}"
    minutes = p.history_messages / rate / 60
    return (
        f"history: {p.history_messages:,} messages in {p.history_chats:,} chats; at the "
        f"empty-history 1:1 rate of {rate:,.0f} msg/s that is about {minutes:.1f} min, {cap}"
    )


async def make(
    loadgen: LoadGen,
    base_url: str,
    fx: Fixtures,
    profile: Profile,
    say: Say,
    stored: Callable[[], Awaitable[dict[str, int]]],
) -> Results:
    """Chats, then messages: the whole history, with what it took."""
    p = profile
    users = len(fx.users)
    index = {u.id: k for k, u in enumerate(fx.users)}
    first = [(index[d.sender.id], index[d.receiver.id]) for d in fx.dialogs]
    try:
        plan = plan_chats(users, p.history_chats, p.history_groups, p.history_group_size, first)
    except ValueError as exc:
        raise BenchError(f"history: {exc}") from None
    started = time.monotonic()
    chats = await create_chats(base_url, fx, plan)
    chat_seconds = time.monotonic() - started
    per_user = chats_per_user(plan, users)
    say(
        f"history: {len(chats):,} chats opened in {chat_seconds:.1f} s "
        f"({sum(c.kind == 'group' for c in plan)} groups); each user is in "
        f"{per_user['min']:.0f}-{per_user['max']:.0f} of them"
    )
    seeded = await seed(loadgen, base_url, chats, p, say, stored)
    await asyncio.sleep(p.settle)
    return {
        "chats": {
            "total": len(chats),
            "groups": sum(c.kind == "group" for c in plan),
            "dialogs": sum(c.kind == "dialog" for c in plan),
            "group_size": p.history_group_size,
            "per_user": per_user,
            "seconds": chat_seconds,
        },
        "seed": seeded,
        "stored_after": await stored(),
    }
