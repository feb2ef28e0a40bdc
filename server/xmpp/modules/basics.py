"""Small protocol pieces: ping (XEP-0199), version (XEP-0092), session (RFC 3921), the roster
delimiter in private storage (XEP-0049/XEP-0083)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server import __version__
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

PING = "urn:xmpp:ping"
VERSION = "jabber:iq:version"
SESSION = "urn:ietf:params:xml:ns:xmpp-session"
PRIVATE = "jabber:iq:private"
DELIMITER = "roster:delimiter"
GROUP_DELIMITER = "/"


def install(server: XmppServer) -> None:
    server.add_feature(PING, VERSION, PRIVATE)

    async def ping(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        return result(iq)

    async def version(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        query = element("query", ns=VERSION)
        child(query, "name", text="Portal Hub")
        child(query, "version", text=__version__)
        return result(iq, query)

    async def legacy_session(
        session: C2SSession, iq: ET.Element, payload: ET.Element
    ) -> ET.Element:
        return result(iq)  # RFC 3921 session establishment: nothing left to do today

    async def private_get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        stored = payload[0] if len(payload) else None
        if stored is None:
            raise StanzaError("bad-request")
        query = element("query", ns=PRIVATE)
        if stored.tag == q(DELIMITER, "roster"):
            child(query, "roster", ns=DELIMITER, text=GROUP_DELIMITER)
        else:
            query.append(ET.Element(stored.tag))  # nothing stored for other namespaces
        return result(iq, query)

    async def private_set(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        raise StanzaError("not-allowed", "private storage is read-only here")

    server.iq("get", q(PING, "ping"), ping)
    server.iq("get", q(VERSION, "query"), version)
    server.iq("set", q(SESSION, "session"), legacy_session)
    server.iq("get", q(PRIVATE, "query"), private_get)
    server.iq("set", q(PRIVATE, "query"), private_set)
