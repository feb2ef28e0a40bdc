"""One-to-one messages, bridged to the portal messenger: a <message type="chat"/> to
login@domain is a message in the portal's private dialog, and every message of a private
dialog or of the portal's notices reaches the members' Jabber sessions.

Also here: offline delivery with delay stamps (XEP-0203), once; chat states (XEP-0085) as
typing notifications; chat markers (XEP-0333, "displayed") as read state; message
correction (XEP-0308) and retraction (XEP-0424) for edits and deletions made on the web.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pymongo import UpdateOne

from server.events.models import EphemeralEvent, Event
from server.im.models import HistoryQuery, MessageOrigin, MessageOut, SendMessage, SendResult
from server.im.rules import origin_key, private_pair_key
from server.im.service import ImService
from server.store.database import Document
from server.web.problems import Problem
from server.xmpp.jid import Jid
from server.xmpp.modules.blocking import blocked_error, blocked_for
from server.xmpp.modules.carbons import received_copy, sent_copy
from server.xmpp.modules.csi import wants_chat_states
from server.xmpp.modules.typing import TypingPauses
from server.xmpp.modules.upload import add_files, attachments
from server.xmpp.server import BODY, MESSAGE, overlappable
from server.xmpp.session import C2SSession
from server.xmpp.stanza import CLIENT, PORTAL_RESOURCE, StanzaError, child, element, q
from server.xmpp.xmlstream import addressed

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

log = logging.getLogger(__name__)

CHATSTATES = "http://jabber.org/protocol/chatstates"
MARKERS = "urn:xmpp:chat-markers:0"
DELAY = "urn:xmpp:delay"
SID = "urn:xmpp:sid:0"
# XEP-0160: messages to a user with no client online are kept and delivered at the next login
# (they are the dialog's history; see deliver_offline).
OFFLINE = "msgoffline"
CORRECT = "urn:xmpp:message-correct:0"
RETRACT = "urn:xmpp:message-retract:1"
FALLBACK = "urn:xmpp:fallback:0"
RECEIPTS = "urn:xmpp:receipts"
CONFERENCE = "jabber:x:conference"
CHAT_STATES = ("active", "composing", "paused", "inactive", "gone")
OFFLINE_LIMIT = 200
MAX_ID_CHARS = 256
MAX_SUBJECT_CHARS = 1024
MARK_DELAY_SECONDS = 1.0  # delivery marks are written behind, at most this late
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


async def submit_message(
    im: ImService, user: Document, request: SendMessage, *, origin: MessageOrigin | None = None
) -> Awaitable[SendResult]:
    """Check ``request`` and hand it to the messenger's write path (``ImService.submit``):
    the checks run here, and once this returns the message is queued for the group commit,
    so the order in which a session's calls return is the order its messages are stored.
    The awaitable resolves once the message is stored and its event published. The one
    place the XMPP transport sends a message. ``origin``: what the client sent besides the
    text (its ids, thread, subject...), stored with the message in the same insert."""
    return await im.submit(user, request, origin=origin)


async def stored(pending: Awaitable[SendResult]) -> SendResult:
    """The store's outcome, a messenger refusal turned into the stanza error for the client."""
    try:
        return await pending
    except (ValidationError, Problem) as exc:
        raise as_stanza_error(exc) from None


HISTORY_PAGE = 100


async def read_history(
    im: ImService,
    user: Document,
    chat_id: str,
    limit: int,
    *,
    after: str | None = None,
    before: str | None = None,
    oldest_first: bool = False,
    keep: Callable[[MessageOut], bool] = lambda _m: True,
) -> list[MessageOut]:
    """Up to ``limit`` messages of a chat strictly between ``after`` and ``before`` that are
    not deleted and that ``keep`` accepts: the newest ones, newest first, or with
    ``oldest_first`` the oldest ones, oldest first. Read through the messenger's history page
    by page (by chat and id, which its index serves whatever the size of the history: a filter
    on ``deleted`` or ``created_at`` would make the embedded database scan every message)."""
    found: list[MessageOut] = []
    cursor = after if oldest_first else before
    while len(found) < limit:
        if oldest_first:
            query = HistoryQuery(after=cursor, limit=HISTORY_PAGE)
        else:
            query = HistoryQuery(before=cursor, limit=HISTORY_PAGE)
        page = await im.history(user, chat_id, query)  # oldest first either way
        if not oldest_first:
            page.reverse()
        for message in page:
            if (after is not None and message.id <= after) or (
                before is not None and message.id >= before
            ):
                return found  # past the range: nothing further is in it
            if not message.deleted and keep(message):
                found.append(message)
                if len(found) == limit:
                    return found
        if len(page) < HISTORY_PAGE:
            return found
        cursor = page[-1].id
    return found


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


def own_lookups(user_id: str, chat_id: str, ident: str) -> list[Document]:
    """The filters ``find_own`` tries after the portal id: plain equalities, each whole in
    one of the messages' indexes (the embedded database uses an index only when every field
    of a filter is in it; an ``$or`` read the chat's whole history)."""
    return [
        {"origin_keys": origin_key(user_id, chat_id, "id", ident)},
        {"origin_keys": origin_key(user_id, chat_id, "origin_id", ident)},
    ]


async def find_own(
    server: XmppServer, user_id: str, chat_id: str, ident: str | None
) -> Document | None:
    """A message a client refers to (a correction, a retraction): by the portal id (the
    stanza-id, and the id others saw), or by the id or origin-id this user sent it with
    (the newest such, as ids may repeat across streams)."""
    if not ident:
        return None
    messages = server.store["messages"]
    doc = await messages.find_one({"_id": ident, "chat_id": chat_id})
    for query in own_lookups(user_id, chat_id, ident):
        if doc is not None:
            break
        doc = await messages.find_one(query, sort=[("_id", -1)])
    return doc


def archived(message: MessageOut) -> dict[str, Any]:
    """A message read from the history (MAM, room history, offline delivery) in the shape
    events carry, with the ids its author's client sent it with (``add_ids``)."""
    return {
        "id": message.id,
        "author_id": message.author_id,
        "text": message.text,
        "origin": message.origin.model_dump() if message.origin is not None else None,
        "files": [ref.model_dump() for ref in message.files],
    }


def before_id(message_id: str) -> str | None:
    """The id just before a message's (ids are ObjectIds, compared as hex strings)."""
    try:
        value = int(message_id, 16)
    except ValueError:
        return None
    if len(message_id) != 24 or value == 0:
        return None
    return format(value - 1, "024x")


def stamp(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


class Bridge:
    def __init__(self, server: XmppServer) -> None:
        self.server = server
        self.chats: dict[str, Document] = {}
        self.origins: dict[tuple[str, str], str] = {}  # (user, client id) -> session id
        self.marks: dict[str, str] = {}  # user id -> delivered up to, not yet stored
        self._marker: asyncio.Task[None] | None = None
        # Mark writes one at a time: a mark taken back (undeliver) must not be overtaken by
        # an older write raising it again.
        self._marks_written = asyncio.Lock()
        self.pauses = TypingPauses(server, self._paused)

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
        add_files(self.server, stanza, message)
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
        if stanza.tag != MESSAGE:
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
        if await blocked_for(self.server, session.user_id, str(target.bare)):
            session.answer(stanza, blocked_error(stanza))  # XEP-0191 3.5: unblock first
            return True
        recipient_id = str(recipient["_id"])
        body = stanza.findtext(BODY)
        chat: Document | None = None
        if not overlappable(stanza):
            # Typing, markers, corrections, signals without text: they need the dialog (a
            # plain message does not: the messenger finds or opens it).
            chat = await self.server.store["chats"].find_one(
                {"pair_key": private_pair_key(session.user_id, recipient_id)}
            )
            await self._signals(session, stanza, chat)
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
            text, file_ids = await attachments(self.server, session, stanza, body)
            request = SendMessage(
                to=[recipient_id], text=text, client_id=client_id, file_ids=file_ids
            )
            pending = await submit_message(self.server.im, session.user, request, origin=origin)
        except (ValidationError, Problem) as exc:
            raise as_stanza_error(exc) from None
        session.pipeline.add(stored(pending), stanza)
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
        if await blocked_for(self.server, str(data["to"]), str(data["from"])):
            return
        if signal.get("state"):
            await self._typing_told(str(data["from"]), str(data["to"]))
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
            # An inactive client (XEP-0352) gets no chat states; a receipt or an invitation
            # riding with one still goes.
            if signal.get("state") and wants_chat_states(session):
                child(stanza, str(signal["state"]), ns=CHATSTATES)
            elif not (signal.get("received") or signal.get("invite")):
                continue
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
        if event.type == "im.message" and author:
            self.pauses.ended(ident, str(author))  # the message carries <active/>
        origin = (
            self.origins.pop((str(author), str(message.get("client_id"))), None)
            if message.get("client_id")
            else None
        )
        # Nothing here waits on the database once the chat and the logins are known: the
        # event's publication (and the next message of this chat) does not wait for us.
        # Each stanza is serialised once per recipient and addressed per session.
        server = self.server
        for member in chat.get("member_ids", []):
            sessions = [s for s in server.available_sessions_of(member) if s.jid is not None]
            if not sessions:
                continue
            bare = sessions[0].jid.bare  # type: ignore[union-attr]
            if member == author:
                copies = [s for s in sessions if s.carbons and s.id != origin]
                if not copies:
                    continue
                other = next((m for m in chat["member_ids"] if m != member), member)
                to = Jid(await server.login_of(other) or "", server.domain)
                original = await self._shaped(event, message, to, frm=str(bare))
                wrapped = addressed(sent_copy(bare, original))
                for session in copies:
                    session.send_bytes(wrapped(str(session.jid)))
                continue
            if author and await blocked_for(server, member, await self.author_jid(message)):
                continue  # XEP-0191: not to this member's Jabber clients (still on the web)
            # Addressed to one of the member's resources: only that one gets it while it is
            # online (RFC 6121 8.5.3.1); else every session.
            wanted = (message.get("origin") or {}).get("resource")
            chosen = [s for s in sessions if wanted and s.jid and s.jid.resource == wanted]
            shaped = addressed(await self._shaped(event, message, bare))
            for session in chosen or sessions:
                session.send_bytes(shaped(str(session.jid)))
            copies = [s for s in sessions if chosen and s.carbons and s not in chosen]
            if copies:
                # XEP-0280 6: the user's other clients that enabled carbons get a copy of a
                # message addressed to one of them, so every client shows the conversation.
                original = await self._shaped(event, message, chosen[0].jid or bare)
                received = addressed(received_copy(bare, original))
                for session in copies:
                    session.send_bytes(received(str(session.jid)))
            if event.type == "im.message":
                self.delivered(member, str(message["id"]))

    def delivered(self, user_id: str, message_id: str) -> None:
        """Offline delivery starts after this message for the user. Written behind, a second
        at most later, one write for every user and message of that second: a crash loses at
        most a second of marks, and those messages come again (never fewer)."""
        known = self.marks.get(user_id)
        if known is None or message_id > known:
            self.marks[user_id] = message_id
        if self._marker is None:
            self._marker = self.server.spawn(self._write_marks_soon())

    async def _write_marks_soon(self) -> None:
        try:
            await asyncio.sleep(MARK_DELAY_SECONDS)
        finally:
            self._marker = None
        await self.write_marks()

    async def write_marks(self, user_ids: list[str] | None = None) -> None:
        """Store the pending delivery marks (of ``user_ids``, or all)."""
        async with self._marks_written:
            if user_ids is None:
                marks, self.marks = self.marks, {}
            else:
                marks = {u: self.marks.pop(u) for u in user_ids if u in self.marks}
            if not marks:
                return
            try:
                await self.server.store.users.bulk_write(
                    [
                        UpdateOne({"_id": user_id}, {"$max": {"xmpp_delivered_upto": message_id}})
                        for user_id, message_id in marks.items()
                    ],
                    ordered=False,
                )
            except Exception:
                for user_id, message_id in marks.items():  # kept for the next write
                    if message_id > self.marks.get(user_id, ""):
                        self.marks[user_id] = message_id
                raise

    async def undeliver(self, user_id: str, first: str) -> None:
        """A session ended with message ``first`` (and maybe later ones) sent but never
        acknowledged by its client (XEP-0198): offline delivery starts again just before it.
        The messages of a stream come in order, so everything acknowledged is older."""
        floor = before_id(first)
        if floor is None:
            log.warning("cannot take back the delivery mark of %s: %r", user_id, first)
            return
        async with self._marks_written:
            pending = self.marks.get(user_id)
            if pending is not None and pending >= first:
                self.marks[user_id] = floor
            await self.server.store.users.update_one(
                {"_id": user_id, "xmpp_delivered_upto": {"$gte": first}},
                {"$set": {"xmpp_delivered_upto": floor}},
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
        chat_id, typer = str(event.data.get("chat_id")), str(event.data.get("user_id"))
        if await self.send_state(chat_id, typer, "composing"):
            self.pauses.started(chat_id, typer)  # nothing says when it stops: a timer does

    async def send_state(self, chat_id: str, typer: str, state: str) -> bool:
        """A chat state of ``typer`` to the other member's Jabber sessions on this node, in a
        private chat; whether any got it."""
        chat = await self.chat(chat_id)
        if chat is None or chat["kind"] != "private":
            return False
        login = await self.server.login_of(typer)
        sent = False
        for member in chat["member_ids"]:
            if member == typer or await blocked_for(
                self.server, member, f"{login}@{self.server.domain}"
            ):
                continue
            for session in self.server.available_sessions_of(member):
                if not wants_chat_states(session):
                    continue  # inactive (XEP-0352): typing would be stale when looked at
                stanza = element(
                    "message",
                    {
                        "type": "chat",
                        "to": str(session.jid),
                        "from": f"{login}@{self.server.domain}",
                    },
                )
                child(stanza, state, ns=CHATSTATES)
                session.send_nowait(stanza)
                sent = True
        return sent

    async def _typing_told(self, frm: str, to: str) -> None:
        """A chat state the typer's own Jabber client sent (relayed as it is) replaces the
        timer's paused in their dialog with ``to``."""
        typer = await self.server.user_for(Jid.parse(frm))
        if typer is None:
            return
        for chat_id in self.pauses.chats_of(str(typer["_id"])):
            chat = self.chats.get(chat_id)
            if chat is not None and to in chat["member_ids"]:
                self.pauses.ended(chat_id, str(typer["_id"]))

    async def _paused(self, chat_id: str, typer: str) -> None:
        await self.send_state(chat_id, typer, "paused")

    async def deliver_offline(self, session: C2SSession) -> None:
        """Messages that came while the user had no Jabber session and were not read on the web,
        with their original time (XEP-0203), each delivered once.

        The messenger's unread numbers say which chats to look at: none (the usual login)
        costs no read of the history at all."""
        assert session.jid is not None and session.user is not None
        user_id = session.user_id
        unread = (await self.server.im.counters(user_id)).chats
        if not unread:
            return
        store = self.server.store
        user = await store.users.find_one(
            {"_id": user_id}, projection={"xmpp_delivered_upto": True}
        )
        marks = ((user or {}).get("xmpp_delivered_upto"), self.marks.get(user_id))
        upto = max(filter(None, marks), default=None)
        read_marks = {
            m["chat_id"]: m.get("last_read_id")
            async for m in store["chat_members"].find(
                {"_id": {"$in": [f"{chat_id}|{user_id}" for chat_id in unread]}}
            )
        }
        pending: list[MessageOut] = []
        for chat_id in sorted(unread):
            chat = await self.chat(chat_id)
            if chat is None or chat["kind"] not in ("private", "system"):
                continue  # group chats: their rooms' history
            floor = max(filter(None, (upto, read_marks.get(chat_id))), default=None)
            pending += await read_history(
                self.server.im,
                session.user,
                chat_id,
                OFFLINE_LIMIT,
                after=floor,
                keep=lambda m: m.author_id != user_id,
            )
        pending.sort(key=lambda m: m.id)
        pending = [
            m
            for m in pending
            if not await blocked_for(
                self.server, user_id, await self.author_jid({"author_id": m.author_id})
            )
        ]
        for found in pending[-OFFLINE_LIMIT:]:
            stanza = await self.stanza(archived(found), session.jid)
            child(
                stanza,
                "delay",
                {"from": self.server.domain, "stamp": stamp(found.created_at)},
                ns=DELAY,
            )
            session.send_nowait(stanza)
        if pending:
            self.delivered(user_id, pending[-1].id)


def install(server: XmppServer) -> None:
    bridge = Bridge(server)
    server.add_feature(CHATSTATES, MARKERS, DELAY, SID, CORRECT, RETRACT, OFFLINE)
    # Messages to and from the account carry the portal's stanza-id (XEP-0359 5.1: announced
    # by the entity that stamps them, the account, as Prosody's mod_mam does).
    server.account_features.add(SID)
    server.on_message(bridge.on_message)
    server.bus.subscribe(bridge.on_event)
    server.bus.subscribe_ephemeral(bridge.on_typing)
    server.bus.subscribe_ephemeral(bridge.on_signal)
    server.on_available.append(bridge.deliver_offline)

    async def warm(session: C2SSession) -> None:
        await server.im.counters(session.user_id)  # what deliver_offline looks at first

    server.on_authenticated(warm)

    async def last_session_gone(session: C2SSession) -> None:
        # The marks of a user going offline are stored now: their next login (on any node)
        # must not get again what they saw live.
        if session.user is not None and not server.available_sessions_of(session.user_id):
            await bridge.write_marks([session.user_id])

    server.on_unbound(last_session_gone)
    server.bridge = bridge
