"""Who is connected right now. Presence is ephemeral: live events and snapshots, never stored.

A user is online while at least one of their connections is open; the first connection makes
them online and the last one to close makes them offline, so several tabs do not flicker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.events.streams import user_stream

Status = Literal["online", "offline"]
ViewersOf = Callable[[str], Awaitable[list[str]]]


class PresenceTracker:
    def __init__(self, bus: EventBus, viewers_of: ViewersOf) -> None:
        self._bus = bus
        self._viewers_of = viewers_of
        self._connections: dict[str, set[str]] = {}

    def status(self, user_id: str) -> Status:
        return "online" if self._connections.get(user_id) else "offline"

    def online_user_ids(self) -> set[str]:
        return {user for user, conns in self._connections.items() if conns}

    async def connected(self, user_id: str, connection_id: str) -> None:
        conns = self._connections.setdefault(user_id, set())
        first = not conns
        conns.add(connection_id)
        if first:
            await self._announce(user_id, "online")

    async def disconnected(self, user_id: str, connection_id: str) -> None:
        conns = self._connections.get(user_id)
        if not conns or connection_id not in conns:
            return
        conns.discard(connection_id)
        if not conns:
            del self._connections[user_id]
            await self._announce(user_id, "offline")

    async def _announce(self, user_id: str, status: Status) -> None:
        online = self.online_user_ids()
        viewers = [v for v in await self._viewers_of(user_id) if v in online and v != user_id]
        # The user's own other devices learn it too (e.g. "you are online elsewhere").
        targets = tuple(user_stream(v) for v in [user_id, *viewers])
        await self._bus.publish_ephemeral(
            EphemeralEvent("presence.changed", {"user_id": user_id, "status": status}, targets)
        )
