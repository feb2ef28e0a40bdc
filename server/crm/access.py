"""Who holds which CRM role and whose records they see, read from the store.

The rules are pure (``server.crm.rules``); this module gathers their inputs - grants, the
department tree, every user's department and workgroups - into one snapshot. A snapshot is
reused for a short time because every record event needs the list of its viewers; grant,
workgroup and user changes made on this node drop it at once; department changes and other
nodes' changes are seen within ``TTL_SECONDS``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.crm.rules import (
    CrmRole,
    CrmUser,
    RoleGrant,
    Scope,
    effective_role,
    may_see,
    visibility_scope,
)
from server.directory.rules import DepartmentNode
from server.store.database import Store

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


@dataclass(frozen=True, slots=True)
class AccessSnapshot:
    viewers: dict[str, Viewer]  # every active user

    def viewer(self, user_id: str) -> Viewer:
        found = self.viewers.get(user_id)
        if found is None:  # an inactive or unknown user sees nothing
            return Viewer(user_id, CrmRole.NONE, Scope(everyone=False, user_ids=frozenset()))
        return found

    def viewers_of(self, responsible_id: str) -> list[str]:
        """Everyone who sees records of this responsible person."""
        return sorted(uid for uid, v in self.viewers.items() if v.sees(responsible_id))


class CrmAccess:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._snapshot: AccessSnapshot | None = None
        self._taken_at = 0.0
        self._generation = 0
        self.default_role = CrmRole.MANAGER

    def invalidate(self) -> None:
        self._snapshot = None
        self._generation += 1

    async def snapshot(self) -> AccessSnapshot:
        if self._snapshot is not None and time.monotonic() - self._taken_at < TTL_SECONDS:
            return self._snapshot
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
                {"is_active": {"$ne": False}}, {"department_id": 1, "is_admin": 1}
            )
        ]
        department_of = {u["_id"]: u.get("department_id") for u in users}
        viewers: dict[str, Viewer] = {}
        for u in users:
            person = CrmUser(
                id=u["_id"],
                department_id=u.get("department_id"),
                workgroup_ids=frozenset(workgroups.get(u["_id"], ())),
                is_portal_admin=bool(u.get("is_admin")),
            )
            role = effective_role(person, grants, tree, default)
            viewers[u["_id"]] = Viewer(
                u["_id"], role, visibility_scope(person, role, tree, department_of)
            )
        snapshot = AccessSnapshot(viewers)
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
