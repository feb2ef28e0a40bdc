"""The CRM, wired: access, settings, counters, records and activities over one store."""

from __future__ import annotations

from dataclasses import dataclass

from server.counters.crm import CounterSettings, CrmCounters
from server.crm.access import CrmAccess, role_name
from server.crm.activities import ActivityService
from server.crm.config import CrmConfig
from server.crm.core import CrmCore
from server.crm.models import CrmMe
from server.crm.records import RecordService
from server.crm.rules import may_grant_roles, may_manage_settings, sees_others
from server.directory.models import WorkgroupOut
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.events.streams import StreamLog
from server.im.service import ImService
from server.settings import Settings
from server.store.database import Document, Store
from server.web.problems import forbidden


@dataclass
class Crm:
    access: CrmAccess
    config: CrmConfig
    counters: CrmCounters
    records: RecordService
    activities: ActivityService

    @classmethod
    def build(
        cls,
        settings: Settings,
        store: Store,
        streams: StreamLog,
        bus: EventBus,
        directory: DirectoryService,
        im: ImService,
    ) -> Crm:
        access = CrmAccess(store, bus)
        config = CrmConfig(store, access)

        async def counter_settings() -> CounterSettings:
            cfg = await config.counter_config()
            return CounterSettings(cfg.mode, cfg.window)

        counters = CrmCounters(
            store,
            bus,
            counter_settings,
            settings.default_time_zone,
            cache_max_entries=settings.cache_max_entries,
            cache_ttl_seconds=settings.cache_ttl_seconds,
            cache_stale_seconds=settings.cache_stale_seconds,
        )
        core = CrmCore(store, streams, access, config, counters, directory, im)
        activities = ActivityService(core)
        crm = cls(access, config, counters, RecordService(core, activities), activities)
        config.on_counter_rules_changed.append(counters.recount_everyone)
        counters.on_time_passed.append(core.announce_records)

        async def deals_reopened(user_ids: list[str]) -> None:
            counters.touch(user_ids, ["deal"])

        config.on_deals_reopened.append(deals_reopened)
        directory.user_hooks.append(crm.user_changed)
        directory.user_created_hooks.append(counters.user_created)
        directory.workgroup_hooks.append(crm)
        directory.membership_guards.append(crm.check_new_members)
        return crm

    # Workgroups can hold CRM roles: a membership change changes who sees what.
    async def workgroup_created(self, owner: Document, group: WorkgroupOut) -> None:
        self.access.invalidate()

    async def workgroup_members_added(self, group_id: str, user_ids: list[str]) -> None:
        self.access.invalidate()

    async def workgroup_member_removed(self, group_id: str, user_id: str) -> None:
        self.access.invalidate()

    async def check_new_members(self, actor: Document, group_id: str, user_ids: list[str]) -> None:
        """Adding people to a workgroup that holds a CRM role gives them that role: only CRM
        administrators may, as with any grant. Members whose role it does not raise (they hold
        as much anyway, or are extranet users, whom workgroup roles do not reach) may be added
        by the workgroup's moderators as before."""
        if may_grant_roles((await self.access.viewer(str(actor["_id"]))).role):
            return
        if await self.access.raised_by_joining(group_id, user_ids):
            raise forbidden(
                "this workgroup holds a CRM role that these members would gain; only CRM "
                "administrators may give CRM roles"
            )

    async def user_changed(self, user_id: str, fields: frozenset[str]) -> None:
        if fields & {"department_id", "is_active", "is_admin", "is_external"}:
            await self.access.changed()
        if "time_zone" in fields:
            self.counters.touch([user_id])

    async def me(self, user_id: str) -> CrmMe:
        viewer = await self.access.viewer(user_id)
        zone = (await self.counters.time_zones([user_id]))[user_id]
        return CrmMe(
            role=role_name(viewer.role),
            sees_others=sees_others(viewer.role),
            may_manage_settings=may_manage_settings(viewer.role),
            time_zone=zone.key,
        )

    async def require_admin(self, user_id: str) -> None:
        if not may_manage_settings((await self.access.viewer(user_id)).role):
            raise forbidden("CRM administrators only")

    async def require_member(self, user_id: str) -> None:
        """Any CRM role: what the CRM is set up like is the CRM's own business too."""
        await self.records.core.member(user_id)
