"""A burst of first connects reads each chat document once, however many of its users share it.

With history each user is in 27-47 chats and two users of one burst share their dialog and
groups: a chat one connect is reading is waited for by the next who misses it, not read
again (``Cache.get_or_load_many``), unless it changed since that read began.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from server.im.state import ImState
from server.store.database import Document, Store

CHATS = 40
USERS = 8
PER_USER = 30


async def test_a_burst_of_first_connects_reads_each_shared_chat_once(store: Store) -> None:
    await store["chats"].insert_many([{"_id": f"c{c}", "msg_count": c} for c in range(CHATS)])
    # Each user in 30 of the 40 chats, a window moved by 1 per user: most chats are shared.
    await store["chat_members"].insert_many(
        [
            {"_id": f"c{c}|u{u}", "chat_id": f"c{c}", "user_id": f"u{u}", "read_n": 0}
            for u in range(USERS)
            for c in range(u, u + PER_USER)
        ]
    )
    state = ImState(store, ttl_seconds=10.0, max_entries=1_000)
    read: Counter[str] = Counter()
    read_chats = state._read_chats

    async def counted(chat_ids: list[str]) -> dict[str, Document]:
        found = await read_chats(chat_ids)
        read.update(list(found))
        return found

    state._chat_reads._load_many = counted

    async def first_connect(user_id: str) -> dict[str, Document]:
        return await state.chats_by_id(sorted(await state.member_map(user_id)))

    try:
        found = await asyncio.gather(*(first_connect(f"u{u}") for u in range(USERS)))
    finally:
        await state.close()
    assert [len(chats) for chats in found] == [PER_USER] * USERS
    assert found[5]["c20"]["msg_count"] == 20
    assert sum(read.values()) == len(read) == USERS + PER_USER - 1, read
