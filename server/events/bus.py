"""The one internal event bus. Producers publish here; transports subscribe.

The in-process bus serves a single node. A Redis-backed bus implements the same protocol so
that producers and transports do not change when several nodes share the load.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from server.events.models import EphemeralEvent, Event

log = logging.getLogger(__name__)

EventHandler = Callable[[Event], Awaitable[None]]
EphemeralHandler = Callable[[EphemeralEvent], Awaitable[None]]


class EventBus(Protocol):
    def subscribe(self, handler: EventHandler) -> None: ...

    def subscribe_ephemeral(self, handler: EphemeralHandler) -> None: ...

    async def publish(self, event: Event) -> None: ...

    async def publish_ephemeral(self, event: EphemeralEvent) -> None: ...

    async def caught_up(self, stream: str, seq: int) -> int:
        """A reader has read ``stream`` through ``seq`` from the database; once this returns,
        every event up to it has reached this node's subscribers (later copies are dropped).

        Returns the position from which this node goes on passing events live: at least
        ``seq``, more when the node had already gone further. Events between ``seq`` and that
        position may never have reached the subscribers (another reader said it had read them
        from the database), so a reader needing them reads them too."""
        ...


class InProcessBus:
    """Calls every subscriber in subscription order; a failing subscriber is logged, not fatal."""

    def __init__(self) -> None:
        self._handlers: list[EventHandler] = []
        self._ephemeral_handlers: list[EphemeralHandler] = []

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def subscribe_ephemeral(self, handler: EphemeralHandler) -> None:
        self._ephemeral_handlers.append(handler)

    async def publish(self, event: Event) -> None:
        for handler in self._handlers:
            try:
                await handler(event)
            except Exception:
                log.exception("event handler %r failed on %s#%s", handler, event.stream, event.seq)

    async def publish_ephemeral(self, event: EphemeralEvent) -> None:
        for handler in self._ephemeral_handlers:
            try:
                await handler(event)
            except Exception:
                log.exception("ephemeral handler %r failed on %s", handler, event.type)

    async def caught_up(self, stream: str, seq: int) -> int:
        """One node: every stored event is published here, in order (StreamLog waits for
        the ones in flight), so there is nothing to pull."""
        return seq
