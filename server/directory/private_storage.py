"""A user's private storage for their Jabber clients (XEP-0049): opaque fragments, one per
key (a namespaced element name), that only the user reads and writes. Clients keep their
settings there, notably the rooms they join (XEP-0048 bookmarks), so that every client of the
user, on any device, finds them.

Stored in ``private_storage``, one document per (user, key): ``{_id: "<user>|<key>", user_id,
key, data, updated_at}``. Limits: ``MAX_FRAGMENT_CHARS`` per fragment, ``MAX_KEYS`` keys per
user. Not cached: clients read it once per login.
"""

from __future__ import annotations

from server.store.database import Store, utcnow

COLLECTION = "private_storage"
MAX_FRAGMENT_CHARS = 64 * 1024  # a few hundred bookmarks
MAX_KEYS = 50


class StorageFull(ValueError):
    pass


class PrivateStorage:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, user_id: str, key: str) -> str | None:
        doc = await self._store[COLLECTION].find_one({"_id": f"{user_id}|{key}"})
        return str(doc["data"]) if doc else None

    async def put(self, user_id: str, key: str, data: str) -> None:
        """Store (replace) one fragment; StorageFull past the limits."""
        if len(data) > MAX_FRAGMENT_CHARS:
            raise StorageFull(f"a stored element is at most {MAX_FRAGMENT_CHARS} characters")
        ident = f"{user_id}|{key}"
        collection = self._store[COLLECTION]
        new = await collection.find_one({"_id": ident}, projection={"_id": True}) is None
        if new and await collection.count_documents({"user_id": user_id}) >= MAX_KEYS:
            raise StorageFull(f"at most {MAX_KEYS} stored namespaces")
        await collection.replace_one(
            {"_id": ident},
            {"user_id": user_id, "key": key, "data": data, "updated_at": utcnow()},
            upsert=True,
        )
