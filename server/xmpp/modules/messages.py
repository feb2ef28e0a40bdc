"""One-to-one messages, bridged to the portal messenger: a <message type="chat"/> to
login@domain is a message in the portal's private dialog, and every message of a private
dialog or of the portal's notices reaches the members' Jabber sessions.

Also here: offline delivery with delay stamps (XEP-0203), once; chat states (XEP-0085) as
typing notifications; chat markers (XEP-0333, "displayed") as read state; message
correction (XEP-0308) and retraction (XEP-0424) for edits and deletions made on the web.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import xml.etree.ElementTree as ET
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from server.events.models import EphemeralEvent, Event
from server.im.models import MessageOrigin, SendMessage
from server.im.rules import private_pair_key
from server.store.database import Document
from server.web.problems import Problem
from server.xmpp.jid import Jid
from server.xmpp.modules.carbons import sent_copy
from server.xmpp.session import C2SSession
from server.xmpp.stanza import CLIENT, PORTAL_RESOURCE, StanzaError, child, element, q

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

log = logging.getLogger(__name__)

CHATSTATES = "http://jabber.org/protocol/chatstates"
MARKERS = "urn:xmpp:chat-markers:0"
DELAY = "urn:xmpp:delay"
SID = "urn:xmpp:sid:0"
CORRECT = "urn:xmpp:message-correct:0"
RETRACT = "urn:xmpp:message-retract:1"
FALLBACK = "urn:xmpp:fallback:0"
RECEIPTS = "urn:xmpp:receipts"
CONFERENCE = "jabber:x:conference"
CHAT_STATES = ("active", "composing", "paused", "inactive", "gone")
OFFLINE_LIMIT = 200
MAX_ID_CHARS = 256
MAX_SUBJECT_CHARS = 1024
MAX_ORIGINS = 10_000

PROBLEM_CONDITIONS = {
    403: "forbidden",
    404: "item-not-found",
    413: "policy-violation",
    422: "not-acceptable",
    429: "resource-constraint",
    503: "wait",
}


def as_stanza_error(exc: Exception) -> StanzaError:
    """A messenger refusal (validation or problem) as the stanza error a client understands."""
    if isinstance(exc, ValidationError):
        return StanzaError("bad-request", str(exc.errors()[0]["msg"]))
    if isinstance(exc, Problem):
        return StanzaError(
            PROBLEM_CONDITIONS.get(exc.status, "undefined-condition"), exc.detail or exc.title
        )
    raise exc


def _short(value: str | None, limit: int = MAX_ID_CHARS) -> str | None:
    if value is not None and len(value) > limit:
        raise StanzaError("not-acceptable", f"an id, thread or subject over {limit} chars")
    return value or None


def invitation_of(stanza: ET.Element) -> dict[str, str] | None:
    """A direct MUC invitation (XEP-0249): the room and what goes with it."""
    found = stanza.find(q(CONFERENCE, "x"))
    if found is None or not found.get("jid"):
        return None
    invite = {
        name: str(_short(found.get(name), MAX_SUBJECT_CHARS))
        for name in ("jid", "reason", "password", "continue", "thread")
        if found.get(name)
    }
    return invite


def origin_of(stanza: ET.Element) -> MessageOrigin | None:
    """What the client sent with its message besides the text, kept as sent: ids (stanza id,
    XEP-0359 origin-id), thread, subject, receipt request, a room invitation."""
    ident = _short(stanza.get("id"))
    found = stanza.find(q(SID, "origin-id"))
    thread = stanza.find(q(CLIENT, "thread"))
    origin = MessageOrigin(
        id=ident,
        origin_id=_short(found.get("id")) if found is not None else None,
        thread=_short(thread.text) if thread is not None else None,
        thread_parent=_short(thread.get("parent")) if thread is not None else None,
        subject=_short(stanza.findtext(q(CLIENT, "subject")), MAX_SUBJECT_CHARS),
        receipt=stanza.find(q(RECEIPTS, "request")) is not None,
        invite=invitation_of(stanza),
    )
    return origin if origin != MessageOrigin() else None


def client_id_for(session_id: str, origin: MessageOrigin | None, body: str) -> str | None:
    """The idempotency key of a message from a Jabber client: the same message sent twice
    stores one. RFC 6120 makes a stanza id unique within one stream only (many clients count
    from 1 at each start), so a stanza id counts within its stream; an origin-id is unique
    for good (XEP-0359), so a copy resent on a new stream is still recognised. The body is
    part of the key: a client that reuses an id for a different text loses nothing."""
    if origin is None or (origin.id is None and origin.origin_id is None):
        return None  # nothing names the message: two alike are two messages
    if origin.origin_id is not None:
        scope = f"o\0{origin.origin_id}"
    else:
        scope = f"s\0{session_id}\0{origin.id}"
    return "x" + hashlib.sha256(f"{scope}\0{body}".encode()).hexdigest()[:40]


def add_thread(stanza: ET.Element, origin: dict[str, Any]) -> None:
    if origin.get("thread"):
        thread = child(stanza, "thread", text=str(origin["thread"]), ns=CLIENT)
        if origin.get("thread_parent"):
            thread.set("parent", str(origin["thread_parent"]))


def add_invitation(stanza: ET.Element, invite: dict[str, str] | None) -> None:
    if invite:
        child(stanza, "x", {k: str(v) for k, v in invite.items()}, ns=CONFERENCE)


def add_ids(stanza: ET.Element, message: dict[str, Any], by: str) -> None:
    """The message's ids on a stanza: the client's id and origin-id as it sent them (the
    portal id for messages written elsewhere), and the server's XEP-0359 stanza-id."""
    origin = message.get("origin") or {}
    stanza.set("id", str(origin.get("id") or message["id"]))
    if origin.get("origin_id"):
        child(stanza, "origin-id", {"id": str(origin["origin_id"])}, ns=SID)
    child(stanza, "stanza-id", {"id": str(message["id"]), "by": by}, ns=SID)


async def find_own(
    server: XmppServer, user_id: str, chat_id: str, ident: str | None
) -> Document | None:
    """A message a client refers to (a correction, a retraction): by the portal id (the
    stanza-id, and the id others saw), or by the id or origin-id this user sent it with."""
    if not ident:
        return None
    messages = server.store["messages"]
    doc = await messages.find_one({"_id": ident, "chat_id": chat_id})
    if doc is None:
        doc = await messages.find_one(
            {
                "chat_id": chat_id,
                "author_id": user_id,
                "$or": [{"origin.id": ident}, {"origin.origin_id": ident}],
            },
            sort=[("_id", -1)],
        )
    return doc


def archived(doc: Document) -> dict[str, Any]:
    """A stored message as the shape events carry."""
    return {
        "id": doc["_id"],
        "author_id": doc.get("author_id"),
        "text": doc["text"],
        "origin": doc.get("origin"),
    }


def stamp(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


class Bridge:
    def __init__(self, server: XmppServer) -> None:
        self.server = server
        self.chats: dict[str, Document] = {}
        self.origins: dict[tuple[str, str], str] = {}  # (user, client id) -> session id

    async def chat(self, chat_id: str) -> Document | None:
        if chat_id not in self.chats:
            doc = await self.server.store["chats"].find_one({"_id": chat_id})
            if doc is None:
                return None
            if len(self.chats) > 10_000:
                self.chats.clear()
            self.chats[chat_id] = doc
        return self.chats[chat_id]

    async def author_jid(self, message: dict[str, Any]) -> str:
        login = await self.server.login_of(message.get("author_id"))
        return f"{login}@{self.server.domain}" if login else self.server.domain

    async def stanza(
        self, message: dict[str, Any], to: Jid, *, frm: str | None = None
    ) -> ET.Element:
        stanza = element(
            "message",
            {"type": "chat", "from": frm or await self.author_jid(message), "to": str(to)},
        )
        child(stanza, "body", text=str(message.get("text", "")))
        origin = message.get("origin") or {}
        if origin.get("subject"):
            child(stanza, "subject", text=str(origin["subject"]))
        add_thread(stanza, origin)
        # A message means its author is active in the conversation (XEP-0085 5.1); it also
        # tells clients such as Pidgin that this contact takes chat states.
        child(stanza, "active", ns=CHATSTATES)
        if origin.get("receipt"):
            child(stanza, "request", ns=RECEIPTS)
        add_invitation(stanza, origin.get("invite"))
        add_ids(stanza, message, str(to.bare))
        child(stanza, "markable", ns=MARKERS)
        return stanza

    # from Jabber clients ---------------------------------------------------------------------

    async def on_message(self, session: C2SSession, stanza: ET.Element) -> bool:
        if stanza.tag != q(CLIENT, "message"):
            return False
        kind = stanza.get("type") or "normal"
        to = stanza.get("to")
        if kind == "error":
            return True
        if not to or kind == "groupchat":
            return False
        target = Jid.parse(to)
        if target.domain != self.server.domain:
            return False
        assert session.user is not None
        if not target.local:
            return True  # to the server itself: nothing to do
        recipient = await self.server.user_for(target)
        if (
            recipient is None
            or not recipient.get("is_active", True)
            or not await self.server.directory.may_see(session.user, recipient)
        ):
            raise StanzaError("service-unavailable")
        recipient_id = str(recipient["_id"])
        chat = await self.server.store["chats"].find_one(
            {"pair_key": private_pair_key(session.user_id, recipient_id)}
        )
        await self._signals(session, stanza, chat)
        body = stanza.findtext(q(CLIENT, "body"))
        try:
            if chat is not None and await self._change(session, stanza, chat, body):
                return True
        except Problem as problem:
            raise as_stanza_error(problem) from None
        if body is None or not body.strip():
            await self._relay_signal(session, stanza, recipient_id, target, chat)
            return True
        origin = origin_of(stanza)
        if target.resource and target.resource != PORTAL_RESOURCE:
            # Addressed to one of the recipient's resources: only that one gets it while it
            # is online (RFC 6121 8.5.3.1).
            origin = (origin or MessageOrigin()).model_copy(update={"resource": target.resource})
        client_id = client_id_for(session.id, origin, body)
        if client_id is not None:
            if len(self.origins) > MAX_ORIGINS:
                self.origins.clear()
            self.origins[(session.user_id, client_id)] = session.id
        try:
            request = SendMessage(to=[recipient_id], text=body, client_id=client_id)
            await self.server.im.send(session.user, request, origin=origin)
        except (ValidationError, Problem) as exc:
            raise as_stanza_error(exc) from None
        return True

    async def _change(
        self, session: C2SSession, stanza: ET.Element, chat: Document, body: str | None
    ) -> bool:
        """A correction (XEP-0308) edits, a retraction (XEP-0424) deletes, the portal message."""
        assert session.user is not None
        retract = stanza.find(q(RETRACT, "retract"))
        replace = stanza.find(q(CORRECT, "replace"))
        if retract is None and (replace is None or not (body or "").strip()):
            return False
        ident = (retract if retract is not None else replace).get("id")  # type: ignore[union-attr]
        doc = await find_own(self.server, session.user_id, chat["_id"], ident)
        if doc is None:
            raise StanzaError("item-not-found", f"no message {ident} in this dialog")
        if retract is not None:
            await self.server.im.delete(session.user, str(doc["_id"]))
        else:
            await self.server.im.edit(session.user, str(doc["_id"]), body or "")
        return True

    async def _signals(
        self, session: C2SSession, stanza: ET.Element, chat: Document | None
    ) -> None:
        """Chat states, receipts and markers: live typing and read state, never stored."""
        if chat is None:
            return
        assert session.user is not None
        if stanza.find(q(CHATSTATES, "composing")) is not None:
            await self.server.im.typing(session.user_id, chat["_id"])
        # Only "displayed" means read: a delivery receipt says the device got it, not the person.
        for tag in (q(MARKERS, "displayed"),):
            marker = stanza.find(tag)
            if marker is not None and marker.get("id"):
                # (a marker for something that is not a portal message id is ignored)
                with contextlib.suppress(Problem):
                    await self.server.im.mark_read(session.user, chat["_id"], marker.get("id", ""))

    async def _relay_signal(
        self,
        session: C2SSession,
        stanza: ET.Element,
        recipient_id: str,
        target: Jid,
        chat: Document | None,
    ) -> None:
        """What a message without text carries from one Jabber client to another: chat states,
        delivery receipts (XEP-0184), a room invitation (XEP-0249), the thread. Never stored:
        it goes live, through the bus, to the recipient's sessions on any node."""
        states = [s for s in CHAT_STATES if stanza.find(q(CHATSTATES, s)) is not None]
        # "composing" in an existing dialog already went out as the messenger's typing event
        # (on_typing relays it to Jabber sessions too): not twice.
        if chat is not None:
            states = [s for s in states if s != "composing"]
        received = stanza.find(q(RECEIPTS, "received"))
        signal: dict[str, Any] = {
            "state": states[0] if states else None,
            "received": _short(received.get("id")) if received is not None else None,
            "invite": invitation_of(stanza),
        }
        if not any(signal.values()):
            return
        thread = stanza.find(q(CLIENT, "thread"))
        signal.update(
            id=_short(stanza.get("id")),
            type=stanza.get("type") if stanza.get("type") in ("chat", "normal") else "chat",
            thread=_short(thread.text) if thread is not None else None,
        )
        await self.server.bus.publish_ephemeral(
            EphemeralEvent(
                "xmpp.signal",
                {
                    "from": str(session.jid),
                    "to": recipient_id,
                    "resource": target.resource or None,
                    "signal": signal,
                },
                (f"user:{recipient_id}",),
            )
        )

    async def on_signal(self, event: EphemeralEvent) -> None:
        if event.type != "xmpp.signal":
            return
        data = event.data
        signal = data["signal"]
        for session in self.server.available_sessions_of(str(data["to"])):
            if session.jid is None:
                continue
            if data.get("resource") and session.jid.resource != data["resource"]:
                continue
            stanza = element(
                "message",
                {
                    "type": signal.get("type") or "chat",
                    "from": data["from"],
                    "to": str(session.jid),
                },
            )
            if signal.get("id"):
                stanza.set("id", str(signal["id"]))
            if signal.get("thread"):
                child(stanza, "thread", text=str(signal["thread"]))
            if signal.get("state"):
                child(stanza, str(signal["state"]), ns=CHATSTATES)
            if signal.get("received"):
                child(stanza, "received", {"id": str(signal["received"])}, ns=RECEIPTS)
            add_invitation(stanza, signal.get("invite"))
            session.send_nowait(stanza)

    # to Jabber clients -----------------------------------------------------------------------

    async def on_event(self, event: Event) -> None:
        kind, _, ident = event.stream.partition(":")
        if kind == "user":
            if event.type in ("im.chat.joined", "im.chat.left"):
                chat_id = (event.data.get("chat") or {}).get("id") or event.data.get("chat_id")
                self.chats.pop(str(chat_id), None)
            return
        if kind != "chat":
            return
        if event.type == "im.chat.members":
            self.chats.pop(ident, None)
            return
        if event.type not in ("im.message", "im.message.updated", "im.message.deleted"):
            return
        chat = await self.chat(ident)
        if chat is None or chat["kind"] == "group":
            return  # group chats travel as MUC rooms
        message = event.data["message"]
        author = message.get("author_id")
        origin = (
            self.origins.pop((str(author), str(message.get("client_id"))), None)
            if message.get("client_id")
            else None
        )
        delivered: list[str] = []
        for member in chat.get("member_ids", []):
            sessions = self.server.available_sessions_of(member)
            if not sessions:
                continue
            if member == author:
                other = next((m for m in chat["member_ids"] if m != member), member)
                other_login = await self.server.login_of(other)
                for session in sessions:
                    if session.carbons and session.id != origin and session.jid is not None:
                        to = Jid(other_login or "", self.server.domain)
                        original = await self._shaped(event, message, to, frm=str(session.jid.bare))
                        session.send_nowait(sent_copy(self.server, session, original))
                continue
            wanted = (message.get("origin") or {}).get("resource")
            addressed = [s for s in sessions if s.jid is not None and s.jid.resource == wanted]
            for session in addressed or sessions:
                if session.jid is not None:
                    session.send_nowait(await self._shaped(event, message, session.jid))
            delivered.append(member)
        if delivered and event.type == "im.message":
            await self.server.store.users.update_many(
                {"_id": {"$in": delivered}}, {"$max": {"xmpp_delivered_upto": message["id"]}}
            )

    async def _shaped(
        self, event: Event, message: dict[str, Any], to: Jid, *, frm: str | None = None
    ) -> ET.Element:
        if event.type == "im.message":
            return await self.stanza(message, to, frm=frm)
        stanza = element(
            "message",
            {
                "type": "chat",
                "from": frm or await self.author_jid(message),
                "to": str(to),
                "id": f"{message['id']}-{event.seq}",
            },
        )
        # Clients know the message by the id its author's client gave it, if it had one.
        known = str((message.get("origin") or {}).get("id") or message["id"])
        if event.type == "im.message.updated":
            child(stanza, "body", text=str(message.get("text", "")))
            child(stanza, "replace", {"id": known}, ns=CORRECT)
        else:
            child(stanza, "body", text="(message deleted)")
            child(stanza, "retract", {"id": known}, ns=RETRACT)
            child(stanza, "fallback", {"for": RETRACT}, ns=FALLBACK)
        return stanza

    async def on_typing(self, event: EphemeralEvent) -> None:
        if event.type != "im.typing":
            return
        chat = await self.chat(str(event.data.get("chat_id")))
        if chat is None or chat["kind"] != "private":
            return
        typer = str(event.data.get("user_id"))
        login = await self.server.login_of(typer)
        for member in chat["member_ids"]:
            if member == typer:
                continue
            for session in self.server.available_sessions_of(member):
                stanza = element(
                    "message",
                    {
                        "type": "chat",
                        "to": str(session.jid),
                        "from": f"{login}@{self.server.domain}",
                    },
                )
                child(stanza, "composing", ns=CHATSTATES)
                session.send_nowait(stanza)

    async def deliver_offline(self, session: C2SSession) -> None:
        """Messages that came while the user had no Jabber session and were not read on the web,
        with their original time (XEP-0203), each delivered once."""
        assert session.jid is not None
        store = self.server.store
        user = await store.users.find_one(
            {"_id": session.user_id}, projection={"xmpp_delivered_upto": True}
        )
        upto = (user or {}).get("xmpp_delivered_upto")
        memberships = {
            m["chat_id"]: m.get("last_read_id")
            async for m in store["chat_members"].find({"user_id": session.user_id})
        }
        chats = [
            c
            async for c in store["chats"].find(
                {"_id": {"$in": list(memberships)}, "kind": {"$in": ["private", "system"]}}
            )
        ]
        pending: list[Document] = []
        for chat in chats:
            floor = max(filter(None, (upto, memberships[chat["_id"]])), default=None)
            query: Document = {
                "chat_id": chat["_id"],
                "deleted": False,
                "author_id": {"$ne": session.user_id},
            }
            if floor is not None:
                query["_id"] = {"$gt": floor}
            pending += [
                m
                async for m in store["messages"].find(
                    query, sort=[("_id", -1)], limit=OFFLINE_LIMIT
                )
            ]
        pending.sort(key=lambda m: m["_id"])
        for doc in pending[-OFFLINE_LIMIT:]:
            stanza = await self.stanza(archived(doc), session.jid)
            child(
                stanza,
                "delay",
                {"from": self.server.domain, "stamp": stamp(doc["created_at"])},
                ns=DELAY,
            )
            session.send_nowait(stanza)
        if pending:
            await store.users.update_one(
                {"_id": session.user_id}, {"$max": {"xmpp_delivered_upto": pending[-1]["_id"]}}
            )


def install(server: XmppServer) -> None:
    bridge = Bridge(server)
    server.add_feature(CHATSTATES, MARKERS, DELAY, SID, CORRECT, RETRACT)
    server.on_message(bridge.on_message)
    server.bus.subscribe(bridge.on_event)
    server.bus.subscribe_ephemeral(bridge.on_typing)
    server.bus.subscribe_ephemeral(bridge.on_signal)
    server.on_available.append(bridge.deliver_offline)
    server.bridge = bridge
