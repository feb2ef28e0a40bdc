"""Presence (RFC 6121 section 4): an XMPP session is one presence source among the user's web
tabs; the portal's merged state reaches XMPP contacts and web users alike."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server.events.models import EphemeralEvent
from server.store.database import Document
from server.xmpp.jid import Jid
from server.xmpp.modules.blocking import blocked_for
from server.xmpp.modules.csi import deliver_presence
from server.xmpp.modules.disco import contact_caps
from server.xmpp.session import C2SSession
from server.xmpp.stanza import CLIENT, PORTAL_RESOURCE, child, element, q

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

TRANSPORT = "xmpp"


VCARD_UPDATE = "vcard-temp:x:update"
AVATAR_CHANGED = "user.avatar"


def presence_stanza(
    server: XmppServer, login: str, status: str, to: Jid, photo: str | None = None
) -> ET.Element:
    """A colleague's merged presence; ``photo``: the SHA-1 of their picture, announced as
    XEP-0153 asks, so clients fetch the vCard when it changes."""
    frm = Jid(login, server.domain, PORTAL_RESOURCE)
    stanza = element("presence", {"from": str(frm), "to": str(to)})
    if status == "offline":
        stanza.set("type", "unavailable")
    else:
        if status in ("away", "dnd"):
            child(stanza, "show", text=status)
        stanza.append(contact_caps())
        if photo:
            child(child(stanza, "x", ns=VCARD_UPDATE), "photo", text=photo)
    return stanza


async def photo_of(server: XmppServer, user_id: str) -> str | None:
    """The SHA-1 of a user's picture, from the directory's cache."""
    doc = await server.directory.cached_user(user_id)
    return str(doc["avatar_sha1"]) if doc and doc.get("avatar_sha1") else None


def own_copy(stanza: ET.Element, frm: Jid, to: Jid) -> ET.Element:
    """A presence of one of the user's resources, as another of them (or itself) gets it."""
    copy = element("presence", {"from": str(frm), "to": str(to)})
    if stanza.get("type"):
        copy.set("type", stanza.get("type", ""))
    for part in stanza:
        copy.append(part)
    return copy


def flags(stanza: ET.Element) -> tuple[bool, bool]:
    """(active, dnd) from a client's <show/>: away and xa are idle, dnd is do-not-disturb."""
    show = stanza.findtext(q(CLIENT, "show")) or ""
    return show not in ("away", "xa"), show == "dnd"


def install(server: XmppServer) -> None:
    async def send_colleagues(session: C2SSession) -> None:
        """Initial presence: the current state of every colleague one may see who is online."""
        assert session.user is not None and session.jid is not None
        visible = set(await server.directory.visible_user_ids(session.user))
        for user_id in await server.presence.online_user_ids():
            if user_id in visible and user_id != session.user_id:
                status = await server.presence.seen_status(user_id)
                login = await server.login_of(user_id)
                if (
                    login
                    and status != "offline"
                    and not await blocked_for(server, session.user_id, f"{login}@{server.domain}")
                ):
                    photo = await photo_of(server, user_id)
                    deliver_presence(
                        session, presence_stanza(server, login, status, session.jid, photo)
                    )

    async def on_presence(session: C2SSession, stanza: ET.Element) -> bool:
        assert session.jid is not None
        kind = stanza.get("type")
        to = stanza.get("to")
        if to:
            target = Jid.parse(to)
            if target.domain != server.domain:
                return False  # e.g. a MUC room: another module's

            async def visible_user() -> Document | None:
                """The addressed colleague, if the sender may see them: for anyone else the
                answer is the same as for a login nobody has (nothing), so neither a status
                nor an account's existence leaks."""
                user = await server.user_for(target)
                if user is None or session.user is None:
                    return None
                visible = await server.directory.visible_user_ids(session.user)
                return user if str(user["_id"]) in visible else None

            if kind == "subscribe" and await visible_user() is not None:
                # The roster is the company: every subscription already exists.
                session.send_nowait(
                    element(
                        "presence",
                        {
                            "type": "subscribed",
                            "from": str(target.bare),
                            "to": str(session.jid.bare),
                        },
                    )
                )
                return True
            if kind == "probe":
                user = await visible_user()
                if user is not None and not await blocked_for(
                    server, session.user_id, str(target.bare)
                ):
                    status = await server.presence.seen_status(str(user["_id"]))
                    photo = str(user.get("avatar_sha1") or "") or None
                    session.send_nowait(
                        presence_stanza(server, str(user["login"]), status, session.jid, photo)
                    )
            return True  # other directed presence and subscription changes: ignored
        if kind == "unavailable":
            if session.available:
                session.available = False
                await server.presence.disconnected(session.user_id, session.id)
                tell_own_resources(session, stanza)
            for hook in server.on_unavailable:
                await hook(session)
            return True
        if kind not in (None, ""):
            return True
        active, dnd = flags(stanza)
        session.presence = stanza
        if not session.available:
            session.available = True
            await server.presence.connected(session.user_id, session.id, TRANSPORT, active, dnd)
            await send_colleagues(session)
            # A new resource learns of the user's other available ones (RFC 6121 4.2.2).
            for other in server.available_sessions_of(session.user_id):
                if other is not session and other.jid is not None and other.presence is not None:
                    session.send_nowait(own_copy(other.presence, other.jid, session.jid))
            for hook in server.on_available:
                await hook(session)
        else:
            await server.presence.heartbeat(session.user_id, session.id, active, dnd)
        # The user's other resources see this one, and the sender gets its own presence back
        # (RFC 6121 4.2.2, 4.4.2: clients take the echo as the sign they are online).
        tell_own_resources(session, stanza, echo=True)
        return True

    server.on_presence(on_presence)

    def tell_own_resources(session: C2SSession, stanza: ET.Element, echo: bool = False) -> None:
        assert session.jid is not None
        for other in server.sessions_of(session.user_id):
            if other.jid is not None and (other.available or (echo and other is session)):
                other.send_nowait(own_copy(stanza, session.jid, other.jid))

    async def unbound(session: C2SSession) -> None:
        if session.available and session.user is not None:
            session.available = False
            await server.presence.disconnected(session.user_id, session.id)
            tell_own_resources(session, element("presence", {"type": "unavailable"}))

    server.on_unbound(unbound)

    async def presence_changed(event: EphemeralEvent) -> None:
        if event.type != "presence.changed":
            return
        user_id = str(event.data.get("user_id", ""))
        login = await server.login_of(user_id)
        if login is None:
            return
        status = str(event.data.get("status", "offline"))
        photo = await photo_of(server, user_id) if status != "offline" else None
        for stream in event.streams:
            viewer = stream.partition(":")[2]
            if viewer == user_id:
                continue  # a user's own merged state is not a contact's presence
            # Only viewers with a Jabber session here get anything: their blocklist (a read
            # when not cached) is not looked at for the others, so a colleague going online
            # costs nothing for the web-only ones (every viewer of every change before).
            if not server.available_sessions_of(viewer):
                continue
            if await blocked_for(server, viewer, f"{login}@{server.domain}"):
                continue  # XEP-0191: blocked contacts' presence does not reach the viewer
            for session in server.available_sessions_of(viewer):
                if session.jid is not None:
                    deliver_presence(
                        session, presence_stanza(server, login, status, session.jid, photo)
                    )

    async def avatar_changed(event: EphemeralEvent) -> None:
        """XEP-0153: a new picture is announced in a presence with its hash (from the event:
        this node's directory cache may not have heard of the change yet)."""
        if event.type != AVATAR_CHANGED:
            return
        user_id = str(event.data.get("user_id", ""))
        user = await server.directory.cached_user(user_id)
        login = await server.login_of(user_id)
        if user is None or login is None:
            return
        status = await server.presence.seen_status(user_id)
        if status == "offline":
            return  # their next presence carries it
        photo = str(event.data.get("sha1") or "") or None
        for viewer in await server.directory.visible_user_ids(user):
            if viewer == user_id or not server.available_sessions_of(viewer):
                continue  # (a blocklist read saved for each web-only viewer)
            if await blocked_for(server, viewer, f"{login}@{server.domain}"):
                continue
            for session in server.available_sessions_of(viewer):
                if session.jid is not None:
                    stanza = presence_stanza(server, login, status, session.jid, photo)
                    if photo is None:  # removed: an empty <photo/> says "no picture"
                        child(child(stanza, "x", ns=VCARD_UPDATE), "photo")
                    deliver_presence(session, stanza)

    server.bus.subscribe_ephemeral(presence_changed)
    server.bus.subscribe_ephemeral(avatar_changed)
