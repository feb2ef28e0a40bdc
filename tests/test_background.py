"""Stopping background tasks: a task that swallows its cancellation (as redis-py's clean-up
was seen to make a retrying loop do) is cancelled again; one that will not end is reported
and left, never waited on for ever; a failure is logged, not lost."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server import background
from server.background import SideTasks, raise_if_stopping, stop
from tests.harness import HubHarness


async def test_a_swallowed_cancellation_is_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background, "STOP_WAIT_SECONDS", 0.1)
    rounds = 0

    async def retrying_loop() -> None:
        nonlocal rounds
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                rounds += 1
                if rounds == 1:  # the first one disguised as an error, and caught
                    continue
                raise

    task = asyncio.create_task(retrying_loop())
    await asyncio.sleep(0)
    await stop(task)
    assert task.cancelled() and rounds == 2


async def test_a_loop_checking_stopping_ends_at_the_first_cancellation() -> None:
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError as exc:
                rounds += 1
                try:
                    raise OSError("connection reset") from exc  # what a library made of it
                except OSError:
                    raise_if_stopping()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await stop(task)
    assert task.cancelled() and rounds == 1


async def test_one_that_will_not_end_is_left_and_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(background, "STOP_WAIT_SECONDS", 0.05)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="server.background"):
        await stop(task)
    assert not task.done()
    assert "stubborn would not stop; left behind" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task})


async def test_a_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def failing() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(failing(), name="failing")
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="server.background"):
        await stop(task, None)
    assert "failing had failed" in caplog.text and "boom" in caplog.text


async def test_side_tasks_are_held_their_failures_logged_and_all_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    side = SideTasks("a publication", logging.getLogger("tests.owner"))
    release = asyncio.Event()

    async def fails() -> None:
        raise RuntimeError("boom")

    async def waits() -> None:
        await release.wait()

    with caplog.at_level(logging.ERROR, logger="tests.owner"):
        failing = side.spawn(fails())
        await asyncio.sleep(0.01)
    assert failing.done() and not failing.cancelled()  # failure caught, logged, not raised
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("tests.owner", "a publication failed")
    ]
    assert len(side) == 0  # a finished task is let go

    slow = side.spawn(waits(), name="slow")
    await side.wait(timeout=0.01)  # waiting does not cancel
    assert not slow.done() and len(side) == 1 and list(side) == [slow]
    await side.stop()
    assert slow.cancelled() and len(side) == 0


async def test_the_hub_stops_a_socketio_listener_that_swallows_its_cancellation(
    hub: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """python-socketio's Redis manager listener catches every exception in its reconnect loop,
    so a cancellation that redis-py turns into an error while Redis is away is swallowed (a
    test's teardown after a Redis restart waited on it for ever). The hub must still stop."""
    monkeypatch.setattr(background, "STOP_WAIT_SECONDS", 0.1)
    swallowed = 0

    async def listener_like_the_library() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)  # stands for redis-py's subscribe/listen
            except asyncio.CancelledError:
                if swallowed:
                    raise  # a cancellation landing anywhere else ends it
                # the first one, turned into a redis-py error and caught by `except Exception`
                swallowed += 1
            await asyncio.sleep(0.05)  # the library's retry sleep

    sio_hub = hub.services.hub
    listener = asyncio.create_task(listener_like_the_library(), name="socketio-redis-listener")
    monkeypatch.setattr(sio_hub.sio.manager, "thread", listener, raising=False)
    await asyncio.sleep(0)
    await asyncio.wait_for(sio_hub.close(), 10)
    assert listener.done() and swallowed == 1
