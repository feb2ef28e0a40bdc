"""In-process copies of a domain service's own data, kept right through the bus.

A service that caches what it owns (tokens, users, chats, memberships) invalidates an entry on
the events that change it - on every node, since every node sees every event on the bus - and
keeps a time to live as a backstop for an event that never arrives (one lost while Redis was
away). ``Cache`` is the map they use: bounded (least recently used first out), with that time
to live, and safe against the classic race of a read that straddles an invalidation: a value
loaded while the key was invalidated is returned to its caller but not kept.

With ``stale_seconds``, an entry whose time to live ran out is still served for that long
while one background read (an owned task, stopped by ``close()``) replaces it: the backstop
then never puts a database read in series with a caller (a connect burst that met the time
to live read every user's entries again, 11 commands per connect). An invalidation still acts
at once (the entry goes, the next caller loads), and a lost one lasts at most
``ttl_seconds + stale_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

from server.background import SideTasks

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Abandoned(Exception):
    """The caller that was to load (a key, a batch) was cancelled: its waiters load again."""


async def _load_for_waiters(future: asyncio.Future[V], load: Callable[[], Awaitable[V]]) -> V:
    """``load`` run by the caller that began it, its outcome told to those waiting on
    ``future`` (``Cache``, ``SharedLoad``, ``BatchLoad``): its value, its error, or
    ``_Abandoned`` when that caller was cancelled (a waiter then loads itself)."""
    try:
        value = await load()
    except BaseException as exc:
        future.set_exception(_Abandoned() if isinstance(exc, asyncio.CancelledError) else exc)
        future.exception()  # told to the waiters, if any: not "never retrieved"
        raise
    future.set_result(value)
    return value


class _Load:
    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale = False


class Cache(Generic[K, V]):
    def __init__(
        self,
        max_entries: int,
        ttl_seconds: float,
        *,
        stale_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_entries
        self._ttl = ttl_seconds
        self._stale = stale_seconds
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._loads: dict[K, list[_Load]] = {}
        self._refreshing: set[K] = set()
        # A caller's load of a key, shared with those who miss the same key meanwhile (a
        # connect burst found the colleagues list missing and each of 51 connects read every
        # user): not with one who asks after an invalidation of the key (the load is stale).
        self._shared: dict[K, tuple[_Load, asyncio.Future[V | None]]] = {}
        # The same for ``get_or_load_many``: a key one caller is loading is waited for by the
        # next who misses it (two first connects of one burst share their dialog and groups:
        # with history a first step read 1,734 chat documents for at most 1,000 chats).
        self._shared_many: dict[K, tuple[_Load, asyncio.Future[dict[K, V]]]] = {}
        self._refreshes = SideTasks("cache refresh", log)
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0
        # Moves on every change of what may be served (kept, changed, dropped by a change or
        # a clear): what was computed from the cache at one version is what it gives again.
        self.version = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return self.get(key) is not None

    def get(self, key: K) -> V | None:
        """The entry if within its time to live (one past it, still served while being
        refreshed, is not returned here)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if entry[0] <= now:
            if entry[0] + self._stale <= now:
                del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def _stale_entry(self, key: K, now: float) -> V | None:
        """The value of an entry past its time to live but within ``stale_seconds`` of it."""
        entry = self._entries.get(key)
        if entry is None or entry[0] + self._stale <= now:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` (newer than anything a load under way may have read)."""
        self.changed(key)
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        self._trim()

    def replace(self, key: K, value: V) -> None:
        """Change a cached value in place (an event said how), keeping its expiry; a load of
        the key under way is not kept, since it may have read the value from before."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], value)
        self.changed(key)

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)
        self.changed(key)

    def invalidate_many(self, keys: Iterable[K]) -> None:
        for key in keys:
            self.invalidate(key)

    def clear(self) -> None:
        self.version += 1
        self._entries.clear()
        for loads in self._loads.values():
            for load in loads:
                load.stale = True

    def values(self) -> list[tuple[K, V]]:
        """Every entry that may still be served (stale ones included: an invalidation by
        value must reach them too)."""
        now = self._clock()
        return [(k, v) for k, (expires, v) in self._entries.items() if expires + self._stale > now]

    def changed(self, key: K) -> None:
        """The value of ``key`` changed (the entry, if any, was updated in place): a load of
        it under way may have read it before, so it is returned but not kept. An entry past
        its time to live goes: callers update only what ``get`` gives them (fresh entries),
        so a stale one was not updated and is known to be out of date now (served on, it
        would lag for as long as changes keep its refreshes from being kept)."""
        self.version += 1
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= self._clock():
            del self._entries[key]
        for load in self._loads.get(key, ()):
            load.stale = True

    def _begin(self, key: K) -> _Load:
        load = _Load()
        self._loads.setdefault(key, []).append(load)
        return load

    def _end(self, key: K, load: _Load) -> bool:
        """Whether the load may be kept."""
        loads = self._loads.get(key)
        if loads is not None:
            loads.remove(load)
            if not loads:
                del self._loads[key]
        return not load.stale

    async def get_or_load(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The cached value, or what ``load`` returns (kept unless invalidated meanwhile;
        None is returned, not kept)."""
        found = self.get(key)
        if found is not None:
            self.hits += 1
            return found
        if self._stale > 0 and (stale := self._stale_entry(key, self._clock())) is not None:
            self.stale_hits += 1
            if key not in self._refreshing:
                self._refreshing.add(key)
                self._refreshes.spawn(self._refresh_one(key, load), name="cache refresh")
            return stale
        shared = self._shared.get(key)
        if shared is not None and not shared[0].stale:
            self.hits += 1
            try:
                return await asyncio.shield(shared[1])
            except _Abandoned:
                pass  # its caller was cancelled: this one loads
        self.misses += 1
        token = self._begin(key)
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._shared[key] = (token, future)
        try:
            value = await _load_for_waiters(future, load)
        finally:
            keep = self._end(key, token)
            if self._shared.get(key, (None,))[0] is token:
                del self._shared[key]
        if value is not None and keep:
            self.version += 1
            self._entries[key] = (self._clock() + self._ttl, value)
            self._trim()
        return value

    async def get_or_load_many(
        self, keys: Iterable[K], load: Callable[[list[K]], Awaitable[dict[K, V]]]
    ) -> dict[K, V]:
        """The cached values of ``keys``, and the missing ones from one call of ``load``."""
        found: dict[K, V] = {}
        missing: list[K] = []
        for key in keys:
            value = self.get(key)
            if value is None:
                missing.append(key)
            else:
                found[key] = value
        self.hits += len(found)
        if missing and self._stale > 0:
            now = self._clock()
            unknown: list[K] = []
            refresh: list[K] = []
            for key in missing:
                stale = self._stale_entry(key, now)
                if stale is None:
                    unknown.append(key)
                else:
                    found[key] = stale
                    if key not in self._refreshing:
                        refresh.append(key)
            self.stale_hits += len(missing) - len(unknown)
            if refresh:
                self._refreshing.update(refresh)
                self._refreshes.spawn(self._refresh_many(refresh, load), name="cache refresh")
            missing = unknown
        if not missing:
            return found
        joined: dict[asyncio.Future[dict[K, V]], list[K]] = {}
        own: list[K] = []
        for key in missing:
            shared = self._shared_many.get(key)
            if shared is not None and not shared[0].stale:
                joined.setdefault(shared[1], []).append(key)
            else:
                own.append(key)
        self.hits += len(missing) - len(own)
        if own:
            found.update(await self._load_many(own, load))
        for future, keys in joined.items():
            try:
                loaded = await asyncio.shield(future)
            except _Abandoned:  # its caller was cancelled: this one loads them
                loaded = await self._load_many(keys, load)
            found.update((key, loaded[key]) for key in keys if key in loaded)
        return found

    async def _load_many(
        self, keys: list[K], load: Callable[[list[K]], Awaitable[dict[K, V]]]
    ) -> dict[K, V]:
        """``load`` of ``keys``, shared with callers who miss them meanwhile, kept unless
        invalidated meanwhile."""
        self.misses += len(keys)
        tokens = [(key, self._begin(key)) for key in keys]
        future: asyncio.Future[dict[K, V]] = asyncio.get_running_loop().create_future()
        for key, token in tokens:
            self._shared_many[key] = (token, future)
        try:
            loaded = await _load_for_waiters(future, lambda: load(keys))
        finally:
            kept = {key for key, token in tokens if self._end(key, token)}
            for key, token in tokens:
                if self._shared_many.get(key, (None,))[0] is token:
                    del self._shared_many[key]
        for key, value in loaded.items():
            if key in kept:
                self.version += 1
                self._entries[key] = (self._clock() + self._ttl, value)
        self._trim()
        return loaded

    async def _refresh_one(self, key: K, load: Callable[[], Awaitable[V | None]]) -> None:
        token = self._begin(key)
        try:
            value = await load()
        finally:
            keep = self._end(key, token)
            self._refreshing.discard(key)
        if keep:
            self._keep(key, value)

    async def _refresh_many(
        self, keys: list[K], load: Callable[[list[K]], Awaitable[dict[K, V]]]
    ) -> None:
        tokens = [(key, self._begin(key)) for key in keys]
        try:
            loaded = await load(keys)
        finally:
            kept = [key for key, token in tokens if self._end(key, token)]
            self._refreshing.difference_update(keys)
        for key in kept:
            self._keep(key, loaded.get(key))

    def _keep(self, key: K, value: V | None) -> None:
        """What a refresh read, unless invalidated meanwhile: None (the data is gone) drops
        the stale entry instead. A refresh that read what the entry holds (nearly every
        one: the backstop seldom finds a lost change) keeps the entry's value with a new
        time to live and leaves the version: what was computed from it still holds (the
        messenger's unread numbers kept per user were counted again for every connect
        after any of the chats' refreshes)."""
        if value is None:
            self.version += 1
            self._entries.pop(key, None)
            return
        entry = self._entries.get(key)
        if entry is not None and entry[1] == value:
            value = entry[1]
        else:
            self.version += 1
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        self._trim()

    async def close(self) -> None:
        """Stop the refreshes under way (their stale entries stay as they are)."""
        await self._refreshes.stop()

    def _trim(self) -> None:
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class SharedLoad(Generic[V]):
    """One load at a time of a value that many callers want at once: those who ask while a
    load is under way wait for its result instead of each reading the same documents.

    A connect burst meets a cached snapshot that just ran out with dozens of connects in
    flight; each read it again (the CRM access snapshot reads every user). ``key`` tells
    loads apart that must not be shared: a caller who asks after an invalidation (a new
    generation) does not get what was read before it. No task is made: the first caller
    loads, the others wait on a future; if that caller is cancelled, a waiter loads."""

    def __init__(self) -> None:
        self._pending: asyncio.Future[V] | None = None
        self._key: Hashable = None

    async def run(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> V:
        while (pending := self._pending) is not None and self._key == key:
            try:
                return await asyncio.shield(pending)
            except _Abandoned:
                pass  # its loader was cancelled: this caller loads, unless another began
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._pending, self._key = future, key
        try:
            return await _load_for_waiters(future, load)
        finally:
            if self._pending is future:
                self._pending = None


class _Batch(Generic[K, V]):
    __slots__ = ("keys", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.keys: dict[K, None] = {}
        self.result: asyncio.Future[dict[K, V]] = loop.create_future()


class BatchLoad(Generic[K, V]):
    """Reads of one kind asked for at about the same time, made as one query.

    A connect burst after a restart or a deploy is every user's first connect at once, and
    the embedded database serves one command at a time at about 0.6 ms a command and 0.07 ms a
    document read: fifty connects each reading their token, user, memberships, tasks and CRM
    numbers by their own query kept it busy for the whole first step. Here, while one read
    of a kind is under way, the keys asked for meanwhile gather into the next, which
    ``load_many`` reads with one query (``$in``) when the first ends: a lone caller reads
    at once, a burst pays one command per kind per round instead of one per caller.

    A key asked for is read by a query that starts after it was asked for (a batch under way
    is never joined): so a caller whose cache entry was just invalidated reads what came after
    the change, as it would on its own. No task is made: the caller that opened a batch reads
    it, the others wait on a future; if that caller is cancelled, they read again.

    ``max_keys``: a batch that holds that many keys takes no more (the next caller opens
    another, read after it). The embedded database checks each document it found against
    every value of the ``$in`` in turn: 1,000 chats by ``_id`` cost 56 ms in batches of 37,
    186 ms in batches of 250 and 589 ms in one; 100 users' 37 memberships each 99 ms in
    batches of 5 or 10, 176 ms of 50, 282 ms of 100 (one by one: 116 ms).

    ``at_once``: how many batches may be read side by side (each still holds only keys
    asked for before it began). With one, a burst's reads of a kind form a queue: fifty
    first connects with history waited for 7 membership reads and about 40 chat reads in
    turn, the database idle half of that time between the hub's steps."""

    def __init__(
        self,
        load_many: Callable[[list[K]], Awaitable[dict[K, V]]],
        max_keys: int = 32,
        at_once: int = 1,
    ) -> None:
        self._load_many = load_many
        self._max_keys = max_keys
        self._next: _Batch[K, V] | None = None
        self._free = asyncio.Semaphore(at_once)
        self.batches = 0  # queries made (for tests and counters)

    async def load(self, key: K) -> V | None:
        return (await self.load_many([key])).get(key)

    async def load_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The values of those of ``keys`` that exist."""
        wanted = list(keys)
        while True:
            batch = self._next
            if batch is not None and len(batch.keys) < self._max_keys:
                batch.keys.update(dict.fromkeys(wanted))
                try:
                    found = await asyncio.shield(batch.result)
                except _Abandoned:
                    continue
                return {k: found[k] for k in wanted if k in found}
            batch = self._next = _Batch(asyncio.get_running_loop())
            batch.keys.update(dict.fromkeys(wanted))
            found = await self._read(batch)
            return {k: found[k] for k in wanted if k in found}

    async def _read(self, batch: _Batch[K, V]) -> dict[K, V]:
        try:
            # One round of the loop first: the callers of the same moment join this batch.
            await asyncio.sleep(0)
            await self._free.acquire()
        except BaseException:
            if self._next is batch:
                self._next = None
            batch.result.set_exception(_Abandoned())
            batch.result.exception()  # the waiters read again; not "never retrieved"
            raise
        if self._next is batch:
            self._next = None
        self.batches += 1
        try:
            return await _load_for_waiters(batch.result, lambda: self._load_many(list(batch.keys)))
        finally:
            self._free.release()
