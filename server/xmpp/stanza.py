"""Building and answering stanzas: small helpers over ElementTree, in Clark notation."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

CLIENT = "jabber:client"
# The merged (web) presence of a portal user is shown as one resource of their JID.
PORTAL_RESOURCE = "portal"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"

# RFC 6120 8.3.3: the error type that goes with each condition.
ERROR_TYPES = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


def q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


def element(
    tag: str, attrib: dict[str, str] | None = None, *, text: str | None = None, ns: str = CLIENT
) -> ET.Element:
    el = ET.Element(q(ns, tag) if not tag.startswith("{") else tag, attrib or {})
    if text is not None:
        el.text = text
    return el


def child(
    parent: ET.Element,
    tag: str,
    attrib: dict[str, str] | None = None,
    *,
    ns: str | None = None,
    text: str | None = None,
) -> ET.Element:
    namespace = ns if ns is not None else _ns(parent.tag)
    el = ET.SubElement(parent, tag if tag.startswith("{") else q(namespace, tag), attrib or {})
    if text is not None:
        el.text = text
    return el


def _ns(tag: str) -> str:
    return tag[1:].partition("}")[0] if tag.startswith("{") else CLIENT


def local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def namespace(tag: str) -> str:
    return _ns(tag)


def payload(stanza: ET.Element) -> ET.Element | None:
    """The first child (an iq's payload)."""
    return stanza[0] if len(stanza) else None


class StanzaError(Exception):
    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(condition)
        self.condition = condition
        self.text = text


def error_reply(stanza: ET.Element, condition: str, text: str = "") -> ET.Element:
    """The error answer to a stanza: to/from swapped, its id kept, the original payload dropped."""
    reply = ET.Element(stanza.tag, {"type": "error"})
    if stanza.get("id") is not None:
        reply.set("id", stanza.get("id", ""))
    if stanza.get("from"):
        reply.set("to", stanza.get("from", ""))
    if stanza.get("to"):
        reply.set("from", stanza.get("to", ""))
    error = child(
        reply, "error", {"type": ERROR_TYPES.get(condition, "cancel")}, ns=_ns(stanza.tag)
    )
    child(error, condition, ns=STANZAS_NS)
    if text:
        child(error, "text", ns=STANZAS_NS, text=text)
    return reply


def result(iq: ET.Element, payload_el: ET.Element | None = None) -> ET.Element:
    reply = element("iq", {"type": "result", "id": iq.get("id", "")})
    if iq.get("from"):
        reply.set("to", iq.get("from", ""))
    if iq.get("to"):
        reply.set("from", iq.get("to", ""))
    if payload_el is not None:
        reply.append(payload_el)
    return reply


_DIGITS = re.compile(r"[0-9]{1,9}")


def small_int(text: str | None) -> int | None:
    """A count or a number of seconds from an attribute or element: ASCII digits, at most
    nine of them, else None. ``str.isdigit`` would let "²" and endless digits through."""
    if text is None or not _DIGITS.fullmatch(text):
        return None
    return int(text)
