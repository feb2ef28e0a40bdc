"""The secrets reply codes are signed with, kept in the database so every node shares them.

One key is current (new codes use it); older keys keep verifying replies to mail sent
before a rotation until they are retired.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from bson import Binary
from pymongo.errors import DuplicateKeyError

from server.store.database import Store, utcnow

KEY_IDS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # one Crockford base32 character each
CACHE_SECONDS = 5.0


class KeyProblem(Exception):
    """A rotation or retirement that cannot be done (said to the admin as is)."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    created_at: datetime
    current: bool
    retired: bool


class CodeKeys:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cached: tuple[str, dict[str, bytes]] | None = None
        self._cached_at = 0.0

    async def _load(self) -> tuple[str, dict[str, bytes]]:
        # One read, so the current key is always among the keys read with it.
        found = [
            k
            async for k in self._store["mail_keys"]
            .find({"retired": {"$ne": True}})
            .sort([("created_at", 1), ("_id", 1)])
        ]
        if not found:
            await self._first()
            return await self._load()
        return found[-1]["_id"], {k["_id"]: bytes(k["secret"]) for k in found}

    async def _first(self) -> None:
        """The first key, "0": made once however many senders ask for it at the same time
        (a rotation each would use up key ids)."""
        fresh = {
            "_id": KEY_IDS[0],
            "secret": Binary(secrets.token_bytes(32)),
            "created_at": utcnow(),
        }
        with contextlib.suppress(DuplicateKeyError):
            await self._store["mail_keys"].insert_one(fresh)

    async def keys(self) -> tuple[str, dict[str, bytes]]:
        """(the current key id, every key that still verifies)."""
        if self._cached is not None and time.monotonic() - self._cached_at < CACHE_SECONDS:
            return self._cached
        self._cached = await self._load()
        self._cached_at = time.monotonic()
        return self._cached

    async def rotate(self) -> str:
        """Make a new current key; the previous ones keep verifying. Ids of retired keys are
        reused last, oldest first (codes signed with a retired key are void anyway)."""
        collection = self._store["mail_keys"]
        known = {k["_id"]: k async for k in collection.find({}, {"secret": 0})}
        retired = sorted(
            (k for k in known.values() if k.get("retired")), key=lambda k: k["created_at"]
        )
        for kid in [k for k in KEY_IDS if k not in known] + [k["_id"] for k in retired]:
            fresh = {"secret": Binary(secrets.token_bytes(32)), "created_at": utcnow()}
            try:
                if kid in known:
                    replaced = await collection.replace_one({"_id": kid, "retired": True}, fresh)
                    if replaced.matched_count == 0:
                        continue  # another node took it meanwhile
                else:
                    await collection.insert_one({"_id": kid, **fresh})
            except DuplicateKeyError:
                continue  # another node rotated at the same moment
            self._cached = None
            return str(kid)
        raise KeyProblem("all 32 key ids are in use: retire an old key first")

    async def retire(self, kid: str) -> None:
        """Codes signed with this key stop verifying: replies carrying them are matched by
        thread headers, rules or sender instead."""
        current, _ = await self._load()
        key = await self._store["mail_keys"].find_one({"_id": kid.upper()})
        if key is None:
            raise KeyProblem(f"no key {kid!r}")
        if key["_id"] == current:
            raise KeyProblem(f"key {kid} is the current one: rotate first")
        await self._store["mail_keys"].update_one(
            {"_id": key["_id"]}, {"$set": {"retired": True, "retired_at": utcnow()}}
        )
        self._cached = None

    async def describe(self) -> list[KeyInfo]:
        current, _ = await self._load()
        return [
            KeyInfo(
                k["_id"],
                k["created_at"],
                current=k["_id"] == current,
                retired=bool(k.get("retired")),
            )
            async for k in self._store["mail_keys"].find({}, {"secret": 0}).sort("created_at", 1)
        ]
