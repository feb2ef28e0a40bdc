"""Message Carbons (XEP-0280): a session that enables them gets copies of what the user sends
from elsewhere (another resource, or the web messenger), and of what is sent to another of
the user's resources by its full JID."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server.xmpp.jid import Jid
from server.xmpp.session import C2SSession
from server.xmpp.stanza import child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"


def sent_copy(user: Jid, original: ET.Element) -> ET.Element:
    """The <sent/> wrapper around a message ``user`` sent from elsewhere (addressed to each
    of their sessions by the caller)."""
    return _carbon(user, original, "sent")


def received_copy(user: Jid, original: ET.Element) -> ET.Element:
    """The <received/> wrapper around a message to another of ``user``'s clients (addressed to
    each of their sessions by the caller)."""
    return _carbon(user, original, "received")


def _carbon(user: Jid, original: ET.Element, kind: str) -> ET.Element:
    wrapper = element(
        "message",
        {"from": str(user.bare), "to": str(user), "type": original.get("type", "chat")},
    )
    forwarded = child(child(wrapper, kind, ns=CARBONS), "forwarded", ns=FORWARD)
    forwarded.append(original)
    return wrapper


def install(server: XmppServer) -> None:
    server.add_feature(CARBONS)

    async def enable(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        session.carbons = True
        return result(iq)

    async def disable(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        session.carbons = False
        return result(iq)

    server.iq("set", q(CARBONS, "enable"), enable)
    server.iq("set", q(CARBONS, "disable"), disable)
