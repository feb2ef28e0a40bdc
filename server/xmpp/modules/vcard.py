"""vcard-temp (XEP-0054): the portal profile of a colleague, read-only over XMPP."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server.xmpp.jid import Jid
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

VCARD = "vcard-temp"


def install(server: XmppServer) -> None:
    server.add_feature(VCARD)

    async def get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        assert session.user is not None
        to = iq.get("to")
        user = session.user if not to else await server.user_for(Jid.parse(to))
        if user is None or not await server.directory.may_see(session.user, user):
            raise StanzaError("item-not-found")
        card = element("vCard", ns=VCARD)
        first, last = user.get("first_name", ""), user.get("last_name", "")
        child(card, "FN", text=f"{first} {last}".strip() or str(user["login"]))
        name = child(card, "N")
        child(name, "FAMILY", text=last)
        child(name, "GIVEN", text=first)
        child(card, "NICKNAME", text=str(user["login"]))
        if user.get("department_id"):
            dept = await server.store.departments.find_one({"_id": user["department_id"]})
            if dept is not None:
                org = child(card, "ORG")
                child(org, "ORGNAME", text=server.settings.domain)
                child(org, "ORGUNIT", text=str(dept["name"]))
        if user.get("position"):
            child(card, "TITLE", text=str(user["position"]))
        for phone in user.get("phones", []):
            tel = child(card, "TEL")
            child(tel, {"mobile": "CELL", "home": "HOME"}.get(phone.get("type"), "WORK"))
            child(tel, "VOICE")
            child(tel, "NUMBER", text=str(phone.get("number", "")))
        if user.get("email"):
            email = child(card, "EMAIL")
            child(email, "INTERNET")
            child(email, "USERID", text=str(user["email"]))
        return result(iq, card)

    async def set_card(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        raise StanzaError("not-allowed", "the profile is edited in the portal")

    server.iq("get", q(VCARD, "vCard"), get)
    server.iq("set", q(VCARD, "vCard"), set_card)
