"""Service discovery (XEP-0030) and entity capabilities (XEP-0115), built from what the loaded
modules registered, so the server announces exactly what it implements."""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server.xmpp.jid import Jid
from server.xmpp.session import C2SSession
from server.xmpp.stanza import PORTAL_RESOURCE, child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"
CAPS = "http://jabber.org/protocol/caps"
CAPS_NODE = "https://portalhub.example/xmpp"
CHATSTATES = "http://jabber.org/protocol/chatstates"
# What a colleague's portal resource (their merged web presence) is, for clients that decide
# by caps whether to send chat states (libpurple sends <composing/> only to contacts whose
# caps list chat states).
CONTACT_NODE = f"{CAPS_NODE}/contact"
CONTACT_IDENTITY = ("client", "web", "Portal Hub")
CONTACT_FEATURES = frozenset({INFO, CHATSTATES})


def caps_hash(identities: list[tuple[str, str, str]], features: set[str]) -> str:
    """XEP-0115 verification string, SHA-1, base64."""
    text = "".join(f"{c}/{t}//{n}<" for c, t, n in sorted(identities))
    text += "".join(f"{f}<" for f in sorted(features))
    return base64.b64encode(hashlib.sha1(text.encode()).digest()).decode()


def contact_caps() -> ET.Element:
    """XEP-0115 caps for a colleague's presence."""
    ver = caps_hash([CONTACT_IDENTITY], set(CONTACT_FEATURES))
    return element("c", {"hash": "sha-1", "node": CONTACT_NODE, "ver": ver}, ns=CAPS)


def install(server: XmppServer) -> None:
    server.add_feature(INFO, ITEMS)

    async def info(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        query = element("query", ns=INFO)
        if payload.get("node"):
            query.set("node", payload.get("node", ""))
        to = iq.get("to", server.domain)
        target = Jid.parse(to)
        if target.local and target.resource == PORTAL_RESOURCE:
            # A colleague's portal resource: what its caps promise.
            category, kind, name = CONTACT_IDENTITY
            child(query, "identity", {"category": category, "type": kind, "name": name})
            for feature in sorted(CONTACT_FEATURES):
                child(query, "feature", {"var": feature})
        elif "@" in to:
            child(query, "identity", {"category": "account", "type": "registered"})
            for feature in sorted(server.account_features):
                child(query, "feature", {"var": feature})
        else:
            for category, kind, name in server.identities:
                child(query, "identity", {"category": category, "type": kind, "name": name})
            for feature in sorted(server.features):
                child(query, "feature", {"var": feature})
            for form in server.info_forms:
                query.append(form())
        return result(iq, query)

    async def items(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        query = element("query", ns=ITEMS)
        for jid, name in server.disco_items():
            child(query, "item", {"jid": jid, "name": name})
        return result(iq, query)

    server.iq("get", q(INFO, "query"), info)
    server.iq("get", q(ITEMS, "query"), items)

    def caps() -> ET.Element:
        return element(
            "c",
            {
                "hash": "sha-1",
                "node": CAPS_NODE,
                "ver": caps_hash(server.identities, server.features),
            },
            ns=CAPS,
        )

    server.add_stream_feature(caps)
