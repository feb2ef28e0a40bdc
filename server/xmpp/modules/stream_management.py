"""Stream management (XEP-0198): acknowledgements, and resumption of a session whose
connection died, as Prosody's mod_smacks does it.

- ``<enable/>`` after binding: the server counts the stanzas it handled (its ``h``, sent in
  ``<a/>`` when the client asks with ``<r/>``), keeps every stanza it sent until the client
  acknowledges it, and asks for acks itself (one ``<r/>`` after each write that leaves
  stanzas unacknowledged, never two outstanding). At most ``MAX_QUEUE`` stanzas (or
  ``MAX_QUEUE_BYTES``) wait: past that the session ends with ``policy-violation``.
- With ``resume='true'``: a connection that dies without ``</stream>`` leaves the session
  *held* for ``PORTALHUB_XMPP_RESUME_SECONDS``: still bound, its presence unchanged (contacts
  see no flap), its stanzas queued. ``<resume previd h/>`` on a new authenticated stream takes
  it over: ``<resumed/>``, then the stanzas the client had not acknowledged, once, in order.
- A session with stream management that ends for good (the hold ran out, the client closed
  with stanzas unacknowledged, the queue overflowed, the node shuts down) hands its
  unacknowledged chat messages to offline delivery: the user's delivery mark goes back to just
  before the first of them, so their next login gets them with a delay stamp, once.
- Held sessions live in this process. A resume on another node (or after a restart) fails
  with ``item-not-found``; the node that held it is asked over the bus to end it first (and
  answers), so its messages are in offline delivery before the client binds anew. A shutdown
  ends every held session the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import xml.etree.ElementTree as ET
from collections import deque
from typing import TYPE_CHECKING

from server.background import raise_if_stopping, stop
from server.events.models import EphemeralEvent
from server.xmpp.session import C2SSession, Resumed
from server.xmpp.stanza import CLIENT, STANZAS_NS, child, element, q
from server.xmpp.xmlstream import StreamError

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

log = logging.getLogger(__name__)

SM = "urn:xmpp:sm:3"
SID = "urn:xmpp:sid:0"
MOD = 2**32  # h counts modulo 2^32
MAX_QUEUE = 500  # unacknowledged stanzas per session (mod_smacks' smacks_max_queue_size)
MAX_QUEUE_BYTES = 2 * 1024 * 1024
SWEEP_SECONDS = 1.0
RELEASE_WAIT_SECONDS = 3.0  # how long a resume on another node waits for the holder's answer
TAKE_OVER_SECONDS = 5.0
RELEASE = "xmpp.sm.release"
RELEASED = "xmpp.sm.released"


class Acks:
    """One session's stream management: counters and the stanzas not yet acknowledged."""

    def __init__(self, resume_id: str | None, seconds: int) -> None:
        self.id = resume_id  # None: acks only, no resumption
        self.seconds = seconds  # how long the session is held once its connection drops
        self.handled = 0  # stanzas from the client handled (the h this side reports)
        self.acked = 0  # the client's last h: stanzas it has from us
        self.queue: deque[bytes] = deque()  # sent after ``acked``, in order
        self.queue_bytes = 0
        self.requested = False  # an <r/> is out and not yet answered
        self.overflowed = False
        self.finished = False  # the session ended: nothing is kept any more

    @property
    def sent(self) -> int:
        return (self.acked + len(self.queue)) % MOD

    def handled_one(self) -> None:
        self.handled = (self.handled + 1) % MOD

    def track(self, data: bytes) -> bool:
        """Keep a sent stanza until acknowledged; False when that passes the bounds."""
        if self.overflowed:
            return True  # ending already; its messages come back by offline delivery
        self.queue.append(data)
        self.queue_bytes += len(data)
        if len(self.queue) > MAX_QUEUE or self.queue_bytes > MAX_QUEUE_BYTES:
            self.overflowed = True
            return False
        return True

    def valid(self, h: int) -> bool:
        """Whether the client's h acknowledges no more than was sent."""
        return (h - self.acked) % MOD <= len(self.queue)

    def ack(self, h: int) -> None:
        """The client has everything up to ``h`` (checked with ``valid``)."""
        for _ in range(min((h - self.acked) % MOD, len(self.queue))):
            self.queue_bytes -= len(self.queue.popleft())
        self.acked = h
        self.requested = False

    def wants_request(self) -> bool:
        """Whether to ask the client for an ack now (something unacknowledged, no <r/> out)."""
        if self.requested or not self.queue or self.finished:
            return False
        self.requested = True
        return True


def failed(condition: str, h: int | None = None) -> ET.Element:
    answer = element("failed", ns=SM)
    if h is not None:
        answer.set("h", str(h))
    child(answer, condition, ns=STANZAS_NS)
    return answer


def too_high(h: int, acks: Acks) -> StreamError:
    """XEP-0198 4: an h above what was sent ends the stream."""
    app = element("handled-count-too-high", {"h": str(h), "send-count": str(acks.sent)}, ns=SM)
    return StreamError("undefined-condition", "you acknowledged stanzas never sent", app)


def parse_h(value: str | None) -> int:
    try:
        h = int(value or "")
    except ValueError:
        raise StreamError("invalid-xml", "h is a number") from None
    if not 0 <= h < MOD:
        raise StreamError("invalid-xml", "h is a 32-bit unsigned number")
    return h


def message_id(data: bytes, bare: str) -> str | None:
    """The portal message id of a queued stanza, if it is a chat message to the user (the
    messenger's, with its XEP-0359 stanza-id by the user's bare JID): what offline delivery
    gives again. Presence, iq, room messages and carbons are not."""
    if not data.startswith(b"<message"):
        return None
    try:  # our own output: no DTD, no entities
        stanza = ET.fromstring(b"<w xmlns='jabber:client'>" + data + b"</w>")[0]
    except (ET.ParseError, IndexError):
        return None
    if stanza.get("type", "normal") not in ("chat", "normal"):
        return None
    found = stanza.find(q(SID, "stanza-id"))
    if found is None or found.get("by") != bare or stanza.find(q(CLIENT, "body")) is None:
        return None
    return found.get("id") or None


class StreamManagement:
    def __init__(self, server: XmppServer) -> None:
        self.server = server
        # Resume ids carry this instance's tag: a node tells its own from another's (or a
        # previous run's), and asks the holder on the bus.
        self.instance = secrets.token_hex(4)
        window = server.settings.xmpp_resume_seconds
        self.window = max(1, round(window)) if window > 0 else 0  # whole seconds (max='')
        self.resumable: dict[str, C2SSession] = {}  # resume id -> session (live or held)
        self.held: dict[C2SSession, float] = {}  # held session -> when its hold ends
        self._waiting: dict[str, asyncio.Future[None]] = {}  # resume id -> holder's answer
        self._sweeper: asyncio.Task[None] | None = None
        self.stopping = False

    # nonzas ----------------------------------------------------------------------------------

    async def on_nonza(self, session: C2SSession, nonza: ET.Element) -> None:
        name = nonza.tag.rpartition("}")[2]
        acks = session.sm
        if name == "r":
            if acks is None:
                raise StreamError("unsupported-stanza-type", "stream management is not enabled")
            session.send_nonza(element("a", {"h": str(acks.handled)}, ns=SM))
        elif name == "a":
            if acks is None:
                raise StreamError("unsupported-stanza-type", "stream management is not enabled")
            h = parse_h(nonza.get("h"))
            if not acks.valid(h):
                raise too_high(h, acks)
            acks.ack(h)
        elif name == "enable":
            self.enable(session, nonza)
        elif name == "resume":
            await self.resume(session, nonza)
        else:
            raise StreamError("unsupported-stanza-type", f"<{name}/> of XEP-0198")

    def enable(self, session: C2SSession, nonza: ET.Element) -> None:
        if session.sm is not None or not session.bound:
            # XEP-0198 3: once, and only after binding a resource.
            session.send_nonza(failed("unexpected-request"))
            return
        resume = nonza.get("resume") in ("true", "1") and self.window > 0 and not self.stopping
        seconds = self.window
        with contextlib.suppress(ValueError):
            seconds = max(1, min(seconds, int(nonza.get("max") or seconds)))
        resume_id = f"{self.instance}.{secrets.token_urlsafe(18)}" if resume else None
        session.sm = Acks(resume_id, seconds)
        enabled = element("enabled", ns=SM)
        if resume_id is not None:
            self.resumable[resume_id] = session
            enabled.attrib.update({"id": resume_id, "resume": "true", "max": str(seconds)})
        session.send_nonza(enabled)

    async def resume(self, session: C2SSession, nonza: ET.Element) -> None:
        """``<resume/>`` on a new authenticated stream, before binding."""
        if session.sm is not None or session.bound:
            session.send_nonza(failed("unexpected-request"))
            return
        previd = nonza.get("previd") or ""
        h = parse_h(nonza.get("h"))
        held = self.resumable.get(previd)
        if held is None or held.user is None or held.user_id != session.user_id:
            if held is None:
                await self._ask_holder(previd, session.user_id)
            session.send_nonza(failed("item-not-found"))
            return
        acks = held.sm
        assert acks is not None
        if not acks.valid(h):
            raise too_high(h, acks)
        if not held.hibernating:
            await self._take_over(held)
            if not held.hibernating:  # it ended meanwhile
                session.send_nonza(failed("item-not-found"))
                return
        self.held.pop(held, None)
        held.adopt(session)
        if acks.valid(h):  # (the old connection may have acknowledged more meanwhile)
            acks.ack(h)
        held.send_nonza(element("resumed", {"previd": previd, "h": str(acks.handled)}, ns=SM))
        for data in acks.queue:  # what the client has not got: again, once, in order
            held.send_bytes(data, track=False)
        log.info("xmpp %s: resumed, %d stanzas sent again", held.jid, len(acks.queue))
        raise Resumed(held)

    async def _take_over(self, live: C2SSession) -> None:
        """A resume while the old connection still looks open (the client saw it die before
        the server did): it is dropped, the session held, then resumed."""
        live.drop_connection()
        if live.task is not None and live.task is not asyncio.current_task():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(live.task), TAKE_OVER_SECONDS)

    # holding ---------------------------------------------------------------------------------

    def hold(self, session: C2SSession) -> bool:
        """The connection of ``session`` died: hold it if it may be resumed."""
        acks = session.sm
        if acks is None or acks.id is None or acks.finished or acks.overflowed or self.stopping:
            return False
        if self.resumable.get(acks.id) is not session:
            return False
        loop = asyncio.get_running_loop()
        self.held[session] = loop.time() + acks.seconds
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="xmpp-sm-holds")
        log.info("xmpp %s: connection lost; held %d s for resumption", session.jid, acks.seconds)
        return True

    async def end(self, session: C2SSession) -> None:
        """A held session ends as one whose client left (unavailable to contacts), its
        unacknowledged messages to offline delivery (``unbound``)."""
        self.held.pop(session, None)
        await session.close()

    def overflowed(self, session: C2SSession) -> None:
        """Too much unacknowledged: the session ends; its messages go to offline delivery."""
        log.warning("xmpp %s: too many unacknowledged stanzas; ending the session", session.jid)
        if session.hibernating:
            self.server.spawn(self.end(session))
        else:
            self.server.spawn(
                session.terminate("policy-violation", "too many unacknowledged stanzas")
            )

    async def _sweep(self) -> None:
        """Ends the holds that ran out; keeps the held sessions' presence alive meanwhile."""
        while self.held:
            await asyncio.sleep(SWEEP_SECONDS)
            now = asyncio.get_running_loop().time()
            for session, until in list(self.held.items()):
                try:
                    if now >= until:
                        log.info("xmpp %s: not resumed in time; ending it", session.jid)
                        await self.end(session)
                    else:
                        self.server.touched(session)  # a heartbeat for the presence sweeper
                except Exception:
                    raise_if_stopping()
                    log.exception("ending the held session of %s failed", session.jid)

    async def unbound(self, session: C2SSession) -> None:
        """Any session with stream management that ends for good."""
        acks = session.sm
        if acks is None or acks.finished:
            return
        if acks.id is not None and self.resumable.get(acks.id) is session:
            del self.resumable[acks.id]
        self.held.pop(session, None)
        acks.finished = True
        queue, acks.queue = acks.queue, deque()
        acks.queue_bytes = 0
        if session.user is None or session.jid is None:
            return
        bare = str(session.jid.bare)
        ids = [found for data in queue if (found := message_id(data, bare)) is not None]
        if ids and self.server.bridge is not None:
            await self.server.bridge.undeliver(session.user_id, min(ids))

    async def stop(self) -> None:
        """Shutdown: no more holds; every held session ends now (offline delivery)."""
        self.stopping = True
        for session in list(self.held):
            try:
                await self.end(session)
            except Exception:
                log.exception("ending the held session of %s failed", session.jid)
        await stop(self._sweeper)
        for waiting in self._waiting.values():
            waiting.cancel()

    # other nodes -----------------------------------------------------------------------------

    async def _ask_holder(self, previd: str, user_id: str) -> None:
        """A resume id this node does not hold: if another node (alive) holds it, that node
        ends the session, handing its messages to offline delivery, before we answer."""
        tag = previd.partition(".")[0]
        if tag == self.instance or self.server.settings.redis_url is None or not previd:
            return  # ours and gone, or one node only (a previous run's: ended at shutdown)
        if len(self._waiting) >= 1000 or previd in self._waiting:
            return
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[previd] = answer
        try:
            await self.server.bus.publish_ephemeral(
                EphemeralEvent(RELEASE, {"id": previd, "user": user_id, "node": self.instance})
            )
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(answer, RELEASE_WAIT_SECONDS)
        finally:
            self._waiting.pop(previd, None)

    async def on_event(self, event: EphemeralEvent) -> None:
        data = event.data
        if event.type == RELEASE:
            previd, asker = str(data.get("id", "")), str(data.get("node", ""))
            if asker != self.instance and previd.partition(".")[0] == self.instance:
                # Not in the bus's handler: ending a live session takes a moment.
                self.server.spawn(self._release(previd, str(data.get("user", "")), asker))
        elif event.type == RELEASED and data.get("to") == self.instance:
            answer = self._waiting.get(str(data.get("id", "")))
            if answer is not None and not answer.done():
                answer.set_result(None)

    async def _release(self, previd: str, user_id: str, asker: str) -> None:
        """Another node's client resumes a session of ours: it ends here (its messages to
        offline delivery), then the asker is told, and answers the client."""
        session = self.resumable.get(previd)
        if session is not None and session.user is not None and session.user_id == user_id:
            log.info("xmpp %s: resumed on another node; ending it here", session.jid)
            if session.hibernating:
                await self.end(session)
            else:
                await session.terminate("conflict", "resumed on another node")
                if session.task is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(session.task), TAKE_OVER_SECONDS)
        await self.server.bus.publish_ephemeral(
            EphemeralEvent(RELEASED, {"id": previd, "to": asker})
        )


def install(server: XmppServer) -> None:
    sm = StreamManagement(server)
    server.stream_management = sm
    # A stream feature, not a disco feature (as Prosody announces it).
    server.add_stream_feature(lambda: element("sm", ns=SM))
    server.on_unbound(sm.unbound)
    server.bus.subscribe_ephemeral(sm.on_event)
