"""Who holds which CRM role and whose records they see, read from the store.

The rules are pure (``server.crm.rules``); this module gathers their inputs - grants, the
department tree, every user's department, workgroups and extranet flag - into one snapshot. A
snapshot is reused for a short time because every record event needs the list of its viewers.
Whatever changes a role or a scope drops it on every node at once: grants and CRM settings
(``crm.access.changed``), users, departments and workgroup members (``directory.changed``),
both live-only events on the bus. ``TTL_SECONDS`` only bounds how long a node that missed one
(Redis down) keeps an outdated snapshot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from server.crm.rules import (
    CrmRole,
    CrmUser,
    RoleGrant,
    Scope,
    effective_role,
    joining_raises_role,
    may_see,
    visibility_scope,
)
from server.directory.rules import DepartmentNode
from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.store.database import Document, Store

ACCESS_CHANGED = "crm.access.changed"
"""Live-only bus event: CRM grants or settings changed; every node drops its snapshot."""
INVALIDATING = frozenset({ACCESS_CHANGED, "directory.changed"})

TTL_SECONDS = 2.0
ROLE_NAMES: dict[str, CrmRole] = {
    "none": CrmRole.NONE,
    "manager": CrmRole.MANAGER,
    "head": CrmRole.HEAD,
    "chief": CrmRole.CHIEF,
    "admin": CrmRole.ADMIN,
}


def role_name(role: CrmRole) -> str:
    return next(name for name, value in ROLE_NAMES.items() if value == role)


@dataclass(frozen=True, slots=True)
class Viewer:
    user_id: str
    role: CrmRole
    scope: Scope

    def sees(self, responsible_id: str) -> bool:
        return may_see(self.scope, responsible_id)


def crm_user(doc: Document, workgroup_ids: set[str] | frozenset[str]) -> CrmUser:
    return CrmUser(
        id=str(doc["_id"]),
        department_id=doc.get("department_id"),
        workgroup_ids=frozenset(workgroup_ids),
        is_portal_admin=bool(doc.get("is_admin")),
        is_external=bool(doc.get("is_external")),
    )


@dataclass(frozen=True, slots=True)
class AccessSnapshot:
    viewers: dict[str, Viewer]  # every active user
    grants: list[RoleGrant] = field(default_factory=list)
    tree: dict[str, DepartmentNode] = field(default_factory=dict)
    workgroups_of: dict[str, set[str]] = field(default_factory=dict)
    default: CrmRole = CrmRole.MANAGER

    def viewer(self, user_id: str) -> Viewer:
        found = self.viewers.get(user_id)
        if found is None:  # an inactive or unknown user sees nothing
            return Viewer(user_id, CrmRole.NONE, Scope(everyone=False, user_ids=frozenset()))
        return found

    def viewers_of(self, responsible_id: str) -> list[str]:
        """Everyone who sees records of this responsible person."""
        return sorted(uid for uid, v in self.viewers.items() if v.sees(responsible_id))


class CrmAccess:
    def __init__(self, store: Store, bus: EventBus | None = None) -> None:
        self._store = store
        self._bus = bus
        self._snapshot: AccessSnapshot | None = None
        self._loading: tuple[int, asyncio.Future[AccessSnapshot]] | None = None
        self._taken_at = 0.0
        self._generation = 0
        self.default_role = CrmRole.MANAGER
        if bus is not None:
            bus.subscribe_ephemeral(self._on_ephemeral)

    def invalidate(self) -> None:
        self._snapshot = None
        self._generation += 1

    async def changed(self) -> None:
        """Roles may have changed (a grant, the settings, a user's flags): every node's
        snapshot goes, so that no node keeps telling a user about records they lost."""
        self.invalidate()
        if self._bus is not None:
            await self._bus.publish_ephemeral(EphemeralEvent(ACCESS_CHANGED, {}))

    async def _on_ephemeral(self, event: EphemeralEvent) -> None:
        if event.type in INVALIDATING:
            self.invalidate()

    async def snapshot(self, fresh: bool = False) -> AccessSnapshot:
        """``fresh``: read now, for a decision that must not rest on a cached grant."""
        if (
            not fresh
            and self._snapshot is not None
            and time.monotonic() - self._taken_at < TTL_SECONDS
        ):
            return self._snapshot
        if fresh:
            return await self._load()
        # One read for everyone who finds the copy out of date at once (a batch of mail
        # announcing its activities side by side), not one each.
        loading = self._loading
        if loading is None or loading[0] != self._generation:
            task = asyncio.ensure_future(self._load())
            loading = self._loading = (self._generation, task)
            task.add_done_callback(lambda _t: self._forget_loading(task))
        return await asyncio.shield(loading[1])

    def _forget_loading(self, task: asyncio.Future[AccessSnapshot]) -> None:
        if self._loading is not None and self._loading[1] is task:
            self._loading = None
        if not task.cancelled():
            task.exception()  # retrieved: each waiter got it raised already

    async def _load(self) -> AccessSnapshot:
        taken_at = time.monotonic()
        generation = self._generation
        settings = await self._store["crm_settings"].find_one({"_id": "settings"}) or {}
        default = ROLE_NAMES.get(str(settings.get("default_role", "manager")), CrmRole.MANAGER)
        grants = [
            RoleGrant(ROLE_NAMES[g["role"]], g["subject_kind"], g["subject_id"])
            async for g in self._store["crm_roles"].find({})
        ]
        tree = {
            d["_id"]: DepartmentNode(d["_id"], d.get("parent_id"), d.get("head_id"))
            async for d in self._store.departments.find({})
        }
        workgroups: dict[str, set[str]] = {}
        async for group in self._store.workgroups.find({}, {"member_ids": 1}):
            for member in group.get("member_ids", []):
                workgroups.setdefault(member, set()).add(group["_id"])
        users = [
            u
            async for u in self._store.users.find(
                {"is_active": {"$ne": False}}, {"department_id": 1, "is_admin": 1, "is_external": 1}
            )
        ]
        department_of = {u["_id"]: u.get("department_id") for u in users}
        viewers: dict[str, Viewer] = {}
        for u in users:
            person = crm_user(u, workgroups.get(u["_id"], set()))
            role = effective_role(person, grants, tree, default)
            viewers[u["_id"]] = Viewer(
                u["_id"], role, visibility_scope(person, role, tree, department_of)
            )
        snapshot = AccessSnapshot(viewers, grants, tree, workgroups, default)
        # A change that dropped the cache while this was being read may be missing from it:
        # use it for this call, but do not keep it.
        if generation == self._generation:
            self._snapshot, self._taken_at = snapshot, taken_at
        self.default_role = default
        return snapshot

    async def viewer(self, user_id: str) -> Viewer:
        snapshot = await self.snapshot()
        if user_id not in snapshot.viewers:  # a user created since (here or on another node)
            self.invalidate()
            snapshot = await self.snapshot()
        return snapshot.viewer(user_id)

    async def raised_by_joining(self, workgroup_id: str, user_ids: list[str]) -> list[str]:
        """Those of ``user_ids`` whose CRM role joining the workgroup would raise, read fresh:
        a grant to the workgroup given a moment ago on another node counts. Inactive users
        count as they would be when reactivated."""
        snapshot = await self.snapshot(fresh=True)
        raised: list[str] = []
        async for doc in self._store.users.find(
            {"_id": {"$in": user_ids}}, {"department_id": 1, "is_admin": 1, "is_external": 1}
        ):
            person = crm_user(doc, snapshot.workgroups_of.get(doc["_id"], set()))
            if joining_raises_role(
                person, workgroup_id, snapshot.grants, snapshot.tree, snapshot.default
            ):
                raised.append(str(doc["_id"]))
        return sorted(raised)
