"""Which streams a user may subscribe to. Pure and deny-by-default: a stream kind that has no
rule here cannot be joined by anyone."""

from __future__ import annotations

from collections.abc import Collection


def stream_kind(stream: str) -> str:
    kind, _, _ = stream.partition(":")
    return kind


def may_subscribe(user_id: str, stream: str, member_streams: Collection[str]) -> bool:
    """``member_streams`` are the shared streams the user belongs to (chats, later)."""
    if stream == f"user:{user_id}":
        return True
    if stream_kind(stream) == "user":
        return False  # another user's private stream, never
    return stream in member_streams
