"""The embedded database: SecantusDB's ``secantusd-py`` run as a supervised child process.

SecantusDB is GPL-2.0, so it is only ever run as a separate program and spoken to over the
MongoDB wire protocol; nothing of it is imported here.

**Ownership.** One hub owns a data directory at a time: it holds an exclusive ``flock`` on
``.lock`` (which names its pid) and writes the database's address to ``endpoint.json``, so
that the CLI uses the database of a running hub instead of opening the same files twice. The
child inherits the locked descriptor, so the lock is free only once both are gone: a hub
started right after another one died waits for the old database process (which gets SIGTERM
when its parent dies) to finish writing and release its files, instead of failing on
WiredTiger's lock.

**Access.** Only the hub's own user can reach the data: the directory is 0700, its files 0600
(the child runs with umask 077), and the server requires a password (``--auth``), created at
the first start without ever listening unauthenticated (see ``credentials.py``).

**Supervision.** When the child exits, or WiredTiger panics (it then answers every command
with an error while ``ping`` still works: a failed log write on a full disk does this), the
hub restarts it on the same port, so that the one client every service shares reconnects by
itself. Restarts back off (at once after a long run, then 1, 2, 4 ... 30 s), wait for disk
space above the reserve first (WiredTiger's recovery needs room), and are reported by
``/healthz`` and ``/readyz``. Writes are journaled (``journal=true``: every write's commit
is flushed to WiredTiger's log before it is acknowledged), so a killed database loses nothing
the hub has acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from server.background import stop as stop_tasks
from server.store.credentials import (
    Credentials,
    EmbeddedDatabaseError,
    new_credentials,
    provisioning_tls,
    read_credentials,
    save_credentials,
)
from server.store.files import (
    PRIVATE_UMASK,
    open_private,
    private_dir,
    tighten_tree,
    write_private,
)
from server.store.space import DiskSpace

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
ENDPOINT_FILE = "endpoint.json"
LOG_FILE = "secantusd.log"
CONFIG_FILE = "secantusd.toml"
HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
AUTHENTICATION_FAILED = 18
USER_ALREADY_EXISTS = 51003

TAIL_BYTES = 16 * 1024  # of the child's output, kept for error messages
TAIL_LINES = 15
PANIC_MARK = b"WT_PANIC"

STABLE_SECONDS = 30.0  # a child that ran this long is restarted at once when it dies
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
PREVIOUS_RUN_WAIT_SECONDS = 30.0  # for a dead hub's database process to release the files
# A dead hub's database process still running after this long is killed: its shutdown hangs
# (a SIGTERM taken by one of its threads while the main thread waits in a lock is never
# acted on), and it would hold the data directory for ever. The writes are journaled, so
# killing it loses nothing acknowledged.
PREVIOUS_RUN_KILL_SECONDS = 10.0
STOP_SECONDS = 20.0
# The run that sets the password is stopped within this long, then killed: its shutdown can
# hang as above, and the hub's start would wait the whole start timeout for it. Killing it
# costs nothing: the first run with the password checks it, and sets it again if it was lost.
PROVISION_STOP_SECONDS = 5.0

__all__ = ["EmbeddedDatabase", "EmbeddedDatabaseError", "running_endpoint"]


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
        sock.bind((HOST, 0))
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


def embedded_url(host: str, port: int) -> str:
    """The URL the hub and the CLI use for the embedded database: every write journaled
    (``j: true``). SecantusDB acknowledges a plain write before its log record is written;
    a killed database process then lost acknowledged writes (26 of 500 in a measurement)."""
    return mongodb_url(host, port) + "&journal=true"


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        pass
    except OSError:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(db_dir: Path) -> int | None:
    """The pid of the process that took the lock last (it writes it into the lock file)."""
    try:
        return int((db_dir / LOCK_FILE).read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def _left_database_pid(db_dir: Path) -> int | None:
    """The database process an ended hub started on ``db_dir``, if it still runs: the pid its
    ``endpoint.json`` names, checked against that process's command line (a pid reused by
    anything else is left alone)."""
    try:
        pid = int(json.loads((db_dir / ENDPOINT_FILE).read_text())["pid"])
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    data = str(db_dir / "data").encode()
    serves_it = any(
        flag == b"--storage-path" and value == data for flag, value in itertools.pairwise(args)
    )
    return pid if serves_it and _pid_alive(pid) else None


def running_endpoint(db_dir: Path) -> str | None:
    """The URL of an embedded database another process runs on ``db_dir``, if any. Its
    password is in the data directory (``credentials.json``), readable by its owner only."""
    lock_path = db_dir / LOCK_FILE
    if not lock_path.exists():
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise EmbeddedDatabaseError(
            f"cannot open {lock_path}: run this as the user that owns the hub's data directory"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
    owner = _lock_owner(db_dir)
    if owner is not None and not _pid_alive(owner):
        raise EmbeddedDatabaseError(
            f"the database of a hub that ended (pid {owner}) is still shutting down in "
            f"{db_dir}; try again in a moment"
        )
    try:
        endpoint = json.loads((db_dir / ENDPOINT_FILE).read_text())
        return embedded_url(str(endpoint["host"]), int(endpoint["port"]))
    except (OSError, ValueError, KeyError) as exc:
        raise EmbeddedDatabaseError(
            f"{db_dir} is locked by another process but has no readable {ENDPOINT_FILE} "
            "(is a hub still starting?)"
        ) from exc


class CredentialsRejected(EmbeddedDatabaseError):
    """The database refused the stored password."""


class ChildOutput:
    """The child's stdout and stderr: appended to ``secantusd.log``, the last lines kept in
    memory (for error messages even when the log cannot be written, on a full disk), and
    watched for WiredTiger's panic."""

    def __init__(self, stream: asyncio.StreamReader, log_path: Path) -> None:
        self._stream = stream
        self._log_path = log_path
        self._tail = bytearray()
        self.panicked = asyncio.Event()
        self._task = asyncio.create_task(self._pump(), name="secantusd-output")

    async def _pump(self) -> None:
        # The output is read whatever happens to the log file: a child whose pipe is full
        # would stop.
        fd: int | None = None
        write_failed = False
        try:
            fd = open_private(self._log_path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            log.warning("cannot open %s: %s", self._log_path, exc)
        try:
            while chunk := await self._stream.read(64 * 1024):
                if PANIC_MARK in bytes(self._tail[-len(PANIC_MARK) :]) + chunk:
                    self.panicked.set()
                self._tail += chunk
                del self._tail[:-TAIL_BYTES]
                if fd is None:
                    continue
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if not write_failed:
                        log.warning("cannot write %s: %s", self._log_path, exc)
                    write_failed = True
                else:
                    write_failed = False
        finally:
            if fd is not None:
                os.close(fd)

    def tail(self) -> str:
        lines = self._tail.decode(errors="replace").splitlines()
        return "\n".join(line for line in lines[-TAIL_LINES:] if line.strip())

    async def finished(self, timeout: float = 5.0) -> None:
        """Wait for the rest of the output (the child has exited), at most ``timeout``."""
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        if not done:
            await stop_tasks(self._task)


class EmbeddedDatabase:
    """Starts, supervises and stops one ``secantusd-py`` on a loopback port."""

    def __init__(
        self,
        db_dir: Path,
        *,
        space: DiskSpace | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.db_dir = db_dir
        self.space = space
        self._extra_args = extra_args
        self._process: asyncio.subprocess.Process | None = None
        self._output: ChildOutput | None = None
        self._lock_fd: int | None = None
        self._port = 0
        self._started_at = 0.0
        self._supervisor: asyncio.Task[None] | None = None
        self.credentials: Credentials | None = None
        self.url = ""
        # For /healthz and /readyz: starting, running, restarting, waiting-for-disk-space,
        # stopped.
        self.state = "stopped"
        self.restarts = 0
        self.last_failure: str | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def supervised(self) -> bool:
        """Whether the supervisor is at work (False once it failed: a bug, logged)."""
        return self._supervisor is not None and not self._supervisor.done()

    # start and stop ----------------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> str:
        self.state = "starting"
        private_dir(self.db_dir)
        self._lock_fd = await self._take_lock()
        try:
            # Files of an older version (0644 in 0755 directories) become private too.
            tightened = await asyncio.to_thread(tighten_tree, self.db_dir)
            if tightened:
                log.warning("made %d files and directories in %s private", tightened, self.db_dir)
            # Our own (empty) configuration: SecantusDB would otherwise read a secantusd.toml
            # from the working directory, ~/.secantus or /etc/secantus.
            write_private(
                self.db_dir / CONFIG_FILE,
                b"# Written by Portal Hub; its command line sets everything.\n",
            )
            self._port = free_loopback_port()
            credentials = read_credentials(self.db_dir)
            if credentials is None:
                credentials = new_credentials()
                await self._provision(credentials, timeout)
                save_credentials(self.db_dir, credentials)
                log.info("embedded database: password set, kept in %s", self.db_dir)
            self.credentials = credentials
            try:
                await self._run(timeout)
            except CredentialsRejected:
                # The files and the password kept beside them disagree (a restored copy of
                # the data, say): whoever can write here owns the data, so set it again.
                log.warning("the embedded database refused the stored password; setting it again")
                await self._provision(credentials, timeout)
                await self._run(timeout)
            self._write_endpoint()
        except BaseException:
            await self.stop()
            raise
        self.state = "running"
        self._supervisor = asyncio.create_task(self._supervise(timeout), name="embedded-db")
        log.info("embedded database (pid %s) listening on %s:%s", self.pid, HOST, self._port)
        return self.url

    async def stop(self, timeout: float = STOP_SECONDS) -> None:
        supervisor, self._supervisor = self._supervisor, None
        await stop_tasks(supervisor)
        await self._end_child(timeout)
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.db_dir / ENDPOINT_FILE).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        self.state = "stopped"

    async def _take_lock(self) -> int:
        """The data directory's lock. Held by a live hub: refused at once. Held after its
        hub died: that hub's database process is still shutting down; wait for it."""
        fd = open_private(self.db_dir / LOCK_FILE, os.O_RDWR)
        started = time.monotonic()
        deadline = started + PREVIOUS_RUN_WAIT_SECONDS
        waiting = killed = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                else:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    if waiting:
                        log.warning("the previous database process has released %s", self.db_dir)
                    return fd
                owner = _lock_owner(self.db_dir)
                if owner is None or _pid_alive(owner):
                    who = f" (pid {owner})" if owner is not None else ""
                    raise EmbeddedDatabaseError(
                        f"the embedded database in {self.db_dir} is already run by another "
                        f"process{who}"
                    )
                if not killed and time.monotonic() > started + PREVIOUS_RUN_KILL_SECONDS:
                    killed = True
                    left = _left_database_pid(self.db_dir)
                    if left is not None:
                        log.warning(
                            "the database process of a hub that ended (pid %s) has not finished "
                            "its shutdown in %.0f s; killing it",
                            left,
                            PREVIOUS_RUN_KILL_SECONDS,
                        )
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(left, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise EmbeddedDatabaseError(
                        f"the database process of a hub that ended (pid {owner}) still holds "
                        f"{self.db_dir} after {PREVIOUS_RUN_WAIT_SECONDS:.0f} s"
                    )
                if not waiting:
                    log.warning(
                        "waiting for the database process of a hub that ended (pid %s) to "
                        "release %s",
                        owner,
                        self.db_dir,
                    )
                    waiting = True
                await asyncio.sleep(0.1)
        except BaseException:
            os.close(fd)
            raise

    def _write_endpoint(self) -> None:
        endpoint = {"host": HOST, "port": self._port, "pid": self.pid, "hub_pid": os.getpid()}
        write_private(self.db_dir / ENDPOINT_FILE, json.dumps(endpoint).encode())

    # the child ---------------------------------------------------------------------------

    async def _launch(self, port: int, *args: str) -> asyncio.subprocess.Process:
        assert self._lock_fd is not None
        process = await asyncio.create_subprocess_exec(
            find_executable(),
            "--config",
            str(self.db_dir / CONFIG_FILE),
            "--host",
            HOST,
            "--port",
            str(port),
            "--storage-path",
            str(self.db_dir / "data"),
            "--log-level",
            "WARNING",
            # A single node, not a one-member replica set: without ``--standalone`` SecantusDB
            # writes an oplog entry (a BSON encode and a table write) for every document
            # written, for change streams and transactions, which the hub does not use. 32
            # messages took it 13.1 ms to insert with the oplog, 11.0 ms without; 32 events,
            # journaled, 10.0 and 9.0 ms (2026-12-07).
            "--standalone",
            *args,
            *self._extra_args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            # The lock stays held while the child lives, even if the hub is gone.
            pass_fds=(self._lock_fd,),
            umask=PRIVATE_UMASK,
        )
        assert process.stdout is not None
        self._process = process
        self._output = ChildOutput(process.stdout, self.db_dir / LOG_FILE)
        self._started_at = time.monotonic()
        return process

    async def _run(self, timeout: float) -> None:
        """Start the child for service (``--auth``) on our port and wait until it answers."""
        assert self.credentials is not None
        process = await self._launch(self._port, "--auth")
        self.url = embedded_url(HOST, self._port)
        try:
            await self._wait_ready(process, self.url, self.credentials.client_options(), timeout)
        except BaseException:
            await self._end_child(timeout)
            raise

    async def _provision(self, credentials: Credentials, timeout: float) -> None:
        """Create (or reset) the database user, on a run that only our TLS key can reach."""
        tls = await asyncio.to_thread(provisioning_tls, self.db_dir, HOST)
        try:
            port = free_loopback_port()
            process = await self._launch(port, *tls.server_args())
            url = mongodb_url(HOST, port)
            provisioned = False
            try:
                await self._wait_ready(process, url, tls.client_options(), timeout)
                client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                    url, serverSelectionTimeoutMS=int(timeout * 1000), **tls.client_options()
                )
                try:
                    name, password = credentials.username, credentials.password
                    try:
                        await client.admin.command("createUser", name, pwd=password, roles=["root"])
                    except OperationFailure as exc:
                        if exc.code != USER_ALREADY_EXISTS:
                            raise
                        await client.admin.command("updateUser", name, pwd=password, roles=["root"])
                    # On disk before the run is stopped: a run that must be killed (above)
                    # would otherwise take the new user with it.
                    await client.admin.command("fsync")
                    provisioned = True
                finally:
                    await client.close()
            finally:
                await self._end_child(min(timeout, PROVISION_STOP_SECONDS))
            stopped = (0, -signal.SIGTERM, -signal.SIGKILL) if provisioned else (0, -signal.SIGTERM)
            if process.returncode not in stopped:
                raise EmbeddedDatabaseError(
                    f"secantusd-py {self._exit_report(process)} while the password was set"
                )
        finally:
            await asyncio.to_thread(tls.remove)

    async def _wait_ready(
        self,
        process: asyncio.subprocess.Process,
        url: str,
        options: dict[str, Any],
        timeout: float,
    ) -> None:
        deadline = time.monotonic() + timeout
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=500, connectTimeoutMS=500, **options
        )
        try:
            while True:
                if process.returncode is not None:
                    if self._output is not None:
                        await self._output.finished()
                    raise EmbeddedDatabaseError(f"secantusd-py {self._exit_report(process)}")
                try:
                    await client.admin.command("ping")
                    return
                except OperationFailure as exc:
                    if exc.code == AUTHENTICATION_FAILED:
                        raise CredentialsRejected(str(exc)) from None
                    failure: Exception = exc
                except Exception as exc:
                    failure = exc
                if time.monotonic() > deadline:
                    raise EmbeddedDatabaseError(
                        f"no answer to ping from the database on port {self._port}: {failure}"
                        + self._last_lines()
                    ) from failure
                await asyncio.sleep(0.1)
        finally:
            await client.close()

    def _last_lines(self) -> str:
        tail = self._output.tail() if self._output is not None else ""
        return f"; its last lines:\n{tail}" if tail else " (and wrote nothing)"

    def _exit_report(self, process: asyncio.subprocess.Process) -> str:
        code = process.returncode
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else f"exited with {code}"
        )
        return how + self._last_lines()

    async def _end_child(self, timeout: float) -> None:
        process, output = self._process, self._output
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("embedded database did not stop in %ss; killing it", timeout)
                process.kill()
                await process.wait()
        # Forgotten only once it is gone: a stop() interrupted here ends it next time.
        if self._process is process:
            self._process = None
        if output is not None:
            await output.finished()

    # supervision -------------------------------------------------------------------------

    async def _supervise(self, timeout: float) -> None:
        delay = 0.0
        while True:
            why = await self._until_failed()
            self.restarts += 1
            self.last_failure = why
            self.state = "restarting"
            ran = time.monotonic() - self._started_at
            delay = 0.0 if ran >= STABLE_SECONDS else min(max(delay * 2, 1.0), MAX_RETRY_SECONDS)
            log.error("the embedded database %s; restarting it", why)
            while True:
                await self._wait_for_disk_space()
                if delay:
                    await asyncio.sleep(delay)
                try:
                    await self._run(timeout)
                    break
                except EmbeddedDatabaseError as exc:
                    self.last_failure = str(exc)
                    delay = min(max(delay * 2, FIRST_RETRY_SECONDS), MAX_RETRY_SECONDS)
                    log.error(
                        "restarting the embedded database failed: %s; next attempt in %.0f s",
                        exc,
                        delay,
                    )
            self._write_endpoint()
            self.state = "running"
            log.warning(
                "embedded database running again (pid %s, restart %d)", self.pid, self.restarts
            )

    async def _until_failed(self) -> str:
        """Wait until the child exits or WiredTiger panics (then kill it); say which."""
        process, output = self._process, self._output
        assert process is not None and output is not None
        exited = asyncio.ensure_future(process.wait())
        panicked = asyncio.ensure_future(output.panicked.wait())
        try:
            await asyncio.wait({exited, panicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (exited, panicked):
                waiter.cancel()
        if process.returncode is None:
            # A panicked WiredTiger answers nothing but errors until the process restarts;
            # every acknowledged write is in its journal already.
            process.kill()
            await process.wait()
            await output.finished()
            self._process = None
            return "reported a WiredTiger panic (see secantusd.log); killed it" + (
                self._last_lines()
            )
        await output.finished()
        self._process = None
        return self._exit_report(process)

    async def _wait_for_disk_space(self) -> None:
        """WiredTiger's recovery writes: a restart on a full disk fails, and may eat the
        space that is left. Start it again once there is room above the reserve."""
        if self.space is None or not await self.space.refresh():
            return
        self.state = "waiting-for-disk-space"
        log.error(
            "the embedded database waits for disk space before it restarts: %s",
            self.space.refusal(),
        )
        await self.space.wait_for_room()
        self.state = "restarting"
