"""The secrets reply codes are signed with, kept in the database so every node shares them.

One key is current (new codes use it); older keys keep verifying replies to mail sent
before a rotation until they are retired.
"""

from __future__ import annotations

import secrets
import time

from bson import Binary
from pymongo.errors import DuplicateKeyError

from server.store.database import Store, utcnow

KEY_IDS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # one Crockford base32 character each
CACHE_SECONDS = 5.0


class CodeKeys:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cached: tuple[str, dict[str, bytes]] | None = None
        self._cached_at = 0.0

    async def _load(self) -> tuple[str, dict[str, bytes]]:
        keys = {
            k["_id"]: bytes(k["secret"])
            async for k in self._store["mail_keys"].find({"retired": {"$ne": True}})
        }
        current = await self._store["mail_keys"].find_one(
            {"retired": {"$ne": True}}, sort=[("created_at", -1)]
        )
        if current is None:
            await self.rotate()
            return await self._load()
        return current["_id"], keys

    async def keys(self) -> tuple[str, dict[str, bytes]]:
        """(the current key id, every key that still verifies)."""
        if self._cached is not None and time.monotonic() - self._cached_at < CACHE_SECONDS:
            return self._cached
        self._cached = await self._load()
        self._cached_at = time.monotonic()
        return self._cached

    async def rotate(self) -> str:
        """Make a new current key; the previous ones keep verifying."""
        used = {k["_id"] async for k in self._store["mail_keys"].find({}, {"_id": 1})}
        for kid in KEY_IDS:
            if kid in used:
                continue
            try:
                await self._store["mail_keys"].insert_one(
                    {"_id": kid, "secret": Binary(secrets.token_bytes(32)), "created_at": utcnow()}
                )
            except DuplicateKeyError:
                continue  # another node rotated at the same moment
            self._cached = None
            return kid
        raise RuntimeError("all 32 key ids are used: retire old keys first")

    async def retire(self, kid: str) -> None:
        await self._store["mail_keys"].update_one({"_id": kid}, {"$set": {"retired": True}})
        self._cached = None
