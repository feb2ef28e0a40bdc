"""Messenger rules. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Literal

ChatKind = Literal["private", "group", "system"]


def origin_key(author_id: str, chat_id: str, kind: Literal["id", "origin_id"], ident: str) -> str:
    """How a message is found by an id its author's Jabber client sent it with (a correction
    or retraction names it so): one value per id, the author and chat included, so that one
    sparse index serves both kinds of id and only messages that have one pay for it."""
    return f"{author_id}|{chat_id}|{kind}|{ident}"


def origin_keys(
    author_id: str | None, chat_id: str, stanza_id: str | None, origin_id: str | None
) -> list[str]:
    """The ``origin_keys`` of a message: none for a message no client id names."""
    if author_id is None:
        return []
    keys = []
    if stanza_id is not None:
        keys.append(origin_key(author_id, chat_id, "id", stanza_id))
    if origin_id is not None:
        keys.append(origin_key(author_id, chat_id, "origin_id", origin_id))
    return keys


def chat_stream(chat_id: str) -> str:
    return f"chat:{chat_id}"


def private_pair_key(a: str, b: str) -> str:
    """One private dialog per pair of users, whoever opens it first."""
    first, second = sorted((a, b))
    return f"{first}|{second}"


def system_pair_key(user_id: str) -> str:
    return f"system|{user_id}"


def may_read(user_id: str, member_ids: Collection[str]) -> bool:
    return user_id in member_ids


def may_post(user_id: str, kind: ChatKind, member_ids: Collection[str]) -> bool:
    """Members post; nobody posts into the portal's system notices but the portal."""
    return kind != "system" and user_id in member_ids


def may_change_message(user_id: str, author_id: str | None, deleted: bool) -> bool:
    """Only the author edits or deletes a message, and a deleted message stays deleted."""
    return author_id is not None and author_id == user_id and not deleted


def may_manage_members(
    user_id: str, kind: ChatKind, owner_id: str | None, workgroup_id: str | None, is_admin: bool
) -> bool:
    """A group chat's owner (or an admin) changes its members; a workgroup's chat follows the
    workgroup's own membership, and private dialogs have none to change."""
    if kind != "group" or workgroup_id is not None:
        return False
    return is_admin or user_id == owner_id


def recipients(sender_id: str, requested: Collection[str]) -> list[str]:
    """Distinct recipients in the order given, never the sender themself."""
    seen: list[str] = []
    for user_id in requested:
        if user_id != sender_id and user_id not in seen:
            seen.append(user_id)
    return seen


def unread_after(msg_count: int, read_n: int, deleted: Iterable[int]) -> int:
    """A member's unread messages in a chat, from the maintained numbers.

    Messages are numbered 1, 2, 3... per chat (``msg_count`` is the highest); the member has
    read up to ``read_n``; ``deleted`` are the numbers of deleted messages. Unread are those
    after ``read_n`` that are not deleted. The member's own messages are never after it:
    posting moves it to the new message. The same number as counting the messages after
    the member's read mark, not deleted, by someone else (``ImCheck`` recounts it so).
    """
    if msg_count <= read_n:
        return 0
    return msg_count - read_n - sum(1 for n in deleted if read_n < n <= msg_count)
