"""A session's stanzas in flight: read, checked and handed to the write path in arrival order,
while their storage completes off the read loop.

Prosody stores nothing, so it routes a message and reads the next. The hub stores every
message in the one history before anyone sees it; awaiting that store before reading on (as
the session once did) made one client's messages cost a database round trip each, one after
the other. Now the read loop does the checks and the enqueue (``ImService``'s write path keeps
the enqueue order as the store order), adds the pending store here, and reads on. One task per
busy session (none for an idle one) awaits the stores in order and sends what the client must
see once a store is decided: the error of a message that could not be stored, the echo of a
resent room message. An error found by the checks of a later stanza waits its turn behind the
stores before it, so a client sees answers in the order it sent.

Backpressure: past ``limit`` unfinished stanzas the read loop stops reading (it waits in
``room()``), so a flood cannot grow memory; the socket's buffers then fill and TCP slows the
sender, as mod_limits' paused reads do.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from server.xmpp.stanza import StanzaError, error_reply

log = logging.getLogger(__name__)

CLOSE_GRACE_SECONDS = 30.0  # how long a closing session waits for its stores to finish


@dataclass(slots=True)
class _Entry:
    pending: Awaitable[Any] | None  # None: decided already (``reply`` is the answer)
    stanza: ET.Element  # what the client sent: an error answers it
    reply: ET.Element | None = None
    done: Callable[[Any], None] | None = None  # what follows a successful store


class Pipeline:
    """The unfinished stanzas of one session, in arrival order."""

    def __init__(
        self,
        send: Callable[[ET.Element], None],
        limit: int,
        spawn: Callable[[Awaitable[None]], asyncio.Task[None]],
    ) -> None:
        self._send = send
        self.limit = limit
        self._spawn = spawn
        self._entries: deque[_Entry] = deque()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # set whenever an entry finishes
        self.peak = 0  # the most stanzas ever unfinished at once (for tests and metrics)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def busy(self) -> bool:
        return bool(self._entries)

    def add(
        self,
        pending: Awaitable[Any],
        stanza: ET.Element,
        done: Callable[[Any], None] | None = None,
    ) -> None:
        """A store handed to the write path; ``pending`` raises ``StanzaError`` for the client
        (anything else is logged and answered ``internal-server-error``)."""
        self._entries.append(_Entry(pending, stanza, done=done))
        self.peak = max(self.peak, len(self._entries))
        self._start()

    def answer(self, stanza: ET.Element, reply: ET.Element) -> None:
        """A reply decided at once (an error from the checks): sent now when nothing is in
        flight, else after what came before it."""
        if not self._entries:
            self._send(reply)
            return
        self._entries.append(_Entry(None, stanza, reply))
        self._start()

    async def room(self) -> None:
        """Returns once fewer than ``limit`` stanzas are unfinished."""
        while len(self._entries) >= self.limit:
            self._changed.clear()
            await self._changed.wait()

    async def drain(self) -> None:
        """Returns once every stanza so far is finished and answered (a stanza that is not a
        plain message waits for this: a correction must find the message it corrects, an iq
        answer must not overtake an earlier error)."""
        while self._entries:
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        """The session ends: what was accepted is still stored (briefly waited for)."""
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), CLOSE_GRACE_SECONDS)
        except TimeoutError:
            log.warning("xmpp: %s stores still unfinished at close; left to finish", len(self))
        except asyncio.CancelledError:
            task.cancel()
            raise

    def _start(self) -> None:
        if self._task is None:
            self._task = self._spawn(self._finish())

    async def _finish(self) -> None:
        try:
            while self._entries:
                entry = self._entries[0]
                reply = entry.reply
                if entry.pending is not None:
                    try:
                        result = await entry.pending
                    except StanzaError as exc:
                        reply = _error(entry.stanza, exc.condition, exc.text)
                    except Exception:
                        log.exception("xmpp: a stanza's store failed")
                        reply = _error(entry.stanza, "internal-server-error")
                    else:
                        if entry.done is not None:
                            try:
                                entry.done(result)
                            except Exception:
                                log.exception("xmpp: answering a stored stanza failed")
                if reply is not None:
                    self._send(reply)
                self._entries.popleft()
                self._changed.set()
        finally:
            self._task = None
            if self._entries:  # cancelled: whatever is left is dropped, nobody waits on it
                for entry in self._entries:
                    if asyncio.iscoroutine(entry.pending):
                        entry.pending.close()  # never started: nothing was stored
                    elif asyncio.isfuture(entry.pending):
                        # The write path's: it stores the message whoever waits for it.
                        entry.pending.add_done_callback(_retrieve)
                self._entries.clear()
            self._changed.set()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # looked at, so that asyncio does not log it as never retrieved


def _error(stanza: ET.Element, condition: str, text: str = "") -> ET.Element | None:
    # RFC 6120 8.3.1: never answer an error with an error.
    if stanza.get("type") == "error":
        return None
    return error_reply(stanza, condition, text)
