"""Group chats as multi-user chat rooms (XEP-0045): every portal group chat (workgroup chats
included) is a members-only, persistent, non-anonymous room at ``conference.<domain>`` whose
localpart is the chat id. Membership is the portal's: rooms are neither created nor configured
over XMPP. Messages are the messenger's: a groupchat message from an occupant is a portal
message, and every message of the chat, whoever wrote it and wherever, reaches the occupants.

Occupants are held in memory, per session (a session joins a room once, under one nick). A
nick is the user's own: it may not be another occupant's nor another portal user's login, so
that a web author, shown under their login, cannot be impersonated.

Also here: history on join (with XEP-0203 delay stamps), stanza ids (XEP-0359), corrections
(XEP-0308) and retractions (XEP-0424) both ways, chat states (XEP-0085) as typing, chat markers
(XEP-0333) as read state, the member list (muc#admin, read-only) and self-ping (XEP-0410).
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from server.events.models import EphemeralEvent, Event
from server.im.models import MessageOut, SendMessage, SendResult
from server.store.database import Document, id_at
from server.web.problems import Problem
from server.xmpp.jid import Jid
from server.xmpp.modules.basics import PING
from server.xmpp.modules.csi import wants_chat_states
from server.xmpp.modules.disco import INFO, ITEMS
from server.xmpp.modules.mam import MAM, archive_page, form_fields
from server.xmpp.modules.messages import (
    CHATSTATES,
    CORRECT,
    DELAY,
    FALLBACK,
    MARKERS,
    RETRACT,
    SID,
    add_ids,
    add_thread,
    archived,
    as_stanza_error,
    client_id_for,
    find_own,
    origin_of,
    read_history,
    stamp,
    stored,
    submit_message,
)
from server.xmpp.modules.typing import TypingPauses
from server.xmpp.modules.upload import add_files, attachments
from server.xmpp.session import C2SSession
from server.xmpp.stanza import (
    CLIENT,
    StanzaError,
    child,
    element,
    error_reply,
    q,
    result,
    small_int,
)
from server.xmpp.xmlstream import addressed, serialize

if TYPE_CHECKING:
    from server.xmpp.server import IqHandler, XmppServer

log = logging.getLogger(__name__)

MUC = "http://jabber.org/protocol/muc"
MUC_USER = f"{MUC}#user"
MUC_ADMIN = f"{MUC}#admin"
ROOMINFO = f"{MUC}#roominfo"
DATA = "jabber:x:data"
FASTEN = "urn:xmpp:fasten:0"
XML = "http://www.w3.org/XML/1998/namespace"
RETRACT_0 = "urn:xmpp:message-retract:0"
ROOM_FEATURES = (
    MUC,
    "muc_membersonly",
    "muc_persistent",
    "muc_nonanonymous",
    "muc_unsecured",
    "muc_hidden",
    "muc_unmoderated",
    INFO,
    SID,
    MAM,
)
SERVICE_NAME = "Group chats"
DEFAULT_HISTORY = 20
MAX_HISTORY = 200
MAX_NICK = 100
MAX_REMEMBERED = 10_000
SELF = 110  # status codes (XEP-0045 section 15.6)
NON_ANONYMOUS = 100
NEW_NICK = 303
AFFILIATION_CHANGED = 321


@dataclass(eq=False)
class Occupant:
    """One session in one room."""

    session: C2SSession
    user_id: str
    jid: str  # the session's full JID, kept: it may be gone when the session ends
    nick: str
    extras: list[ET.Element]  # what the occupant's presence carries (show, status, caps...)
    # held back while joining: a stanza, or one serialised already
    buffer: list[tuple[str | None, ET.Element | bytes]] | None = None

    def deliver(self, stanza: ET.Element | bytes, message_id: str | None = None) -> None:
        if self.buffer is not None:
            self.buffer.append((message_id, stanza))
        elif isinstance(stanza, bytes):
            self.session.send_bytes(stanza)
        else:
            self.session.send_nowait(stanza)


@dataclass(eq=False)
class Room:
    chat_id: str
    title: str
    owner_id: str | None
    occupants: dict[str, Occupant] = field(default_factory=dict)  # session id -> occupant


def presence_extras(stanza: ET.Element) -> list[ET.Element]:
    return [
        part
        for part in stanza
        if part.tag not in (q(MUC, "x"), q(MUC_USER, "x"), q(CLIENT, "priority"))
    ]


class Muc:
    def __init__(self, server: XmppServer) -> None:
        self.server = server
        self.domain = f"conference.{server.domain}"
        self.rooms: dict[str, Room] = {}  # chat id -> room with occupants
        self.joined: dict[str, set[str]] = {}  # session id -> chat ids
        # (author, client id) -> (session id, stanza id): the echo keeps the sender's id
        self.origins: dict[tuple[str, str], tuple[str, str]] = {}
        # (session id, message id) -> the id that session knows the message by
        self.known_as: dict[tuple[str, str], str] = {}
        self.pauses = TypingPauses(server, self._paused)

    # names -----------------------------------------------------------------------------------

    def room_jid(self, chat_id: str) -> str:
        return f"{chat_id}@{self.domain}"

    def occupant_jid(self, chat_id: str, nick: str | None) -> str:
        room = self.room_jid(chat_id)
        return f"{room}/{nick}" if nick else room

    async def nick_of(self, room: Room, user_id: str | None) -> str | None:
        """An occupant's nick, else the login: what a web author is called in the room."""
        if user_id is None:
            return None
        for occupant in room.occupants.values():
            if occupant.user_id == user_id:
                return occupant.nick
        return await self.server.login_of(user_id)

    async def nick_taken(self, room: Room | None, nick: str, user_id: str) -> bool:
        folded = nick.casefold()
        if room is not None and any(
            o.user_id != user_id and o.nick.casefold() == folded for o in room.occupants.values()
        ):
            return True
        other = await self.server.directory.user_by_login(nick)
        return other is not None and str(other["_id"]) != user_id

    async def member_chat(self, session: C2SSession, chat_id: str) -> Document | None:
        """The group chat, if the session's user is a member (the messenger's answer)."""
        try:
            chat = await self.server.im.readable_chat(session.user_id, chat_id)
        except Problem:
            return None
        if chat.get("kind") != "group" or session.user_id not in chat.get("member_ids", []):
            return None
        return chat

    # stanzas ---------------------------------------------------------------------------------

    def presence(
        self,
        room: Room,
        occupant: Occupant,
        to: str,
        *,
        unavailable: bool = False,
        codes: tuple[int, ...] = (),
        affiliation: str | None = None,
        nick: str | None = None,
        status: ET.Element | None = None,
    ) -> ET.Element:
        stanza = element("presence", {"from": self.occupant_jid(room.chat_id, occupant.nick)})
        stanza.set("to", to)
        if unavailable:
            stanza.set("type", "unavailable")
            if status is not None:
                stanza.append(status)
        else:
            for part in occupant.extras:
                stanza.append(part)
        x = child(stanza, "x", ns=MUC_USER)
        item = child(
            x,
            "item",
            {
                "affiliation": affiliation
                or ("owner" if occupant.user_id == room.owner_id else "member"),
                "role": "none" if unavailable else "participant",
                "jid": occupant.jid,
            },
        )
        if nick is not None:
            item.set("nick", nick)
        for code in sorted(codes):
            child(x, "status", {"code": str(code)})
        return stanza

    def presence_error(
        self, session: C2SSession, stanza: ET.Element, condition: str, text: str = ""
    ) -> None:
        reply = error_reply(stanza, condition, text)
        reply.insert(0, element("x", ns=MUC))
        session.send_nowait(reply)

    def groupchat(self, room: Room, nick: str | None, to: str, ident: str | None) -> ET.Element:
        stanza = element(
            "message",
            {"type": "groupchat", "from": self.occupant_jid(room.chat_id, nick), "to": to},
        )
        if ident is not None:
            stanza.set("id", ident)
        return stanza

    def message(self, room: Room, nick: str | None, to: str, message: dict[str, Any]) -> ET.Element:
        """A room message with the id and origin-id its author's client gave it (so the
        author recognises its reflection), and the room's stanza-id."""
        stanza = self.groupchat(room, nick, to, None)
        child(stanza, "body", text=str(message.get("text", "")))
        add_files(self.server, stanza, message)
        origin = message.get("origin") or {}
        if origin.get("subject"):
            # beside a body, a message's own subject, not the room's (XEP-0045 8.1)
            child(stanza, "subject", text=str(origin["subject"]))
        add_thread(stanza, origin)
        add_ids(stanza, message, self.room_jid(room.chat_id))
        return stanza

    # presence: join, change, leave -----------------------------------------------------------

    async def on_presence(self, session: C2SSession, stanza: ET.Element) -> bool:
        to = stanza.get("to")
        if not to:
            return False
        target = Jid.parse(to)
        if target.domain != self.domain:
            return False
        kind = stanza.get("type") or None
        if not target.local or kind not in (None, "unavailable"):
            return True  # subscriptions, probes, errors: nothing to do for a room
        room = self.rooms.get(target.local)
        occupant = room.occupants.get(session.id) if room else None
        if kind == "unavailable":
            if room is not None and occupant is not None:
                self.leave(room, occupant, status=stanza.find(q(CLIENT, "status")))
            return True
        nick = target.resource
        if not nick.strip():
            self.presence_error(session, stanza, "jid-malformed", "a nick is needed")
            return True
        if len(nick) > MAX_NICK:
            self.presence_error(session, stanza, "not-acceptable", "the nick is too long")
            return True
        request = stanza.find(q(MUC, "x"))
        if room is None or occupant is None:
            await self.join(session, stanza, target.local, nick, request)
        elif nick != occupant.nick:
            await self.change_nick(room, occupant, stanza, nick)
        elif request is not None:
            await self.send_room(room, occupant, request)  # a rejoin: the room state again
        else:
            occupant.extras = presence_extras(stanza)
            for other in list(room.occupants.values()):
                codes = (SELF,) if other is occupant else ()
                other.deliver(self.presence(room, occupant, other.jid, codes=codes))
        return True

    async def join(
        self,
        session: C2SSession,
        stanza: ET.Element,
        chat_id: str,
        nick: str,
        request: ET.Element | None,
    ) -> None:
        chat = await self.member_chat(session, chat_id)
        if chat is None:
            self.presence_error(
                session,
                stanza,
                "registration-required",
                "only members of this group chat may join; group chats are made in the portal",
            )
            return
        if await self.nick_taken(self.rooms.get(chat_id), nick, session.user_id):
            self.presence_error(session, stanza, "conflict", "this nick is someone else's")
            return
        if session.jid is None:
            return  # the session ended meanwhile
        room = self.rooms.get(chat_id)
        if room is None:
            room = self.rooms[chat_id] = Room(chat_id, str(chat.get("title", "")), None)
        room.title = str(chat.get("title", ""))
        room.owner_id = chat.get("owner_id")
        if room.occupants.get(session.id) is not None:
            return  # (joined meanwhile)
        occupant = Occupant(
            session, session.user_id, str(session.jid), nick, presence_extras(stanza), buffer=[]
        )
        others = list(room.occupants.values())
        room.occupants[session.id] = occupant
        self.joined.setdefault(session.id, set()).add(chat_id)
        for other in others:
            other.deliver(self.presence(room, occupant, other.jid))
        await self.send_room(room, occupant, request)

    async def send_room(self, room: Room, occupant: Occupant, request: ET.Element | None) -> None:
        """To a (re)joining occupant, in XEP-0045's order: the others' presence, its own, the
        history, the subject. What happens meanwhile is held back and follows."""
        if occupant.buffer is None:
            occupant.buffer = []
        session = occupant.session
        sent: set[str] = set()
        try:
            nicks = {occupant.nick}
            for other in list(room.occupants.values()):
                if other.nick not in nicks:
                    nicks.add(other.nick)
                    session.send_nowait(self.presence(room, other, occupant.jid))
            session.send_nowait(
                self.presence(room, occupant, occupant.jid, codes=(NON_ANONYMOUS, SELF))
            )
            for stanza, message_id in await self.history(room, occupant, request):
                session.send_nowait(stanza)
                sent.add(message_id)
            subject = self.groupchat(room, None, occupant.jid, f"subject-{room.chat_id}")
            child(subject, "subject", text=room.title)
            session.send_nowait(subject)
        finally:
            held, occupant.buffer = occupant.buffer or [], None
            for held_id, held_stanza in held:
                if held_id is None or held_id not in sent:
                    if isinstance(held_stanza, bytes):
                        session.send_bytes(held_stanza)
                    else:
                        session.send_nowait(held_stanza)

    async def history(
        self, room: Room, occupant: Occupant, request: ET.Element | None
    ) -> list[tuple[ET.Element, str]]:
        wanted = request.find(q(MUC, "history")) if request is not None else None
        limit = DEFAULT_HISTORY
        max_chars: int | None = None
        since: datetime | None = None
        if wanted is not None:
            maxstanzas = small_int(wanted.get("maxstanzas"))
            if maxstanzas is not None:
                limit = min(maxstanzas, MAX_HISTORY)
            max_chars = small_int(wanted.get("maxchars"))
            seconds = small_int(wanted.get("seconds"))
            if seconds is not None:
                since = datetime.now(UTC) - timedelta(seconds=seconds)
            elif wanted.get("since"):
                with contextlib.suppress(ValueError):
                    since = datetime.fromisoformat(wanted.get("since", "").replace("Z", "+00:00"))
                    if since.tzinfo is None:
                        since = since.replace(tzinfo=UTC)
        if limit <= 0 or max_chars == 0:
            return []
        occupant_user = await self.server.directory.cached_user(occupant.user_id)
        if occupant_user is None:
            return []
        newer = since
        try:
            docs = await read_history(
                self.server.im,
                occupant_user,
                room.chat_id,
                limit,
                # a second early: ids carry whole seconds; created_at decides
                after=id_at(newer - timedelta(seconds=1)) if newer is not None else None,
                keep=lambda m: newer is None or m.created_at > newer,
            )
        except Problem:  # no longer a member (removed meanwhile): no history
            return []
        out: list[tuple[ET.Element, str]] = []
        chars = 0
        for found in docs:  # newest first, to cut at maxchars
            message_id = found.id
            message = archived(found)
            nick = await self.nick_of(room, found.author_id)
            stanza = self.message(room, nick, occupant.jid, message)
            child(
                stanza,
                "delay",
                {"from": self.room_jid(room.chat_id), "stamp": stamp(found.created_at)},
                ns=DELAY,
            )
            if max_chars is not None:
                chars += len(serialize(stanza))
                if chars > max_chars:
                    break
            out.append((stanza, message_id))
        out.reverse()
        return out

    async def change_nick(
        self, room: Room, occupant: Occupant, stanza: ET.Element, nick: str
    ) -> None:
        if await self.nick_taken(room, nick, occupant.user_id):
            self.presence_error(occupant.session, stanza, "conflict", "this nick is someone else's")
            return
        if room.occupants.get(occupant.session.id) is not occupant:
            return  # left meanwhile
        for other in list(room.occupants.values()):
            codes = (NEW_NICK, SELF) if other is occupant else (NEW_NICK,)
            other.deliver(
                self.presence(room, occupant, other.jid, unavailable=True, codes=codes, nick=nick)
            )
        occupant.nick = nick
        occupant.extras = presence_extras(stanza)
        for other in list(room.occupants.values()):
            own = (SELF,) if other is occupant else ()
            other.deliver(self.presence(room, occupant, other.jid, codes=own))

    def leave(
        self,
        room: Room,
        occupant: Occupant,
        *,
        tell_self: bool = True,
        codes: tuple[int, ...] = (),
        affiliation: str | None = None,
        status: ET.Element | None = None,
    ) -> None:
        session_id = occupant.session.id
        if room.occupants.get(session_id) is not occupant:
            return
        del room.occupants[session_id]
        chats = self.joined.get(session_id)
        if chats is not None:
            chats.discard(room.chat_id)
            if not chats:
                del self.joined[session_id]
        if not room.occupants:
            self.rooms.pop(room.chat_id, None)
        if tell_self:
            occupant.buffer = None
            occupant.session.send_nowait(
                self.presence(
                    room,
                    occupant,
                    occupant.jid,
                    unavailable=True,
                    codes=(*codes, SELF),
                    affiliation=affiliation,
                    status=status,
                )
            )
        # The same user may still be there under this nick from another session.
        still = next((o for o in room.occupants.values() if o.nick == occupant.nick), None)
        for other in list(room.occupants.values()):
            if still is not None:
                other.deliver(self.presence(room, still, other.jid))
            else:
                other.deliver(
                    self.presence(
                        room,
                        occupant,
                        other.jid,
                        unavailable=True,
                        codes=codes,
                        affiliation=affiliation,
                        status=status,
                    )
                )

    async def unbound(self, session: C2SSession) -> None:
        for chat_id in list(self.joined.get(session.id, ())):
            room = self.rooms.get(chat_id)
            occupant = room.occupants.get(session.id) if room else None
            if room is not None and occupant is not None:
                self.leave(room, occupant, tell_self=False)
        self.joined.pop(session.id, None)

    # messages from occupants -----------------------------------------------------------------

    async def on_message(self, session: C2SSession, stanza: ET.Element) -> bool:
        if stanza.tag != q(CLIENT, "message") or not stanza.get("to"):
            return False
        target = Jid.parse(stanza.get("to", ""))
        if target.domain != self.domain:
            return False
        kind = stanza.get("type") or "normal"
        if kind == "error":
            return True
        if not target.local:
            raise StanzaError("service-unavailable")
        if kind != "groupchat":
            if target.resource:
                self.private_message(session, target, stanza)
                return True
            raise StanzaError("not-acceptable", "members are managed in the portal")
        if target.resource:
            raise StanzaError("bad-request", "a groupchat message goes to the room")
        room = self.rooms.get(target.local)
        occupant = room.occupants.get(session.id) if room else None
        if room is None or occupant is None:
            raise StanzaError("not-acceptable", "join the room first")
        assert session.user is not None
        try:
            await self.from_occupant(session, room, stanza)
        except (ValidationError, Problem) as exc:
            raise as_stanza_error(exc) from None
        return True

    def private_message(self, session: C2SSession, target: Jid, stanza: ET.Element) -> None:
        """XEP-0045 7.5: a private message from one occupant to another, by nick. It goes to
        the sessions in the room under that nick (on this node), from the sender's occupant
        JID, marked as a MUC private message; it is not stored (not part of the room's
        history, nor of the dialog between the two: that is the user's own address)."""
        room = self.rooms.get(target.local)
        sender = room.occupants.get(session.id) if room else None
        if room is None or sender is None:
            raise StanzaError("not-acceptable", "join the room first")
        recipients = [o for o in room.occupants.values() if o.nick == target.resource]
        if not recipients:
            raise StanzaError("item-not-found", "no occupant with this nick")
        frm = self.occupant_jid(room.chat_id, sender.nick)
        states_only = all(part.tag.startswith(f"{{{CHATSTATES}}}") for part in stanza)
        for recipient in recipients:
            if states_only and not wants_chat_states(recipient.session):
                continue  # inactive (XEP-0352): no typing
            copy = element("message", {"from": frm, "to": recipient.jid})
            for name in ("type", "id", q(XML, "lang")):
                if stanza.get(name):
                    copy.set(name, stanza.get(name, ""))
            for part in stanza:
                if part.tag != q(MUC_USER, "x"):
                    copy.append(part)
            child(copy, "x", ns=MUC_USER)  # a private message through a room (XEP-0045 7.5)
            recipient.deliver(copy)

    async def from_occupant(self, session: C2SSession, room: Room, stanza: ET.Element) -> None:
        assert session.user is not None
        im = self.server.im
        body = stanza.findtext(q(CLIENT, "body"))
        retract = stanza.find(q(RETRACT, "retract"))
        fasten = stanza.find(q(FASTEN, "apply-to"))
        if (
            retract is None
            and fasten is not None
            and fasten.find(q(RETRACT_0, "retract")) is not None
        ):
            retract = fasten
        if retract is not None:
            await im.delete(session.user, await self.own_message(session, room, retract.get("id")))
            return
        replace = stanza.find(q(CORRECT, "replace"))
        if replace is not None and body is not None and body.strip():
            message_id = await self.own_message(session, room, replace.get("id"))
            await im.edit(session.user, message_id, body)
            return
        if stanza.find(q(CLIENT, "subject")) is not None and body is None:
            raise StanzaError("forbidden", "the title is changed in the portal")
        if stanza.find(q(CHATSTATES, "composing")) is not None:
            await im.typing(session.user_id, room.chat_id)
        marker = stanza.find(q(MARKERS, "displayed"))
        if marker is not None and marker.get("id"):
            with contextlib.suppress(Problem):
                await im.mark_read(session.user, room.chat_id, marker.get("id", ""))
        if body is None or not body.strip():
            return
        text, file_ids = await attachments(self.server, session, stanza, body)
        stanza_id = stanza.get("id")
        origin_ids = origin_of(stanza)
        client_id = client_id_for(session.id, origin_ids, body)
        key = (session.user_id, client_id) if client_id and stanza_id else None
        origin = (session.id, stanza_id or "")  # this submission's (compared by identity)
        if key is not None:
            if len(self.origins) > MAX_REMEMBERED:
                self.origins.clear()
            self.origins[key] = origin
        request = SendMessage(
            chat_id=room.chat_id, text=text, client_id=client_id, file_ids=file_ids
        )
        try:
            pending = await submit_message(im, session.user, request, origin=origin_ids)
        except BaseException:
            self.forget_origin(key, origin)
            raise

        async def finished() -> SendResult:
            try:
                return await stored(pending)
            finally:
                # (the echo, if there was one, has been sent by now: a store resolves once
                # its event is published). A resend of the same id may be in flight behind
                # this one: its origin is its own.
                self.forget_origin(key, origin)

        def echo(sent: SendResult) -> None:
            occupant = room.occupants.get(session.id)
            if not sent.duplicate or key is None or occupant is None:
                return
            # A resent stanza stores nothing new and publishes nothing: echo it once more,
            # with the ids the first one was stored with.
            nick = next(
                (o.nick for o in room.occupants.values() if o.user_id == session.user_id),
                occupant.nick,
            )
            reflected = archived(sent.messages[0])
            occupant.deliver(self.message(room, nick, occupant.jid, reflected))

        session.pipeline.add(finished(), stanza, echo)

    def forget_origin(self, key: tuple[str, str] | None, origin: tuple[str, str]) -> None:
        if key is not None and self.origins.get(key) is origin:
            del self.origins[key]

    async def own_message(self, session: C2SSession, room: Room, ident: str | None) -> str:
        """The portal message a client refers to: by the message id (the stanza-id and the id
        others saw), or by the stanza id this user sent it with."""
        if not ident:
            raise StanzaError("bad-request", "which message?")
        doc = await find_own(self.server, session.user_id, room.chat_id, ident)
        if doc is None:
            raise StanzaError("item-not-found", f"no message {ident} here")
        return str(doc["_id"])

    # the messenger's events, to occupants ----------------------------------------------------

    async def on_event(self, event: Event) -> None:
        kind, _, chat_id = event.stream.partition(":")
        if kind != "chat":
            return
        room = self.rooms.get(chat_id)
        if room is None:
            return  # nobody here: nothing to tell
        if event.type == "im.chat.members":
            await self.members_changed(room, event.data)
            return
        if event.type == "im.chat.updated":
            self.subject_changed(room, event.data, event.seq)
            return
        if event.type not in ("im.message", "im.message.updated", "im.message.deleted"):
            return
        message = event.data["message"]
        message_id = str(message["id"])
        author = message.get("author_id")
        if event.type == "im.message" and author:
            self.pauses.ended(chat_id, str(author))  # typing ends with the message
        nick = await self.nick_of(room, author)
        origin: tuple[str, str] | None = None
        if event.type == "im.message" and author and message.get("client_id"):
            origin = self.origins.get((str(author), str(message["client_id"])))
        # One serialisation for every occupant (each gets it with its own "to"): the stanza
        # carries the id and origin-id its author's client sent, so the author's own session
        # recognises its reflection in the same bytes.
        shared = (
            addressed(self.message(room, nick, "", message)) if event.type == "im.message" else None
        )
        for occupant in list(room.occupants.values()):
            if shared is not None:
                if origin is not None and origin[0] == occupant.session.id:
                    if len(self.known_as) > MAX_REMEMBERED:
                        self.known_as.clear()
                    self.known_as[(occupant.session.id, message_id)] = origin[1]
                occupant.deliver(shared(occupant.jid), message_id)
                continue
            stanza = self.groupchat(room, nick, occupant.jid, f"{message_id}-{event.seq}")
            # Everyone saw the message under the id its author's client gave it.
            known = (message.get("origin") or {}).get("id") or self.known_as.get(
                (occupant.session.id, message_id), message_id
            )
            if event.type == "im.message.updated":
                child(stanza, "body", text=str(message.get("text", "")))
                child(stanza, "replace", {"id": known}, ns=CORRECT)
            else:
                child(stanza, "body", text="(message deleted)")
                child(stanza, "retract", {"id": known}, ns=RETRACT)
                child(stanza, "fallback", {"for": RETRACT}, ns=FALLBACK)
            occupant.deliver(stanza)

    def subject_changed(self, room: Room, data: dict[str, Any], seq: int) -> None:
        """A group chat renamed in the portal: the room's subject changes for everyone in it
        (XEP-0045 8.1), from the room itself (the portal, not an occupant, renamed it)."""
        title = data.get("title")
        if not isinstance(title, str) or title == room.title:
            return
        room.title = title
        for occupant in list(room.occupants.values()):
            stanza = self.groupchat(room, None, occupant.jid, f"subject-{room.chat_id}-{seq}")
            child(stanza, "subject", text=title)
            occupant.deliver(stanza)

    async def members_changed(self, room: Room, data: dict[str, Any]) -> None:
        chat = await self.server.store["chats"].find_one({"_id": room.chat_id})
        if chat is not None:
            room.title = str(chat.get("title", room.title))
            room.owner_id = chat.get("owner_id")
        removed = {str(user_id) for user_id in data.get("removed") or ()}
        for occupant in list(room.occupants.values()):
            if occupant.user_id in removed:
                self.leave(room, occupant, codes=(AFFILIATION_CHANGED,), affiliation="none")

    async def on_typing(self, event: EphemeralEvent) -> None:
        if event.type != "im.typing":
            return
        chat_id, typer = str(event.data.get("chat_id")), str(event.data.get("user_id"))
        if await self.send_state(chat_id, typer, "composing"):
            self.pauses.started(chat_id, typer)  # nothing says when it stops: a timer does

    async def send_state(self, chat_id: str, typer: str, state: str) -> bool:
        """A chat state of ``typer`` to the room's other occupants here; whether any got it."""
        room = self.rooms.get(chat_id)
        if room is None:
            return False
        nick = await self.nick_of(room, typer)
        if nick is None:
            return False
        sent = False
        for occupant in list(room.occupants.values()):
            if occupant.user_id != typer and wants_chat_states(occupant.session):
                stanza = self.groupchat(room, nick, occupant.jid, None)
                child(stanza, state, ns=CHATSTATES)
                occupant.deliver(stanza)
                sent = True
        return sent

    async def _paused(self, chat_id: str, typer: str) -> None:
        await self.send_state(chat_id, typer, "paused")

    # iq: disco, member list, self-ping ---------------------------------------------------------

    async def disco_info(
        self, session: C2SSession, iq: ET.Element, payload: ET.Element
    ) -> ET.Element:
        target = Jid.parse(iq.get("to", ""))
        query = element("query", ns=INFO)
        if payload.get("node"):
            query.set("node", payload.get("node", ""))
        if not target.local:
            child(
                query, "identity", {"category": "conference", "type": "text", "name": SERVICE_NAME}
            )
            for feature in (INFO, ITEMS, MUC):
                child(query, "feature", {"var": feature})
            return result(iq, query)
        if target.resource:
            raise StanzaError("service-unavailable")
        chat = await self.member_chat(session, target.local)
        if chat is None:
            raise StanzaError("item-not-found")
        title = str(chat.get("title", ""))
        child(query, "identity", {"category": "conference", "type": "text", "name": title})
        for feature in ROOM_FEATURES:
            child(query, "feature", {"var": feature})
        form = child(query, "x", {"type": "result"}, ns=DATA)
        room = self.rooms.get(target.local)
        for var, value in (
            ("FORM_TYPE", ROOMINFO),
            ("muc#roomconfig_roomname", title),
            ("muc#roominfo_occupants", str(len(room.occupants) if room else 0)),
        ):
            attrs = {"var": var, "type": "hidden"} if var == "FORM_TYPE" else {"var": var}
            child(child(form, "field", attrs), "value", text=value)
        return result(iq, query)

    async def disco_items(
        self, session: C2SSession, iq: ET.Element, payload: ET.Element
    ) -> ET.Element:
        target = Jid.parse(iq.get("to", ""))
        query = element("query", ns=ITEMS)
        if payload.get("node"):
            query.set("node", payload.get("node", ""))
        if target.local:
            if target.resource or await self.member_chat(session, target.local) is None:
                raise StanzaError("item-not-found")
            return result(iq, query)  # occupants are not listed
        store = self.server.store
        member_of = [
            m["chat_id"] async for m in store["chat_members"].find({"user_id": session.user_id})
        ]
        # by _id alone: a filter on kind too would make the embedded database scan every chat
        groups = [
            chat
            async for chat in store["chats"].find({"_id": {"$in": member_of}})
            if chat.get("kind") == "group"
        ]
        for chat in sorted(groups, key=lambda c: str(c.get("title", ""))):
            jid = self.room_jid(str(chat["_id"]))
            child(query, "item", {"jid": jid, "name": str(chat.get("title", ""))})
        return result(iq, query)

    async def ping(self, session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        """XEP-0410: a ping to one's own occupant JID tells whether one is still joined."""
        target = Jid.parse(iq.get("to", ""))
        room = self.rooms.get(target.local)
        occupant = room.occupants.get(session.id) if room else None
        if target.local and target.resource:
            if occupant is None or occupant.nick != target.resource:
                raise StanzaError("not-acceptable", "not joined")
        elif target.local and await self.member_chat(session, target.local) is None:
            raise StanzaError("item-not-found")
        return result(iq)

    async def member_list(
        self, session: C2SSession, iq: ET.Element, payload: ET.Element
    ) -> ET.Element:
        target = Jid.parse(iq.get("to", ""))
        if target.domain != self.domain or not target.local or target.resource:
            raise StanzaError("service-unavailable")
        chat = await self.member_chat(session, target.local)
        if chat is None:
            raise StanzaError("item-not-found")
        wanted = {i.get("affiliation") for i in payload.findall(q(MUC_ADMIN, "item"))}
        query = element("query", ns=MUC_ADMIN)
        members = [str(m) for m in chat.get("member_ids", [])]
        found = await self.server.directory.cached_users(members)
        for user in (found[m] for m in members if m in found):
            affiliation = "owner" if user["_id"] == chat.get("owner_id") else "member"
            if not wanted - {None} or affiliation in wanted:
                jid = f"{user['login']}@{self.server.domain}"
                child(query, "item", {"affiliation": affiliation, "jid": jid})
        return result(iq, query)

    async def archive(self, session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        """MAM for a room (XEP-0313 section 6): the group chat's history, from the messenger's
        one history (what the web shows), for members only; each message as occupants got it,
        from the author's nick (their login when they are not in the room now)."""
        target = Jid.parse(iq.get("to", ""))
        if not target.local or target.resource:
            raise StanzaError("service-unavailable")
        chat = await self.member_chat(session, target.local)
        if chat is None:
            raise StanzaError("forbidden", "only members may read a room's archive")
        if form_fields(payload).get("with"):
            raise StanzaError("feature-not-implemented", "no filter by occupant in rooms")
        room = self.rooms.get(target.local) or Room(
            target.local, str(chat.get("title", "")), chat.get("owner_id")
        )
        assert session.jid is not None

        async def render(doc: MessageOut) -> ET.Element:
            nick = await self.nick_of(room, doc.author_id)
            return self.message(room, nick, str(session.jid), archived(doc))

        room_jid = Jid.parse(self.room_jid(target.local))
        return await archive_page(
            self.server, session, iq, payload, [chat["_id"]], render, room_jid
        )

    async def admin_set(
        self, session: C2SSession, iq: ET.Element, payload: ET.Element
    ) -> ET.Element:
        raise StanzaError("forbidden", "members are managed in the portal")


def routed(server: XmppServer, kind: str, tag: str, domain: str, handler: IqHandler) -> None:
    """Take iq of ``kind``/``tag`` addressed to ``domain`` (or a room in it); leave the rest to
    the handler registered before (the router keys handlers by payload, not by address)."""
    before = server.iq_handler(kind, tag)

    async def route(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element | None:
        to = iq.get("to")
        if to and Jid.parse(to).domain == domain:
            return await handler(session, iq, payload)
        if before is None:
            raise StanzaError("service-unavailable")
        return await before(session, iq, payload)

    server.iq(kind, tag, route)


def install(server: XmppServer) -> None:
    muc = Muc(server)
    server.disco_item_list.append((muc.domain, SERVICE_NAME))
    routed(server, "get", q(INFO, "query"), muc.domain, muc.disco_info)
    routed(server, "get", q(ITEMS, "query"), muc.domain, muc.disco_items)
    routed(server, "get", q(PING, "ping"), muc.domain, muc.ping)
    routed(server, "set", q(MAM, "query"), muc.domain, muc.archive)
    server.iq("get", q(MUC_ADMIN, "query"), muc.member_list)
    server.iq("set", q(MUC_ADMIN, "query"), muc.admin_set)
    server.on_presence(muc.on_presence)
    server.on_message(muc.on_message)
    server.on_unbound(muc.unbound)
    server.on_unavailable.append(muc.unbound)  # unavailable presence leaves the rooms too
    server.bus.subscribe(muc.on_event)
    server.bus.subscribe_ephemeral(muc.on_typing)
