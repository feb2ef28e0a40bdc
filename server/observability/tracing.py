"""Following an event from its producer to its deliveries, without changing its wire form.

``TracedStreamLog`` remembers, while an append is in flight, which request made it.
``ObservedBus`` wraps the node's bus: when the log publishes a stored event it counts it and
logs ``event stored`` with the event id and that request id; and every subscriber (the hub,
the XMPP modules) runs with both ids in the context variables, so whatever they log while
delivering the event carries them. Events that arrive from other nodes (Redis) or are pulled
from the database carry the event id only: their request happened elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

from server.events.bus import EphemeralHandler, EventBus, EventHandler
from server.events.models import EphemeralEvent, Event
from server.events.streams import HINT_TTL_SECONDS, Append, StreamLog
from server.observability.context import current_request_id, event_id, traced
from server.observability.instruments import EVENTS_PUBLISHED, stream_kind, trace_log
from server.store.database import Store

_Key = tuple[str, int]


class _Origins:
    """The request behind each append in flight, by (stream, identity of its data)."""

    def __init__(self) -> None:
        self._by_key: dict[_Key, list[str]] = {}

    def add(self, key: _Key, request_id: str) -> None:
        self._by_key.setdefault(key, []).append(request_id)

    def remove(self, key: _Key, request_id: str) -> None:
        ids = self._by_key.get(key)
        if ids is not None:
            ids.remove(request_id)
            if not ids:
                del self._by_key[key]

    def of(self, event: Event) -> str | None:
        ids = self._by_key.get((event.stream, id(event.data)))
        # The same data appended to one stream by two requests at once: say neither.
        return ids[0] if ids and len(set(ids)) == 1 else None

    def __len__(self) -> int:
        return len(self._by_key)


class ObservedBus:
    """The node's bus, counted and traced. Implements ``EventBus`` by delegation."""

    def __init__(self, inner: EventBus) -> None:
        self.inner = inner
        self.origins = _Origins()
        self.published = 0  # events this node stored (and published)

    def subscribe(self, handler: EventHandler) -> None:
        self.inner.subscribe(self._traced(handler))

    def subscribe_ephemeral(self, handler: EphemeralHandler) -> None:
        self.inner.subscribe_ephemeral(handler)

    async def publish(self, event: Event) -> None:
        """Called by the stream log, once per event this node stored."""
        self.published += 1
        EVENTS_PUBLISHED.inc(kind=stream_kind(event.stream))
        with traced(request_id=self.origins.of(event), event=event_id(event.stream, event.seq)):
            trace_log.debug("event stored", extra={"type": event.type})
            await self.inner.publish(event)

    async def publish_ephemeral(self, event: EphemeralEvent) -> None:
        await self.inner.publish_ephemeral(event)

    async def caught_up(self, stream: str, seq: int) -> int:
        return await self.inner.caught_up(stream, seq)

    def _traced(self, handler: EventHandler) -> EventHandler:
        @functools.wraps(handler)
        async def deliver(event: Event) -> None:
            with traced(request_id=self.origins.of(event), event=event_id(event.stream, event.seq)):
                await handler(event)

        return deliver


class TracedStreamLog(StreamLog):
    """A ``StreamLog`` that tells its ``ObservedBus`` which request each append is for."""

    def __init__(
        self,
        store: Store,
        bus: ObservedBus,
        *,
        retention_seconds: int,
        replay_limit: int = 5000,
        hint_ttl_seconds: float = HINT_TTL_SECONDS,
    ) -> None:
        super().__init__(
            store,
            bus,
            retention_seconds=retention_seconds,
            replay_limit=replay_limit,
            hint_ttl_seconds=hint_ttl_seconds,
        )
        self.observed = bus

    def enqueue(self, items: Sequence[Append]) -> list[asyncio.Future[Event]]:
        current = current_request_id()
        origins: list[tuple[_Key, str]] = []
        for item in items:
            request_id = item.request_id or current
            if request_id is not None:
                key = (item.stream, id(item.data))
                self.observed.origins.add(key, request_id)
                origins.append((key, request_id))
        futures = super().enqueue(items)
        if origins:
            # Until the last of them is stored and published (or failed).
            remaining = [len(futures)]

            def done(_: asyncio.Future[Event]) -> None:
                remaining[0] -= 1
                if remaining[0] == 0:
                    for key, request_id in origins:
                        self.observed.origins.remove(key, request_id)

            for future in futures:
                future.add_done_callback(done)
        return futures
