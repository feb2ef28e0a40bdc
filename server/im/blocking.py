"""Who a user does not want to hear from over Jabber (XEP-0191 blocking command): a list of
Jabber addresses per user, stored in ``blocklists`` (one document per user, ``{_id: user id,
jids: [...]}``).

The list is the user's Jabber setting, like a client's own ignore list kept on the server: it
stops delivery to their Jabber clients (messages, chat states, presence, offline messages),
not the portal's dialog. What a blocked colleague writes is still stored in the one history
and shown by the web messenger, where the user reads it if they choose to; the colleague is
not told. (The portal has no blocking of colleagues of its own: a company messenger.)

Rules (pure, below): items are JIDs as XEP-0191 allows them, a domain, a bare JID or a full
JID; a bare item blocks every resource of that address, a domain item everyone at it. The
service owns a per-node cache of lists, corrected on every node by the ``blocklist.changed``
event it publishes after each store write (which the XMPP transport also uses to push the
change to the user's clients).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.store.database import Store

log = logging.getLogger(__name__)

COLLECTION = "blocklists"
CHANGED = "blocklist.changed"
MAX_ITEMS = 1000  # per user: room for anyone's grudges, a bound on what one user stores
MAX_JID_CHARS = 3071  # RFC 7622: three parts of at most 1023 bytes
MAX_CACHED = 100_000


class BlocklistFull(ValueError):
    pass


def normalize(jid: str) -> str | None:
    """The canonical text of a blocklist item: localpart and domain in lower case, no trailing
    dot; None when it is not an address."""
    text = jid.strip()
    if not text or len(text) > MAX_JID_CHARS or any(ord(c) < 32 or c.isspace() for c in text):
        return None
    bare, slash, resource = text.partition("/")
    local, at, domain = bare.rpartition("@")
    domain = domain.lower().rstrip(".")
    if not domain or (at and not local) or (slash and not resource) or "@" in local:
        return None
    out = f"{local.lower()}@{domain}" if at else domain
    return f"{out}/{resource}" if slash else out


def is_blocked(items: Iterable[str], sender: str) -> bool:
    """Whether a stanza from ``sender`` (a full, bare or domain JID) is blocked by ``items``:
    a full item matches that full JID only, a bare item every resource of it, a domain item
    every address at that domain (XEP-0191 section 3.3, the privacy-list matching rules)."""
    address = normalize(sender)
    if address is None:
        return False
    bare = address.partition("/")[0]
    domain = bare.rpartition("@")[2]
    wanted = set(items)
    return address in wanted or bare in wanted or domain in wanted


class BlockingService:
    def __init__(self, store: Store, bus: EventBus) -> None:
        self._store = store
        self._bus = bus
        self._cache: dict[str, frozenset[str]] = {}
        bus.subscribe_ephemeral(self._on_event)

    async def blocked(self, user_id: str) -> frozenset[str]:
        """The user's blocklist (cached; every node's copy is dropped when it changes)."""
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        doc = await self._store[COLLECTION].find_one({"_id": user_id})
        items = frozenset(doc.get("jids", [])) if doc else frozenset()
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[user_id] = items
        return items

    async def blocks(self, user_id: str, sender: str) -> bool:
        return is_blocked(await self.blocked(user_id), sender)

    async def block(self, user_id: str, jids: Iterable[str]) -> list[str]:
        """Add addresses (already normalised); returns those that were not on the list."""
        current = await self._fresh(user_id)
        added = sorted(set(jids) - current)
        if not added:
            return []
        if len(current) + len(added) > MAX_ITEMS:
            raise BlocklistFull(f"at most {MAX_ITEMS} blocked addresses")
        await self._store[COLLECTION].update_one(
            {"_id": user_id}, {"$addToSet": {"jids": {"$each": added}}}, upsert=True
        )
        await self._changed(user_id, added, [])
        return added

    async def unblock(self, user_id: str, jids: Iterable[str] | None) -> list[str]:
        """Remove addresses (None: all of them); returns those that were on the list."""
        current = await self._fresh(user_id)
        removed = sorted(current if jids is None else set(jids) & current)
        if not removed:
            return []
        await self._store[COLLECTION].update_one(
            {"_id": user_id}, {"$pull": {"jids": {"$in": removed}}}
        )
        await self._changed(user_id, [], removed)
        return removed

    async def _fresh(self, user_id: str) -> frozenset[str]:
        """The stored list, not the cache: a change decides from what is stored."""
        self._cache.pop(user_id, None)
        return await self.blocked(user_id)

    async def _changed(self, user_id: str, added: list[str], removed: list[str]) -> None:
        self._cache.pop(user_id, None)
        await self._bus.publish_ephemeral(
            EphemeralEvent(CHANGED, {"user_id": user_id, "added": added, "removed": removed})
        )

    async def _on_event(self, event: EphemeralEvent) -> None:
        if event.type == CHANGED:
            self._cache.pop(str(event.data.get("user_id")), None)
