"""A bounded, fair pool for password hashing: what a flood of logins can take is capped.

An argon2 check costs a core for a quarter of a second. Left to ``asyncio.to_thread``, a burst
of bogus logins queues hundreds of them ahead of a real one. Here:

- at most ``workers`` checks run at once (one per core by default);
- one client address runs at most half of them (at least one), so a flood from one address
  always leaves a thread to everyone else;
- waiting turns are handed out round-robin across addresses, so a real login waits for at
  most one check to finish, however long the flood's queue;
- at most ``per_address_waiting`` checks of one address and ``max_waiting`` in all may wait;
  past that ``admit`` refuses at once (``Busy``), before any work is done.

The empty address stands for "not known" (a peer behind a trusted proxy that named no client):
it gets no per-address cap, as it may be everybody.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """Too many checks waiting: ``scope`` is ``address`` (this client's) or ``server`` (all)."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"password checks busy ({scope})")
        self.scope = scope


@dataclass
class _Address:
    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class Ticket:
    """One admitted check: ``run`` it (waits for its turn), or ``cancel`` it unused."""

    def __init__(self, pool: HashingPool, address: str, turn: asyncio.Future[None]) -> None:
        self._pool = pool
        self._address = address
        self._turn = turn
        self._ended = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await self._turn
        # The slot is given back when the thread is done, not when the caller stops waiting:
        # a cancelled caller must not let more threads run than ``workers``.
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._ended = True
        work.add_done_callback(lambda _: self._pool._finish(self._address))
        return await asyncio.shield(work)

    def cancel(self) -> None:
        """Give the place back if ``run`` never started the work (idempotent)."""
        if self._ended:
            return
        self._ended = True
        if self._turn.done() and not self._turn.cancelled():
            self._pool._finish(self._address)  # granted, never used
        else:
            self._turn.cancel()
            self._pool._withdraw(self._address, self._turn)


class HashingPool:
    def __init__(self, workers: int, *, per_address_waiting: int, max_waiting: int) -> None:
        self.workers = max(1, workers)
        self.per_address_running = max(1, self.workers // 2)
        self.per_address_waiting = per_address_waiting
        self.max_waiting = max_waiting
        self._running = 0
        self._waiting = 0
        self._addresses: dict[str, _Address] = {}
        self._turns: deque[str] = deque()  # addresses with waiters, in round-robin order

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def admit(self, address: str) -> Ticket:
        """A place for one check of ``address``, or ``Busy`` at once (no await in here)."""
        state = self._addresses.setdefault(address, _Address())
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._running < self.workers and state.running < self._cap(address):
            self._grant(address, state, turn)
            return Ticket(self, address, turn)
        if address and len(state.waiting) >= self.per_address_waiting:
            self._forget_if_idle(address, state)
            raise Busy("address")
        if self._waiting >= self.max_waiting:
            self._forget_if_idle(address, state)
            raise Busy("server")
        state.waiting.append(turn)
        self._waiting += 1
        if address not in self._turns:
            self._turns.append(address)
        return Ticket(self, address, turn)

    async def run(self, address: str, fn: Callable[..., T], *args: Any) -> T:
        ticket = self.admit(address)
        try:
            return await ticket.run(fn, *args)
        finally:
            ticket.cancel()

    def _cap(self, address: str) -> int:
        return self.per_address_running if address else self.workers

    def _grant(self, address: str, state: _Address, turn: asyncio.Future[None]) -> None:
        state.running += 1
        self._running += 1
        turn.set_result(None)

    def _finish(self, address: str) -> None:
        state = self._addresses.get(address)
        if state is not None:
            state.running -= 1
            self._forget_if_idle(address, state)
        self._running -= 1
        self._dispatch()

    def _withdraw(self, address: str, turn: asyncio.Future[None]) -> None:
        state = self._addresses.get(address)
        if state is None or turn not in state.waiting:
            return
        state.waiting.remove(turn)
        self._waiting -= 1
        if not state.waiting and address in self._turns:
            self._turns.remove(address)
        self._forget_if_idle(address, state)

    def _dispatch(self) -> None:
        while self._running < self.workers and self._turns:
            for _ in range(len(self._turns)):
                address = self._turns[0]
                self._turns.rotate(-1)  # whoever is served goes to the back
                state = self._addresses[address]
                # A waiter cancelled a moment ago (its task not yet resumed) is dropped here.
                while state.waiting and state.waiting[0].done():
                    state.waiting.popleft()
                    self._waiting -= 1
                if not state.waiting:
                    self._turns.remove(address)
                    self._forget_if_idle(address, state)
                    break  # the round-robin changed: look again
                if state.running < self._cap(address):
                    turn = state.waiting.popleft()
                    self._waiting -= 1
                    if not state.waiting:
                        self._turns.remove(address)
                    self._grant(address, state, turn)
                    break
            else:
                return  # every waiting address is at its own cap

    def _forget_if_idle(self, address: str, state: _Address) -> None:
        if not state.running and not state.waiting:
            self._addresses.pop(address, None)
