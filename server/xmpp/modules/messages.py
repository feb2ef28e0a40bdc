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

from bson import ObjectId
from pydantic import ValidationError
from pymongo import UpdateOne

from server.events.models import EphemeralEvent, Event
from server.im.models import HistoryQuery, MessageOut, SendMessage, SendResult
from server.im.rules import private_pair_key
from server.im.service import ImService
from server.store.database import Document
from server.web.problems import Problem
from server.xmpp.jid import Jid
from server.xmpp.modules.carbons import sent_copy
from server.xmpp.server import BODY, MESSAGE, overlappable
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q
from server.xmpp.xmlstream import addressed

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
OFFLINE_LIMIT = 200
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
    im: ImService, user: Document, request: SendMessage
) -> Awaitable[SendResult]:
    """Check ``request`` and hand it to the messenger's write path (``ImService.submit``):
    the checks run here, and once this returns the message is queued for the group commit,
    so the order in which a session's calls return is the order its messages are stored.
    The awaitable resolves once the message is stored and its event published. The one
    place the XMPP transport sends a message."""
    return await im.submit(user, request)


async def stored(pending: Awaitable[SendResult]) -> SendResult:
    """The store's outcome, a messenger refusal turned into the stanza error for the client."""
    try:
        return await pending
    except (ValidationError, Problem) as exc:
        raise as_stanza_error(exc) from None


HISTORY_PAGE = 100


def id_at(moment: datetime) -> str:
    """The smallest message id of ``moment``'s second: ids are ObjectIds, time first, so a
    time range becomes an id range the history's index can serve."""
    return str(ObjectId.from_datetime(moment))


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


def client_id_for(stanza_id: str | None) -> str | None:
    """A client's stanza id as an idempotency key: a resent stanza stores no second message."""
    if not stanza_id:
        return None
    return "x" + hashlib.sha256(stanza_id.encode()).hexdigest()[:40]


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
            {
                "type": "chat",
                "id": str(message["id"]),
                "from": frm or await self.author_jid(message),
                "to": str(to),
            },
        )
        child(stanza, "body", text=str(message.get("text", "")))
        child(stanza, "stanza-id", {"id": str(message["id"]), "by": str(to.bare)}, ns=SID)
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
        recipient_id = str(recipient["_id"])
        body = stanza.findtext(BODY)
        if not overlappable(stanza):
            # Typing, markers, corrections: they need the dialog (a plain message does not:
            # the messenger finds or opens it).
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
            return True
        client_id = client_id_for(stanza.get("id"))
        if client_id is not None:
            if len(self.origins) > MAX_ORIGINS:
                self.origins.clear()
            self.origins[(session.user_id, client_id)] = session.id
        try:
            request = SendMessage(to=[recipient_id], text=body, client_id=client_id)
            pending = await submit_message(self.server.im, session.user, request)
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
        store = self.server.store["messages"]
        doc = await store.find_one({"_id": ident, "chat_id": chat["_id"]}) if ident else None
        if doc is None and ident:
            doc = await store.find_one(
                {"dedup_key": f"{session.user_id}|{chat['_id']}|{client_id_for(ident)}"}
            )
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
                wrapped = addressed(sent_copy(server, bare, original))
                for session in copies:
                    session.send_bytes(wrapped(str(session.jid)))
                continue
            shaped = addressed(await self._shaped(event, message, bare))
            for session in sessions:
                session.send_bytes(shaped(str(session.jid)))
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
        if event.type == "im.message.updated":
            child(stanza, "body", text=str(message.get("text", "")))
            child(stanza, "replace", {"id": str(message["id"])}, ns=CORRECT)
        else:
            child(stanza, "body", text="(message deleted)")
            child(stanza, "retract", {"id": str(message["id"])}, ns=RETRACT)
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
        for found in pending[-OFFLINE_LIMIT:]:
            message = {"id": found.id, "author_id": found.author_id, "text": found.text}
            stanza = await self.stanza(message, session.jid)
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
    server.add_feature(CHATSTATES, MARKERS, DELAY, SID, CORRECT, RETRACT)
    server.on_message(bridge.on_message)
    server.bus.subscribe(bridge.on_event)
    server.bus.subscribe_ephemeral(bridge.on_typing)
    server.on_available.append(bridge.deliver_offline)

    async def last_session_gone(session: C2SSession) -> None:
        # The marks of a user going offline are stored now: their next login (on any node)
        # must not get again what they saw live.
        if session.user is not None and not server.available_sessions_of(session.user_id):
            await bridge.write_marks([session.user_id])

    server.on_unbound(last_session_gone)
    server.bridge = bridge
