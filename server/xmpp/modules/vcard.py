"""vcard-temp (XEP-0054): the portal profile of a colleague, from the directory (the user and
their department as the directory service keeps them), and one's own profile set from a
client: the fields users may change in the portal themselves, through the directory service.

A vCard set changes what it carries of: the name (N: GIVEN, FAMILY), the position (TITLE),
the phones (TEL, all of them when any is given) and the picture (PHOTO: TYPE and BINVAL,
base64, at most ``MAX_AVATAR_BYTES``; an empty PHOTO removes it). What it leaves out stays as
it is (clients that send only a new picture must not erase the name), and what users do not
change themselves (login, e-mail, department) is the portal's: ignored. Bad base64 or a value
the portal refuses is ``bad-request`` with the reason; a picture too large ``not-acceptable``.
"""

from __future__ import annotations

import base64
import binascii
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from server.directory.models import ProfileUpdate
from server.directory.service import MAX_AVATAR_BYTES
from server.web.problems import Problem
from server.xmpp.jid import Jid
from server.xmpp.limits import writes_of
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

VCARD = "vcard-temp"
PHOTO_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
PHONE_TYPES = (("CELL", "mobile"), ("HOME", "home"), ("WORK", "work"))


def profile_fields(card: ET.Element) -> dict[str, Any]:
    """The profile fields a vCard carries (only those users may change themselves)."""
    fields: dict[str, Any] = {}
    name = card.find(q(VCARD, "N"))
    if name is not None:
        for tag, field in (("GIVEN", "first_name"), ("FAMILY", "last_name")):
            part = name.find(q(VCARD, tag))
            if part is not None:
                fields[field] = (part.text or "").strip()
    title = card.find(q(VCARD, "TITLE"))
    if title is not None:
        fields["position"] = (title.text or "").strip()
    tels = card.findall(q(VCARD, "TEL"))
    if tels:
        phones = []
        for tel in tels:
            number = (tel.findtext(q(VCARD, "NUMBER")) or "").strip()
            if not number:
                continue
            kind = next(
                (k for tag, k in PHONE_TYPES if tel.find(q(VCARD, tag)) is not None), "work"
            )
            phones.append({"type": kind, "number": number})
        fields["phones"] = phones
    return fields


def read_photo(photo: ET.Element) -> tuple[str, bytes] | None:
    """A PHOTO's (type, bytes); None for an empty PHOTO (remove the picture)."""
    text = "".join((photo.findtext(q(VCARD, "BINVAL")) or "").split())
    if not text:
        if photo.find(q(VCARD, "EXTVAL")) is not None:
            raise StanzaError("feature-not-implemented", "a picture by address (EXTVAL)")
        return None
    if len(text) > (MAX_AVATAR_BYTES + 2) // 3 * 4 + 4:
        raise StanzaError("not-acceptable", f"a picture is at most {MAX_AVATAR_BYTES} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise StanzaError("bad-request", "PHOTO/BINVAL is not base64") from None
    if len(data) > MAX_AVATAR_BYTES:
        raise StanzaError("not-acceptable", f"a picture is at most {MAX_AVATAR_BYTES} bytes")
    media_type = (photo.findtext(q(VCARD, "TYPE")) or "").strip().lower()
    if media_type not in PHOTO_TYPES:
        raise StanzaError(
            "bad-request", f"PHOTO/TYPE must be one of {', '.join(sorted(PHOTO_TYPES))}"
        )
    return media_type, data


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
        if user.get("avatar_sha1"):
            picture = await server.directory.avatar(str(user["_id"]))
            if picture is not None:
                photo = child(card, "PHOTO")
                child(photo, "TYPE", text=picture[0])
                child(photo, "BINVAL", text=base64.b64encode(picture[1]).decode())
        return result(iq, card)

    async def set_card(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        to = iq.get("to")
        if to and Jid.parse(to).bare != Jid.parse(iq.get("from", "")).bare:
            raise StanzaError("forbidden", "only one's own vCard")
        writes_of(server).check(session.user_id)
        fields = profile_fields(payload)
        photo = payload.find(q(VCARD, "PHOTO"))
        picture = read_photo(photo) if photo is not None else None
        try:
            patch = ProfileUpdate.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise StanzaError("bad-request", f"{where}: {first['msg']}") from None
        directory = server.directory
        try:
            if fields:
                await directory.update_user(session.user_id, patch, session.user_id)
            if photo is not None:
                media_type, data = picture if picture is not None else ("", None)
                await directory.set_avatar(session.user_id, media_type, data)
        except Problem as problem:
            raise StanzaError("bad-request", problem.detail or problem.title) from None
        return result(iq)

    server.iq("get", q(VCARD, "vCard"), get)
    server.iq("set", q(VCARD, "vCard"), set_card)
