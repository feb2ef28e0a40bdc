"""A user's personal eventing nodes (XEP-0163 PEP): what Jabber clients publish on the user's
own address (bookmarks, avatars, nicknames, OMEMO keys) and what colleagues' clients read and
are told of. The rules are in ``pep_rules``; this service stores and announces.

Stored in ``pep_nodes`` (one document per (user, node): ``{_id: "<user>|<node>", user_id,
node, config, last, created_at, updated_at}``; ``last`` is the newest item, kept there so
that a client coming online gets every colleague's last items from one query) and
``pep_items`` (``{_id: "<user>|<node>|<item id>", user_id, node, item_id, payload, seq, at}``;
``seq`` orders them, newest highest). Payloads are serialised XML, written by the transport
from parsed elements.

Every change is announced with an ephemeral event (``pep.published``, ``pep.retracted``,
``pep.deleted``) that reaches every node, where the XMPP transport notifies its sessions. Not
cached: read on request and once per client coming online.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from server.directory import pep_rules as rules
from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.store.database import Store, utcnow

NODES = "pep_nodes"
ITEMS = "pep_items"
PUBLISHED = "pep.published"
RETRACTED = "pep.retracted"
DELETED = "pep.deleted"
MAX_LAST_ITEMS = 2000  # last items sent to one client coming online, at most


class PepError(Exception):
    """A request the rules refuse; ``kind`` names which."""

    def __init__(self, kind: str, text: str = "") -> None:
        super().__init__(text or kind)
        self.kind = kind
        self.text = text


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    payload: str


@dataclass(frozen=True, slots=True)
class Node:
    owner_id: str
    name: str
    config: dict[str, str]
    last: Item | None

    @property
    def access(self) -> str:
        return self.config.get(rules.ACCESS, "presence")


def _node(doc: Mapping[str, Any]) -> Node:
    last = doc.get("last")
    return Node(
        str(doc["user_id"]),
        str(doc["node"]),
        {str(k): str(v) for k, v in dict(doc.get("config") or {}).items()},
        Item(str(last["id"]), str(last["payload"])) if last else None,
    )


class PepService:
    def __init__(self, store: Store, bus: EventBus) -> None:
        self._store = store
        self._bus = bus

    async def node(self, user_id: str, node: str) -> Node | None:
        doc = await self._store[NODES].find_one({"_id": f"{user_id}|{node}"})
        return _node(doc) if doc else None

    async def nodes(self, user_id: str) -> list[Node]:
        cursor = self._store[NODES].find({"user_id": user_id}).limit(rules.MAX_NODES_PER_USER)
        return [_node(doc) async for doc in cursor]

    async def create(self, user_id: str, node: str, options: Mapping[str, str]) -> Node:
        """A new node; ``exists`` if it is there, ``too-many-nodes`` past the limit."""
        if await self.node(user_id, node) is not None:
            raise PepError("exists", "the node exists")
        return await self._create(user_id, node, options)

    async def _create(self, user_id: str, node: str, options: Mapping[str, str]) -> Node:
        if not rules.valid_name(node):
            raise PepError("bad-name", "a node name is 1 to 256 printable characters")
        nodes = self._store[NODES]
        if await nodes.count_documents({"user_id": user_id}) >= rules.MAX_NODES_PER_USER:
            raise PepError("too-many-nodes", f"at most {rules.MAX_NODES_PER_USER} nodes")
        config = rules.initial_config(node, options)
        now = utcnow()
        # Two first publishes at once: one creates, both then use what it created.
        await nodes.update_one(
            {"_id": f"{user_id}|{node}"},
            {
                "$setOnInsert": {
                    "user_id": user_id,
                    "node": node,
                    "config": config,
                    "created_at": now,
                    "updated_at": now,
                }
            },
            upsert=True,
        )
        created = await self.node(user_id, node)
        assert created is not None
        return created

    async def publish(
        self, user_id: str, node: str, item_id: str, payload: str, options: Mapping[str, str]
    ) -> Node:
        """Store an item (replacing one with its id), creating the node with ``options`` as
        its configuration, or checking them as preconditions (``precondition``) against the
        node's. Older items past the node's limit go."""
        if not rules.valid_name(item_id):
            raise PepError("bad-name", "an item id is 1 to 256 printable characters")
        if len(payload) > rules.MAX_ITEM_CHARS:
            raise PepError("payload-too-big", f"an item is at most {rules.MAX_ITEM_CHARS} bytes")
        found = await self.node(user_id, node)
        if found is None:
            found = await self._create(user_id, node, options)
        else:
            wrong = rules.conflicts(found.config, options)
            if wrong:
                raise PepError("precondition", f"the node's {', '.join(wrong)} differ")
        seq = time.time_ns()
        await self._store[ITEMS].replace_one(
            {"_id": f"{user_id}|{node}|{item_id}"},
            {
                "user_id": user_id,
                "node": node,
                "item_id": item_id,
                "payload": payload,
                "seq": seq,
                "at": utcnow(),
            },
            upsert=True,
        )
        await self._store[NODES].update_one(
            {"_id": f"{user_id}|{node}"},
            {"$set": {"last": {"id": item_id, "payload": payload}, "updated_at": utcnow()}},
        )
        await self._trim(user_id, node, rules.kept_items(found.config))
        await self._bus.publish_ephemeral(
            EphemeralEvent(
                PUBLISHED,
                {
                    "owner_id": user_id,
                    "node": node,
                    "access": found.access,
                    "item_id": item_id,
                    "payload": payload,
                },
            )
        )
        return found

    async def _trim(self, user_id: str, node: str, keep: int) -> None:
        old = (
            self._store[ITEMS]
            .find({"user_id": user_id, "node": node}, projection={"_id": True})
            .sort("seq", -1)
            .skip(keep)
        )
        gone = [doc["_id"] async for doc in old]
        if gone:
            await self._store[ITEMS].delete_many({"_id": {"$in": gone}})

    async def items(
        self,
        user_id: str,
        node: str,
        item_ids: Iterable[str] = (),
        max_items: int | None = None,
    ) -> list[Item]:
        """The node's items, oldest first: those named, or the newest ``max_items``, or all."""
        query: dict[str, Any] = {"user_id": user_id, "node": node}
        wanted = list(item_ids)
        if wanted:
            query["item_id"] = {"$in": wanted}
        cursor = self._store[ITEMS].find(query).sort("seq", -1)
        limit = rules.MAX_ITEMS_PER_NODE if max_items is None else max_items
        cursor = cursor.limit(max(1, min(limit, rules.MAX_ITEMS_PER_NODE)))
        found = [Item(str(doc["item_id"]), str(doc["payload"])) async for doc in cursor]
        found.reverse()
        return found

    async def retract(self, user_id: str, node: str, item_id: str, *, notify: bool) -> None:
        """Remove an item (``no-node``, ``no-item`` when there is none)."""
        found = await self.node(user_id, node)
        if found is None:
            raise PepError("no-node")
        removed = await self._store[ITEMS].delete_one({"_id": f"{user_id}|{node}|{item_id}"})
        if removed.deleted_count == 0:
            raise PepError("no-item")
        if found.last is not None and found.last.item_id == item_id:
            newest = await self.items(user_id, node, max_items=1)
            last = {"id": newest[0].item_id, "payload": newest[0].payload} if newest else None
            await self._store[NODES].update_one(
                {"_id": f"{user_id}|{node}"}, {"$set": {"last": last, "updated_at": utcnow()}}
            )
        if notify:
            await self._bus.publish_ephemeral(
                EphemeralEvent(
                    RETRACTED,
                    {
                        "owner_id": user_id,
                        "node": node,
                        "access": found.access,
                        "item_id": item_id,
                    },
                )
            )

    async def delete(self, user_id: str, node: str) -> None:
        """Remove a node and its items (``no-node`` when there is none)."""
        found = await self.node(user_id, node)
        if found is None:
            raise PepError("no-node")
        await self._store[ITEMS].delete_many({"user_id": user_id, "node": node})
        await self._store[NODES].delete_one({"_id": f"{user_id}|{node}"})
        await self._bus.publish_ephemeral(
            EphemeralEvent(DELETED, {"owner_id": user_id, "node": node, "access": found.access})
        )

    async def configure(self, user_id: str, node: str, changes: Mapping[str, str]) -> Node:
        """Change a node's configuration (``no-node`` when there is none); items past a lower
        limit go."""
        found = await self.node(user_id, node)
        if found is None:
            raise PepError("no-node")
        config = {**found.config, **changes}
        await self._store[NODES].update_one(
            {"_id": f"{user_id}|{node}"}, {"$set": {"config": config, "updated_at": utcnow()}}
        )
        await self._trim(user_id, node, rules.kept_items(config))
        return Node(found.owner_id, found.name, config, found.last)

    async def last_items(self, owner_ids: Iterable[str], nodes: Iterable[str]) -> list[Node]:
        """The nodes of these owners with these names that have an item: what a client
        coming online is sent (each node's ``last``). Bounded by ``MAX_LAST_ITEMS``."""
        owners, names = list(owner_ids), list(nodes)
        if not owners or not names:
            return []
        cursor = (
            self._store[NODES]
            .find({"node": {"$in": names}, "user_id": {"$in": owners}})
            .limit(MAX_LAST_ITEMS)
        )
        return [node async for doc in cursor if (node := _node(doc)).last is not None]
