"""Entity Time (XEP-0202): the server's clock, in UTC, for clients that show the server's time
or measure their clock's offset (Gajim, Psi). Users' clients answer for themselves: an iq to a
colleague's full JID is passed to that client by the router; the server answers only for
itself (its domain and ``conference.<domain>``)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from server.xmpp.jid import Jid
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

TIME = "urn:xmpp:time"


def time_payload(now: datetime) -> ET.Element:
    """<time/> for a moment: the server keeps UTC, so the offset is always zero."""
    answer = element("time", ns=TIME)
    child(answer, "tzo", text="+00:00")
    child(answer, "utc", text=now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    return answer


def install(server: XmppServer) -> None:
    server.add_feature(TIME)

    async def get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        to = iq.get("to")
        if to and Jid.parse(to).local:
            # A user's bare JID (or their portal resource) is no clock: nobody answers for it.
            raise StanzaError("service-unavailable")
        return result(iq, time_payload(datetime.now(UTC)))

    server.iq("get", q(TIME, "time"), get)
