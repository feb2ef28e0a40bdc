"""What a hung test leaves behind: the event loop's tasks and every thread's stack.

pytest-timeout fails a test that runs past its limit (``timeout`` in pyproject.toml) and the
run goes on. A hang is usually an await that never returns, and the thread stack alone shows
only the loop's ``select``; so a little before that limit this guard prints every asyncio task
with where it waits. Should the test still not finish (a teardown that hangs too, after the
timeout fired), it prints them again and ends the process: a CI run then fails in minutes with
the reason, instead of running into the CI's own limit with none.

``kill -USR1 <pytest pid>`` prints the same at any time.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

DUMP_BEFORE_TIMEOUT_SECONDS = 30
GIVE_UP_AFTER_TIMEOUT_SECONDS = 120


def dump_tasks(reason: str) -> None:
    out = sys.__stderr__
    if out is None:
        return
    print(f"\n===== {reason} =====", file=out, flush=True)
    loop = asyncio.events._get_running_loop()
    if loop is None:
        print("(no event loop running in the main thread)", file=out)
    else:
        for task in asyncio.all_tasks(loop):
            print(f"--- {task!r}", file=out)
            task.print_stack(limit=12, file=out)
    faulthandler.dump_traceback(file=out, all_threads=True)
    print("===== end =====", file=out, flush=True)


def _on_usr1(signum: int, frame: FrameType | None) -> None:
    dump_tasks("SIGUSR1: asyncio tasks and threads")


class Watchdog:
    def __init__(self, config: pytest.Config, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self.current: tuple[str, float] | None = None
        self.dumped = False
        self.lock = threading.Lock()

    def arm(self, nodeid: str) -> None:
        with self.lock:
            self.current = (nodeid, time.monotonic())
            self.dumped = False

    def disarm(self) -> None:
        with self.lock:
            self.current = None

    def run(self) -> None:
        while True:
            time.sleep(2)
            with self.lock:
                if self.current is None:
                    continue
                nodeid, started = self.current
                elapsed = time.monotonic() - started
                dump = not self.dumped and elapsed > self.timeout - DUMP_BEFORE_TIMEOUT_SECONDS
                if dump:
                    self.dumped = True
            if dump:
                # In the main thread, where the loop runs: its tasks are readable there.
                os.kill(os.getpid(), signal.SIGUSR1)
            if elapsed > self.timeout + GIVE_UP_AFTER_TIMEOUT_SECONDS:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(2)
                self.release_captured_output()
                print(
                    f"\n{nodeid} still running {elapsed:.0f} s after it started, past its "
                    "timeout: giving up on the whole run",
                    file=sys.__stderr__,
                    flush=True,
                )
                os._exit(3)

    def release_captured_output(self) -> None:
        """pytest holds the test's output (the dumps included) until the test ends, which it
        will not: hand it to the terminal before leaving."""
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            return
        try:
            capman.suspend_global_capture(in_=False)
            out, err = capman.read_global_capture()
        except Exception as exc:  # the run is being abandoned anyway
            print(f"(captured output lost: {exc!r})", file=sys.__stderr__)
            return
        if sys.__stderr__ is not None:
            sys.__stderr__.write(out[-20_000:] + err[-200_000:])
            sys.__stderr__.flush()


def _timeout_of(config: pytest.Config) -> float:
    try:
        return float(config.getini("timeout") or 0)
    except ValueError:
        return 0.0


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGUSR1, _on_usr1)
    timeout = _timeout_of(config)
    if timeout > 0:
        watchdog = Watchdog(config, timeout)
        config.stash[_KEY] = watchdog
        threading.Thread(target=watchdog.run, name="hang-guard", daemon=True).start()


_KEY = pytest.StashKey[Watchdog]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    watchdog = item.config.stash.get(_KEY, None)
    if watchdog is not None:
        watchdog.arm(item.nodeid)
    try:
        return (yield)
    finally:
        if watchdog is not None:
            watchdog.disarm()
