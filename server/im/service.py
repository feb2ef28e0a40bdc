"""Messenger service: handler -> here -> store write -> event on the chat's stream -> transports.

A message is stored once and published once, on its chat's stream; members' connections are in
that stream's room. A new membership is announced on the member's personal stream with the
chat stream's position at that moment (``join_stream``/``from_seq``), so that transports can
subscribe live connections, and reconnecting ones replay the chat from where they joined.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import DuplicateKeyError

from server.channels.ratelimit import TokenBucket
from server.directory.models import display_name
from server.directory.rules import descendants
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, VersionedState
from server.events.streams import StreamLog, user_stream
from server.im.models import (
    ChatOut,
    Counters,
    DialogOut,
    HistoryQuery,
    ImSettings,
    MessageOrigin,
    MessageOut,
    SendMessage,
    SendResult,
)
from server.im.rules import (
    ChatKind,
    chat_stream,
    may_change_message,
    may_manage_members,
    may_post,
    may_read,
    private_pair_key,
    recipients,
    system_pair_key,
)
from server.settings import Settings
from server.store.database import Document, Store, new_id, utcnow
from server.web.problems import Problem, forbidden, not_found

log = logging.getLogger(__name__)

PREVIEW_CHARS = 200
PORTAL_NAME = "Portal"
# How long a retried send waits for its first attempt's event before announcing the message
# itself (that attempt's node may have died between storing the message and its event).
ANNOUNCE_GRACE_SECONDS = 5.0


class ImService:
    def __init__(
        self,
        store: Store,
        streams: StreamLog,
        directory: DirectoryService,
        bus: EventBus,
        settings: Settings,
    ) -> None:
        self._store = store
        self._streams = streams
        self._directory = directory
        self._bus = bus
        self._settings = settings
        self._buckets: dict[str, TokenBucket] = {}

    # chats -------------------------------------------------------------------------------------

    async def chat_document(self, chat_id: str) -> Document:
        chat = await self._store["chats"].find_one({"_id": chat_id})
        if chat is None:
            raise not_found(f"chat {chat_id}")
        return chat

    async def readable_chat(self, user_id: str, chat_id: str) -> Document:
        """The chat, if ``user_id`` is a member; a non-member cannot tell it exists."""
        chat = await self._store["chats"].find_one({"_id": chat_id})
        if chat is None or not may_read(user_id, chat.get("member_ids", [])):
            raise not_found(f"chat {chat_id}")
        return chat

    async def open_private(self, user: Document, other_id: str) -> Document:
        user_id = str(user["_id"])
        if other_id == user_id:
            raise Problem(
                422, "invalid-recipient", "Invalid recipient", "a private dialog needs another user"
            )
        other = await self._store.users.find_one({"_id": other_id})
        if (
            other is None
            or not other.get("is_active", True)
            or not await self._directory.may_see(user, other)
        ):
            raise Problem(
                422,
                "invalid-recipient",
                "Invalid recipient",
                f"user {other_id} does not exist or cannot be written to",
            )
        key = private_pair_key(user_id, other_id)
        existing = await self._store["chats"].find_one({"pair_key": key})
        if existing is not None:
            return await self._with_members(existing, [user_id, other_id])
        return await self._create_chat(
            "private", [user_id, other_id], title="", owner_id=None, pair_key=key
        )

    async def create_group(
        self, owner: Document, title: str, member_ids: list[str], workgroup_id: str | None = None
    ) -> Document:
        owner_id = str(owner["_id"])
        members = list(dict.fromkeys([owner_id, *member_ids]))
        await self._require_users(owner, members)
        return await self._create_chat(
            "group", members, title=title, owner_id=owner_id, workgroup_id=workgroup_id
        )

    async def _create_chat(
        self,
        kind: ChatKind,
        members: list[str],
        *,
        title: str,
        owner_id: str | None,
        pair_key: str | None = None,
        workgroup_id: str | None = None,
    ) -> Document:
        chat: Document = {
            "_id": new_id(),
            "kind": kind,
            "title": title,
            "member_ids": [],
            "owner_id": owner_id,
            "workgroup_id": workgroup_id,
            "created_at": utcnow(),
            "last_message": None,
            "last_message_at": None,
        }
        if pair_key is not None:
            chat["pair_key"] = pair_key
        try:
            await self._store["chats"].insert_one(chat)
        except DuplicateKeyError:
            existing = await self._store["chats"].find_one({"pair_key": pair_key})
            if existing is None:
                raise
            return await self._with_members(existing, members)
        await self._add_members(chat, members, from_start=True)
        return await self.chat_document(chat["_id"])

    async def _with_members(self, chat: Document, members: list[str]) -> Document:
        """A private dialog found rather than made: its creator may still be adding the two
        members (two first messages crossing), or have died before. Adding them here is
        idempotent, and whoever adds a member announces it."""
        if set(members) <= set(chat.get("member_ids", [])):
            return chat
        await self._add_members(chat, members, from_start=True)
        return await self.chat_document(chat["_id"])

    async def _require_users(self, actor: Document, user_ids: list[str]) -> None:
        unreachable = await self._directory.first_unreachable(actor, user_ids)
        if unreachable is not None:
            raise Problem(
                422,
                "invalid-recipient",
                "Invalid recipient",
                f"user {unreachable} does not exist or cannot be added",
            )

    async def _add_members(
        self, chat: Document, user_ids: list[str], *, from_start: bool = False
    ) -> list[str]:
        """Add memberships; announce each on the member's personal stream. Returns the new ones.

        ``from_start``: a new chat, whose stream is wholly its members'. Its joins say so
        (``from_seq`` 0) rather than naming the head: a first message crossing the creation
        (posted by whoever lost the race to create the dialog) may be in the stream already,
        and it must not fall before the join."""
        added: list[str] = []
        stream = chat_stream(chat["_id"])
        for user_id in user_ids:
            try:
                await self._store["chat_members"].insert_one(
                    {
                        "_id": f"{chat['_id']}|{user_id}",
                        "chat_id": chat["_id"],
                        "user_id": user_id,
                        "joined_at": utcnow(),
                        "last_read_id": None,
                    }
                )
            except DuplicateKeyError:
                continue
            added.append(user_id)
        if not added:
            return added
        await self._store["chats"].update_one(
            {"_id": chat["_id"]}, {"$addToSet": {"member_ids": {"$each": added}}}
        )
        chat = await self.chat_document(chat["_id"])
        head = 0 if from_start else await self._streams.last_seq(stream)
        for user_id in added:
            out = await self.chat_out(chat, user_id)
            await self._streams.append(
                user_stream(user_id),
                "im.chat.joined",
                {"chat": out.model_dump(mode="json"), "join_stream": stream, "from_seq": head},
            )
        if chat["kind"] == "group" and len(chat["member_ids"]) > len(added):
            await self._streams.append(
                stream,
                "im.chat.members",
                {
                    "chat_id": chat["_id"],
                    "added": added,
                    "removed": [],
                    "member_ids": chat["member_ids"],
                },
            )
        return added

    async def add_members(self, actor: Document, chat_id: str, user_ids: list[str]) -> ChatOut:
        chat = await self.readable_chat(str(actor["_id"]), chat_id)
        self._check_manage(actor, chat)
        await self._require_users(actor, user_ids)
        await self._add_members(chat, user_ids)
        return await self.chat_out(await self.chat_document(chat_id), str(actor["_id"]))

    async def rename_group(self, actor: Document, chat_id: str, title: str) -> ChatOut:
        """A group chat's new name, told to its members (``im.chat.updated``); the same people
        may rename it as may change its members."""
        actor_id = str(actor["_id"])
        chat = await self.readable_chat(actor_id, chat_id)
        if not may_manage_members(
            actor_id,
            chat["kind"],
            chat.get("owner_id"),
            chat.get("workgroup_id"),
            bool(actor.get("is_admin")),
        ):
            raise forbidden(
                "only the chat's owner may rename it"
                if chat["kind"] == "group" and not chat.get("workgroup_id")
                else "this chat cannot be renamed here"
            )
        if title != chat.get("title"):
            await self._store["chats"].update_one({"_id": chat_id}, {"$set": {"title": title}})
            chat = {**chat, "title": title}
            await self._streams.append(
                chat_stream(chat_id), "im.chat.updated", {"chat_id": chat_id, "title": title}
            )
        return await self.chat_out(chat, actor_id)

    async def remove_member(self, actor: Document, chat_id: str, user_id: str) -> None:
        actor_id = str(actor["_id"])
        chat = await self.readable_chat(actor_id, chat_id)
        leaving = user_id == actor_id and chat["kind"] == "group" and not chat["workgroup_id"]
        if not leaving:
            self._check_manage(actor, chat)
        await self._remove_members(chat, [user_id])

    async def _remove_members(self, chat: Document, user_ids: list[str]) -> None:
        stream = chat_stream(chat["_id"])
        present = [u for u in user_ids if u in chat.get("member_ids", [])]
        if not present:
            return
        await self._store["chats"].update_one(
            {"_id": chat["_id"]}, {"$pull": {"member_ids": {"$in": present}}}
        )
        await self._store["chat_members"].delete_many(
            {"chat_id": chat["_id"], "user_id": {"$in": present}}
        )
        remaining = [m for m in chat["member_ids"] if m not in present]
        if chat.get("owner_id") in present and chat["kind"] == "group":
            # An owner who leaves hands the chat to the longest-standing member left.
            await self._store["chats"].update_one(
                {"_id": chat["_id"]}, {"$set": {"owner_id": remaining[0] if remaining else None}}
            )
        await self._streams.append(
            stream,
            "im.chat.members",
            {"chat_id": chat["_id"], "added": [], "removed": present, "member_ids": remaining},
        )
        for user_id in present:
            await self._streams.append(
                user_stream(user_id),
                "im.chat.left",
                {"chat_id": chat["_id"], "leave_stream": stream},
            )

    def _check_manage(self, actor: Document, chat: Document) -> None:
        if not may_manage_members(
            str(actor["_id"]),
            chat["kind"],
            chat.get("owner_id"),
            chat.get("workgroup_id"),
            bool(actor.get("is_admin")),
        ):
            raise forbidden(
                "only the chat's owner may change its members"
                if chat["kind"] == "group" and not chat.get("workgroup_id")
                else "this chat's members cannot be changed here"
            )

    async def chat_out(
        self, chat: Document, viewer_id: str, names: dict[str, str] | None = None
    ) -> ChatOut:
        title = chat.get("title", "")
        if chat["kind"] == "private":
            other = next((m for m in chat["member_ids"] if m != viewer_id), viewer_id)
            if names is not None and other in names:
                title = names[other]
            else:
                doc = await self._store.users.find_one({"_id": other})
                title = display_name(doc) if doc else "Unknown user"
        elif chat["kind"] == "system":
            title = PORTAL_NAME
        last = chat.get("last_message")
        return ChatOut(
            id=chat["_id"],
            kind=chat["kind"],
            title=title,
            member_ids=list(chat.get("member_ids", [])),
            owner_id=chat.get("owner_id"),
            workgroup_id=chat.get("workgroup_id"),
            stream=chat_stream(chat["_id"]),
            created_at=chat["created_at"],
            last_message=MessageOut.model_validate(last) if last else None,
        )

    async def member_streams(self, user: Document) -> list[str]:
        return [
            chat_stream(m["chat_id"])
            async for m in self._store["chat_members"].find(
                {"user_id": str(user["_id"])}, projection={"chat_id": True}
            )
        ]

    # messages ----------------------------------------------------------------------------------

    def _check_length(self, text: str) -> None:
        limit = self._settings.im_max_message_chars
        if len(text) > limit:
            raise Problem(
                413,
                "message-too-long",
                "Message too long",
                f"a message has at most {limit} characters",
            )

    def _take_token(self, user_id: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets[user_id] = TokenBucket(
                self._settings.im_messages_per_second, self._settings.im_message_burst, now
            )
        if not bucket.take(now):
            raise Problem(
                429,
                "rate-limited",
                "Too many messages",
                "slow down: too many messages per second",
                headers={"Retry-After": "1"},
                retry_after=1,
            )

    async def send(
        self, user: Document, request: SendMessage, *, origin: MessageOrigin | None = None
    ) -> SendResult:
        user_id = str(user["_id"])
        self._check_length(request.text)
        self._take_token(user_id)
        if request.chat_id is not None:
            chat = await self.readable_chat(user_id, request.chat_id)
            if not may_post(user_id, chat["kind"], chat["member_ids"]):
                raise forbidden("nobody can post in this chat")
            message, duplicate = await self._post(
                chat, user_id, request.text, request.client_id, origin=origin
            )
            return SendResult(messages=[message], duplicate=duplicate)
        targets = await self._expand_targets(user, request)
        # Every recipient is checked before the first message goes: all or nothing.
        await self._require_users(user, targets)
        messages: list[MessageOut] = []
        duplicates = 0
        for target in targets:
            chat = await self.open_private(user, target)
            message, duplicate = await self._post(
                chat, user_id, request.text, request.client_id, origin=origin
            )
            messages.append(message)
            duplicates += duplicate
        return SendResult(
            messages=messages, duplicate=bool(messages) and duplicates == len(messages)
        )

    async def _expand_targets(self, user: Document, request: SendMessage) -> list[str]:
        user_id = str(user["_id"])
        if request.to_department is not None:
            tree = await self._directory.department_tree()
            if request.to_department not in tree:
                raise Problem(
                    422,
                    "unknown-reference",
                    "Unknown reference",
                    f"department {request.to_department} does not exist",
                )
            departments = sorted(descendants(request.to_department, tree))
            requested = [
                str(u["_id"])
                async for u in self._store.users.find(
                    {"department_id": {"$in": departments}, "is_active": True},
                    projection={"_id": True},
                    sort=[("last_name", 1), ("first_name", 1)],
                )
            ]
        else:
            requested = list(request.to or [])
        targets = recipients(user_id, requested)
        if not targets:
            raise Problem(422, "invalid-recipient", "Invalid recipient", "nobody to send to")
        if len(targets) > self._settings.im_max_recipients:
            raise Problem(
                422,
                "too-many-recipients",
                "Too many recipients",
                f"at most {self._settings.im_max_recipients} recipients at once",
            )
        return targets

    async def _post(
        self,
        chat: Document,
        author_id: str | None,
        text: str,
        client_id: str | None,
        *,
        system: bool = False,
        origin: MessageOrigin | None = None,
    ) -> tuple[MessageOut, bool]:
        messages = self._store["messages"]
        doc: Document = {
            "_id": new_id(),
            "chat_id": chat["_id"],
            "author_id": author_id,
            "text": text,
            "created_at": utcnow(),
            "edited_at": None,
            "deleted": False,
            "system": system,
            "client_id": client_id,
        }
        if origin is not None:
            doc["origin"] = origin.model_dump()
        if client_id is not None:
            # The unique index decides: a retry fails to insert and finds the first one.
            doc["dedup_key"] = f"{author_id}|{chat['_id']}|{client_id}"
        try:
            await messages.insert_one(doc)
        except DuplicateKeyError:
            earlier = await messages.find_one({"dedup_key": doc["dedup_key"]})
            if earlier is None:
                raise
            if not await self._announced(earlier):
                # The first attempt stored the message, and its node died before the event
                # went into the stream: without it now, nobody would ever be told.
                return await self._announce(chat, earlier, author_id), True
            return MessageOut.from_document(earlier), True
        return await self._announce(chat, doc, author_id), False

    async def _announced(self, doc: Document) -> bool:
        """Whether the message's event was stored. A retry can race the first attempt, still
        between its two writes: the event is given that long to appear before it is taken
        as lost (announcing it twice would show the message twice)."""
        created = doc["created_at"]
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        if utcnow() - created > self._streams.retention:
            return True  # its event, if any, is trimmed by now; too late to tell anyone
        give_up = created + timedelta(seconds=ANNOUNCE_GRACE_SECONDS)
        while True:
            found = await self._store.events.find_one(
                {"data.message.id": doc["_id"], "type": "im.message"}, projection={"_id": True}
            )
            if found is not None:
                return True
            if utcnow() >= give_up:
                log.warning("message %s was stored without its event; announcing it", doc["_id"])
                return False
            await asyncio.sleep(0.1)

    async def _announce(self, chat: Document, doc: Document, author_id: str | None) -> MessageOut:
        """The message's event, then what follows from it (the chat's preview, the author's
        read mark)."""
        messages = self._store["messages"]
        message = MessageOut.from_document(doc)
        payload = message.model_dump(mode="json")
        try:
            await self._streams.append(chat_stream(chat["_id"]), "im.message", {"message": payload})
        except Exception as exc:
            # Not half-stored: a message nobody was told about is taken back.
            await messages.delete_one({"_id": doc["_id"]})
            raise Problem(
                503,
                "unavailable",
                "Service unavailable",
                "the message could not be stored; retry with the same client_id",
                headers={"Retry-After": "1"},
            ) from exc
        preview = dict(payload, text=payload["text"][:PREVIEW_CHARS])
        await self._store["chats"].update_one(
            {"_id": chat["_id"]},
            {"$set": {"last_message": preview, "last_message_at": doc["created_at"]}},
        )
        if author_id is not None:
            # Writing in a chat reads it: the author's other devices lose that chat's badge.
            before = await self._store["chat_members"].find_one_and_update(
                {"_id": f"{chat['_id']}|{author_id}"}, {"$set": {"last_read_id": doc["_id"]}}
            )
            if before is not None and await self._had_unread(chat["_id"], author_id, before):
                await self.push_counters(author_id)
        return message

    async def _own_message(self, user_id: str, message_id: str) -> tuple[Document, Document]:
        doc = await self._store["messages"].find_one({"_id": message_id})
        if doc is None:
            raise not_found(f"message {message_id}")
        chat = await self.readable_chat(user_id, doc["chat_id"])
        if not may_change_message(user_id, doc.get("author_id"), bool(doc.get("deleted"))):
            raise forbidden("only the author can change a message")
        return doc, chat

    async def edit(self, user: Document, message_id: str, text: str) -> MessageOut:
        self._check_length(text)
        if not text.strip():
            raise Problem(
                422,
                "validation-error",
                "Invalid request",
                "text must not be blank",
                errors=[{"loc": ["text"], "msg": "blank", "type": "value_error"}],
            )
        doc, chat = await self._own_message(str(user["_id"]), message_id)
        changes = {"text": text, "edited_at": utcnow()}
        await self._store["messages"].update_one({"_id": message_id}, {"$set": changes})
        doc.update(changes)
        message = MessageOut.from_document(doc)
        await self._streams.append(
            chat_stream(chat["_id"]),
            "im.message.updated",
            {"message": message.model_dump(mode="json")},
        )
        await self._refresh_preview(chat["_id"], message)
        return message

    async def delete(self, user: Document, message_id: str) -> None:
        doc, chat = await self._own_message(str(user["_id"]), message_id)
        changes = {"deleted": True, "text": "", "edited_at": utcnow()}
        await self._store["messages"].update_one({"_id": message_id}, {"$set": changes})
        doc.update(changes)
        message = MessageOut.from_document(doc)
        await self._streams.append(
            chat_stream(chat["_id"]),
            "im.message.deleted",
            {"message": message.model_dump(mode="json")},
        )
        await self._refresh_preview(chat["_id"], message)
        # Members for whom it was unread get their corrected badge.
        async for member in self._store["chat_members"].find({"chat_id": chat["_id"]}):
            reader = member["user_id"]
            last_read = member.get("last_read_id")
            if reader != doc.get("author_id") and (last_read is None or last_read < message_id):
                await self.push_counters(reader)

    async def push_counters(self, user_id: str) -> Counters:
        """Send the user's authoritative unread counters to all their devices."""
        state = await self.counters_state(user_id)
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "counters.changed",
                {"im": state.values},
                (user_stream(user_id),),
                private=state.as_private(),
            )
        )
        return Counters.model_validate(state.values)

    async def counters_state(self, user_id: str) -> VersionedState:
        """The unread counters, versioned by when they were counted: of two pushes counted
        at once (a read mark and a message), the later count is the one that stays."""
        counted_at = time.time_ns()
        counters = await self.counters(user_id)
        return VersionedState("im", counted_at, counters.model_dump(), whole=True)

    async def _refresh_preview(self, chat_id: str, message: MessageOut) -> None:
        # Only while this message is still the chat's last one: a newer message stays shown.
        payload = message.model_dump(mode="json")
        payload["text"] = payload["text"][:PREVIEW_CHARS]
        await self._store["chats"].update_one(
            {"_id": chat_id, "last_message.id": message.id}, {"$set": {"last_message": payload}}
        )

    async def history(self, user: Document, chat_id: str, query: HistoryQuery) -> list[MessageOut]:
        await self.readable_chat(str(user["_id"]), chat_id)
        filters: Document = {"chat_id": chat_id}
        id_range: Document = {}
        if query.before:
            id_range["$lt"] = query.before
        if query.after:
            id_range["$gt"] = query.after
        if id_range:
            filters["_id"] = id_range
        if query.day is not None:
            start = datetime(query.day.year, query.day.month, query.day.day, tzinfo=UTC)
            filters["created_at"] = {"$gte": start, "$lt": start + timedelta(days=1)}
        newest_first = query.after is None
        cursor = self._store["messages"].find(
            filters, sort=[("_id", -1 if newest_first else 1)], limit=query.limit
        )
        found = [MessageOut.from_document(d) async for d in cursor]
        return list(reversed(found)) if newest_first else found

    async def search(self, user: Document, text: str, limit: int) -> list[MessageOut]:
        chats = [
            m["chat_id"]
            async for m in self._store["chat_members"].find(
                {"user_id": str(user["_id"])}, projection={"chat_id": True}
            )
        ]
        cursor = self._store["messages"].find(
            {
                "chat_id": {"$in": chats},
                "deleted": False,
                "text": {"$regex": re.escape(text), "$options": "i"},
            },
            sort=[("_id", -1)],
            limit=limit,
        )
        return [MessageOut.from_document(d) async for d in cursor]

    # read state --------------------------------------------------------------------------------

    async def _unread_in(self, chat_id: str, user_id: str, last_read_id: str | None) -> int:
        filters: Document = {"chat_id": chat_id, "deleted": False, "author_id": {"$ne": user_id}}
        if last_read_id is not None:
            filters["_id"] = {"$gt": last_read_id}
        return await self._store["messages"].count_documents(filters)

    async def _had_unread(self, chat_id: str, user_id: str, member: Document) -> bool:
        query: Document = {"chat_id": chat_id, "deleted": False, "author_id": {"$ne": user_id}}
        if member.get("last_read_id") is not None:
            query["_id"] = {"$gt": member["last_read_id"]}
        return await self._store["messages"].find_one(query, projection={"_id": True}) is not None

    async def counters(self, user_id: str) -> Counters:
        chats: dict[str, int] = {}
        async for member in self._store["chat_members"].find({"user_id": user_id}):
            unread = await self._unread_in(member["chat_id"], user_id, member.get("last_read_id"))
            if unread:
                chats[member["chat_id"]] = unread
        return Counters(unread=sum(chats.values()), chats=chats)

    async def mark_read(self, user: Document, chat_id: str, up_to: str) -> Counters:
        user_id = str(user["_id"])
        await self.readable_chat(user_id, chat_id)
        if (
            await self._store["messages"].find_one(
                {"_id": up_to, "chat_id": chat_id}, projection={"_id": True}
            )
            is None
        ):
            raise Problem(
                422,
                "unknown-reference",
                "Unknown reference",
                f"message {up_to} is not in chat {chat_id}",
            )
        result = await self._store["chat_members"].update_one(
            {
                "_id": f"{chat_id}|{user_id}",
                "$or": [{"last_read_id": None}, {"last_read_id": {"$lt": up_to}}],
            },
            {"$set": {"last_read_id": up_to}},
        )
        if not result.modified_count:
            return await self.counters(user_id)  # already read that far: nothing to tell
        counters = await self.push_counters(user_id)
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "im.read",
                {"chat_id": chat_id, "user_id": user_id, "up_to": up_to},
                (chat_stream(chat_id),),
            )
        )
        return counters

    async def dialogs(self, user: Document) -> list[DialogOut]:
        user_id = str(user["_id"])
        memberships = {
            m["chat_id"]: m async for m in self._store["chat_members"].find({"user_id": user_id})
        }
        chats = [c async for c in self._store["chats"].find({"_id": {"$in": list(memberships)}})]
        others = {m for c in chats if c["kind"] == "private" for m in c["member_ids"]}
        names = {
            str(u["_id"]): display_name(u)
            async for u in self._store.users.find({"_id": {"$in": list(others)}})
        }
        # The other side's read mark, for "seen"; only in private dialogs, where it is
        # one person's and already pushed to this user as im.read.
        private = [c["_id"] for c in chats if c["kind"] == "private"]
        peer_read = {
            m["chat_id"]: m.get("last_read_id")
            async for m in self._store["chat_members"].find(
                {"chat_id": {"$in": private}, "user_id": {"$ne": user_id}}
            )
        }
        dialogs = []
        for chat in chats:
            last_read = memberships[chat["_id"]].get("last_read_id")
            dialogs.append(
                DialogOut(
                    chat=await self.chat_out(chat, user_id, names),
                    last_read_id=last_read,
                    unread=await self._unread_in(chat["_id"], user_id, last_read),
                    peer_last_read_id=peer_read.get(chat["_id"]),
                )
            )
        epoch = datetime.min.replace(tzinfo=UTC)
        dialogs.sort(
            key=lambda d: (
                d.chat.last_message.created_at
                if d.chat.last_message
                else d.chat.created_at or epoch
            ),
            reverse=True,
        )
        return dialogs

    async def typing(self, user_id: str, chat_id: str) -> bool:
        chat = await self._store["chats"].find_one(
            {"_id": chat_id}, projection={"member_ids": True, "kind": True}
        )
        if chat is None or not may_post(user_id, chat["kind"], chat["member_ids"]):
            return False
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "im.typing", {"chat_id": chat_id, "user_id": user_id}, (chat_stream(chat_id),)
            )
        )
        return True

    # system notices ----------------------------------------------------------------------------

    async def post_system_notice(self, user_id: str, text: str) -> MessageOut:
        """Post as the portal itself into the user's notice chat (created on first use)."""
        key = system_pair_key(user_id)
        chat = await self._store["chats"].find_one({"pair_key": key})
        if chat is None:
            chat = await self._create_chat(
                "system", [user_id], title=PORTAL_NAME, owner_id=None, pair_key=key
            )
        message, _ = await self._post(
            chat, None, text[: self._settings.im_max_message_chars], None, system=True
        )
        return message

    # settings ----------------------------------------------------------------------------------

    async def get_settings(self, user_id: str) -> ImSettings:
        doc = await self._store.users.find_one({"_id": user_id}, projection={"im_settings": True})
        return ImSettings.model_validate((doc or {}).get("im_settings") or {})

    async def put_settings(self, user_id: str, settings: ImSettings) -> ImSettings:
        await self._store.users.update_one(
            {"_id": user_id}, {"$set": {"im_settings": settings.model_dump()}}
        )
        await self._streams.append(
            user_stream(user_id), "im.settings", {"settings": settings.model_dump()}
        )
        return settings

    # workgroups --------------------------------------------------------------------------------

    async def workgroup_created(self, owner: Document, group: Any) -> None:
        await self._create_chat(
            "group",
            list(group.member_ids),
            title=group.name,
            owner_id=group.owner_id,
            workgroup_id=group.id,
        )

    async def workgroup_members_added(self, group_id: str, user_ids: list[str]) -> None:
        chat = await self._store["chats"].find_one({"workgroup_id": group_id})
        if chat is not None:
            await self._add_members(chat, user_ids)

    async def workgroup_member_removed(self, group_id: str, user_id: str) -> None:
        chat = await self._store["chats"].find_one({"workgroup_id": group_id})
        if chat is not None:
            await self._remove_members(chat, [user_id])
