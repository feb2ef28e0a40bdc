"""CRM settings (counter mode, due window, deal stages, custom fields, default role) and
role grants. Settings are one document; reads are cached briefly since every counter
computation needs the mode."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from server.caching import SharedLoad
from server.counters.rules import CounterMode, DueWindow
from server.crm.access import CrmAccess
from server.crm.models import (
    CrmSettings,
    CrmSettingsUpdate,
    FieldDefOut,
    RoleGrantIn,
    RoleGrantOut,
    StageOut,
)
from server.crm.rules import (
    DEFAULT_DEAL_STAGES,
    FieldDef,
    FieldType,
    Stage,
    StageSemantics,
    validate_field_defs,
    validate_stages,
)
from server.store.database import Store, new_id, utcnow
from server.web.problems import Problem, conflict, not_found

SETTINGS_TTL_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class CounterConfig:
    mode: CounterMode
    window: DueWindow


def default_settings() -> CrmSettings:
    return CrmSettings(
        deal_stages=[
            StageOut(id=s.id, name=s.name, semantics=s.semantics.value) for s in DEFAULT_DEAL_STAGES
        ],
        custom_fields={"lead": [], "contact": [], "company": [], "deal": []},
    )


def field_defs(defs: list[FieldDefOut]) -> list[FieldDef]:
    return [FieldDef(d.code, d.name, FieldType(d.type), tuple(d.options), d.required) for d in defs]


def stages_of(settings: CrmSettings) -> list[Stage]:
    return [Stage(s.id, s.name, StageSemantics(s.semantics)) for s in settings.deal_stages]


class CrmConfig:
    def __init__(self, store: Store, access: CrmAccess) -> None:
        self._store = store
        self._access = access
        self._cached: CrmSettings | None = None
        self._cached_at = 0.0
        self._generation = 0  # bumped by an update here: a read begun before is not kept
        self._reading: SharedLoad[CrmSettings] = SharedLoad()
        # Told when the counter mode or due window changes: every counter is recounted.
        self.on_counter_rules_changed: list[Callable[[], Awaitable[None]]] = []
        # Told whose deals opened or closed because a stage's meaning changed (idle counters).
        self.on_deals_reopened: list[Callable[[list[str]], Awaitable[None]]] = []

    async def settings(self) -> CrmSettings:
        if self._cached is not None and time.monotonic() - self._cached_at < SETTINGS_TTL_SECONDS:
            return self._cached
        # One read for every caller asking while it is under way (a connect burst).
        return await self._reading.run(self._generation, self._read)

    async def _read(self) -> CrmSettings:
        taken = time.monotonic()
        generation = self._generation
        doc = await self._store["crm_settings"].find_one({"_id": "settings"})
        found = default_settings()
        if doc is not None:
            data: dict[str, Any] = {**found.model_dump(), **doc}
            data.pop("_id", None)
            data.pop("updated_at", None)
            found = CrmSettings.model_validate(data)
        if generation == self._generation:  # else an update here came after this read
            self._cached, self._cached_at = found, taken
        return found

    async def counter_config(self) -> CounterConfig:
        s = await self.settings()
        return CounterConfig(CounterMode(s.counter_mode), DueWindow(s.due_minutes_before))

    async def update(self, patch: CrmSettingsUpdate) -> CrmSettings:
        current = await self.settings()
        changes = patch.model_dump(exclude_unset=True)
        if "custom_fields" in changes:  # per record type: types left out keep their fields
            changes["custom_fields"] = {
                **current.model_dump()["custom_fields"],
                **changes["custom_fields"],
            }
        merged = CrmSettings.model_validate({**current.model_dump(), **changes})
        try:
            validate_stages(stages_of(merged))
            for defs in merged.custom_fields.values():
                validate_field_defs(field_defs(defs))
        except ValueError as exc:
            raise Problem(422, "invalid-value", "Invalid value", str(exc)) from None
        if "deal_stages" in changes:
            kept = {stage.id for stage in merged.deal_stages}
            in_use = await self._store["crm_records"].distinct("stage_id", {"type": "deal"})
            orphaned = sorted(set(in_use) - kept)
            if orphaned:
                raise conflict(
                    f"deals are in the stage(s) {', '.join(orphaned)}: move them before "
                    "removing the stage"
                )
        await self._store["crm_settings"].update_one(
            {"_id": "settings"},
            {"$set": {**merged.model_dump(), "updated_at": utcnow()}},
            upsert=True,
        )
        if "deal_stages" in changes:
            await self._apply_stage_semantics(merged)
        self._generation += 1
        self._cached = merged
        self._cached_at = time.monotonic()
        await self._access.changed()
        counting = (current.counter_mode, current.due_minutes_before)
        if counting != (merged.counter_mode, merged.due_minutes_before):
            for hook in self.on_counter_rules_changed:
                await hook()
        return merged

    async def _apply_stage_semantics(self, settings: CrmSettings) -> None:
        """A stage that became won/lost closes its deals (and reopens them the other way)."""
        touched: set[str] = set()
        for stage in settings.deal_stages:
            query = {
                "type": "deal",
                "stage_id": stage.id,
                "stage_semantics": {"$ne": stage.semantics},
            }
            touched.update(await self._store["crm_records"].distinct("responsible_id", query))
            await self._store["crm_records"].update_many(
                query,
                {
                    "$set": {
                        "stage_semantics": stage.semantics,
                        "open": stage.semantics == "process",
                    }
                },
            )
        if touched:
            for hook in self.on_deals_reopened:
                await hook(sorted(touched))

    # role grants -----------------------------------------------------------------------------

    async def grants(self) -> list[RoleGrantOut]:
        return [
            RoleGrantOut(id=g["_id"], **{k: g[k] for k in ("role", "subject_kind", "subject_id")})
            async for g in self._store["crm_roles"].find({}).sort("_id", 1)
        ]

    async def grant(self, data: RoleGrantIn) -> RoleGrantOut:
        collection = {"user": "users", "department": "departments", "workgroup": "workgroups"}
        if (
            await self._store[collection[data.subject_kind]].find_one({"_id": data.subject_id})
            is None
        ):
            raise not_found(f"the {data.subject_kind} {data.subject_id}")
        existing = await self._store["crm_roles"].find_one(
            {"subject_kind": data.subject_kind, "subject_id": data.subject_id}
        )
        grant_id = existing["_id"] if existing else new_id()
        await self._store["crm_roles"].update_one(
            {"_id": grant_id}, {"$set": data.model_dump()}, upsert=True
        )
        await self._access.changed()
        return RoleGrantOut(id=grant_id, **data.model_dump())

    async def revoke(self, grant_id: str) -> None:
        result = await self._store["crm_roles"].delete_one({"_id": grant_id})
        if result.deleted_count == 0:
            raise not_found(f"no role grant {grant_id}")
        await self._access.changed()
