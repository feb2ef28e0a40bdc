"""Small protocol pieces: ping (XEP-0199), version (XEP-0092), session (RFC 3921), and private
XML storage (XEP-0049) through the directory's ``PrivateStorage``: what clients keep there
(XEP-0048 bookmarks of the rooms they join, settings) follows the user to every client; the
roster group delimiter (XEP-0083) is the server's, ``/``, and cannot be changed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server import __version__
from server.directory.private_storage import StorageFull
from server.xmpp.jid import Jid
from server.xmpp.limits import writes_of
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, namespace, q, result
from server.xmpp.xmlstream import serialize

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

PING = "urn:xmpp:ping"
VERSION = "jabber:iq:version"
SESSION = "urn:ietf:params:xml:ns:xmpp-session"
PRIVATE = "jabber:iq:private"
RESERVED = frozenset({"jabber:client", "jabber:server", PRIVATE})
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

    storage = server.private_storage

    def own(iq: ET.Element) -> None:
        to = iq.get("to")
        if to and Jid.parse(to).bare != Jid.parse(iq.get("from", "")).bare:
            raise StanzaError("forbidden", "only one's own private storage")

    def wanted(payload: ET.Element) -> ET.Element:
        """XEP-0049: exactly one namespaced element, not of the protocol's own namespaces."""
        if len(payload) != 1:
            raise StanzaError("not-acceptable", "one element per request")
        stored = payload[0]
        if namespace(stored.tag) in RESERVED or not stored.tag.startswith("{"):
            raise StanzaError("not-acceptable", "not a namespace for private storage")
        return stored

    async def private_get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        own(iq)
        stored = wanted(payload)
        query = element("query", ns=PRIVATE)
        if stored.tag == q(DELIMITER, "roster"):
            child(query, "roster", ns=DELIMITER, text=GROUP_DELIMITER)
            return result(iq, query)
        data = await storage.get(session.user_id, stored.tag) if storage else None
        # (written by private_set from a parsed element: no DOCTYPE, no entities)
        query.append(ET.fromstring(data) if data else ET.Element(stored.tag))
        return result(iq, query)

    async def private_set(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        own(iq)
        writes_of(server).check(session.user_id)
        stored = wanted(payload)
        if stored.tag == q(DELIMITER, "roster") or storage is None:
            raise StanzaError("not-allowed", "the roster delimiter is the server's: /")
        data = serialize(stored, namespace(stored.tag)).decode()
        try:
            await storage.put(session.user_id, stored.tag, data)
        except StorageFull as exc:
            raise StanzaError("resource-constraint", str(exc)) from None
        return result(iq)

    server.iq("get", q(PING, "ping"), ping)
    server.iq("get", q(VERSION, "query"), version)
    server.iq("set", q(SESSION, "session"), legacy_session)
    server.iq("get", q(PRIVATE, "query"), private_get)
    server.iq("set", q(PRIVATE, "query"), private_set)
