"""When typing stops (XEP-0085 ``paused``): the messenger's ``im.typing`` event says someone
is typing, and nothing says they stopped. The web sends it at most every 3 s while keys are
pressed and shows the indicator for 6 s after the last one; Jabber clients show
``<composing/>`` until told otherwise. So a chat state ``paused`` follows when no new typing
event of that user in that chat came for as long as the web shows it, unless a message of
theirs (which carries ``<active/>``) or a chat state their own Jabber client sent ended it
first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer
    from server.xmpp.session import C2SSession

PAUSED_AFTER_SECONDS = 6.0  # the web's TYPING_SHOWN_MS (web-client/src/core/timing.ts)

SendPaused = Callable[[str, str], Awaitable[None]]  # (chat id, typer's user id)


class TypingPauses:
    """One timer per (chat, typer) on this node; each renewal restarts it."""

    def __init__(
        self, server: XmppServer, send: SendPaused, after: float = PAUSED_AFTER_SECONDS
    ) -> None:
        self._server = server
        self._send = send
        self._after = after
        self._timers: dict[tuple[str, str], asyncio.Task[None]] = {}
        server.on_unbound(self._unbound)

    async def _unbound(self, _session: C2SSession) -> None:
        """No session left on this node (the last one gone, or the node draining): nobody
        here to tell, and a drain need not wait for the timers."""
        if self._server.session_count == 0:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()

    def started(self, chat_id: str, user_id: str) -> None:
        key = (chat_id, user_id)
        self.ended(chat_id, user_id)
        self._timers[key] = self._server.spawn(self._later(key))

    def ended(self, chat_id: str, user_id: str) -> None:
        """The typing ended otherwise (a message, the client's own chat state): no paused."""
        timer = self._timers.pop((chat_id, user_id), None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()

    def chats_of(self, user_id: str) -> list[str]:
        """The chats where a timer runs for ``user_id``."""
        return [chat for chat, typer in self._timers if typer == user_id]

    def __len__(self) -> int:
        return len(self._timers)

    async def _later(self, key: tuple[str, str]) -> None:
        await asyncio.sleep(self._after)
        if self._timers.get(key) is asyncio.current_task():
            del self._timers[key]
            await self._send(*key)
