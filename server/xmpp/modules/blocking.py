"""Blocking Command (XEP-0191): the user's blocklist, kept by the messenger's blocking service
(server/im/blocking.py), which decides; this module translates.

A blocked address's messages, chat states, receipts and presence are not delivered to the
user's Jabber clients (live or as offline messages); the user writing to it gets
``not-acceptable`` with ``<blocked/>``; clients are told of every change (a push to each
session that asked for the list, on every node); blocking someone shows them offline at once,
unblocking shows their current status. Group chats are not filtered (a room's messages come
from the room, XEP-0191 section 3.3), and neither is the web messenger (see the service).
"""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING
from weakref import WeakSet

from server.events.models import EphemeralEvent
from server.im.blocking import CHANGED, BlocklistFull, is_blocked, normalize
from server.xmpp.limits import writes_of
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, error_reply, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

BLOCKING = "urn:xmpp:blocking"
BLOCKING_ERRORS = "urn:xmpp:blocking:errors"


async def blocked_for(server: XmppServer, user_id: str, sender: str) -> bool:
    """Whether ``user_id`` blocked ``sender`` (a JID) from reaching their Jabber clients."""
    return server.blocking is not None and await server.blocking.blocks(user_id, sender)


def blocked_error(stanza: ET.Element) -> ET.Element:
    """XEP-0191 section 3.5: writing to an address one blocked."""
    reply = error_reply(stanza, "not-acceptable")
    error = reply.find(q("jabber:client", "error"))
    assert error is not None
    child(error, "blocked", ns=BLOCKING_ERRORS)
    return reply


def items_of(payload: ET.Element) -> list[str]:
    """The normalised addresses of a <block/> or <unblock/>; bad-request for one that is not."""
    found: list[str] = []
    for item in payload.findall(q(BLOCKING, "item")):
        jid = normalize(item.get("jid", ""))
        if jid is None:
            raise StanzaError("jid-malformed", "an item's jid is not an address")
        found.append(jid)
    return found


def install(server: XmppServer) -> None:
    service = server.blocking
    if service is None:
        return  # not wired (no blocking service): nothing announced
    server.add_feature(BLOCKING)
    listeners: WeakSet[C2SSession] = WeakSet()  # sessions that asked for the list

    async def get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        listeners.add(session)
        answer = element("blocklist", ns=BLOCKING)
        for jid in sorted(await service.blocked(session.user_id)):
            child(answer, "item", {"jid": jid})
        return result(iq, answer)

    async def block(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        writes_of(server).check(session.user_id)
        jids = items_of(payload)
        if not jids:
            raise StanzaError("bad-request", "block whom?")
        try:
            await service.block(session.user_id, jids)
        except BlocklistFull as exc:
            raise StanzaError("resource-constraint", str(exc)) from None
        return result(iq)

    async def unblock(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        writes_of(server).check(session.user_id)
        jids = items_of(payload)
        await service.unblock(session.user_id, jids or None)  # none named: everyone
        return result(iq)

    async def warm(session: C2SSession) -> None:
        # Read now, at login, so that live delivery to this user finds it cached (the
        # messages bridge checks it for every message and presence to them).
        await service.blocked(session.user_id)

    server.on_authenticated(warm)
    server.iq("get", q(BLOCKING, "blocklist"), get)
    server.iq("set", q(BLOCKING, "block"), block)
    server.iq("set", q(BLOCKING, "unblock"), unblock)

    async def changed(event: EphemeralEvent) -> None:
        """On every node: push the change to the user's clients here, and show the colleagues
        it concerns as offline (blocked) or as they are (unblocked)."""
        if event.type != CHANGED:
            return
        user_id = str(event.data.get("user_id"))
        sessions = [s for s in server.sessions_of(user_id) if s.jid is not None]
        if not sessions:
            return
        added, removed = list(event.data.get("added", [])), list(event.data.get("removed", []))
        for session in sessions:
            if session not in listeners:
                continue
            for kind, jids in (("block", added), ("unblock", removed)):
                if not jids:
                    continue
                push = element(
                    "iq",
                    {"type": "set", "id": f"{kind}-{secrets.token_hex(4)}", "to": str(session.jid)},
                )
                payload = child(push, kind, ns=BLOCKING)
                for jid in jids:
                    child(payload, "item", {"jid": jid})
                session.send_nowait(push)
        await show_concerned(user_id, added, removed)

    async def show_concerned(user_id: str, added: list[str], removed: list[str]) -> None:
        """Blocked colleagues' resources are shown unavailable, unblocked ones as they are."""
        from server.xmpp.modules.presence import resync  # (it imports us)

        if not server.available_sessions_of(user_id):
            return
        for other_id in await server.presence.online_user_ids():
            if other_id == user_id:
                continue
            login = await server.login_of(other_id)
            if login is None:
                continue
            jid = f"{login}@{server.domain}"
            if is_blocked(added, jid) or is_blocked(removed, jid):
                await resync(server, other_id, viewer_id=user_id)

    server.bus.subscribe_ephemeral(changed)
