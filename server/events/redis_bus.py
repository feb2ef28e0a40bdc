"""The event bus across nodes: Redis pub/sub carries events, the database fills any gap.

Every node publishes what it stores to its own subscribers at once (no round trip), then to
Redis for the other nodes. Pub/sub is fast but forgets: a message is lost when a subscriber's
connection drops, Redis restarts, or a publish fails. So it is used only as a fast path, and
order and completeness come from the streams themselves (Centrifugo's recovery, done per
node): each node remembers, per stream, the last ``seq`` it passed to its subscribers, and

- drops an event it has already passed on (its own, coming back; a late copy);
- on an event beyond the next one, first reads the missing ones from the database (a stream
  is gap-free: ``seq`` n+1 is stored only after n) and passes them on in order;
- when a reader (the hub, catching a connection up) has read a stream up to some ``seq``
  from the database, pulls whatever of it this node has not passed on yet, so that a late
  live copy is recognised as one;
- after reconnecting to Redis, compares the heads of the streams it knows (has passed on
  events of, or been told of through ``caught_up``: a subscriber that serves a stream says
  so) with the database and pulls what it missed while it was away; and keeps what it could
  not publish, to publish once Redis is back;
- does the same when a peer node dies. A node killed between storing an event and
  publishing it leaves a gap nobody notices until the stream's next event, which on a quiet
  stream may be never (the last message of a conversation). So every node keeps a key alive
  in Redis while it runs, watches the keys of the peers it has heard from, and recovers when
  one runs out.

Ephemeral events (presence, typing, counter values) are live-only by design: they go
through Redis once, and one lost during an outage is not replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import bson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.background import raise_if_stopping, stop
from server.events.bus import EphemeralHandler, EventHandler, InProcessBus
from server.events.models import EphemeralEvent, Event
from server.events.redis_subscription import RedisSubscription

log = logging.getLogger(__name__)

MAX_KNOWN_STREAMS = 200_000  # per-stream positions kept; the least recently used go first
MAX_UNSENT = 10_000  # publications kept while Redis is unreachable
HEADS_BATCH = 1000
ALIVE_SECONDS = 3.0  # a node's alive key lives this long; refreshed (and peers checked) thrice


class StreamSource(Protocol):
    """What the bus reads from the database (the StreamLog)."""

    async def read_range(self, stream: str, after_seq: int, through_seq: int) -> list[Event]: ...

    async def heads(self, streams: Sequence[str]) -> dict[str, int]: ...


def _encode_event(node: str, event: Event) -> bytes:
    return bson.encode(
        {
            "node": node,
            "stream": event.stream,
            "seq": event.seq,
            "type": event.type,
            "data": event.data,
            "ts": event.ts,
        }
    )


def _encode_ephemeral(node: str, event: EphemeralEvent) -> bytes:
    return bson.encode(
        {
            "node": node,
            "type": event.type,
            "data": event.data,
            "streams": list(event.streams),
            "private": event.private,
        }
    )


class RedisBus:
    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        channel_prefix: str = "portalhub:",
        alive_seconds: float = ALIVE_SECONDS,
    ) -> None:
        self.node_id = node_id
        self._redis: Redis = Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10
        )
        self._events_channel = f"{channel_prefix}events"
        self._ephemeral_channel = f"{channel_prefix}ephemeral"
        self._alive_prefix = f"{channel_prefix}bus:alive:"
        self._alive_ms = max(1, round(alive_seconds * 1000))
        self._peers: set[str] = set()  # nodes heard from, watched until their key runs out
        self._local = InProcessBus()
        self._source: StreamSource | None = None
        self._passed: OrderedDict[str, int] = OrderedDict()
        self._locks: dict[str, list[Any]] = {}  # stream -> [lock, users]
        self._unsent: deque[tuple[str, bytes]] = deque(maxlen=MAX_UNSENT)
        self._subscription = RedisSubscription(
            self._redis,
            [self._events_channel, self._ephemeral_channel],
            name="redis-bus",
            on_subscribed=self._on_subscribed,
            on_message=self._received,
        )
        self._watcher: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        # Called when the subscription is back after an outage: whatever the events lost
        # meanwhile would have corrected (the services' caches) must be read again.
        self.on_resubscribed: list[Callable[[], None]] = []

    def attach(self, source: StreamSource) -> None:
        self._source = source

    # the EventBus protocol ---------------------------------------------------------------------

    def subscribe(self, handler: EventHandler) -> None:
        self._local.subscribe(handler)

    def subscribe_ephemeral(self, handler: EphemeralHandler) -> None:
        self._local.subscribe_ephemeral(handler)

    async def publish(self, event: Event) -> None:
        await self._accept(event)
        await self._send(self._events_channel, _encode_event(self.node_id, event))

    async def publish_ephemeral(self, event: EphemeralEvent) -> None:
        await self._local.publish_ephemeral(event)
        await self._send(self._ephemeral_channel, _encode_ephemeral(self.node_id, event))

    async def caught_up(self, stream: str, seq: int) -> int:
        """A reader has read ``stream`` through ``seq`` from the database: pass on here
        whatever of it this node has not, so that late copies are known as such.

        Returns the position live delivery goes on from. On a stream this node has passed
        nothing of yet, it starts at ``seq`` without passing the events up to it (the reader
        has them; their live copies are late copies): a second reader on this node that read
        less far must read the rest itself, as it learns from the position returned."""
        async with self._lock(stream):
            passed = self._passed.get(stream)
            if passed is None:
                self._remember(stream, seq)  # nothing passed on yet: start from there
                return seq
            if seq > passed:
                await self._fill(stream, passed, seq)
            return max(seq, self._passed.get(stream, seq))

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._subscription.start()
        self._watcher = asyncio.create_task(self._watch_peers(), name="redis-bus-peers")
        # Not fatal when Redis is down at start: the node serves its own clients meanwhile.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5)

    async def close(self) -> None:
        await self._subscription.close()
        await stop(self._watcher)
        # Gone on purpose: peers recover at once rather than when the key runs out. Whatever
        # this node stored it has published or still holds unsent, so they find nothing new.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._alive_prefix + self.node_id)
        await self._redis.aclose()

    @property
    def connected(self) -> bool:
        return self._subscription.connected

    @property
    def unsent_count(self) -> int:
        """Publications kept until Redis is reachable again."""
        return len(self._unsent)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    # receiving ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lock(self, stream: str) -> AsyncIterator[None]:
        """One stream at a time. Per stream, not striped: a subscriber that appends to another
        stream while handling an event must not wait on the lock its caller holds."""
        entry = self._locks.get(stream)
        if entry is None:
            entry = self._locks[stream] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[stream]

    def _remember(self, stream: str, seq: int) -> None:
        self._passed[stream] = seq
        self._passed.move_to_end(stream)
        while len(self._passed) > MAX_KNOWN_STREAMS:
            self._passed.popitem(last=False)

    async def _accept(self, event: Event) -> None:
        async with self._lock(event.stream):
            passed = self._passed.get(event.stream)
            if passed is not None:
                if event.seq <= passed:
                    return  # passed on already (pulled from the database, or our own)
                if event.seq > passed + 1:
                    await self._fill(event.stream, passed, event.seq - 1)
            await self._pass(event)

    async def _fill(self, stream: str, after: int, through: int) -> None:
        if self._source is None:
            return
        for missing in await self._source.read_range(stream, after, through):
            await self._pass(missing)
        self._remember(stream, max(through, self._passed.get(stream, 0)))

    async def _pass(self, event: Event) -> None:
        self._remember(event.stream, event.seq)
        await self._local.publish(event)

    async def _received(self, channel: str, payload: Any) -> None:
        doc: dict[str, Any] = bson.decode(payload, codec_options=_CODEC)
        node = doc.get("node")
        if node == self.node_id:
            return
        if isinstance(node, str):
            self._peers.add(node)
        if channel == self._events_channel:
            await self._accept(
                Event(doc["stream"], int(doc["seq"]), doc["type"], doc["data"], doc["ts"])
            )
        elif channel == self._ephemeral_channel:
            await self._local.publish_ephemeral(
                EphemeralEvent(doc["type"], doc["data"], tuple(doc["streams"]), doc["private"])
            )

    async def _on_subscribed(self, first: bool) -> None:
        self._subscribed.set()
        await self._flush_unsent()
        if not first:
            for forget in self.on_resubscribed:
                try:
                    forget()
                except Exception:
                    log.exception("Redis bus: a resubscription hook failed")
            await self._recover()

    async def _watch_peers(self) -> None:
        beat = self._alive_ms / 3000
        own = self._alive_prefix + self.node_id
        while True:
            try:
                await self._redis.set(own, b"1", px=self._alive_ms)
                peers = sorted(self._peers)
                if peers:
                    alive = await self._redis.mget([self._alive_prefix + p for p in peers])
                    gone = [peer for peer, value in zip(peers, alive, strict=True) if not value]
                    if gone:
                        self._peers.difference_update(gone)
                        log.warning(
                            "Redis bus: node(s) %s gone; pulling what they stored and "
                            "may not have published",
                            ", ".join(gone),
                        )
                        await self._recover()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                raise_if_stopping()  # else the subscription reports the outage
            except Exception:
                raise_if_stopping()
                log.exception("Redis bus: watching peer nodes failed")
            await asyncio.sleep(beat)

    async def _recover(self) -> None:
        """Back after an outage, or a peer died: pull what was stored meanwhile on the streams
        we know."""
        if self._source is not None:
            known = list(self._passed)
            for start in range(0, len(known), HEADS_BATCH):
                heads = await self._source.heads(known[start : start + HEADS_BATCH])
                for stream, head in heads.items():
                    async with self._lock(stream):
                        passed = self._passed.get(stream)
                        if passed is not None and head > passed:
                            await self._fill(stream, passed, head)

    # sending -----------------------------------------------------------------------------------

    async def _send(self, channel: str, payload: bytes) -> None:
        if self._unsent or not self.connected:
            self._unsent.append((channel, payload))  # in order, after what waits already
            return
        try:
            await self._redis.publish(channel, payload)
        except (RedisError, OSError) as exc:
            log.warning("Redis bus: publish failed (%s); kept until Redis is back", exc)
            self._unsent.append((channel, payload))

    async def _flush_unsent(self) -> None:
        while self._unsent:
            channel, payload = self._unsent[0]
            await self._redis.publish(channel, payload)
            self._unsent.popleft()


_CODEC: bson.CodecOptions[dict[str, Any]] = bson.CodecOptions(tz_aware=True)
