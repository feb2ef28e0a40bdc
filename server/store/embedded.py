"""The embedded database: SecantusDB's ``secantusd-py`` run as a child process.

SecantusDB is GPL-2.0, so it is only ever run as a separate program and spoken to over the
MongoDB wire protocol; nothing of it is imported here.

One process owns a data directory at a time: it holds an exclusive ``flock`` on ``.lock``
and writes its address to ``endpoint.json``, so that the CLI can use the database of a
running server instead of opening the same files twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import IO

from pymongo import AsyncMongoClient

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
ENDPOINT_FILE = "endpoint.json"
LOG_FILE = "secantusd.log"
_PR_SET_PDEATHSIG = 1


class EmbeddedDatabaseError(RuntimeError):
    """The embedded database could not be started or reached."""


def find_executable() -> str:
    """``secantusd-py`` from the same environment as this interpreter, else from PATH."""
    beside = Path(sys.executable).parent / "secantusd-py"
    if beside.exists():
        return str(beside)
    import shutil

    found = shutil.which("secantusd-py")
    if found is None:
        raise EmbeddedDatabaseError(
            "secantusd-py not found: install the 'secantusdb' package or set PORTALHUB_MONGODB_URL"
        )
    return found


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # Ctrl-C goes to the foreground process group; the parent stops the database itself,
    # after its own clients have closed.
    os.setsid()


def mongodb_url(host: str, port: int) -> str:
    # No retryable writes on the embedded server: SecantusDB (0.7) keeps every retryable write
    # for 30 minutes and scans them all on each write, which made writes 10x slower within
    # seconds under load (measured by the benchmark). A single local node has no failover to
    # retry across anyway.
    return f"mongodb://{host}:{port}/?directConnection=true&retryWrites=false"


def running_endpoint(db_dir: Path) -> str | None:
    """The URL of an embedded database another process runs on ``db_dir``, if any."""
    lock_path = db_dir / LOCK_FILE
    if not lock_path.exists():
        return None
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(lock, fcntl.LOCK_UN)
            return None
    try:
        endpoint = json.loads((db_dir / ENDPOINT_FILE).read_text())
        return mongodb_url(str(endpoint["host"]), int(endpoint["port"]))
    except (OSError, ValueError, KeyError) as exc:
        raise EmbeddedDatabaseError(
            f"{db_dir} is locked by another process but has no readable {ENDPOINT_FILE}"
        ) from exc


async def wait_until_ready(
    url: str, timeout: float, process: asyncio.subprocess.Process | None
) -> None:
    deadline = time.monotonic() + timeout
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        url, serverSelectionTimeoutMS=500, connectTimeoutMS=500
    )
    try:
        while True:
            if process is not None and process.returncode is not None:
                raise EmbeddedDatabaseError(f"secantusd-py exited with {process.returncode}")
            try:
                await client.admin.command("ping")
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise EmbeddedDatabaseError(f"no answer to ping from {url}: {exc}") from exc
                await asyncio.sleep(0.1)
    finally:
        await client.close()


class EmbeddedDatabase:
    """Starts, owns and stops one ``secantusd-py`` on a free loopback port."""

    def __init__(
        self, db_dir: Path, *, storage: str | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.db_dir = db_dir
        self._storage = storage
        self._extra_args = extra_args
        self._process: asyncio.subprocess.Process | None = None
        self._lock: IO[str] | None = None
        self._log: IO[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self, timeout: float = 60.0) -> str:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.db_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EmbeddedDatabaseError(
                f"the embedded database in {self.db_dir} is already run by another process"
            ) from None
        self._lock = lock
        port = free_loopback_port()
        storage = self._storage or str(self.db_dir / "data")
        self._log = open(self.db_dir / LOG_FILE, "ab")  # noqa: SIM115 - child's stdout
        self._process = await asyncio.create_subprocess_exec(
            find_executable(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            storage,
            "--log-level",
            "WARNING",
            *self._extra_args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent,
        )
        self.url = mongodb_url("127.0.0.1", port)
        try:
            await wait_until_ready(self.url, timeout, self._process)
        except BaseException:
            await self.stop()
            raise
        (self.db_dir / ENDPOINT_FILE).write_text(
            json.dumps({"host": "127.0.0.1", "port": port, "pid": self._process.pid})
        )
        log.info("embedded database (pid %s) listening on 127.0.0.1:%s", self.pid, port)
        return self.url

    async def stop(self, timeout: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("embedded database did not stop in %ss; killing it", timeout)
                process.kill()
                await process.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.db_dir / ENDPOINT_FILE).unlink()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._log is not None:
            self._log.close()
            self._log = None
