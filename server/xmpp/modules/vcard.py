"""vcard-temp (XEP-0054): the portal profile of a colleague, read-only over XMPP, from the
directory (the user and their department as the directory service keeps them)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server.web.problems import Problem
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
        if to:
            user = await server.user_for(Jid.parse(to))
        else:  # one's own, as it is now (not as it was at login)
            user = await server.directory.cached_user(session.user_id)
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
            try:
                department = await server.directory.get_department(str(user["department_id"]))
            except Problem:  # gone meanwhile
                department = None
            if department is not None:
                org = child(card, "ORG")
                child(org, "ORGNAME", text=server.settings.domain)
                child(org, "ORGUNIT", text=department.name)
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
