"""The login limits' parts on their own: the throttle's reservations (pure, time passed in),
the client-address key, and the bounded hashing pool (real threads)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.auth.addresses import UNKNOWN, client_key, networks
from server.auth.hashing import Busy, HashingPool
from server.auth.throttle import BUSY_RETRY_SECONDS, LoginThrottle

# the throttle -----------------------------------------------------------------------------------


def test_concurrent_attempts_get_no_more_checks_than_sequential_ones() -> None:
    throttle = LoginThrottle(5, 300)
    admitted = [throttle.reserve("alice", 0.0) == 0.0 for _ in range(100)]
    assert admitted.count(True) == 5  # the other 95 are refused before any password check
    assert throttle.retry_after("alice", 0.0) == BUSY_RETRY_SECONDS
    for _ in range(5):
        throttle.failed("alice", 0.1)
    assert throttle.retry_after("alice", 0.1) == pytest.approx(300)


def test_a_success_that_comes_back_after_the_lock_does_not_open_it() -> None:
    throttle = LoginThrottle(3, 300)
    for _ in range(3):
        assert throttle.reserve("alice", 0.0) == 0.0
    throttle.failed("alice", 0.1)
    throttle.failed("alice", 0.1)
    throttle.failed("alice", 0.1)  # locked
    throttle.succeeded("alice", 0.2)  # a verdict arriving late (or forged) changes nothing
    assert throttle.retry_after("alice", 0.2) > 299
    assert throttle.reserve("alice", 0.2) > 0


def test_success_before_the_limit_resets_and_only_its_own_reservation_is_returned() -> None:
    throttle = LoginThrottle(3, 300)
    throttle.reserve("alice", 0.0)
    throttle.failed("alice", 0.0)
    throttle.reserve("alice", 1.0)
    throttle.reserve("alice", 1.0)
    throttle.succeeded("alice", 1.1)  # resets the failure; the other check is still under way
    assert throttle.retry_after("alice", 1.1) == 0.0
    throttle.failed("alice", 1.2)
    for _ in range(2):
        assert throttle.reserve("alice", 2.0) == 0.0
        throttle.failed("alice", 2.0)
    assert throttle.retry_after("alice", 2.0) > 0  # 3 failures since the success


def test_released_attempts_are_not_counted_and_a_lock_expires() -> None:
    throttle = LoginThrottle(2, 10)
    for _ in range(5):
        assert throttle.reserve("bob", 0.0) == 0.0
        throttle.released("bob", 0.0)
    assert throttle.retry_after("bob", 0.0) == 0.0
    for _ in range(2):
        throttle.reserve("bob", 0.0)
        throttle.failed("bob", 0.0)
    assert throttle.retry_after("bob", 5.0) == pytest.approx(5.0)
    assert throttle.reserve("bob", 10.0) == 0.0  # lock over: a fresh start
    throttle.failed("bob", 10.0)
    assert throttle.retry_after("bob", 10.0) == 0.0


def test_address_count_ignores_successes_and_forgets_after_its_window() -> None:
    throttle = LoginThrottle(3, 60, window_seconds=60, reset_on_success=False)
    for now in (0.0, 1.0):
        throttle.reserve("10.0.0.1", now)
        throttle.failed("10.0.0.1", now)
    throttle.reserve("10.0.0.1", 2.0)
    throttle.succeeded("10.0.0.1", 2.0)  # one good login does not wash the failures away
    throttle.reserve("10.0.0.1", 3.0)
    throttle.failed("10.0.0.1", 3.0)
    assert throttle.retry_after("10.0.0.1", 3.0) == pytest.approx(60)
    other = LoginThrottle(3, 60, window_seconds=60, reset_on_success=False)
    for now in (0.0, 30.0):
        other.reserve("10.0.0.2", now)
        other.failed("10.0.0.2", now)
    other.reserve("10.0.0.2", 61.0)  # the first two are older than the window by now
    other.failed("10.0.0.2", 61.0)
    assert other.retry_after("10.0.0.2", 61.0) == 0.0


def test_memory_stays_bounded_but_attempts_under_way_keep_their_record() -> None:
    throttle = LoginThrottle(2, 300, max_keys=10)
    throttle.reserve("pending", 0.0)
    for i in range(50):
        throttle.reserve(f"spray{i}", 0.0)
        throttle.failed(f"spray{i}", 0.0)
    assert len(throttle._records) <= 11
    throttle.failed("pending", 0.0)
    throttle.reserve("pending", 0.0)
    throttle.failed("pending", 0.0)
    assert throttle.retry_after("pending", 0.0) > 0


# client addresses -----------------------------------------------------------------------------

TRUSTED = networks("127.0.0.1/32, ::1, 10.0.0.0/8")


def test_client_key_of_a_direct_peer() -> None:
    assert client_key("203.0.113.9", None, TRUSTED) == "203.0.113.9"
    # a client's own header counts for nothing when it is not a trusted proxy
    assert client_key("203.0.113.9", "198.51.100.1", TRUSTED) == "203.0.113.9"
    assert client_key("::ffff:203.0.113.9", None, TRUSTED) == "203.0.113.9"
    assert client_key("2001:db8:1:2::55", None, TRUSTED) == "2001:db8:1:2::/64"
    assert client_key(None, None, TRUSTED) == UNKNOWN


def test_client_key_behind_trusted_proxies() -> None:
    assert client_key("10.1.2.3", "198.51.100.7", TRUSTED) == "198.51.100.7"
    # what the client wrote itself is left of what the proxies appended
    assert client_key("10.1.2.3", "1.2.3.4, 198.51.100.7, 10.9.9.9", TRUSTED) == "198.51.100.7"
    assert client_key("127.0.0.1", "[2001:db8::1]:4711", TRUSTED) == "2001:db8::/64"
    # a proxy that names nobody (or nonsense) is no client of its own
    assert client_key("127.0.0.1", None, TRUSTED) == UNKNOWN
    assert client_key("127.0.0.1", "10.0.0.7", TRUSTED) == UNKNOWN
    assert client_key("127.0.0.1", "bogus", TRUSTED) == UNKNOWN
    assert client_key("127.0.0.1", None, networks("")) == "127.0.0.1"


# the hashing pool ----------------------------------------------------------------------------


class Gate:
    """Blocking work that finishes only when told to, and counts how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def work(self, label: str) -> str:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        self.release.wait(10)
        with self.lock:
            self.now -= 1
        return label


async def test_a_flood_from_one_address_leaves_room_for_everyone_else() -> None:
    pool = HashingPool(2, per_address_waiting=3, max_waiting=100)
    gate = Gate()
    flood = [asyncio.create_task(pool.run("flood", gate.work, f"f{i}")) for i in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(Busy) as refused:  # 1 running + 3 waiting: the fifth is refused at once
        pool.admit("flood")
    assert refused.value.scope == "address"
    assert pool.running == 1  # one address gets at most half the threads
    real = asyncio.create_task(pool.run("real", gate.work, "real"))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if pool.running == 2:
            break
    assert pool.running == 2  # the real check runs beside the flood, without waiting
    gate.release.set()
    assert await real == "real"
    assert await asyncio.gather(*flood) == ["f0", "f1", "f2", "f3"]
    assert gate.most <= 2 and pool.running == 0 and pool.waiting == 0


async def test_turns_go_round_robin_and_the_server_wide_queue_is_bounded() -> None:
    pool = HashingPool(1, per_address_waiting=10, max_waiting=4)
    gate = Gate()
    order: list[str] = []

    def work(label: str) -> str:
        order.append(label)
        return gate.work(label)

    first = asyncio.create_task(pool.run("a", work, "a0"))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(pool.run("a", work, f"a{i}")) for i in (1, 2, 3)]
    rest.append(asyncio.create_task(pool.run("b", work, "b1")))
    await asyncio.sleep(0)
    with pytest.raises(Busy) as refused:
        pool.admit("c")
    assert refused.value.scope == "server"
    gate.release.set()
    await asyncio.gather(first, *rest)
    assert order[:3] == ["a0", "a1", "b1"]  # b did not wait behind all of a's


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    pool = HashingPool(1, per_address_waiting=1, max_waiting=10)
    gate = Gate()
    running = asyncio.create_task(pool.run("a", gate.work, "a0"))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(pool.run("a", gate.work, "a1"))
    await asyncio.sleep(0)
    assert pool.waiting == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.waiting == 0
    again = asyncio.create_task(pool.run("a", gate.work, "a2"))  # the place is free again
    gate.release.set()
    assert list(await asyncio.gather(running, again)) == ["a0", "a2"]
    assert pool.running == 0
