"""Directory service: every change goes store write -> domain event on the owner's stream."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pymongo.errors import DuplicateKeyError

from server.auth.passwords import password_fields
from server.auth.sessions import announce_revocation
from server.caching import BatchLoad, Cache
from server.directory.models import (
    DepartmentIn,
    DepartmentOut,
    DepartmentUpdate,
    ProfileFields,
    UserCreate,
    UserOut,
    UserQuery,
    UserUpdate,
    WorkgroupIn,
    WorkgroupOut,
    phone_digits,
)
from server.directory.rules import (
    MIN_PHONE_DIGITS,
    DepartmentNode,
    Person,
    ancestors,
    departments_named,
    descendants,
    may_see_user,
    phone_search,
    search_words,
)
from server.events.bus import EventBus
from server.events.models import EphemeralEvent, Event
from server.events.streams import StreamLog, user_stream
from server.store.database import Document, Store, new_id, utcnow
from server.web.problems import Problem, conflict, forbidden, not_found

log = logging.getLogger(__name__)


def person(doc: Document) -> Person:
    return Person(
        id=str(doc["_id"]),
        department_id=doc.get("department_id"),
        is_external=bool(doc.get("is_external")),
        is_active=bool(doc.get("is_active", True)),
    )


# Changes to these fields change what others see of a user (names, groups, visibility).
DIRECTORY_FIELDS = frozenset(
    {
        "first_name",
        "last_name",
        "position",
        "email",
        "phones",
        "department_id",
        "is_active",
        "is_external",
    }
)

# Stored with a user, never shown nor announced as a change.
AVATARS = "avatars"  # user id -> {type, data, sha1}: the picture, apart from the hot user document
MAX_AVATAR_BYTES = 64 * 1024  # a contact-list picture; larger ones cost every roster viewer
HIDDEN_FIELDS = frozenset({"password_hash", "scram", "password_stamp", "phone_digits"})

# Never kept in memory: what checks a password is read from the database when it is needed.
SECRET_FIELDS = {"password_hash": False, "scram": False}
# Events on a user's personal stream that say the user's document changed.
USER_CHANGES = frozenset({"user.updated", "im.settings"})
ALL = "all"  # the key of the caches holding one value for the whole directory


@dataclass(frozen=True, slots=True)
class Colleague:
    """What the presence snapshot and the tasks' heads need of each active user."""

    id: str
    is_external: bool
    department_id: str | None = None


def password_stamp() -> str:
    """A new value for ``users.password_stamp`` at each password change: a Jabber session
    opened with the old password sees it differ and ends (server/auth/sessions.py)."""
    return secrets.token_hex(8)


class WorkgroupHooks(Protocol):
    """Told about workgroup membership changes (the messenger keeps a chat per workgroup)."""

    async def workgroup_created(self, owner: Document, group: WorkgroupOut) -> None: ...

    async def workgroup_members_added(self, group_id: str, user_ids: list[str]) -> None: ...

    async def workgroup_member_removed(self, group_id: str, user_id: str) -> None: ...


class DirectoryService:
    """People, departments and workgroups.

    Caches (this node's copies, see server/caching.py): user documents without their
    secrets, the active users, the workgroups' members and the department tree. A user's copy
    goes on ``user.updated``/``im.settings`` on their stream, on ``directory.changed`` naming
    them and on ``session.revoked`` (a new password, a deactivation); the directory-wide ones
    on any ``directory.changed``; all of them after the time to live.
    """

    def __init__(
        self,
        store: Store,
        streams: StreamLog,
        bus: EventBus,
        *,
        cache_ttl_seconds: float = 10.0,
        cache_stale_seconds: float = 0.0,
        cache_entries: int = 100_000,
    ) -> None:
        self._store = store
        self._streams = streams
        self._bus = bus
        ttl, stale = cache_ttl_seconds, cache_stale_seconds
        self._users: Cache[str, Document] = Cache(cache_entries, ttl, stale_seconds=stale)
        # Users asked for one by one at the same moment (a connect burst), read together.
        self._user_reads: BatchLoad[str, Document] = BatchLoad(self._read_users)
        self._colleagues: Cache[str, list[Colleague]] = Cache(1, ttl, stale_seconds=stale)
        self._groups: Cache[str, list[tuple[str, frozenset[str]]]] = Cache(
            1, ttl, stale_seconds=stale
        )
        self._tree: Cache[str, dict[str, DepartmentNode]] = Cache(1, ttl, stale_seconds=stale)
        bus.subscribe(self._on_event)
        bus.subscribe_ephemeral(self._on_ephemeral)
        self.workgroup_hooks: list[WorkgroupHooks] = []
        # Told which fields of a user changed (the CRM recounts on a new time zone or department).
        self.user_hooks: list[Callable[[str, frozenset[str]], Awaitable[None]]] = []
        # Told of each new user (the CRM stores their numbers, zero, instead of counting them
        # at their first connect).
        self.user_created_hooks: list[Callable[[Document], Awaitable[None]]] = []
        # Asked before members join a workgroup (actor, group id, new member ids); raise a
        # Problem to refuse. The CRM refuses what would give someone a CRM role.
        self.membership_guards: list[Callable[[Document, str, list[str]], Awaitable[None]]] = []

    # users -----------------------------------------------------------------------------------

    async def create_user(self, data: UserCreate) -> UserOut:
        if data.department_id is not None:
            await self._require_department(data.department_id)
        now = utcnow()
        doc: Document = {
            "_id": new_id(),
            "login": data.login,
            "email": data.email,
            "first_name": data.first_name or "",
            "last_name": data.last_name or "",
            "position": data.position or "",
            "phones": [p.model_dump() for p in data.phones or []],
            "phone_digits": phone_digits(data.phones or []),
            "time_zone": data.time_zone,
            "department_id": data.department_id,
            "is_admin": data.is_admin,
            "is_external": data.is_external,
            "is_active": True,
            "password_hash": None,
            "created_at": now,
            "updated_at": now,
        }
        if data.password:
            doc.update(await password_fields(data.password))
        try:
            await self._store.users.insert_one(doc)
        except DuplicateKeyError:
            raise conflict(f"the login '{data.login}' is taken") from None
        await self.directory_changed([doc["_id"]])
        for hook in self.user_created_hooks:
            try:
                await hook(doc)
            except Exception:  # the user exists: what the hook prepares is made later
                log.exception("preparing for new user %s failed", doc["_id"])
        return UserOut.from_document(doc)

    async def user_document(self, user_id: str) -> Document:
        doc = await self._store.users.find_one({"_id": user_id})
        if doc is None:
            raise not_found(f"user {user_id}")
        return doc

    async def cached_user(self, user_id: str) -> Document | None:
        """The user's document as cached here (without secrets), or None if there is none.
        A copy: the caller may change it."""

        doc = await self._users.get_or_load(user_id, lambda: self._user_reads.load(user_id))
        return dict(doc) if doc is not None else None

    async def cached_users(self, user_ids: list[str]) -> dict[str, Document]:
        """The documents of those of ``user_ids`` who exist (copies, without secrets); the
        ones not cached are read in one query."""

        found = await self._users.get_or_load_many(dict.fromkeys(user_ids), self._read_users)
        return {user_id: dict(doc) for user_id, doc in found.items()}

    async def _read_users(self, user_ids: list[str]) -> dict[str, Document]:
        return {
            str(doc["_id"]): doc
            async for doc in self._store.users.find(
                {"_id": {"$in": user_ids}}, projection=SECRET_FIELDS
            )
        }

    def forget_user(self, user_id: str) -> None:
        """This node's copy of the user is out of date (others hear of it through the bus)."""
        self._users.invalidate(user_id)

    def forget_all(self) -> None:
        """Every copy may be out of date (events may have been lost: Redis was away)."""
        for cache in (self._users, self._colleagues, self._groups, self._tree):
            cache.clear()

    async def close(self) -> None:
        """Stop the caches' background refreshes."""
        for cache in (self._users, self._colleagues, self._groups, self._tree):
            await cache.close()

    async def _on_event(self, event: Event) -> None:
        if event.type in USER_CHANGES and event.stream.startswith("user:"):
            self._users.invalidate(event.stream.partition(":")[2])
        elif event.type in ("workgroup.joined", "workgroup.left"):
            self._groups.clear()

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type == "directory.changed":
            self._users.invalidate_many(event.data.get("user_ids") or [])
            self._colleagues.clear()
            self._groups.clear()
            self._tree.clear()
        elif event.type == "session.revoked":  # a new password, a deactivation
            for stream in event.streams:
                kind, _, user_id = stream.partition(":")
                if kind == "user":
                    self._users.invalidate(user_id)

    async def user_by_login(self, login: str) -> Document | None:
        return await self._store.users.find_one({"login": login.strip().lower()})

    async def get_user(self, viewer: Document, user_id: str) -> UserOut:
        doc = await self.user_document(user_id)
        if not await self.may_see(viewer, doc):
            raise not_found(f"user {user_id}")
        return UserOut.from_document(doc)

    async def list_users(
        self, viewer: Document, query: UserQuery, online_ids: set[str] | None = None
    ) -> list[UserOut]:
        """``online_ids`` (who is seen online now) is needed only for the ``online`` filter."""
        filters: Document = {}
        conditions: list[Document] = []
        if not (query.include_inactive and viewer.get("is_admin")):
            filters["is_active"] = True
        if query.name:
            pattern = re.escape(query.name.strip())
            conditions.append(
                {
                    "$or": [
                        {field: {"$regex": pattern, "$options": "i"}}
                        for field in ("first_name", "last_name", "login")
                    ]
                }
            )
        if query.position:
            conditions.append(
                {"position": {"$regex": re.escape(query.position.strip()), "$options": "i"}}
            )
        if query.q and query.q.strip():
            conditions.append(await self._text_search(query.q))
        if query.department_id:
            if query.subtree:
                tree = await self.department_tree()
                filters["department_id"] = {"$in": sorted(descendants(query.department_id, tree))}
            else:
                filters["department_id"] = query.department_id
        if query.email:
            filters["email"] = {"$regex": re.escape(query.email.strip().lower())}
        if query.phone:
            filters["phone_digits"] = {"$regex": re.escape(query.phone)}
        peers = await self.workgroup_peer_ids(str(viewer["_id"]))
        if viewer.get("is_external"):
            conditions.append({"_id": {"$in": peers}})
        elif not viewer.get("is_admin"):
            # extranet users only where a workgroup is shared, as may_see_user says
            conditions.append({"$or": [{"is_external": {"$ne": True}}, {"_id": {"$in": peers}}]})
        if query.online is not None and online_ids is not None:
            key = "$in" if query.online else "$nin"
            conditions.append({"_id": {key: sorted(online_ids)}})
        if conditions:
            filters["$and"] = conditions
        cursor = self._store.users.find(
            filters,
            sort=[("last_name", 1), ("first_name", 1), ("login", 1)],
            skip=query.offset,
            limit=query.limit,
        )
        return [UserOut.from_document(doc) async for doc in cursor]

    async def _text_search(self, text: str) -> Document:
        """One search box over the whole card: every word is found in the name, login,
        position, e-mail, phone digits or the department's name."""
        names = {
            d["_id"]: str(d.get("name", ""))
            async for d in self._store.departments.find({}, projection={"name": True})
        }
        every_word: list[Document] = []
        for word in search_words(text):
            pattern = re.escape(word)
            ors: list[Document] = [
                {field: {"$regex": pattern, "$options": "i"}}
                for field in ("first_name", "last_name", "login", "position", "email")
            ]
            departments = departments_named(word, names)
            if departments:
                ors.append({"department_id": {"$in": departments}})
            digits = re.sub(r"\D", "", word)
            if len(digits) >= MIN_PHONE_DIGITS:
                ors.append({"phone_digits": {"$regex": re.escape(digits)}})
            every_word.append({"$or": ors})
        alternatives: list[Document] = [{"$and": every_word}]
        number = phone_search(text)
        if number is not None:
            alternatives.append({"phone_digits": {"$regex": re.escape(number)}})
        return {"$or": alternatives}

    async def update_user(
        self, user_id: str, patch: UserUpdate | ProfileFields, actor_id: str
    ) -> UserOut:
        doc = await self.user_document(user_id)
        changes: Document = {}
        fields = patch.model_dump(exclude_unset=True)
        password = fields.pop("password", None)
        if "phones" in fields:
            phones = patch.phones or []
            fields["phones"] = [p.model_dump() for p in phones]
            changes["phone_digits"] = phone_digits(phones)
        if fields.get("department_id") is not None:
            await self._require_department(fields["department_id"])
        for key, value in fields.items():
            if value is None and key not in ("department_id", "time_zone"):
                continue
            if doc.get(key) != value:
                changes[key] = value
        if password is not None:
            changes.update(await password_fields(password), password_stamp=password_stamp())
        visible = {k: v for k, v in changes.items() if k not in HIDDEN_FIELDS}
        if not changes:
            return UserOut.from_document(doc)
        changes["updated_at"] = utcnow()
        await self._store.users.update_one({"_id": user_id}, {"$set": changes})
        self.forget_user(user_id)
        doc.update(changes)
        if changes.get("is_active") is False:
            await self.revoke_tokens(user_id, "deactivated")
        elif password is not None:
            await self.revoke_tokens(user_id, "password_changed")
        user = UserOut.from_document(doc)
        if visible:
            await self._streams.append(
                user_stream(user_id),
                "user.updated",
                {
                    "user": user.model_dump(mode="json"),
                    "changed": sorted(visible),
                    "by": actor_id,
                },
            )
        if visible.keys() & DIRECTORY_FIELDS:
            await self.directory_changed([user_id])
        for hook in self.user_hooks:
            await hook(user_id, frozenset(visible))
        return user

    async def avatar(self, user_id: str) -> tuple[str, bytes] | None:
        """The user's picture (media type, bytes), if they set one (from a Jabber client's
        vCard: the portal has no upload of its own yet)."""
        doc = await self._store[AVATARS].find_one({"_id": user_id})
        return (str(doc["type"]), bytes(doc["data"])) if doc else None

    async def set_avatar(self, user_id: str, media_type: str, data: bytes | None) -> None:
        """Set (or, with None, remove) the user's own picture. The user document carries its
        SHA-1 (``avatar_sha1``, what XEP-0153 puts in presence), changed like any profile
        field: a ``user.updated`` event, caches corrected through it."""
        if data is not None and len(data) > MAX_AVATAR_BYTES:
            raise ValueError(f"a picture is at most {MAX_AVATAR_BYTES} bytes")
        doc = await self.user_document(user_id)
        sha1 = hashlib.sha1(data).hexdigest() if data is not None else None
        if doc.get("avatar_sha1") == sha1 and sha1 is not None:
            return  # the same picture again (clients resend the whole vCard)
        if data is None:
            await self._store[AVATARS].delete_one({"_id": user_id})
        else:
            await self._store[AVATARS].replace_one(
                {"_id": user_id},
                {"type": media_type, "data": data, "sha1": sha1, "updated_at": utcnow()},
                upsert=True,
            )
        if doc.get("avatar_sha1") == sha1:
            return
        changes: Document = {"avatar_sha1": sha1, "updated_at": utcnow()}
        await self._store.users.update_one({"_id": user_id}, {"$set": changes})
        self.forget_user(user_id)
        doc.update(changes)
        user = UserOut.from_document(doc)
        await self._streams.append(
            user_stream(user_id),
            "user.updated",
            {"user": user.model_dump(mode="json"), "changed": ["avatar_sha1"], "by": user_id},
        )
        for hook in self.user_hooks:
            await hook(user_id, frozenset({"avatar_sha1"}))
        # For Jabber contacts' presence (XEP-0153), on every node; no rooms: not for browsers.
        await self._bus.publish_ephemeral(
            EphemeralEvent("user.avatar", {"user_id": user_id, "sha1": sha1})
        )

    async def directory_changed(self, user_ids: list[str]) -> None:
        """Tell transports that keep a copy of the directory (XMPP rosters) to refresh.

        Empty ``user_ids`` means the structure changed (departments), not just some people.
        Every node's directory caches hear of it too.
        """
        await self._bus.publish_ephemeral(
            EphemeralEvent("directory.changed", {"user_ids": user_ids})
        )

    async def set_password(self, user_id: str, password: str) -> None:
        await self._store.users.update_one(
            {"_id": user_id},
            {
                "$set": {
                    **(await password_fields(password)),
                    "password_stamp": password_stamp(),
                    "updated_at": utcnow(),
                }
            },
        )
        self.forget_user(user_id)

    async def revoke_tokens(self, user_id: str, reason: str) -> None:
        """End every session of the user: tokens go, and open connections (Socket.IO and
        Jabber, on every node) are closed within a second (server/auth/sessions.py)."""
        await self._store.tokens.delete_many({"user_id": user_id})
        await announce_revocation(self._store, self._bus, user_id, reason)

    async def may_see(self, viewer: Document, other: Document) -> bool:
        if viewer.get("is_admin"):
            return True
        shared: list[str] = []
        if viewer.get("is_external") or other.get("is_external"):
            pair = {str(viewer["_id"]), str(other["_id"])}
            groups = await self._workgroup_members()
            shared = [group_id for group_id, members in groups if pair <= members]
        return may_see_user(person(viewer), person(other), shared)

    async def first_unreachable(self, actor: Document, user_ids: list[str]) -> str | None:
        """The first of ``user_ids`` that is not an active colleague ``actor`` may see, if any:
        whom one may not write to, put on a task or add to a chat."""
        found = await self.cached_users(user_ids)
        for user_id in user_ids:
            other = found.get(user_id)
            if (
                other is None
                or not other.get("is_active", True)
                or not await self.may_see(actor, other)
            ):
                return user_id
        return None

    async def _workgroup_members(self) -> list[tuple[str, frozenset[str]]]:
        """Each workgroup's id and members (cached: read once per change of any)."""

        async def load() -> list[tuple[str, frozenset[str]]]:
            return [
                (str(g["_id"]), frozenset(g.get("member_ids", [])))
                async for g in self._store.workgroups.find({}, projection={"member_ids": True})
            ]

        return await self._groups.get_or_load(ALL, load) or []

    async def workgroup_peer_ids(self, user_id: str) -> list[str]:
        peers = {user_id}
        for _, members in await self._workgroup_members():
            if user_id in members:
                peers.update(members)
        return sorted(peers)

    async def colleagues(self) -> list[Colleague]:
        """Every active user (cached: read once per directory change)."""

        async def load() -> list[Colleague]:
            return [
                Colleague(str(doc["_id"]), bool(doc.get("is_external")), doc.get("department_id"))
                async for doc in self._store.users.find(
                    {"is_active": True}, projection={"is_external": True, "department_id": True}
                )
            ]

        return await self._colleagues.get_or_load(ALL, load) or []

    async def active_people(self) -> list[Person]:
        """Every active user with their department (for who is a head above whom), from the
        same cache as ``colleagues``: a task read no longer reads every user."""
        return [
            Person(c.id, c.department_id, is_external=c.is_external, is_active=True)
            for c in await self.colleagues()
        ]

    async def visible_user_ids(self, viewer: Document) -> list[str]:
        """Everyone ``viewer`` may see (used for the presence snapshot): from the cached
        directory, without a query once it is cached."""
        if viewer.get("is_external"):
            return await self.workgroup_peer_ids(str(viewer["_id"]))
        seen = [c.id for c in await self.colleagues() if not c.is_external]
        known = set(seen)
        for peer in await self.workgroup_peer_ids(str(viewer["_id"])):
            if peer not in known:
                seen.append(peer)
        return seen

    # departments -----------------------------------------------------------------------------

    async def department_tree(self, *, fresh: bool = False) -> dict[str, DepartmentNode]:
        """Every department (cached: read once per change). Do not change the map.

        ``fresh``: read it again (a department not found may have been made by the CLI, whose
        changes reach a running hub only through the time to live)."""
        if fresh:
            self._tree.invalidate(ALL)

        async def load() -> dict[str, DepartmentNode]:
            return {
                str(d["_id"]): DepartmentNode(
                    str(d["_id"]), d.get("parent_id"), d.get("head_id"), str(d.get("name", ""))
                )
                async for d in self._store.departments.find({})
            }

        return await self._tree.get_or_load(ALL, load) or {}

    async def _require_department(self, department_id: str) -> Document:
        doc = await self._store.departments.find_one({"_id": department_id})
        if doc is None:
            raise Problem(
                422,
                "unknown-reference",
                "Unknown reference",
                f"department {department_id} does not exist",
            )
        return doc

    async def _require_user(self, user_id: str) -> None:
        if await self._store.users.find_one({"_id": user_id}, projection={"_id": True}) is None:
            raise Problem(
                422, "unknown-reference", "Unknown reference", f"user {user_id} does not exist"
            )

    async def create_department(self, data: DepartmentIn) -> DepartmentOut:
        if data.parent_id is not None:
            await self._require_department(data.parent_id)
        if data.head_id is not None:
            await self._require_user(data.head_id)
        doc: Document = {
            "_id": new_id(),
            "name": data.name,
            "parent_id": data.parent_id,
            "head_id": data.head_id,
        }
        await self._store.departments.insert_one(doc)
        await self.directory_changed([])
        return DepartmentOut.from_document(doc)

    async def list_departments(self) -> list[DepartmentOut]:
        return [
            DepartmentOut.from_document(d)
            async for d in self._store.departments.find({}, sort=[("name", 1)])
        ]

    async def get_department(self, department_id: str) -> DepartmentOut:
        doc = await self._store.departments.find_one({"_id": department_id})
        if doc is None:
            raise not_found(f"department {department_id}")
        return DepartmentOut.from_document(doc)

    async def update_department(self, department_id: str, patch: DepartmentUpdate) -> DepartmentOut:
        await self.get_department(department_id)
        changes = patch.model_dump(exclude_unset=True)
        if changes.get("parent_id") is not None:
            await self._require_department(changes["parent_id"])
            tree = await self.department_tree()
            if department_id in ancestors(changes["parent_id"], tree):
                raise Problem(
                    422,
                    "department-cycle",
                    "Department cycle",
                    "a department cannot be moved below itself",
                )
        if changes.get("head_id") is not None:
            await self._require_user(changes["head_id"])
        if changes:
            await self._store.departments.update_one({"_id": department_id}, {"$set": changes})
            await self.directory_changed([])
        return await self.get_department(department_id)

    async def delete_department(self, department_id: str) -> None:
        await self.get_department(department_id)
        if await self._store.departments.find_one({"parent_id": department_id}):
            raise conflict("the department has subdepartments; move or delete them first")
        if await self._store.users.find_one({"department_id": department_id, "is_active": True}):
            raise conflict("the department has employees; move them first")
        await self._store.departments.delete_one({"_id": department_id})
        await self.directory_changed([])

    # workgroups ------------------------------------------------------------------------------

    async def create_workgroup(self, owner_id: str, data: WorkgroupIn) -> WorkgroupOut:
        members = list(dict.fromkeys([owner_id, *data.member_ids]))
        for member in members:
            await self._require_user(member)
        doc: Document = {
            "_id": new_id(),
            "name": data.name,
            "description": data.description,
            "owner_id": owner_id,
            "member_ids": members,
            "moderator_ids": [owner_id],
            "created_at": utcnow(),
        }
        await self._store.workgroups.insert_one(doc)
        group = WorkgroupOut.from_document(doc)
        for member in members:
            await self._streams.append(
                user_stream(member),
                "workgroup.joined",
                {"workgroup": group.model_dump(mode="json")},
            )
        owner = await self.user_document(owner_id)
        for hooks in self.workgroup_hooks:
            await hooks.workgroup_created(owner, group)
        await self.directory_changed(members)
        return group

    async def list_workgroups(self, viewer: Document) -> list[WorkgroupOut]:
        query: Document = {"member_ids": str(viewer["_id"])} if viewer.get("is_external") else {}
        return [
            WorkgroupOut.from_document(g)
            async for g in self._store.workgroups.find(query, sort=[("name", 1)])
        ]

    async def get_workgroup(self, viewer: Document, group_id: str) -> WorkgroupOut:
        doc = await self._store.workgroups.find_one({"_id": group_id})
        if doc is None or (
            viewer.get("is_external") and str(viewer["_id"]) not in doc.get("member_ids", [])
        ):
            raise not_found(f"workgroup {group_id}")
        return WorkgroupOut.from_document(doc)

    async def add_workgroup_members(
        self, actor: Document, group_id: str, user_ids: list[str], moderator: bool
    ) -> WorkgroupOut:
        group = await self._moderated_group(actor, group_id)
        for user_id in user_ids:
            await self._require_user(user_id)
        joining = [u for u in dict.fromkeys(user_ids) if u not in group.member_ids]
        if joining:
            for guard in self.membership_guards:
                await guard(actor, group_id, joining)
        update: Document = {"$addToSet": {"member_ids": {"$each": user_ids}}}
        if moderator:
            update["$addToSet"]["moderator_ids"] = {"$each": user_ids}
        await self._store.workgroups.update_one({"_id": group_id}, update)
        result = await self.get_workgroup(actor, group_id)
        for user_id in user_ids:
            if user_id not in group.member_ids:
                await self._streams.append(
                    user_stream(user_id),
                    "workgroup.joined",
                    {"workgroup": result.model_dump(mode="json")},
                )
        for hooks in self.workgroup_hooks:
            await hooks.workgroup_members_added(group_id, joining)
        if joining:
            await self.directory_changed(joining)
        return result

    async def remove_workgroup_member(
        self, actor: Document, group_id: str, user_id: str
    ) -> WorkgroupOut:
        group = await self._moderated_group(actor, group_id)
        if user_id == group.owner_id:
            raise conflict("the owner cannot be removed from the workgroup")
        await self._store.workgroups.update_one(
            {"_id": group_id}, {"$pull": {"member_ids": user_id, "moderator_ids": user_id}}
        )
        if user_id in group.member_ids:
            await self._streams.append(
                user_stream(user_id), "workgroup.left", {"workgroup_id": group_id}
            )
            for hooks in self.workgroup_hooks:
                await hooks.workgroup_member_removed(group_id, user_id)
            await self.directory_changed([user_id])
        return await self.get_workgroup(actor, group_id)

    async def _moderated_group(self, actor: Document, group_id: str) -> WorkgroupOut:
        group = await self.get_workgroup(actor, group_id)
        if not actor.get("is_admin") and str(actor["_id"]) not in group.moderator_ids:
            raise forbidden("only the workgroup's moderators may change its members")
        return group
