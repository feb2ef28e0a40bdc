"""A Redis pub/sub subscription that stays up: the one loop the event bus and the presence
store both need.

Pub/sub forgets whatever is published while a subscriber is away, so what matters is the
moment a subscription is (re)confirmed: from then on nothing is missed, and whatever happened
before must be read from where it is kept (the database, Redis keys). The owner does that in
``on_subscribed``, called after each confirmation; messages are handed to ``on_message`` one at
a time, in order. A lost connection is retried with a growing delay and reported once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from server.background import raise_if_stopping, stop

log = logging.getLogger(__name__)

RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
CONFIRM_TIMEOUT_SECONDS = 5.0

OnSubscribed = Callable[[bool], Awaitable[None]]
"""Called after each confirmed subscription; True the first time, False after a loss."""
OnMessage = Callable[[str, Any], Awaitable[None]]
"""Called with the channel (as text) and the payload of each message."""


class RedisSubscription:
    def __init__(
        self,
        redis: Redis,
        channels: Sequence[str],
        *,
        name: str,
        on_subscribed: OnSubscribed,
        on_message: OnMessage,
    ) -> None:
        self._redis = redis
        self._channels = list(channels)
        self._name = name
        self._on_subscribed = on_subscribed
        self._on_message = on_message
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    async def _run(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        first = True
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(*self._channels)
                await _confirmed(pubsub, len(self._channels))
                if not first:
                    log.info("%s: subscribed to Redis again", self._name)
                self.connected = True
                delay = RECONNECT_FIRST_SECONDS
                await self._on_subscribed(first)
                first = False
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    try:
                        await self._on_message(channel, message["data"])
                    except Exception:
                        log.exception("%s: a message from Redis could not be handled", self._name)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                raise_if_stopping()
                if self.connected:
                    log.warning("%s: Redis connection lost (%s); reconnecting", self._name, exc)
                self.connected = False
            except Exception:
                raise_if_stopping()
                log.exception("%s: subscription failed; starting it again", self._name)
                self.connected = False
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)


async def _confirmed(pubsub: PubSub, count: int) -> None:
    """Wait for Redis to confirm every channel: from then on no message is missed."""
    while count:
        message = await pubsub.get_message(timeout=CONFIRM_TIMEOUT_SECONDS)
        if message is None:
            raise TimeoutError("no subscription confirmation from Redis")
        if message.get("type") == "subscribe":
            count -= 1
