"""The XMPP part: the hub's Jabber endpoint and Prosody, driven by the same slixmpp generator
(``bench/xmpp_loadgen.py``), one after the other."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import prosody
from bench.dbceiling import stored
from bench.fixtures import ADMIN_LOGIN, ADMIN_PASSWORD, BENCH_PASSWORD, Api, _bounded
from bench.procs import REPO, BenchError, free_port, rss_bytes, start_hub, stop_process
from bench.profiles import Profile

Results = dict[str, Any]
Say = Callable[[str], None]

DOMAIN = "localhost"

# The hub's limits for this part: far above what the generator offers.
HUB_XMPP_ENV = {
    "PORTALHUB_XMPP_READ_BYTES_PER_SECOND": "100000000",
    "PORTALHUB_XMPP_READ_BURST_BYTES": "100000000",
    "PORTALHUB_XMPP_MAX_SESSIONS_PER_USER": "100",
    "PORTALHUB_DOMAIN": DOMAIN,
}
# Prosody's c2s limit (mod_limits), as high: it is on, so that its cost is paid, not binding.
PROSODY_LIMITS = '{ c2s = { rate = "100mb/s"; burst = "10s" } }'
# Prosody archives every message as the hub stores every message in its one history: mod_mam
# on its default storage (``internal``: one file per user, appended to), kept for ever, no
# per-user cap in reach (the default, 10,000 items, would make it drop or truncate).
PROSODY_ARCHIVE = {
    "default_archive_policy": "true",
    "archive_expires_after": '"never"',
    "storage_archive_item_limit": "1000000000",
}


def logins(profile: Profile) -> list[str]:
    return [f"xbench{i:03d}" for i in range(profile.xmpp_users)]


def command(profile: Profile, port: int, pids: dict[str, int]) -> Results:
    return {
        "host": "127.0.0.1",
        "port": port,
        "domain": DOMAIN,
        "users": logins(profile),
        "password": BENCH_PASSWORD,
        "pids": pids,
        "logins": profile.xmpp_logins,
        "login_parallel": profile.xmpp_login_parallel,
        "rate": profile.xmpp_rate,
        "latency_seconds": profile.xmpp_latency_seconds,
        "warmup": profile.warmup,
        "pairs": profile.xmpp_pairs,
        "saturation_seconds": profile.xmpp_saturation_seconds,
        "window": profile.xmpp_window,
    }


async def drive(cmd: Results, timeout: float = 600.0) -> Results:
    """One run of the generator, in a process of its own."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "ignore::DeprecationWarning",
        "-m",
        "bench.xmpp_loadgen",
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(json.dumps(cmd).encode()), timeout)
    except BaseException:
        await stop_process(process)
        raise
    if process.returncode != 0:
        raise BenchError(f"the XMPP load generator failed:\n{err.decode()[-2000:]}")
    result: Results = json.loads(out)
    return result


async def run_hub(
    profile: Profile,
    say: Say,
    repo: Path = REPO,
    during: Callable[[dict[str, int]], Any] | None = None,
) -> Results:
    """``repo``: the checkout whose ``server`` runs (``bench/xmpp_probe.py`` compares two);
    ``during``: an async context manager factory wrapped around the generator's run, given
    the hub's pids (the probe records py-spy profiles with it)."""
    data_dir = Path(tempfile.mkdtemp(prefix="portalhub-bench-xmpp-"))
    port = free_port()
    env = {**HUB_XMPP_ENV, "PORTALHUB_XMPP_PORT": str(port)}
    say(f"xmpp: starting the hub on {data_dir}, c2s port {port}")
    hub = await start_hub(data_dir, extra_env=env, repo=repo)
    try:
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            api = Api(session, hub.url)
            admin = await api.login(ADMIN_LOGIN, ADMIN_PASSWORD)

            def create(login: str) -> Callable[[], Any]:
                body = {"login": login, "email": f"{login}@bench.test", "password": BENCH_PASSWORD}
                return lambda: api.call("POST", "/users", body, admin.token)

            await _bounded(4, [create(login) for login in logins(profile)])
        say(f"xmpp: {profile.xmpp_users} hub users in {time.monotonic() - started:.1f}s")
        say("xmpp: the generator against the hub")
        pids = {"server": hub.pid, "db": hub.db_pid}
        before = (await asyncio.to_thread(stored, hub.db_url))["messages"]
        if during is None:
            result = await drive(command(profile, port, pids))
        else:
            async with during(pids):
                result = await drive(command(profile, port, pids))
        result["rss_end"] = {role: rss_bytes(pid) for role, pid in pids.items()}
        after = (await asyncio.to_thread(stored, hub.db_url))["messages"]
        result["stored"] = stored_summary(result, after - before, "messages in the history")
        say(f"xmpp: the hub stored {after - before:,} messages of {sent(result):,} sent")
        return result
    finally:
        await hub.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# What the benchmark's Prosody loads: what the generator's clients use, and the archive.
BENCH_MODULES = ("roster", "saslauth", "tls", "disco", "ping", "limits", "mam")


def prosody_config(root: Path, port: int) -> str:
    return prosody.prosody_config(
        root,
        port,
        DOMAIN,
        BENCH_MODULES,
        disabled=("s2s", "offline"),
        options={**PROSODY_ARCHIVE, "limits": PROSODY_LIMITS},
    )


def prosody_version() -> str:
    return prosody.version()


def prepare_prosody(profile: Profile, root: Path, port: int) -> Path:
    """Certificate, configuration and users of a Prosody in ``root``; its config file."""
    accounts = dict.fromkeys(logins(profile), BENCH_PASSWORD)
    return prosody.prepare(root, prosody_config(root, port), DOMAIN, accounts)


def sent(result: Results) -> int:
    return sum(int(result.get(k, {}).get("sent", 0)) for k in ("latency", "saturation"))


def stored_summary(result: Results, count: int, what: str) -> Results:
    total = sent(result)
    return {"sent": total, "stored": count, "what": what, "all_stored": count >= total > 0}


def archived(root: Path) -> int:
    """Items in the users' message archives (``<data_path>/<host>/archive/<user>.list``)."""
    items = 0
    for path in (root / "data").glob("*/archive/*.list"):
        with path.open("rb") as archive:
            items += sum(1 for line in archive if line.startswith(b"item("))
    return items


async def run_prosody(profile: Profile, say: Say) -> Results:
    root = Path(tempfile.mkdtemp(prefix="portalhub-bench-prosody-"))
    port = free_port()
    process: asyncio.subprocess.Process | None = None
    try:
        started = time.monotonic()
        config = await asyncio.to_thread(prepare_prosody, profile, root, port)
        say(f"xmpp: {profile.xmpp_users} Prosody users in {time.monotonic() - started:.1f}s")
        process = await prosody.start(root, config, port)
        say(f"xmpp: Prosody pid {process.pid} on port {port}; the generator against it")
        result = await drive(command(profile, port, {"server": process.pid}))
        result["rss_end"] = {"server": rss_bytes(process.pid)}
        items = archived(root)
        # mod_mam archives each message twice: in the sender's and in the receiver's archive
        result["stored"] = stored_summary(
            result, items // 2, "messages archived (mod_mam, internal storage)"
        )
        result["stored"]["archive_items"] = items
        say(f"xmpp: Prosody archived {items:,} items for {sent(result):,} messages sent")
        return result
    finally:
        if process is not None:
            await stop_process(process)
        shutil.rmtree(root, ignore_errors=True)


async def run(profile: Profile, say: Say) -> Results:
    return {
        "hub": await run_hub(profile, say),
        "prosody": await run_prosody(profile, say),
        "prosody_version": prosody_version(),
        "prosody_limits": PROSODY_LIMITS,
        "prosody_archive": PROSODY_ARCHIVE,
        "hub_env": HUB_XMPP_ENV,
    }
