"""Recounting the messenger's maintained numbers from the messages: the check and repair tool.

The specification of an unread count stays what it was before the numbers were maintained:
a member's unread messages in a chat are those after their read mark (``last_read_id``) that
are not deleted and not their own - "after" in the chat's order, which is the messages'
ordinal ``n``. ``ImCheck`` recounts that from the messages and compares it with what the
maintained numbers give (``unread_after(msg_count, read_n, deleted_ns)``); it also checks the
numbers themselves:

- per chat, the ordinals are 1..``msg_count`` without a gap (a message taken back after
  another was numbered above it leaves one: repaired by counting the gap as deleted, since
  the ordinals given cannot change), and ``deleted_ns`` are the deleted ones;
- per membership, ``read_n`` is the number of ``last_read_id``, and not below the member's own
  newest message (posting moves both; a node that died before writing that leaves them
  behind).

``repair`` writes the recounted numbers. ``portalhub counters check`` runs it; a running
hub's caches see the repaired numbers within their time to live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pymongo import UpdateOne

from server.im.rules import unread_after
from server.store.database import Document, Store


@dataclass
class ImCheckReport:
    chats: int = 0
    messages: int = 0
    memberships: int = 0
    # chat id -> what differed: {"msg_count": [stored, counted], "deleted_ns": ..., "gaps": [...]}
    chat_differences: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "chat|user" -> {"read_n": [stored, counted], ...}
    member_differences: dict[str, dict[str, Any]] = field(default_factory=dict)
    # user id -> chat id -> [maintained, recounted]
    unread_differences: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (self.chat_differences or self.member_differences or self.unread_differences)

    def summary(self) -> dict[str, Any]:
        return {
            "chats": self.chats,
            "messages": self.messages,
            "memberships": self.memberships,
            "chats_with_differences": len(self.chat_differences),
            "memberships_with_differences": len(self.member_differences),
            "users_with_unread_differences": len(self.unread_differences),
            "repaired": self.repaired,
        }


class ImCheck:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def check(self, *, repair: bool = False) -> ImCheckReport:
        report = ImCheckReport()
        messages: dict[str, list[Document]] = {}
        async for doc in self._store["messages"].find(
            {},
            projection={"chat_id": True, "n": True, "author_id": True, "deleted": True},
        ):
            messages.setdefault(doc["chat_id"], []).append(doc)
        chat_fixes: list[UpdateOne] = []
        member_fixes: list[UpdateOne] = []
        async for chat in self._store["chats"].find(
            {}, projection={"msg_count": True, "deleted_ns": True}
        ):
            docs = sorted(messages.pop(chat["_id"], []), key=lambda d: int(d.get("n", 0)))
            report.chats += 1
            report.messages += len(docs)
            counted, deleted = await self._check_chat(chat, docs, report)
            if chat["_id"] in report.chat_differences:
                chat_fixes.append(
                    UpdateOne(
                        {"_id": chat["_id"]},
                        {"$set": {"msg_count": counted, "deleted_ns": deleted}},
                    )
                )
            stored = (int(chat.get("msg_count", 0)), list(chat.get("deleted_ns") or []))
            member_fixes += await self._check_members(chat["_id"], docs, stored, report)
        if repair and (chat_fixes or member_fixes):
            if chat_fixes:
                await self._store["chats"].bulk_write(chat_fixes, ordered=False)
            if member_fixes:
                await self._store["chat_members"].bulk_write(member_fixes, ordered=False)
            report.repaired = True
        return report

    async def _check_chat(
        self, chat: Document, docs: list[Document], report: ImCheckReport
    ) -> tuple[int, list[int]]:
        numbers = [int(d.get("n", 0)) for d in docs]
        counted = max(numbers, default=0)
        gaps = sorted(set(range(1, counted + 1)) - set(numbers))
        # A gap counts as deleted: its number was given, and cannot be given again.
        deleted = sorted({int(d["n"]) for d in docs if d.get("deleted")} | set(gaps))
        stored_count = int(chat.get("msg_count", 0))
        stored_deleted = sorted(int(n) for n in chat.get("deleted_ns") or [])
        differences: dict[str, Any] = {}
        if stored_count != counted:
            differences["msg_count"] = [stored_count, counted]
        if stored_deleted != deleted:
            differences["deleted_ns"] = [stored_deleted, deleted]
        if gaps and stored_deleted != deleted:
            differences["gaps"] = gaps
        if differences:
            report.chat_differences[chat["_id"]] = differences
        return counted, deleted

    async def _check_members(
        self,
        chat_id: str,
        docs: list[Document],
        stored_chat: tuple[int, list[int]],
        report: ImCheckReport,
    ) -> list[UpdateOne]:
        number = {str(d["_id"]): int(d.get("n", 0)) for d in docs}
        fixes: list[UpdateOne] = []
        async for member in self._store["chat_members"].find(
            {"chat_id": chat_id},
            projection={"user_id": True, "read_n": True, "last_read_id": True},
        ):
            report.memberships += 1
            user_id = member["user_id"]
            last = member.get("last_read_id")
            own = [d for d in docs if d.get("author_id") == user_id]
            mark_n = number.get(last, 0) if last is not None else 0
            mark_id = last
            if own and int(own[-1]["n"]) > mark_n:
                # the member wrote after their mark: writing reads, so the mark moves there
                mark_n, mark_id = int(own[-1]["n"]), str(own[-1]["_id"])
            stored_read = int(member.get("read_n", 0))
            if stored_read != mark_n or mark_id != last:
                report.member_differences[member["_id"]] = {
                    "read_n": [stored_read, mark_n],
                    "last_read_id": [last, mark_id],
                }
                fixes.append(
                    UpdateOne(
                        {"_id": member["_id"]},
                        {"$set": {"read_n": mark_n, "last_read_id": mark_id}},
                    )
                )
            # The specification, counted from the messages, against the maintained numbers.
            recounted = sum(
                1
                for d in docs
                if int(d.get("n", 0)) > mark_n
                and not d.get("deleted")
                and d.get("author_id") != user_id
            )
            maintained = unread_after(stored_chat[0], stored_read, stored_chat[1])
            if maintained != recounted:
                report.unread_differences.setdefault(user_id, {})[chat_id] = [
                    maintained,
                    recounted,
                ]
        return fixes
