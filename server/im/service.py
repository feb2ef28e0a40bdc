"""Messenger service: handler -> here -> store write -> event on the chat's stream -> transports.

A message is stored once and published once, on its chat's stream; members' connections are in
that stream's room. A new membership is announced on the member's personal stream with the
chat stream's position at that moment (``join_stream``/``from_seq``), so that transports can
subscribe live connections, and reconnecting ones replay the chat from where they joined.

Sends are group-committed (``server/im/writer.py``); the checks before them, the unread
counters and the connect path read this node's copies of chats and memberships
(``server/im/state.py``), kept right by the bus. Unread counters are maintained, not counted:
messages carry their ordinal in the chat (``n``), chats their highest (``msg_count``) and the
numbers of their deleted messages (``deleted_ns``), memberships their read position
(``read_n``); a member's unread count in a chat is ``unread_after(...)`` of those, whatever the
history. ``ImCheck`` (server/im/check.py) recounts them from the messages.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pymongo.errors import BulkWriteError, DuplicateKeyError

from server.background import SideTasks, stop
from server.caching import Cache
from server.channels.ratelimit import TokenBucket
from server.directory.models import display_name
from server.directory.rules import descendants
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, Event, VersionedState
from server.events.streams import Append, StreamLog, user_stream
from server.files.models import FileOut, FileRef
from server.files.service import FileService
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
    origin_keys,
    private_pair_key,
    recipients,
    system_pair_key,
    unread_after,
)
from server.im.state import PREVIEW_CHARS, ImState, preview_of
from server.im.writer import MessageWriter, Outgoing, Posted, unavailable
from server.observability.context import current_request_id
from server.settings import Settings
from server.store.database import Document, Store, id_at, new_id, utcnow
from server.web.problems import Problem, forbidden, not_found

log = logging.getLogger(__name__)

PORTAL_NAME = "Portal"
DUPLICATE_KEY = 11000
# How long a retried send waits for its first attempt's event before announcing the message
# itself (that attempt's node may have died between storing the message and its event).
ANNOUNCE_GRACE_SECONDS = 5.0
# A message's event is stored after it, by the clock of a node: looking for it, the events up
# to this long before the message are read too (another node's clock may be behind).
EVENT_CLOCK_MARGIN = timedelta(seconds=60)
EVENT_SCAN_PAGE = 200
# A history page is read from a range of the chat's messages closed on both sides. The
# embedded database fetches every document of an index range before it sorts and limits: a
# page of 50 newest-first took it 2.6 ms in a chat of 100 messages, 25 ms of 1,000 and 88 ms
# of 5,000, holding every other command back meanwhile. The far side is the id of the message
# this many pages of ordinals away (``chat_ordinal``), the second reach where the first range
# held less than a page; then the range is read without it.
# A day's messages are read by their ids this far either side of it (ids are minted as a
# message is queued, ``created_at`` a moment later; several nodes' clocks may differ).
DAY_MARGIN = timedelta(minutes=1)
PAGE_REACHES = (2, 16)
# Ordinals looked through for a message to bound a range with: a send taken back leaves a gap.
ORDINAL_GAP = 16

__all__ = ["PREVIEW_CHARS", "ImService"]


def _msg_count(chat: Document) -> int:
    return int(chat.get("msg_count", 0))


def _deleted(chat: Document) -> list[int]:
    return list(chat.get("deleted_ns") or [])


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
        self.files = FileService(store, settings)
        self._buckets: dict[str, TokenBucket] = {}
        self._state = ImState(
            store,
            ttl_seconds=settings.cache_ttl_seconds,
            stale_seconds=settings.cache_stale_seconds,
            max_entries=settings.cache_max_entries,
        )
        self._writer = MessageWriter(
            store, streams, self._resolve_duplicate, self._state.chat_changed
        )
        # Each user's unread counters as last counted here, with the ``ImState.generation``
        # they hold at: a user's other connections (the benchmark's users have ten each, a
        # person has a few tabs and devices) get them without going over every chat again
        # while nothing they are made of moved. Kept right by the generation, which every
        # change of the chats and memberships served moves (the bus's events, the caches'
        # reads); the time to live bounds one counted from a copy a lost event left behind
        # as it bounds that copy.
        self._counted: Cache[str, CountedState] = Cache(
            settings.cache_max_entries, settings.cache_ttl_seconds
        )
        # Each user's chat stream names, with the membership map they were made from: every
        # connection of the user joins them (27-47 chats for each user of the benchmark's
        # history, ten connections each). Right while the map is the one the memberships'
        # cache holds: a change of the user's chats replaces it (invalidation or a refresh
        # that read something else), a read mark changes a value, never a key.
        self._stream_names: dict[str, tuple[dict[str, Any], list[str]]] = {}
        self._sides = SideTasks("messenger background task", log)
        bus.subscribe(self._on_event)
        bus.subscribe_ephemeral(self._on_ephemeral)

    async def _on_event(self, event: Event) -> None:
        self._state.on_event(event)
        if event.type == "im.message" and event.stream.startswith("chat:"):
            n = (event.data.get("message") or {}).get("n")
            if isinstance(n, int):
                self._writer.saw(event.stream[len("chat:") :], n)

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        self._state.on_ephemeral(event)

    def forget_all(self) -> None:
        """Every cached chat and membership may be out of date (events were lost)."""
        self._state.forget_all()
        self._counted.clear()
        self._stream_names.clear()

    async def settled(self) -> None:
        """Wait until what was sent is stored and its bookkeeping written."""
        await self._writer.settled()

    async def close(self) -> None:
        await self._writer.close()
        await stop(*self._sides)
        await self._state.close()

    # chats -------------------------------------------------------------------------------------

    async def chat_document(self, chat_id: str) -> Document:
        """The chat as stored now (not the cached copy)."""
        chat = await self._state.load_chat(chat_id)
        if chat is None:
            raise not_found(f"chat {chat_id}")
        return chat

    async def readable_chat(self, user_id: str, chat_id: str) -> Document:
        """The chat, if ``user_id`` is a member; a non-member cannot tell it exists."""
        chat = await self._state.chat(chat_id)
        if chat is None or not may_read(user_id, chat.get("member_ids", [])):
            # Read again before refusing: a membership made where this node does not hear of
            # it at once (the CLI) must not wait for the cache to expire.
            self._state.chat_changed(chat_id)
            chat = await self._state.chat(chat_id)
        if chat is None or not may_read(user_id, chat.get("member_ids", [])):
            raise not_found(f"chat {chat_id}")
        return chat

    async def open_private(self, user: Document, other_id: str) -> Document:
        user_id = str(user["_id"])
        if other_id == user_id:
            raise Problem(
                422, "invalid-recipient", "Invalid recipient", "a private dialog needs another user"
            )
        other = await self._directory.cached_user(other_id)
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
        existing = await self._pair_chat(key)
        if existing is not None:
            return await self._with_members(existing, [user_id, other_id])
        return await self._create_chat(
            "private", [user_id, other_id], title="", owner_id=None, pair_key=key
        )

    async def _pair_chat(self, key: str) -> Document | None:
        """The dialog (or notice chat) of a pair key, if made already (its id is cached)."""
        chat_id = self._state.pairs.get(key)
        if chat_id is not None:
            chat = await self._state.chat(chat_id)
            if chat is not None:
                return chat
        found = await self._store["chats"].find_one({"pair_key": key}, projection={"_id": True})
        if found is None:
            return None
        self._state.pairs.put(key, found["_id"])
        return await self._state.chat(found["_id"])

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
            "msg_count": 0,
            "deleted_ns": [],
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
        stream = chat_stream(chat["_id"])
        wanted = list(dict.fromkeys(user_ids))
        if not wanted:
            return []
        now = utcnow()
        rows = [
            {
                "_id": f"{chat['_id']}|{user_id}",
                "chat_id": chat["_id"],
                "user_id": user_id,
                "joined_at": now,
                "read_n": 0,
                "last_read_id": None,
            }
            for user_id in wanted
        ]
        existing: set[int] = set()
        try:
            await self._store["chat_members"].insert_many(rows, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            existing = {int(e["index"]) for e in errors}  # members already
        added = [user_id for i, user_id in enumerate(wanted) if i not in existing]
        if not added:
            return added
        await self._store["chats"].update_one(
            {"_id": chat["_id"]}, {"$addToSet": {"member_ids": {"$each": added}}}
        )
        self._state.chat_changed(chat["_id"])
        self._state.memberships_changed(added)
        chat = await self.chat_document(chat["_id"])
        head = 0 if from_start else await self._streams.last_seq(stream)
        names = await self._names(chat)
        appends = [
            Append(
                user_stream(user_id),
                "im.chat.joined",
                {
                    "chat": (await self.chat_out(chat, user_id, names)).model_dump(mode="json"),
                    "join_stream": stream,
                    "from_seq": head,
                },
            )
            for user_id in added
        ]
        if chat["kind"] == "group" and len(chat["member_ids"]) > len(added):
            appends.append(
                Append(
                    stream,
                    "im.chat.members",
                    {
                        "chat_id": chat["_id"],
                        "added": added,
                        "removed": [],
                        "member_ids": chat["member_ids"],
                    },
                )
            )
        await self._streams.append_many(appends)
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
            self._state.chat_changed(chat_id)  # here at once; elsewhere with the event
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
        chat = await self.chat_document(chat["_id"])  # the members as stored, not as cached
        present = [u for u in user_ids if u in chat.get("member_ids", [])]
        if not present:
            return
        await self._store["chats"].update_one(
            {"_id": chat["_id"]}, {"$pull": {"member_ids": {"$in": present}}}
        )
        await self._store["chat_members"].delete_many(
            {"chat_id": chat["_id"], "user_id": {"$in": present}}
        )
        # Refused here at once; on the other nodes when the events below reach them.
        self._state.chat_changed(chat["_id"])
        self._state.memberships_changed(present)
        remaining = [m for m in chat["member_ids"] if m not in present]
        if chat.get("owner_id") in present and chat["kind"] == "group":
            # An owner who leaves hands the chat to the longest-standing member left.
            await self._store["chats"].update_one(
                {"_id": chat["_id"]}, {"$set": {"owner_id": remaining[0] if remaining else None}}
            )
            self._state.chat_changed(chat["_id"])
        await self._streams.append_many(
            [
                Append(
                    stream,
                    "im.chat.members",
                    {
                        "chat_id": chat["_id"],
                        "added": [],
                        "removed": present,
                        "member_ids": remaining,
                    },
                ),
                *(
                    Append(
                        user_stream(user_id),
                        "im.chat.left",
                        {"chat_id": chat["_id"], "leave_stream": stream},
                    )
                    for user_id in present
                ),
            ]
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

    async def _names(self, chat: Document) -> dict[str, str]:
        """The display names a private chat's title is made of (cached users)."""
        if chat["kind"] != "private":
            return {}
        users = await self._directory.cached_users(list(chat.get("member_ids", [])))
        return {user_id: display_name(doc) for user_id, doc in users.items()}

    async def chat_out(
        self, chat: Document, viewer_id: str, names: dict[str, str] | None = None
    ) -> ChatOut:
        title = chat.get("title", "")
        if chat["kind"] == "private":
            other = next((m for m in chat["member_ids"] if m != viewer_id), viewer_id)
            if names is not None and other in names:
                title = names[other]
            else:
                doc = await self._directory.cached_user(other)
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
        """The chat streams of the user's chats (cached memberships: no query once read).
        Do not change the list: the user's next connects are given it too."""
        user_id = str(user["_id"])
        members = await self._state.member_map(user_id)
        kept = self._stream_names.get(user_id)
        if kept is not None and kept[0] is members and len(kept[1]) == len(members):
            return kept[1]
        names = [chat_stream(chat_id) for chat_id in members]
        if len(self._stream_names) >= self._settings.cache_max_entries:
            self._stream_names.clear()  # a bound, like the caches': made again when needed
        self._stream_names[user_id] = (members, names)
        return names

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
        """Store the message(s); returns once stored (journaled) and published."""
        return await asyncio.shield(await self.submit(user, request, origin=origin))

    async def submit(
        self, user: Document, request: SendMessage, *, origin: MessageOrigin | None = None
    ) -> asyncio.Future[SendResult]:
        """Check a send and queue it; the returned future resolves when it is stored.

        The contract, for transports that pipeline (XMPP sessions):

        - Everything that can refuse the send on its own (length, rate, the chat or the
          recipients, permission) is checked before this returns, and raises here. With the
          chat and the user's memberships cached, nothing here waits for the database; to
          several users (``to``, ``to_department``), opening a dialog not made yet does.
        - Once this returns, the message is queued: messages are stored in the order their
          ``submit`` calls returned, so a caller that awaits ``submit`` before submitting the
          next gets them stored (numbered ``n`` and sequenced on the chat's stream) in that
          order, without waiting for each to be stored.
        - The future resolves once the message and its event are stored (journaled) and the
          event published - what a 201 means - with the ``SendResult`` (``duplicate`` for a
          retried ``client_id``); or fails with a ``Problem`` (503 when it could not be
          stored: nothing of it is kept, and a retry with the same ``client_id`` is safe).
        """
        user_id = str(user["_id"])
        self._check_length(request.text)
        self._take_token(user_id)
        if request.chat_id is not None:
            chat = await self.readable_chat(user_id, request.chat_id)
            if not may_post(user_id, chat["kind"], chat["member_ids"]):
                raise forbidden("nobody can post in this chat")
            files = await self._claim(user_id, chat, request.file_ids)
            futures = [
                await self._post(
                    chat, user_id, request.text, request.client_id, origin=origin, files=files
                )
            ]
        else:
            targets = await self._expand_targets(user, request)
            # Every recipient is checked before the first message goes: all or nothing.
            await self._require_users(user, targets)
            chats = [await self.open_private(user, target) for target in targets]
            # (files go to one chat: the model allows them with one recipient only)
            files = await self._claim(user_id, chats[0], request.file_ids)
            futures = [
                await self._post(
                    chat, user_id, request.text, request.client_id, origin=origin, files=files
                )
                for chat in chats
            ]
        return _send_result(futures)

    async def _claim(self, user_id: str, chat: Document, file_ids: list[str]) -> list[FileRef]:
        """The sender's uploads, made the chat's files (checked before anything is queued)."""
        if not file_ids:
            return []
        if len(file_ids) > self._settings.file_max_per_message:
            raise Problem(
                422,
                "too-many-files",
                "Too many files",
                f"at most {self._settings.file_max_per_message} files in a message",
            )
        return await self.files.claim(user_id, chat["_id"], file_ids)

    async def _expand_targets(self, user: Document, request: SendMessage) -> list[str]:
        user_id = str(user["_id"])
        if request.to_department is not None:
            tree = await self._directory.department_tree()
            if request.to_department not in tree:
                tree = await self._directory.department_tree(fresh=True)
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
        files: list[FileRef] | None = None,
    ) -> asyncio.Future[Posted]:
        """Queue one message into ``chat`` (checked already; its files claimed for it)."""
        doc: Document = {
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
            if keys := origin_keys(author_id, chat["_id"], origin.id, origin.origin_id):
                doc["origin_keys"] = keys
        if files:
            doc["files"] = [f.model_dump() for f in files]
        if client_id is not None:
            # The unique index decides: a retry fails to insert and finds the first one.
            doc["dedup_key"] = f"{author_id}|{chat['_id']}|{client_id}"
        had_unread = False
        if author_id is not None:
            # Writing in a chat reads it: if the author had unread messages there, their
            # devices are told the new numbers once it is stored.
            mine = (await self._state.member_map(author_id)).get(chat["_id"])
            if mine is not None:
                had_unread = unread_after(_msg_count(chat), mine.read_n, _deleted(chat)) > 0
        # The id is made as the message is queued, not before the await above: the writer
        # numbers a node's messages in the order queued, so on one node ids and ordinals
        # then agree, and a history page read by id finds its range by ordinal.
        doc["_id"] = new_id()
        future = self._writer.submit(doc, request_id=current_request_id(), hint=_msg_count(chat))
        if had_unread and author_id is not None:
            author = author_id

            def stored(done: asyncio.Future[Posted]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._spawn(self.push_counters(author))

            future.add_done_callback(stored)
        return future

    async def _resolve_duplicate(self, item: Outgoing) -> Posted:
        """A send whose ``client_id`` was stored before: the earlier message, announced if
        its first attempt's node died before storing its event."""
        earlier = await self._store["messages"].find_one({"dedup_key": item.doc["dedup_key"]})
        if earlier is None:
            raise unavailable()  # taken back meanwhile: a retry stores it anew
        if not await self._announced(earlier):
            # The first attempt stored the message, and its node died before the event went
            # into the stream: without it now, nobody would ever be told.
            return Posted(await self._announce(earlier), True)
        return Posted(MessageOut.from_document(earlier), True)

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
        stream = chat_stream(doc["chat_id"])
        while True:
            if await self._event_stored(stream, str(doc["_id"]), created - EVENT_CLOCK_MARGIN):
                return True
            if utcnow() >= give_up:
                log.warning("message %s was stored without its event; announcing it", doc["_id"])
                return False
            await asyncio.sleep(0.1)

    async def _event_stored(self, stream: str, message_id: str, since: datetime) -> bool:
        """Whether the chat's stream holds the message's ``im.message`` event: its events
        newest first (the ``stream_seq`` index), back to those stored before the message was.
        No index on the message id: the events of every message would pay for it, and only a
        retried send looks (reading what its chat said since the first attempt)."""
        cursor_filter: Document = {"stream": stream, "seq": {"$gt": 0}}
        while True:
            page = [
                event
                async for event in self._store.events.find(
                    cursor_filter,
                    sort=[("seq", -1)],
                    limit=EVENT_SCAN_PAGE,
                    projection={"seq": True, "type": True, "ts": True, "data.message.id": True},
                )
            ]
            for event in page:
                message = (event.get("data") or {}).get("message") or {}
                if event.get("type") == "im.message" and message.get("id") == message_id:
                    return True
                at = event.get("ts")
                if isinstance(at, datetime):
                    if at.tzinfo is None:
                        at = at.replace(tzinfo=UTC)
                    if at < since:
                        return False
            if len(page) < EVENT_SCAN_PAGE:
                return False
            cursor_filter = {"stream": stream, "seq": {"$lt": int(page[-1]["seq"])}}

    async def _announce(self, doc: Document) -> MessageOut:
        """Store the event of a message stored without it, then its bookkeeping."""
        payload = MessageOut.from_document(doc).model_dump(mode="json")
        try:
            await self._streams.append(
                chat_stream(doc["chat_id"]), "im.message", {"message": payload}
            )
        except Exception as exc:
            # Not half-stored: a message nobody was told about is taken back.
            await self._store["messages"].delete_one({"_id": doc["_id"]})
            raise unavailable() from exc
        self._writer.bookkeeper.message_stored(doc, preview_of(payload))
        return MessageOut.model_validate(payload)

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
        # Its files go with it (after the message is marked: a file is never missing from a
        # message that still shows it, only the other way round if this fails half-way).
        await self.files.delete([str(f["id"]) for f in doc.get("files") or []])
        n = int(doc.get("n", 0))
        if n > 0:
            # Counted out of everyone's unread numbers from now on (before the event: the
            # nodes that hear of it read the chat again).
            await self._store["chats"].update_one(
                {"_id": chat["_id"]}, {"$addToSet": {"deleted_ns": n}}
            )
        self._state.chat_changed(chat["_id"])
        doc.update(changes)
        message = MessageOut.from_document(doc)
        await self._streams.append(
            chat_stream(chat["_id"]),
            "im.message.deleted",
            {"message": message.model_dump(mode="json")},
        )
        await self._refresh_preview(chat["_id"], message)
        # Members for whom it was unread get their corrected badge.
        async for member in self._store["chat_members"].find(
            {"chat_id": chat["_id"]}, projection={"user_id": True, "read_n": True}
        ):
            reader = member["user_id"]
            if reader != doc.get("author_id") and int(member.get("read_n", 0)) < n:
                await self.push_counters(reader)

    async def file_for(self, user: Document, file_id: str) -> FileOut:
        """A file the user may read: one sent to a chat they are in, or their own upload
        not sent yet. Anyone else is refused (403)."""
        user_id = str(user["_id"])
        found = await self.files.get(file_id)
        if found.chat_id is None:
            if await self.files.uploader_of(file_id) != user_id:
                raise forbidden("this file is not yours")
            return found
        try:
            await self.readable_chat(user_id, found.chat_id)
        except Problem as problem:
            if problem.status != 404:
                raise
            raise forbidden("only the chat's members may read its files") from None
        return found

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
        generation = self._state.generation
        counted = self._counted.get(user_id)
        if counted is not None and counted.generation == generation:
            # Still what a count gives, and with the version of when it was counted: a push
            # counted since on another node (a newer version) is not overtaken by it.
            return counted
        counted_at = time.time_ns()
        counters = await self.counters(user_id)
        if self._state.generation != generation:
            generation = -1  # changed while counting: not known to hold at any generation
        state = CountedState("im", counted_at, counters.model_dump(), True, generation)
        if generation >= 0:
            self._counted.put(user_id, state)
        return state

    async def counters_state_since(
        self, user_id: str, before: VersionedState | None
    ) -> VersionedState | None:
        """The unread counters, or None when ``before`` (counted here for the same user) is
        still what they are: nothing they are computed from changed since. A connect counts
        them for its snapshot and again once caught up on its streams; the second count went
        over every chat of the user again although, mostly, nothing had moved."""
        if (
            isinstance(before, CountedState)
            and before.generation >= 0
            and before.generation == self._state.generation
        ):
            return None
        return await self.counters_state(user_id)

    async def _refresh_preview(self, chat_id: str, message: MessageOut) -> None:
        # Only while this message is still the chat's last one: a newer message stays shown.
        payload = message.model_dump(mode="json")
        payload["text"] = payload["text"][:PREVIEW_CHARS]
        result = await self._store["chats"].update_one(
            {"_id": chat_id, "last_message.id": message.id}, {"$set": {"last_message": payload}}
        )
        if result.modified_count:
            self._state.chat_changed(chat_id)

    async def history(self, user: Document, chat_id: str, query: HistoryQuery) -> list[MessageOut]:
        chat = await self.readable_chat(str(user["_id"]), chat_id)
        filters: Document = {"chat_id": chat_id}
        id_range: Document = {}
        if query.before:
            id_range["$lt"] = query.before
        if query.after:
            id_range["$gt"] = query.after
        if id_range:
            filters["_id"] = id_range
        day: tuple[datetime, datetime] | None = None
        if query.day is not None:
            # The day's messages by their ids (minted as they are queued, so a minute either
            # side holds them), the time checked on what was read: ``created_at`` in the
            # filter would have the embedded database read every message.
            start = datetime(query.day.year, query.day.month, query.day.day, tzinfo=UTC)
            end = start + timedelta(days=1) if start.date() < date.max else datetime.max
            day = (start, end.replace(tzinfo=UTC))
            low, high = id_at(day[0], -DAY_MARGIN), id_at(day[1], DAY_MARGIN)
            if "$gt" not in id_range or id_range["$gt"] < low:
                id_range.pop("$gt", None)
                id_range["$gte"] = low
            if "$lt" not in id_range or id_range["$lt"] > high:
                id_range["$lt"] = high
            filters["_id"] = id_range
        newest_first = query.after is None
        messages = self._store["messages"]
        sort = [("_id", -1 if newest_first else 1)]
        found: list[Document] = []
        near = None if query.day is not None else await self._near_ordinal(chat, query)
        for pages in PAGE_REACHES:
            if near is None:
                break
            bound = await self._far_bound(chat["_id"], near, pages * query.limit, newest_first)
            if bound is None:
                break
            # The page is the ``limit`` messages nearest the near side; a range closed at the
            # bound that holds that many holds them (any message beyond the bound is further).
            # Fewer: ids and ordinals disagree there (messages of several nodes in the same
            # moment), or the ordinals have gaps; a longer range is read.
            far = {"$gte" if newest_first else "$lte": bound}
            bounded = {**filters, "_id": {**id_range, **far}}
            found = await messages.find(bounded, sort=sort, limit=query.limit).to_list()
            if len(found) == query.limit:
                break
        if day is not None:
            found = []
            async for doc in messages.find(filters, sort=sort):
                if day[0] <= doc["created_at"] < day[1]:
                    found.append(doc)
                    if len(found) == query.limit:
                        break
        elif len(found) < query.limit:
            found = await messages.find(filters, sort=sort, limit=query.limit).to_list()
        out = [MessageOut.from_document(d) for d in found]
        return list(reversed(out)) if newest_first else out

    async def _near_ordinal(self, chat: Document, query: HistoryQuery) -> int | None:
        """The ordinal of the page's near side: ``after`` when reading oldest first, else
        ``before``, else the chat's newest; None when the near side is not one of the chat's
        messages (a time bound from the archive's query)."""
        near_id = query.after if query.after is not None else query.before
        if near_id is None:
            # The stored count lags the newest messages by up to a bookkeeping round; this
            # node's writer knows those it stored or saw. Too low, the range is longer.
            return max(_msg_count(chat), self._writer.known_head(chat["_id"]))
        doc = await self._store["messages"].find_one({"_id": near_id}, {"chat_id": 1, "n": 1})
        if doc is None or doc.get("chat_id") != chat["_id"] or not isinstance(doc.get("n"), int):
            return None
        return int(doc["n"])

    async def _far_bound(
        self, chat_id: str, near: int, reach: int, newest_first: bool
    ) -> str | None:
        """The id of a message about ``reach`` ordinals beyond ``near`` (below it when reading
        newest first), or None when the chat holds fewer than that that way."""
        if newest_first:
            if near - reach <= 1:
                return None
            ordinals: Document = {"$gte": max(1, near - reach - ORDINAL_GAP), "$lte": near - reach}
        else:
            ordinals = {"$gte": near + reach, "$lte": near + reach + ORDINAL_GAP}
        ids = [
            d["_id"]
            async for d in self._store["messages"].find(
                {"chat_id": chat_id, "n": ordinals}, {"_id": 1}
            )
        ]
        if not ids:
            return None
        return str(max(ids) if newest_first else min(ids))

    async def search(self, user: Document, text: str, limit: int) -> list[MessageOut]:
        chats = list(await self._state.member_map(str(user["_id"])))
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

    async def counters(self, user_id: str) -> Counters:
        """Unread messages per chat, from the maintained numbers: the user's memberships and
        their chats, cached (at most two queries when not), whatever the history."""
        members = dict(await self._state.member_map(user_id))
        chats = await self._state.chats_by_id(list(members))
        unread: dict[str, int] = {}
        for chat_id, member in members.items():
            chat = chats.get(chat_id)
            if chat is None:
                continue
            count = unread_after(_msg_count(chat), member.read_n, _deleted(chat))
            if count:
                unread[chat_id] = count
        return Counters(unread=sum(unread.values()), chats=unread)

    async def mark_read(self, user: Document, chat_id: str, up_to: str) -> Counters:
        user_id = str(user["_id"])
        await self.readable_chat(user_id, chat_id)
        message = await self._store["messages"].find_one(
            {"_id": up_to}, projection={"chat_id": True, "n": True}
        )
        if message is None or message.get("chat_id") != chat_id:
            raise Problem(
                422,
                "unknown-reference",
                "Unknown reference",
                f"message {up_to} is not in chat {chat_id}",
            )
        n = int(message.get("n", 0))
        result = await self._store["chat_members"].update_one(
            {"_id": f"{chat_id}|{user_id}", "read_n": {"$lt": n}},
            {"$set": {"read_n": n, "last_read_id": up_to}},
        )
        if not result.modified_count:
            return await self.counters(user_id)  # already read that far: nothing to tell
        self._state.read_moved(chat_id, user_id, n, up_to)
        counters = await self.push_counters(user_id)
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                "im.read",
                {"chat_id": chat_id, "user_id": user_id, "up_to": up_to},
                (chat_stream(chat_id),),
                private={"read_n": n},  # for the other nodes' copies of the read position
            )
        )
        return counters

    async def dialogs(self, user: Document) -> list[DialogOut]:
        user_id = str(user["_id"])
        members = dict(await self._state.member_map(user_id))
        chats = list((await self._state.chats_by_id(list(members))).values())
        others = sorted({m for c in chats if c["kind"] == "private" for m in c["member_ids"]})
        names = {
            uid: display_name(doc)
            for uid, doc in (await self._directory.cached_users(others)).items()
        }
        # The other side's read mark, for "seen"; only in private dialogs, where it is
        # one person's and already pushed to this user as im.read.
        private = [c["_id"] for c in chats if c["kind"] == "private"]
        peer_read = {
            m["chat_id"]: self._state.read_mark(m["chat_id"], m["user_id"], m)
            async for m in self._store["chat_members"].find(
                {"chat_id": {"$in": private}, "user_id": {"$ne": user_id}}
            )
        }
        dialogs = []
        for chat in chats:
            member = members[chat["_id"]]
            dialogs.append(
                DialogOut(
                    chat=await self.chat_out(chat, user_id, names),
                    last_read_id=member.last_read_id,
                    read_n=member.read_n,
                    unread=unread_after(_msg_count(chat), member.read_n, _deleted(chat)),
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
        chat = await self._state.chat(chat_id)
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
        chat = await self._pair_chat(key)
        if chat is None:
            chat = await self._create_chat(
                "system", [user_id], title=PORTAL_NAME, owner_id=None, pair_key=key
            )
        future = await self._post(
            chat, None, text[: self._settings.im_max_message_chars], None, system=True
        )
        return (await asyncio.shield(future)).message

    # settings ----------------------------------------------------------------------------------

    async def get_settings(self, user_id: str) -> ImSettings:
        doc = await self._directory.cached_user(user_id)
        return ImSettings.model_validate((doc or {}).get("im_settings") or {})

    async def put_settings(self, user_id: str, settings: ImSettings) -> ImSettings:
        await self._store.users.update_one(
            {"_id": user_id}, {"$set": {"im_settings": settings.model_dump()}}
        )
        self._directory.forget_user(user_id)
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

    # ---------------------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        self._sides.spawn(coro, name="im-side")


def _send_result(futures: list[asyncio.Future[Posted]]) -> asyncio.Future[SendResult]:
    """One future for a send's messages: its result once all are stored, or the first
    failure."""
    result: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
    left = [len(futures)]
    if not futures:
        result.set_result(SendResult(messages=[], duplicate=False))

    def one_done(_: asyncio.Future[Posted]) -> None:
        left[0] -= 1
        if left[0] or result.done():
            return
        for future in futures:
            if future.cancelled():
                result.set_exception(unavailable())
                return
            error = future.exception()
            if error is not None:
                result.set_exception(error)
                return
        posted = [future.result() for future in futures]
        result.set_result(
            SendResult(
                messages=[p.message for p in posted],
                duplicate=bool(posted) and all(p.duplicate for p in posted),
            )
        )

    for future in futures:
        future.add_done_callback(one_done)
    return result


@dataclass(frozen=True, slots=True)
class CountedState(VersionedState):
    """Unread counters with the ``ImState.generation`` they were computed at (-1: unknown)."""

    generation: int = -1
