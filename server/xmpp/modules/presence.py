"""Presence (RFC 6121 section 4): an XMPP session is one presence source among the user's web
tabs, which decide the portal's merged status (the web's view). Jabber contacts see each
resource as Prosody shows a contact's: every Jabber client of a colleague under its own full
JID with its own show, status, priority and caps, and their web messenger (all tabs
together) as one more resource, ``…/portal``, while a tab is open."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from server.events.models import EphemeralEvent
from server.presence.rules import WEB, Shown, shown_from
from server.store.database import Document
from server.xmpp.jid import Jid
from server.xmpp.modules.blocking import blocked_for
from server.xmpp.modules.csi import deliver_presence
from server.xmpp.modules.disco import CAPS, contact_caps
from server.xmpp.session import C2SSession
from server.xmpp.stanza import CLIENT, PORTAL_RESOURCE, child, element, q

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

TRANSPORT = "xmpp"


VCARD_UPDATE = "vcard-temp:x:update"
AVATAR_CHANGED = "user.avatar"


def resource_presence(
    server: XmppServer,
    login: str,
    resource: str,
    shown: Shown | None,
    to: Jid,
    photo: str | None = None,
) -> ET.Element:
    """The presence of one resource of a colleague: one of their Jabber clients as it shows
    itself, or (``WEB``) their web messenger; ``shown`` None: it went unavailable.
    ``photo``: the SHA-1 of their picture, announced as XEP-0153 asks, so clients fetch the
    vCard when it changes."""
    frm = Jid(login, server.domain, PORTAL_RESOURCE if resource == WEB else resource)
    stanza = element("presence", {"from": str(frm), "to": str(to)})
    if shown is None:
        stanza.set("type", "unavailable")
        return stanza
    if shown.show:
        child(stanza, "show", text=shown.show)
    if shown.status:
        child(stanza, "status", text=shown.status)
    if shown.priority:
        child(stanza, "priority", text=str(shown.priority))
    if resource == WEB:
        stanza.append(contact_caps())  # the server answers disco#info for the web resource
    elif (caps := caps_element(shown.caps)) is not None:
        stanza.append(caps)  # the client's own: disco#info to its full JID reaches it
    if photo:
        child(child(stanza, "x", ns=VCARD_UPDATE), "photo", text=photo)
    return stanza


def caps_of(stanza: ET.Element) -> str:
    """A client's XEP-0115 announcement, kept as "hash node ver" (the three are URIs and
    base64: no spaces), or "" when it sent none (or a malformed one)."""
    caps = stanza.find(q(CAPS, "c"))
    if caps is None:
        return ""
    parts = [caps.get("hash", ""), caps.get("node", ""), caps.get("ver", "")]
    if not all(parts) or any(len(p) > 512 or " " in p for p in parts):
        return ""
    return " ".join(parts)


def caps_element(kept: str) -> ET.Element | None:
    parts = kept.split(" ")
    if len(parts) != 3:
        return None
    return element("c", {"hash": parts[0], "node": parts[1], "ver": parts[2]}, ns=CAPS)


def shown_of(stanza: ET.Element) -> Shown:
    """What a client's available presence shows colleagues."""
    return shown_from(
        stanza.findtext(q(CLIENT, "show")),
        stanza.findtext(q(CLIENT, "status")),
        stanza.findtext(q(CLIENT, "priority")),
        caps_of(stanza),
    )


async def photo_of(server: XmppServer, user_id: str) -> str | None:
    """The SHA-1 of a user's picture, from the directory's cache."""
    doc = await server.directory.cached_user(user_id)
    return str(doc["avatar_sha1"]) if doc and doc.get("avatar_sha1") else None


# What each session was last told of each colleague's resources: every announcement is the
# difference from it, so events that come late, twice, or from several nodes at once send
# nothing twice, and a resource that went is always said to be unavailable.
_told: WeakKeyDictionary[C2SSession, dict[str, dict[str, Shown]]] = WeakKeyDictionary()
# One update of a colleague's resources at a time per server (read the state, then send):
# an older read must not overtake a newer one.
_locks: WeakKeyDictionary[XmppServer, dict[str, asyncio.Lock]] = WeakKeyDictionary()


async def resync(server: XmppServer, user_id: str, *, viewer_id: str | None = None) -> None:
    """Bring this node's sessions (of ``viewer_id`` only, if given) up to date with what
    ``user_id``'s resources show: available for new or changed ones, unavailable for gone
    ones. What a session may not see (not a colleague it may see, blocked) counts as
    nothing online."""
    user = await server.directory.cached_user(user_id)
    login = await server.login_of(user_id)
    if user is None or login is None:
        return
    bare = f"{login}@{server.domain}"
    locks = _locks.setdefault(server, {})
    async with locks.setdefault(user_id, asyncio.Lock()):
        seen = await server.presence.resources_seen(user_id)
        viewers = [viewer_id] if viewer_id is not None else list(server.sessions)
        for viewer in viewers:
            if viewer == user_id:
                continue  # one's own resources are told of each other directly
            sessions = [
                s for s in server.available_sessions_of(viewer) if s.jid and s.user is not None
            ]
            if not sessions:
                continue
            if not seen and not any(user_id in _told.get(s, {}) for s in sessions):
                continue  # nothing to show, nothing shown before
            shown = seen
            if seen and (
                not await server.directory.may_see(sessions[0].user or {}, user)
                or await blocked_for(server, viewer, bare)
            ):
                shown = {}
            for session in sessions:
                await _bring(server, session, user_id, login, shown)


async def _bring(
    server: XmppServer,
    session: C2SSession,
    user_id: str,
    login: str,
    shown: dict[str, Shown],
) -> None:
    assert session.jid is not None
    told = _told.setdefault(session, {})
    before = told.get(user_id, {})
    if before == shown:
        return
    for resource in before.keys() - shown.keys():
        deliver_presence(session, resource_presence(server, login, resource, None, session.jid))
    if shown.keys() - before.keys() or any(before.get(r) != v for r, v in shown.items()):
        picture = await photo_of(server, user_id)
        for resource, now in shown.items():
            if before.get(resource) != now:
                deliver_presence(
                    session,
                    resource_presence(server, login, resource, now, session.jid, picture),
                )
    if shown:
        told[user_id] = dict(shown)
    else:
        told.pop(user_id, None)


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
        """Initial presence: every resource of every colleague one may see who is online
        (as a probe would answer, RFC 6121 4.3.2), on any node."""
        assert session.user is not None and session.jid is not None
        visible = set(await server.directory.visible_user_ids(session.user))
        for user_id in await server.presence.online_user_ids():
            if user_id in visible and user_id != session.user_id:
                await resync(server, user_id, viewer_id=session.user_id)

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
                    # RFC 6121 4.3.2: every available resource, or unavailable from the bare
                    # JID when there is none.
                    seen = await server.presence.resources_seen(str(user["_id"]))
                    photo = str(user.get("avatar_sha1") or "") or None
                    for resource, shown in seen.items():
                        session.send_nowait(
                            resource_presence(
                                server, str(user["login"]), resource, shown, session.jid, photo
                            )
                        )
                    if not seen:
                        session.send_nowait(
                            element(
                                "presence",
                                {
                                    "type": "unavailable",
                                    "from": str(target.bare),
                                    "to": str(session.jid),
                                },
                            )
                        )
            return True  # other directed presence and subscription changes: ignored
        if kind == "unavailable":
            if session.available:
                session.available = False
                _told.pop(session, None)  # available again later: told everything anew
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
            await server.presence.connected(
                session.user_id,
                session.id,
                TRANSPORT,
                active,
                dnd,
                resource=session.jid.resource,
                shown=shown_of(stanza),
            )
            await send_colleagues(session)
            # A new resource learns of the user's other available ones (RFC 6121 4.2.2).
            for other in server.available_sessions_of(session.user_id):
                if other is not session and other.jid is not None and other.presence is not None:
                    session.send_nowait(own_copy(other.presence, other.jid, session.jid))
            for hook in server.on_available:
                await hook(session)
        else:
            await server.presence.heartbeat(
                session.user_id, session.id, active, dnd, shown=shown_of(stanza)
            )
        # The user's other resources see this one, and the sender gets its own presence back
        # (RFC 6121 4.2.2, 4.4.2: clients take the echo as the sign they are online).
        tell_own_resources(session, stanza, echo=True)
        return True

    server.on_presence(on_presence)

    async def warm(session: C2SSession) -> None:
        await server.presence.manual(session.user_id)  # decided at the initial presence

    server.on_authenticated(warm)

    def tell_own_resources(session: C2SSession, stanza: ET.Element, echo: bool = False) -> None:
        assert session.jid is not None
        for other in server.sessions_of(session.user_id):
            if other.jid is not None and (other.available or (echo and other is session)):
                other.send_nowait(own_copy(stanza, session.jid, other.jid))

    async def unbound(session: C2SSession) -> None:
        _told.pop(session, None)
        if session.available and session.user is not None:
            session.available = False
            await server.presence.disconnected(session.user_id, session.id)
            tell_own_resources(session, element("presence", {"type": "unavailable"}))

    server.on_unbound(unbound)

    async def presence_changed(event: EphemeralEvent) -> None:
        """A colleague's resources changed (``presence.resources``), or their merged status
        did (going invisible, a dead node's sources gone, ...): bring this node's sessions up
        to date from the shared state."""
        if event.type not in ("presence.changed", "presence.resources"):
            return
        user_id = str(event.data.get("user_id", ""))
        if event.type == "presence.changed" and not any(
            stream.partition(":")[2] != user_id for stream in event.streams
        ):
            return  # only the user's own view: nothing for colleagues
        await resync(server, user_id)

    async def avatar_changed(event: EphemeralEvent) -> None:
        """XEP-0153: a new picture is announced in a presence with its hash (from the event:
        this node's directory cache may not have heard of the change yet), by each resource
        shown."""
        if event.type != AVATAR_CHANGED:
            return
        user_id = str(event.data.get("user_id", ""))
        login = await server.login_of(user_id)
        if login is None:
            return
        photo = str(event.data.get("sha1") or "") or None
        for sessions in list(server.sessions.values()):
            for session in sessions.values():
                shown = _told.get(session, {}).get(user_id)
                if not shown or session.jid is None:
                    continue
                for resource, now in shown.items():
                    stanza = resource_presence(server, login, resource, now, session.jid, photo)
                    if photo is None:  # removed: an empty <photo/> says "no picture"
                        child(child(stanza, "x", ns=VCARD_UPDATE), "photo")
                    deliver_presence(session, stanza)

    server.bus.subscribe_ephemeral(presence_changed)
    server.bus.subscribe_ephemeral(avatar_changed)
