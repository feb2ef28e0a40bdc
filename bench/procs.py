"""Processes under test: start and stop them, read their memory and CPU time from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from unittest import mock
from urllib.parse import quote

from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = Path(__file__).resolve().parent / "node"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """The benchmark could not set up or run a measurement."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` now (VmRSS)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid`` (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


@dataclass
class CpuPhase:
    """CPU use during one phase, in percent of one core (200 = both cores of this machine)."""

    name: str
    seconds: float = 0.0
    percent: dict[str, float] = field(default_factory=dict)


class CpuMeter:
    """Measures the CPU used by the named processes, and by everything else, per phase."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {"bench": os.getpid()}
        self.phases: list[CpuPhase] = []

    def _sample(self) -> tuple[float, dict[str, int], tuple[int, int]]:
        ticks: dict[str, int] = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                ticks[name] = cpu_ticks(pid)
        return time.monotonic(), ticks, machine_ticks()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[CpuPhase]:
        result = CpuPhase(name)
        wall0, ticks0, (busy0, _) = self._sample()
        try:
            yield result
        finally:
            wall1, ticks1, (busy1, _) = self._sample()
            seconds = max(wall1 - wall0, 1e-6)
            ours = 0
            for process, end in ticks1.items():
                if process in ticks0:
                    used = end - ticks0[process]
                    ours += used
                    result.percent[process] = 100.0 * used / CLOCK_TICKS / seconds
            result.percent["other"] = max(
                0.0, 100.0 * (busy1 - busy0 - ours) / CLOCK_TICKS / seconds
            )
            result.seconds = seconds
            self.phases.append(result)


def clean_env(overrides: dict[str, str]) -> dict[str, str]:
    """This environment without any PORTALHUB_* setting of the caller's, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTALHUB_")}
    env.update(overrides)
    return env


def ensure_node_modules(log: IO[str]) -> None:
    """Install the Node pieces (socket.io, socket.io-client) from the lock file if missing."""
    if (NODE_DIR / "node_modules" / "socket.io-client").is_dir() and (
        NODE_DIR / "node_modules" / "socket.io"
    ).is_dir():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise BenchError("the benchmark needs Node.js 20+ and npm on PATH")
    print("bench: installing bench/node dependencies (npm ci)", file=log, flush=True)
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        check=True,
        timeout=600,
    )


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        return "?"
    return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


@dataclass
class Hub:
    """A ``portalhub serve --demo`` of its own, on a fresh data directory."""

    process: asyncio.subprocess.Process
    data_dir: Path
    port: int
    db_pid: int
    db_port: int
    db_url: str  # with the password of the hub's own database, to read its state
    log_file: IO[bytes]
    # only with ``db_options``: the database the benchmark started for the hub itself
    db_process: asyncio.subprocess.Process | None = None
    env: dict[str, str] = field(default_factory=dict)  # the environment it was started with

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def settings(self) -> Settings:
        """The hub's settings, read as the hub read them: from the environment it was
        started with (``python -m server serve`` builds ``Settings()`` from it)."""
        with mock.patch.dict(os.environ, self.env, clear=True):
            return Settings()

    async def stop(self) -> None:
        await stop_process(self.process)
        if self.db_process is not None:
            await stop_process(self.db_process)
        self.log_file.close()


HUB_LIMITS = {
    # Rate limits far above what the load generator offers: the benchmark measures capacity.
    "PORTALHUB_IM_MESSAGES_PER_SECOND": "1000000",
    "PORTALHUB_IM_MESSAGE_BURST": "1000000",
    "PORTALHUB_SOCKET_EVENTS_PER_SECOND": "100000",
    "PORTALHUB_SOCKET_EVENT_BURST": "100000",
    # Every benchmark client comes from loopback, many of them as the same user.
    "PORTALHUB_HTTP_MAX_CONNECTIONS_PER_ADDRESS": "0",
    "PORTALHUB_SOCKET_MAX_CONNECTIONS_PER_USER": "1000000",
    # Idle benchmark connections send no presence heartbeats; the sweeper must not drop them.
    "PORTALHUB_PRESENCE_HEARTBEAT_TIMEOUT_SECONDS": "3600",
    "PORTALHUB_LOG_LEVEL": "WARNING",
    # Jabber listeners on free ports, so that a hub already running here is no obstacle.
    "PORTALHUB_XMPP_PORT": "0",
    "PORTALHUB_XMPP_TLS_PORT": "0",
    "PORTALHUB_SMTP_PORT": "0",  # the CRM mail listener, likewise
}


async def _start_database(
    data_dir: Path, log_file: IO[bytes], timeout: float
) -> tuple[asyncio.subprocess.Process, int]:
    """``secantusd-py`` started as the hub's embedded.py would, for a URL with our options."""
    port = free_port()
    (data_dir / "db-bench").mkdir(exist_ok=True)
    executable = Path(sys.executable).parent / "secantusd-py"
    process = await asyncio.create_subprocess_exec(
        str(executable) if executable.exists() else "secantusd-py",
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--storage-path", str(data_dir / "db-bench"), "--log-level", "WARNING"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if process.returncode is not None or time.monotonic() > deadline:
                await stop_process(process)
                raise BenchError("secantusd-py did not start") from None
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return process, port


async def start_hub(
    data_dir: Path,
    db_options: str = "",
    timeout: float = 180.0,
    extra_env: dict[str, str] | None = None,
    repo: Path = REPO,
) -> Hub:
    """The hub with its embedded database; with ``db_options`` (e.g. ``retryWrites=false``)
    the database is started here and the hub reaches it through PORTALHUB_MONGODB_URL with
    those options, to measure the effect of a client setting without changing the server.
    ``repo``: the checkout whose ``server`` runs (``bench/probe.py`` compares two)."""
    port = free_port()
    log_path = data_dir / "hub.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - the hub's output, closed by Hub.stop()
    overrides = {
        **HUB_LIMITS,
        "PORTALHUB_DATA_DIR": str(data_dir),
        "PORTALHUB_HTTP_PORT": str(port),
        "PORTALHUB_HOST": "127.0.0.1",
        **(extra_env or {}),
    }
    db_process: asyncio.subprocess.Process | None = None
    if db_options:
        db_process, db_port = await _start_database(data_dir, log_file, timeout)
        overrides["PORTALHUB_MONGODB_URL"] = (
            f"mongodb://127.0.0.1:{db_port}/?directConnection=true&{db_options}"
        )
    env = clean_env(overrides)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        "--demo",
        cwd=repo,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    endpoint = data_dir / "db" / "endpoint.json"
    try:
        while b"Portal Hub is running" not in log_path.read_bytes():
            if process.returncode is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"the hub did not start (exit {process.returncode}):\n{tail}")
            await asyncio.sleep(0.2)
        if db_process is None:
            info = json.loads(endpoint.read_text())
            db_pid, db_port = int(info["pid"]), int(info["port"])
            credentials = json.loads((data_dir / "db" / "credentials.json").read_text())
            user, password = (quote(credentials[k], safe="") for k in ("username", "password"))
            # journaled as the hub's own writes are (server/store/embedded.py)
            db_url = (
                f"mongodb://{user}:{password}@127.0.0.1:{db_port}/"
                "?directConnection=true&authSource=admin&journal=true"
            )
        else:
            db_pid = db_process.pid
            db_url = f"mongodb://127.0.0.1:{db_port}/?directConnection=true"
    except BaseException:
        await stop_process(process)
        if db_process is not None:
            await stop_process(db_process)
        log_file.close()
        raise
    return Hub(process, data_dir, port, db_pid, db_port, db_url, log_file, db_process, env)


@dataclass
class Reference:
    """The Node socket.io reference server (``bench/node/reference-server.js``)."""

    process: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self) -> None:
        await stop_process(self.process)


async def start_reference(timeout: float = 30.0) -> Reference:
    node = shutil.which("node") or "node"
    process = await asyncio.create_subprocess_exec(
        node,
        "--expose-gc",
        str(NODE_DIR / "reference-server.js"),
        "0",
        cwd=NODE_DIR,
        stdin=asyncio.subprocess.PIPE,  # it exits when this closes, whatever happens to us
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout)
        port = int(json.loads(line)["port"])
    except BaseException:
        await stop_process(process)
        raise
    return Reference(process, port)
