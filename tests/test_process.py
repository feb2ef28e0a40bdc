"""The real thing, as `make run` starts it: `portalhub serve` on the embedded database.

These start whole processes: the hub and its SecantusDB child. They check what a user sees:
ready, demo logins work, the CLI shares the running hub's database, data survives a restart,
and no database process outlives the hub - after Ctrl-C, SIGTERM or even SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from server.settings import Settings, describe_errors
from tests.ports import listener_port

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Hub:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = listener_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PORTALHUB_")}
        self.env.update(
            PORTALHUB_DATA_DIR=str(data_dir),
            PORTALHUB_HTTP_PORT=str(self.port),
            PORTALHUB_XMPP_PORT=str(listener_port()),
            PORTALHUB_XMPP_TLS_PORT=str(listener_port()),
            PORTALHUB_SMTP_PORT=str(listener_port()),
        )
        self.process: subprocess.Popen[str] | None = None

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def launch(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--demo"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def start(self) -> None:
        self.launch()
        wait_for(self.ready, 90, "the hub to be ready")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            out = self.process.stdout.read() if self.process.stdout else ""
            raise AssertionError(f"hub exited with {self.process.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(self.url("/readyz"), timeout=2) as resp:
                return bool(json.load(resp)["status"] == "ready")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def login(self, login: str, password: str) -> int:
        request = urllib.request.Request(
            self.url("/api/v1/auth/login"),
            data=json.dumps({"login": login, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    def database_pid(self) -> int:
        endpoint = json.loads((self.data_dir / "db" / "endpoint.json").read_text())
        return int(endpoint["pid"])

    def files_are_private(self) -> None:
        """The data directory as the hub leaves it: nothing for other local users."""
        for directory, dirnames, filenames in os.walk(self.data_dir):
            for name in [".", *dirnames, *filenames]:
                path = Path(directory, name)
                mode = path.lstat().st_mode & 0o777
                wanted = 0o700 if path.is_dir() else 0o600
                assert mode == wanted, f"{path} has mode {mode:o}"

    def stop(self, sig: signal.Signals) -> str:
        assert self.process is not None
        self.process.send_signal(sig)
        out, _ = self.process.communicate(timeout=60)
        return out

    def kill_all(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator[Hub]:
    hub = Hub(tmp_path / "var")
    try:
        yield hub
    finally:
        hub.kill_all()


def test_serve_demo_restart_and_cli(hub_process: Hub) -> None:
    hub = hub_process
    hub.start()
    assert hub.login("john", "demo-pass") == 200
    assert hub.login("john", "wrong-password") == 401
    # what start-up made is frozen out of the collector's passes (see serve())
    with urllib.request.urlopen(hub.url("/metrics"), timeout=10) as resp:
        exposition = resp.read().decode()
    [frozen] = [
        float(line.split()[1])
        for line in exposition.splitlines()
        if line.startswith("python_gc_objects_frozen ")
    ]
    assert frozen > 50_000
    db_pid = hub.database_pid()
    assert alive(db_pid)

    hub.files_are_private()  # database, its password, TLS keys, logs
    # while the hub runs, the CLI works on the hub's own database (with the password that
    # only the hub's user can read)
    added = hub.cli(
        "user",
        "add",
        "carol",
        "--email",
        "carol@example.test",
        "--password-stdin",
        stdin="carol-secret\n",
    )
    assert added.returncode == 0, added.stderr
    assert hub.login("carol", "carol-secret") == 200
    listed = hub.cli("user", "list")
    assert "carol" in listed.stdout and "john" in listed.stdout

    # reply-code keys: rotate, list, retire (never the current one), and pruning of mail
    first = hub.cli("mail", "keys").stdout.split()[0]  # listing makes the first key if none
    rotated = hub.cli("mail", "keys", "rotate")
    assert rotated.returncode == 0 and "is now current" in rotated.stdout, rotated.stderr
    current = rotated.stdout.split()[1]
    refused = hub.cli("mail", "keys", "retire", current)
    assert refused.returncode != 0 and "rotate first" in refused.stderr
    retired = hub.cli("mail", "keys", "retire", first)
    assert retired.returncode == 0, retired.stderr
    states = dict(line.split()[::3] for line in hub.cli("mail", "keys").stdout.splitlines())
    assert states == {first: "retired", current: "current"}
    pruned = hub.cli("mail", "prune", "--days", "7")
    assert pruned.returncode == 0 and "older than 7 days" in pruned.stdout, pruned.stderr

    # the node registry: this hub, up, on its HTTP port
    status = hub.cli("status")
    assert status.returncode == 0, status.stderr
    [node] = [line.split() for line in status.stdout.splitlines() if " up " in line]
    assert node[2] == str(hub.port), status.stdout

    out = hub.stop(signal.SIGINT)
    assert hub.process is not None and hub.process.returncode == 0, out
    assert "Demo logins" in out and f"http://127.0.0.1:{hub.port}/" in out
    wait_for(lambda: not alive(db_pid), 10, "the database to stop")
    assert not (hub.data_dir / "db" / "endpoint.json").exists()

    # with no hub running, the CLI starts the database for itself and stops it after
    passwd = hub.cli("user", "passwd", "carol", "--password-stdin", stdin="carol-secret-2\n")
    assert passwd.returncode == 0, passwd.stderr
    assert not (hub.data_dir / "db" / "endpoint.json").exists()

    # the same data after a restart, demo seeding not repeated
    hub.start()
    assert hub.login("carol", "carol-secret-2") == 200
    assert hub.login("john", "demo-pass") == 200
    second_db = hub.database_pid()
    hub.stop(signal.SIGTERM)
    wait_for(lambda: not alive(second_db), 10, "the database to stop on SIGTERM")


def test_database_dies_with_a_killed_hub(hub_process: Hub) -> None:
    hub = hub_process
    hub.start()
    db_pid = hub.database_pid()
    assert hub.process is not None
    hub.process.kill()
    hub.process.wait()
    wait_for(lambda: not alive(db_pid), 20, "the orphaned database to stop")
    # and the data directory is usable again right away
    hub.start()
    assert hub.login("john", "demo-pass") == 200


def test_a_hub_started_right_after_a_crash_waits_for_the_old_database(hub_process: Hub) -> None:
    """The old database, SIGTERM'd when its hub died, still holds WiredTiger's files for a
    moment; the new hub waits for it instead of failing with "secantusd-py exited with 1"."""
    hub = hub_process
    hub.start()
    old_db = hub.database_pid()
    assert hub.process is not None
    os.kill(old_db, signal.SIGSTOP)  # a database slow to finish its shutdown
    try:
        hub.process.kill()
        hub.process.wait()
        hub.launch()  # at once
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if hub.process.poll() is not None:
                out = hub.process.stdout.read() if hub.process.stdout else ""
                raise AssertionError(f"the new hub gave up with {hub.process.returncode}:\n{out}")
            time.sleep(0.2)
    finally:
        os.kill(old_db, signal.SIGCONT)
    # Its SIGTERM (sent by the kernel when its hub died) may have gone to one of its other
    # threads while it was stopped, which Python's main thread, blocked in a lock, does not
    # notice: say it again until it ends (the new hub keeps waiting meanwhile).
    deadline = time.monotonic() + 20
    while alive(old_db) and time.monotonic() < deadline:
        os.kill(old_db, signal.SIGTERM)
        time.sleep(0.5)
    wait_for(hub.ready, 90, "the new hub to be ready")
    assert hub.login("john", "demo-pass") == 200
    assert not alive(old_db)
    assert hub.database_pid() != old_db


def test_a_dead_hubs_database_that_never_finishes_its_shutdown_is_killed(
    hub_process: Hub,
) -> None:
    """Seen once after a test run: a dead hub's database still running hours later (its
    SIGTERM taken by a thread its main thread never heard from). A new hub on the same data
    waits a little for it, then kills it rather than waiting for a human."""
    hub = hub_process
    hub.start()
    old_db = hub.database_pid()
    assert hub.process is not None
    os.kill(old_db, signal.SIGSTOP)  # a shutdown that never ends
    try:
        hub.process.kill()
        hub.process.wait()
        hub.launch()
        wait_for(hub.ready, 90, "the new hub to be ready")
        assert not alive(old_db)
        assert hub.login("john", "demo-pass") == 200
    finally:
        if alive(old_db):
            os.kill(old_db, signal.SIGKILL)


def test_a_killed_database_is_restarted_by_the_hub(hub_process: Hub) -> None:
    hub = hub_process
    hub.start()
    db_pid = hub.database_pid()
    os.kill(db_pid, signal.SIGKILL)
    wait_for(lambda: hub.database_pid() != db_pid and hub.ready(), 60, "the database's restart")
    assert hub.login("john", "demo-pass") == 200
    with urllib.request.urlopen(hub.url("/healthz"), timeout=5) as resp:
        health = json.load(resp)
    assert health["database_process"] == "running" and health["database_restarts"] == 1
    # the CLI reaches the restarted database too (same port, same password)
    assert "john" in hub.cli("user", "list").stdout


def test_second_server_on_the_same_data_refuses(hub_process: Hub) -> None:
    hub = hub_process
    hub.start()
    second = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", str(listener_port())],
        env=hub.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "already run by another process" in second.stderr
    assert hub.login("john", "demo-pass") == 200


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "portalhub.toml"
    config.write_text('domain = "intranet.example"\nhttp_port = 9000\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTALHUB_")}
    env.update(
        PORTALHUB_CONFIG=str(config),
        PORTALHUB_HTTP_PORT="9100",
        PORTALHUB_MONGODB_URL="mongodb://admin:hunter2@db.example:27017/",
    )
    shown = subprocess.run(
        [sys.executable, "-m", "server", "config", "show"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    settings = json.loads(shown.stdout)
    assert settings["domain"] == "intranet.example"  # from the file
    assert settings["http_port"] == 9100  # the environment wins over the file
    assert settings["host"] == "127.0.0.1"
    assert settings["mongodb_url"] == "********"
    assert "hunter2" not in shown.stdout


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("PORTALHUB_LOG_LEVEL", "LOUD", "PORTALHUB_LOG_LEVEL"),
        ("PORTALHUB_HTTP_PORT", "eighty", "PORTALHUB_HTTP_PORT"),
        ("PORTALHUB_HTTP_MAX_CONNECTIONS_PER_ADDRESS", "-1", "PORTALHUB_HTTP_MAX_CONNECTIONS"),
        ("PORTALHUB_CONFIG", "/nonexistent/portalhub.toml", "PORTALHUB_CONFIG"),
    ],
)
def test_a_bad_setting_is_one_clear_line(
    tmp_path: Path, setting: str, value: str, named: str
) -> None:
    """`serve`, and for one setting the other commands too: one line naming the setting, exit
    status 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTALHUB_")}
    env.update({"PORTALHUB_DATA_DIR": str(tmp_path / "var"), setting: value})
    commands = [["serve"]]
    if setting == "PORTALHUB_LOG_LEVEL":
        commands += [["user", "list"], ["config", "show"]]
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "server", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("portalhub: "), done.stderr
        assert named in lines[0], lines[0]
        assert done.stdout == ""
    assert not (tmp_path / "var").exists()  # nothing was started


def test_setting_errors_name_the_variable_and_never_echo_a_secret() -> None:
    with pytest.raises(ValidationError) as invalid:
        Settings(http_port="zz", metrics_token=["hunter2"], xmpp_cert_file="/x.pem")
    lines = describe_errors(invalid.value)
    assert "invalid setting PORTALHUB_HTTP_PORT: " in lines[0] and "(got 'zz')" in lines[0]
    assert lines[1].startswith("invalid setting PORTALHUB_METRICS_TOKEN: ")
    assert "hunter2" not in " ".join(lines)
    with pytest.raises(ValidationError) as pair:
        Settings(xmpp_cert_file="/x.pem")
    assert describe_errors(pair.value) == [
        "invalid configuration: set both xmpp_cert_file and xmpp_key_file, or neither"
    ]
