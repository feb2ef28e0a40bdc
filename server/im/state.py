"""The messenger's copies of its own data on this node, kept right through the bus.

- **Chats** (``chats`` documents, with ``msg_count`` and ``deleted_ns``): what ``may_post`` and
  ``readable_chat`` need, and the numbers the unread counters are made of.
- **Memberships** per user: chat id -> read position (``read_n``, ``last_read_id``). The
  ``chat_members`` rows are the truth; these are the user's rows.
- **Dialogs** by ``pair_key`` (a pair's dialog is never deleted).

Every node applies every messenger event it sees (its own and other nodes', through the bus):

- ``im.message`` (chat stream): the chat's ``msg_count`` and preview, the author's read
  position;
- ``im.message.updated``: the preview, if it is that message;
- ``im.message.deleted``, ``im.chat.updated`` (a new title), ``im.chat.members``: the chat is
  read again, and so are the memberships of the people added or removed;
- ``im.chat.joined``, ``im.chat.left`` (user stream): the user's memberships and the chat
  are read again;
- ``im.read`` (ephemeral, chat stream): the reader's read position.

The writes behind them come first (membership rows, ``deleted_ns``), except the bookkeeping
of a new message (``msg_count``, preview, the author's ``read_n``), which is written just
after its event is published. A copy read from the database in between would miss it, so the
last numbers seen in events are kept a while (*floors*) and applied to what is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server.caching import BatchLoad, Cache
from server.events.models import EphemeralEvent, Event
from server.store.database import Document, Store

# A message's bookkeeping is normally written within milliseconds of its event; a floor is
# kept for much longer than that, in case the database was slow or away meanwhile.
FLOOR_SECONDS = 60.0
MAX_FLOORS = 20_000
CHAT_PREFIX = "chat:"
USER_PREFIX = "user:"
MEMBER_ROWS_PER_REPLY = 1_000


@dataclass(slots=True)
class Membership:
    read_n: int
    last_read_id: str | None


@dataclass(frozen=True, slots=True)
class _ChatFloor:
    n: int
    preview: dict[str, Any]
    at: datetime


def membership_of(doc: Document) -> Membership:
    return Membership(int(doc.get("read_n", 0)), doc.get("last_read_id"))


class ImState:
    def __init__(
        self, store: Store, *, ttl_seconds: float, max_entries: int, stale_seconds: float = 0.0
    ) -> None:
        self._store = store
        self.chats: Cache[str, Document] = Cache(
            max_entries, ttl_seconds, stale_seconds=stale_seconds
        )
        self.memberships: Cache[str, dict[str, Membership]] = Cache(
            max_entries, ttl_seconds, stale_seconds=stale_seconds
        )
        self.pairs: Cache[str, str] = Cache(max_entries, ttl_seconds, stale_seconds=stale_seconds)
        # What the users' first connects of one moment read, read together (a connect burst:
        # one query per round for their memberships, one for their chats). A user is in
        # dozens of chats: eight users' rows a query (BatchLoad's max_keys). Three reads of
        # each kind side by side: with history a burst's first connects read 27-47 rows and
        # chats per user, and one read at a time made them a queue (the first step of a
        # connect series with history, paired probe: 0 -> 100 at 1.4-1.5x).
        self._member_reads: BatchLoad[str, list[Document]] = BatchLoad(
            self._read_members, max_keys=8, at_once=3
        )
        self._chat_reads: BatchLoad[str, Document] = BatchLoad(self._read_chats, at_once=3)
        self._chat_floors: Cache[str, _ChatFloor] = Cache(MAX_FLOORS, FLOOR_SECONDS)
        self._read_floors: Cache[tuple[str, str], tuple[int, str]] = Cache(
            MAX_FLOORS, FLOOR_SECONDS
        )

    @property
    def generation(self) -> int:
        """Moves whenever what the unread counters are computed from may have changed (the
        chats and memberships served): counters computed at one generation stay right while
        it does not move."""
        return self.chats.version + self.memberships.version

    def forget_all(self) -> None:
        for cache in (self.chats, self.memberships, self.pairs):
            cache.clear()

    async def close(self) -> None:
        """Stop the caches' background refreshes."""
        for cache in (self.chats, self.memberships, self.pairs):
            await cache.close()

    # reading -----------------------------------------------------------------------------------

    def _with_floor(self, chat: Document) -> Document:
        floor = self._chat_floors.get(chat["_id"])
        if floor is not None and floor.n > int(chat.get("msg_count", 0)):
            chat = {
                **chat,
                "msg_count": floor.n,
                "last_message": floor.preview,
                "last_message_at": floor.at,
            }
        return chat

    async def load_chat(self, chat_id: str) -> Document | None:
        """The chat as stored (with what recent events add), not from the cache."""
        doc = await self._store["chats"].find_one({"_id": chat_id})
        return self._with_floor(doc) if doc is not None else None

    async def chat(self, chat_id: str) -> Document | None:
        """The chat (cached). Do not change the document."""
        return await self.chats.get_or_load(chat_id, lambda: self.load_chat(chat_id))

    async def chats_by_id(self, chat_ids: list[str]) -> dict[str, Document]:
        """The chats that exist of ``chat_ids``: cached, and the others in one query."""

        async def load(missing: list[str]) -> dict[str, Document]:
            found = await self._chat_reads.load_many(missing)
            return {chat_id: self._with_floor(doc) for chat_id, doc in found.items()}

        return await self.chats.get_or_load_many(chat_ids, load)

    async def _read_chats(self, chat_ids: list[str]) -> dict[str, Document]:
        return {
            doc["_id"]: doc async for doc in self._store["chats"].find({"_id": {"$in": chat_ids}})
        }

    async def _read_members(self, user_ids: list[str]) -> dict[str, list[Document]]:
        rows: dict[str, list[Document]] = {user_id: [] for user_id in user_ids}
        async for doc in self._store["chat_members"].find(
            {"user_id": {"$in": user_ids}},
            projection={"user_id": True, "chat_id": True, "read_n": True, "last_read_id": True},
            # in one reply: eight users in 27-47 chats each are about 300 rows, and the
            # database's first reply holds 101, so each read took a second round trip
            batch_size=MEMBER_ROWS_PER_REPLY,
        ):
            rows.setdefault(doc["user_id"], []).append(doc)
        return rows

    async def member_map(self, user_id: str) -> dict[str, Membership]:
        """The user's memberships, chat id -> read position (cached; one indexed query).
        Do not change it; read it before the next await."""

        async def load() -> dict[str, Membership]:
            found: dict[str, Membership] = {}
            for doc in await self._member_reads.load(user_id) or []:
                member = membership_of(doc)
                floor = self._read_floors.get((doc["chat_id"], user_id))
                if floor is not None and floor[0] > member.read_n:
                    member = Membership(*floor)
                found[doc["chat_id"]] = member
            return found

        return await self.memberships.get_or_load(user_id, load) or {}

    def read_mark(self, chat_id: str, user_id: str, doc: Document) -> str | None:
        """A member's ``last_read_id`` as read from its ``chat_members`` row, completed by the
        floor of the messages seen: their bookkeeping may not be written yet."""
        floor = self._read_floors.get((chat_id, user_id))
        if floor is not None and floor[0] > int(doc.get("read_n", 0)):
            return floor[1]
        mark = doc.get("last_read_id")
        return str(mark) if mark is not None else None

    # keeping right -----------------------------------------------------------------------------

    def read_moved(self, chat_id: str, user_id: str, n: int, message_id: str) -> None:
        """``user_id`` has read ``chat_id`` up to ``n``."""
        members = self.memberships.get(user_id)
        if members is not None:
            current = members.get(chat_id)
            if current is not None and n > current.read_n:
                members[chat_id] = Membership(n, message_id)
        self.memberships.changed(user_id)

    def chat_changed(self, chat_id: str) -> None:
        self.chats.invalidate(chat_id)

    def memberships_changed(self, user_ids: list[str]) -> None:
        self.memberships.invalidate_many(user_ids)

    def on_event(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if event.stream.startswith(CHAT_PREFIX):
            chat_id = event.stream[len(CHAT_PREFIX) :]
            if event.type == "im.message":
                self._message_stored(chat_id, data.get("message") or {})
            elif event.type == "im.message.updated":
                self._message_edited(chat_id, data.get("message") or {})
            elif event.type in ("im.message.deleted", "im.chat.updated"):  # deleted_ns, title
                self.chats.invalidate(chat_id)
            elif event.type == "im.chat.members":
                self.chats.invalidate(chat_id)
                changed = [*data.get("added", []), *data.get("removed", [])]
                self.memberships.invalidate_many(u for u in changed if isinstance(u, str))
        elif event.stream.startswith(USER_PREFIX) and event.type in (
            "im.chat.joined",
            "im.chat.left",
        ):
            self.memberships.invalidate(event.stream[len(USER_PREFIX) :])
            chat = data.get("chat")
            joined_or_left = chat.get("id") if isinstance(chat, dict) else data.get("chat_id")
            if isinstance(joined_or_left, str):
                self.chats.invalidate(joined_or_left)

    def on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type == "im.read":
            n = event.private.get("read_n")
            user_id, chat_id, up_to = (
                event.data.get("user_id"),
                event.data.get("chat_id"),
                event.data.get("up_to"),
            )
            if isinstance(n, int) and isinstance(user_id, str) and isinstance(chat_id, str):
                self.read_moved(chat_id, user_id, n, str(up_to))

    def _message_stored(self, chat_id: str, message: dict[str, Any]) -> None:
        n = message.get("n")
        if not isinstance(n, int) or n <= 0:
            return
        preview = preview_of(message)
        at = _parse_time(message.get("created_at"))
        floor = self._chat_floors.get(chat_id)
        if floor is None or n > floor.n:
            self._chat_floors.put(chat_id, _ChatFloor(n, preview, at))
        chat = self.chats.get(chat_id)
        if chat is not None and n > int(chat.get("msg_count", 0)):
            self.chats.replace(
                chat_id, {**chat, "msg_count": n, "last_message": preview, "last_message_at": at}
            )
        else:
            self.chats.changed(chat_id)  # a load under way may have read it without
        author = message.get("author_id")
        if isinstance(author, str):
            message_id = str(message.get("id"))
            floor_read = self._read_floors.get((chat_id, author))
            if floor_read is None or n > floor_read[0]:
                self._read_floors.put((chat_id, author), (n, message_id))
            self.read_moved(chat_id, author, n, message_id)

    def _message_edited(self, chat_id: str, message: dict[str, Any]) -> None:
        chat = self.chats.get(chat_id)
        last = (chat or {}).get("last_message") or {}
        if chat is not None and last.get("id") == message.get("id"):
            self.chats.replace(chat_id, {**chat, "last_message": preview_of(message)})


PREVIEW_CHARS = 200


def preview_of(message: dict[str, Any]) -> dict[str, Any]:
    """A message as a chat's ``last_message`` keeps it: the text cut short."""
    return {**message, "text": str(message.get("text", ""))[:PREVIEW_CHARS]}


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
