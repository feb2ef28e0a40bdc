"""Full-JID addressing across nodes: an iq (or its answer) to a colleague's Jabber resource
whose session lives on another hub node is relayed over the ephemeral bus, as one server
(Prosody) would route it between its own clients.

- Node A (the sender's): the full JID is no session here, but the presence store has an XMPP
  source with that resource, and the source id names the node holding it (``node_tag`` +
  ``.`` + the session's own id). If the sender may see the user and is not blocked (else the
  same ``service-unavailable`` as on one node), A publishes ``xmpp.relay`` with the target
  node, the addresses, the already-checked stanza as XML, and the sender's source id.
- Node B (the one named) delivers it to its session with that full JID, if it is still there
  and the user has not blocked the sender meanwhile; otherwise an iq get/set is answered
  ``service-unavailable`` by the same way back (to the sender's node, by source id), and a
  result or error is dropped, as on one node.
- The answer of B's client goes back the same way: B remembers which source asked (by the
  answering session and iq id, bounded), so it reaches the asker's full JID on A.

Bounds: a stanza is at most ``xmpp_max_stanza_bytes`` (the stream's limit) and the read rate
applies as for any stanza; on top of that each session relays at most ``RELAYS_PER_SECOND``
(burst ``RELAY_BURST``): past it an iq get/set is refused ``resource-constraint`` (wait), an
answer dropped. Logs carry addresses' node and kind at most, never the stanza.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from typing import TYPE_CHECKING, Literal

from server.channels.ratelimit import TokenBucket
from server.events.models import EphemeralEvent
from server.xmpp.jid import InvalidJid, Jid
from server.xmpp.stanza import StanzaError, error_reply
from server.xmpp.xmlstream import serialize

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer
    from server.xmpp.session import C2SSession

log = logging.getLogger(__name__)

RELAY = "xmpp.relay"
RELAYS_PER_SECOND = 20.0  # per session: disco, version, a Jingle negotiation's bursts
RELAY_BURST = 50
MAX_ASKED = 10_000  # relayed requests remembered for their answers' way back, at most
ASKED_SECONDS = 120.0  # how long an answer may take to come back the same way

Arrival = Literal["deliver", "bounce", "drop"]


def on_arrival(kind: str | None, present: bool, blocked: bool) -> Arrival:
    """What the node holding (or having held) a full JID does with a relayed stanza: deliver
    it to the session; or, gone or blocked, refuse a request (``service-unavailable``, as one
    node does) and drop an answer (never answer a result or an error)."""
    if present and not blocked:
        return "deliver"
    return "bounce" if kind in ("get", "set") else "drop"


def node_of(source_id: str) -> str:
    """The node tag an XMPP source (session) id carries."""
    return source_id.partition(".")[0]


class Relay:
    def __init__(self, server: XmppServer) -> None:
        self.server = server
        self.enabled = server.settings.redis_url is not None  # one node: nothing elsewhere
        self._buckets: dict[str, TokenBucket] = {}  # session id -> relays it may send
        # (answering session id, iq id) -> (asker's full JID, asker's source id, when)
        self._asked: OrderedDict[tuple[str, str], tuple[str, str, float]] = OrderedDict()
        server.bus.subscribe_ephemeral(self.on_event)

    def forget(self, session: C2SSession) -> None:
        self._buckets.pop(session.id, None)

    # node A ----------------------------------------------------------------------------------

    async def source_for(
        self, session: C2SSession, to: Jid, stanza: ET.Element
    ) -> tuple[str, str] | None:
        """(the node tag, the source id) of another node's session with this full JID that
        the sender may reach; None when there is none (or none it may see, or it blocked
        the sender: the same answer as on one node). The answer to a relayed request goes
        back to the source that asked."""
        if not self.enabled or not to.resource or not to.local:
            return None
        server = self.server
        if stanza.get("type") in ("result", "error"):
            asked = self._asked.get((session.id, stanza.get("id", "")))
            fresh = asked is not None and time.monotonic() - asked[2] <= ASKED_SECONDS
            if asked is not None and fresh and asked[0] == str(to):
                return node_of(asked[1]), asked[1]
        target = await server.user_for(to)
        if target is None or session.user is None or session.jid is None:
            return None
        user_id = str(target["_id"])
        found = next(
            (
                s.id
                for s in await server.presence.sources_of(user_id)
                if s.transport == "xmpp" and s.resource == to.resource
            ),
            None,
        )
        if found is None or node_of(found) == server.node_tag:
            return None  # ours: gone (the local path has answered for a live one)
        if not await server.directory.may_see(session.user, target):
            return None
        if server.blocking is not None and await server.blocking.blocks(user_id, str(session.jid)):
            return None
        return node_of(found), found

    async def send(self, session: C2SSession, stanza: ET.Element, node: str, source: str) -> None:
        """Publish a stanza of ``session`` for the session ``source`` on ``node``."""
        request = stanza.get("type") in ("get", "set")
        if not request:  # answered: the way back is used once
            self._asked.pop((session.id, stanza.get("id", "")), None)
        bucket = self._buckets.get(session.id)
        now = time.monotonic()
        if bucket is None:
            bucket = self._buckets[session.id] = TokenBucket(RELAYS_PER_SECOND, RELAY_BURST, now)
        if not bucket.take(now):
            if request:
                raise StanzaError("resource-constraint", "too many requests: try again")
            return
        await self._publish(node, source, stanza, session.id)

    async def _publish(self, node: str, source: str, stanza: ET.Element, back: str) -> None:
        await self.server.bus.publish_ephemeral(
            EphemeralEvent(
                RELAY,
                {
                    "node": node,
                    "source": source,
                    "back": back,
                    "stanza": serialize(stanza).decode(),
                },
            )
        )

    # node B ----------------------------------------------------------------------------------

    async def on_event(self, event: EphemeralEvent) -> None:
        if event.type != RELAY or event.data.get("node") != self.server.node_tag:
            return
        # Not in the bus's handler: finding the user and the block list may wait.
        self.server.spawn(self._arrived(event.data))

    async def _arrived(self, data: dict[str, object]) -> None:
        server = self.server
        try:  # our own serialisation from another node: no DTD, no entities
            stanza = ET.fromstring(
                "<w xmlns='jabber:client'>" + str(data.get("stanza", "")) + "</w>"
            )[0]
            to, sender = Jid.parse(stanza.get("to", "")), Jid.parse(stanza.get("from", ""))
        except (ET.ParseError, IndexError, InvalidJid):
            log.warning("a relayed stanza that does not parse: dropped")
            return
        back = str(data.get("back", ""))
        target = await server.user_for(to)
        peer = (
            server.sessions.get(str(target["_id"]), {}).get(to.resource)
            if target is not None
            else None
        )
        blocked = (
            peer is not None
            and server.blocking is not None
            and await server.blocking.blocks(peer.user_id, str(sender))
        )
        kind = stanza.get("type")
        action = on_arrival(kind, peer is not None, blocked)
        if action == "deliver":
            assert peer is not None
            if kind in ("get", "set"):
                self._remember(peer.id, stanza.get("id", ""), str(sender), back)
            peer.send_nowait(stanza)
        elif action == "bounce" and back:
            refusal = error_reply(stanza, "service-unavailable")
            refusal.set("from", str(to))
            refusal.set("to", str(sender))
            await self._publish(node_of(back), back, refusal, "")

    def _remember(self, session_id: str, iq_id: str, asker: str, source: str) -> None:
        self._asked[(session_id, iq_id)] = (asker, source, time.monotonic())
        while len(self._asked) > MAX_ASKED:
            self._asked.popitem(last=False)
