"""CRM routes: records of the four types, duplicates, conversion, activities, settings, roles.

Record routes are declared once per type (``/api/v1/crm/leads``, ``.../contacts``,
``.../companies``, ``.../deals``) so each has its own request schema in the OpenAPI document.
"""

from __future__ import annotations

from server.crm.models import (
    CREATE_MODELS,
    PLURAL,
    UPDATE_MODELS,
    ActivityCreate,
    ActivityFields,
    ActivityList,
    ActivityMove,
    ActivityOut,
    ActivityQuery,
    ConversionCandidates,
    ConversionResult,
    ConvertRequest,
    CounterCheckReport,
    CounterCheckRequest,
    CrmMe,
    CrmSettings,
    CrmSettingsUpdate,
    DuplicateList,
    DuplicateProbe,
    HistoryList,
    MergeRequest,
    RecordDetail,
    RecordFields,
    RecordList,
    RecordQuery,
    RoleGrantIn,
    RoleGrantList,
    RoleGrantOut,
)
from server.crm.rules import ConversionMode
from server.services import services
from server.web.api import Call, HandlerFn
from server.web.routes import api

TAG = "crm"


def _declare_record_routes(record_type: str) -> None:
    plural = PLURAL[record_type]
    base = f"/api/v1/crm/{plural}"
    create_model = CREATE_MODELS[record_type]
    update_model = UPDATE_MODELS[record_type]

    async def create(call: Call) -> RecordDetail:
        body = call.body_as(create_model)
        return await services(call.request).crm.records.create(call.user_id, record_type, body)

    async def find(call: Call) -> RecordList:
        return await services(call.request).crm.records.find(
            call.user_id, record_type, call.query_as(RecordQuery)
        )

    async def get(call: Call) -> RecordDetail:
        return await services(call.request).crm.records.get(
            call.user_id, record_type, call.path("record_id")
        )

    async def update(call: Call) -> RecordDetail:
        body: RecordFields = call.body_as(update_model)
        return await services(call.request).crm.records.update(
            call.user_id, record_type, call.path("record_id"), body
        )

    async def delete(call: Call) -> None:
        await services(call.request).crm.records.delete(
            call.user_id, record_type, call.path("record_id")
        )

    async def history(call: Call) -> HistoryList:
        return HistoryList(
            history=await services(call.request).crm.records.history(
                call.user_id, record_type, call.path("record_id")
            )
        )

    declared: list[tuple[str, str, dict[str, object], HandlerFn]] = [
        (
            "POST",
            base,
            {
                "summary": f"Create a {record_type}",
                "body": create_model,
                "response": RecordDetail,
                "status": 201,
                "errors": (403, 409, 422),
                "description": "Answers 409 `possible-duplicates` when records with the same "
                "email, phone, name or company title exist (not for deals): `duplicates` lists "
                "those the caller may see, `hidden` says whether others match too; send "
                "`ignore_duplicates: true` to create anyway.",
            },
            create,
        ),
        (
            "GET",
            base,
            {
                "summary": f"{plural.capitalize()} the caller may see, newest first",
                "query": RecordQuery,
                "response": RecordList,
                "errors": (403, 422),
                "description": "Each record carries its activity `indicator` for the caller.",
            },
            find,
        ),
        (
            "GET",
            base + "/{record_id}",
            {
                "summary": f"One {record_type}, with its links",
                "response": RecordDetail,
                "errors": (403, 404),
            },
            get,
        ),
        (
            "PATCH",
            base + "/{record_id}",
            {
                "summary": f"Change a {record_type}",
                "body": update_model,
                "response": RecordDetail,
                "errors": (403, 404, 409, 422),
            },
            update,
        ),
        (
            "DELETE",
            base + "/{record_id}",
            {
                "summary": f"Delete a {record_type} and its activities",
                "status": 204,
                "errors": (403, 404),
            },
            delete,
        ),
        (
            "GET",
            base + "/{record_id}/history",
            {
                "summary": f"The history of a {record_type}",
                "response": HistoryList,
                "errors": (403, 404),
            },
            history,
        ),
    ]
    for method, path, options, handler in declared:
        handler.__name__ = f"{handler.__name__}_{record_type}"
        api.route(method, path, tag=TAG, **options)(handler)  # type: ignore[arg-type]


for _type in PLURAL:
    _declare_record_routes(_type)


@api.route(
    "POST",
    "/api/v1/crm/duplicates",
    summary="Possible duplicates of a record being typed",
    tag=TAG,
    body=DuplicateProbe,
    response=DuplicateList,
    errors=(403,),
    stores=False,  # a search
)
async def check_duplicates(call: Call) -> DuplicateList:
    """Same email, same phone digits, same full name or company title, across leads,
    contacts and companies. Only matches the caller may see are listed; `hidden` says whether
    any other record matches, and nothing more about it."""
    return await services(call.request).crm.records.check_duplicates(
        call.user_id, call.body_as(DuplicateProbe)
    )


@api.route(
    "POST",
    "/api/v1/crm/leads/{record_id}/convert",
    summary="Convert a lead",
    tag=TAG,
    body=ConvertRequest,
    response=ConversionResult,
    status=201,
    errors=(403, 404, 409, 422),
)
async def convert_lead(call: Call) -> ConversionResult:
    """Modes: contact, company, contact+company, deal, deal+contact, deal+contact+company.
    Creates (or, with `contact_id` / `company_id`, uses existing) records and links them,
    marks the lead converted, keeps references both ways, and moves the lead's e-mails to
    `emails_to`. A contact or company to make that matches existing ones by the duplicate
    rules answers 409 `possible-duplicates` with `contacts`, `companies` and `hidden`, unless
    `ignore_duplicates`."""
    body = call.body_as(ConvertRequest)
    existing = {
        t: rid for t, rid in (("contact", body.contact_id), ("company", body.company_id)) if rid
    }
    return await services(call.request).crm.records.convert(
        call.user_id,
        call.path("record_id"),
        ConversionMode(body.mode),
        existing=existing,
        emails_to=body.emails_to,
        ignore_duplicates=body.ignore_duplicates,
    )


@api.route(
    "GET",
    "/api/v1/crm/leads/{record_id}/convert/candidates",
    summary="Existing contacts and companies a lead's conversion could use",
    tag=TAG,
    response=ConversionCandidates,
    errors=(403, 404),
)
async def conversion_candidates(call: Call) -> ConversionCandidates:
    """Found by the duplicate rules (same e-mail, phone, full name; a company's title) among
    the records the caller sees; `hidden` says whether others match too."""
    return await services(call.request).crm.records.conversion_candidates(
        call.user_id, call.path("record_id")
    )


def _declare_merge_route(record_type: str) -> None:
    plural = PLURAL[record_type]

    async def merge(call: Call) -> RecordDetail:
        return await services(call.request).crm.records.merge(
            call.user_id, record_type, call.path("record_id"), call.body_as(MergeRequest).other_id
        )

    merge.__name__ = f"merge_{record_type}"
    api.route(
        "POST",
        f"/api/v1/crm/{plural}/{{record_id}}/merge",
        summary=f"Merge a duplicate {record_type} into this one",
        tag=TAG,
        body=MergeRequest,
        response=RecordDetail,
        errors=(403, 404, 409, 422),
        description="This record survives: it keeps its values and takes in what it lacks "
        "from `other_id` (names, source, e-mails and phones it does not have, comments, custom "
        "fields); links to the other (a deal's contacts, a company's contacts and deals, the "
        "records converted from a lead), its activities with their mail, and its history move "
        "here; then the other is deleted (`crm.record.removed` with `merged_into`). The caller "
        "must see both.",
    )(merge)


for _type in ("lead", "contact", "company"):
    _declare_merge_route(_type)


# activities ----------------------------------------------------------------------------------


@api.route(
    "POST",
    "/api/v1/crm/activities",
    summary="Log or plan an activity on a record",
    tag=TAG,
    body=ActivityCreate,
    response=ActivityOut,
    status=201,
    errors=(403, 404, 422),
)
async def create_activity(call: Call) -> ActivityOut:
    return await services(call.request).crm.activities.create(
        call.user_id, call.body_as(ActivityCreate)
    )


@api.route(
    "GET",
    "/api/v1/crm/activities",
    summary="Activities: the caller's own by default, or a record's timeline",
    tag=TAG,
    query=ActivityQuery,
    response=ActivityList,
    errors=(403, 404),
)
async def list_activities(call: Call) -> ActivityList:
    """Without `owner_id`: "my activities" (or a subordinate's, for heads), filterable by
    record type, type, status and deadline state. With `owner_type` + `owner_id`: the
    record's timeline."""
    return ActivityList(
        activities=await services(call.request).crm.activities.find(
            call.user_id, call.query_as(ActivityQuery)
        )
    )


@api.route(
    "GET",
    "/api/v1/crm/activities/{activity_id}",
    summary="One activity",
    tag=TAG,
    response=ActivityOut,
    errors=(404,),
)
async def get_activity(call: Call) -> ActivityOut:
    return await services(call.request).crm.activities.get(call.user_id, call.path("activity_id"))


@api.route(
    "PATCH",
    "/api/v1/crm/activities/{activity_id}",
    summary="Change, re-assign, re-date or complete an activity",
    tag=TAG,
    body=ActivityFields,
    response=ActivityOut,
    errors=(404, 409, 422),
)
async def update_activity(call: Call) -> ActivityOut:
    return await services(call.request).crm.activities.update(
        call.user_id, call.path("activity_id"), call.body_as(ActivityFields)
    )


@api.route(
    "POST",
    "/api/v1/crm/activities/{activity_id}/move",
    summary="Put an e-mail activity on another record",
    tag=TAG,
    body=ActivityMove,
    response=ActivityOut,
    errors=(403, 404, 409, 422),
)
async def move_activity(call: Call) -> ActivityOut:
    """By someone who sees both records. Its reply code and thread follow it (later replies
    land on the new record); both records' viewers are told live (`crm.activity.removed` on
    the old, `crm.activity.updated` on the new) and both histories get `activity_moved`."""
    body = call.body_as(ActivityMove)
    return await services(call.request).crm.activities.move(
        call.user_id, call.path("activity_id"), body.owner_type, body.owner_id
    )


@api.route(
    "DELETE",
    "/api/v1/crm/activities/{activity_id}",
    summary="Delete an activity",
    tag=TAG,
    status=204,
    errors=(404,),
)
async def delete_activity(call: Call) -> None:
    await services(call.request).crm.activities.delete(call.user_id, call.path("activity_id"))


# settings and roles --------------------------------------------------------------------------


@api.route("GET", "/api/v1/crm/me", summary="The caller's CRM role", tag=TAG, response=CrmMe)
async def crm_me(call: Call) -> CrmMe:
    return await services(call.request).crm.me(call.user_id)


@api.route(
    "GET",
    "/api/v1/crm/settings",
    summary="CRM settings (any CRM role)",
    tag=TAG,
    response=CrmSettings,
    errors=(403,),
)
async def get_crm_settings(call: Call) -> CrmSettings:
    crm = services(call.request).crm
    await crm.require_member(call.user_id)
    return await crm.config.settings()


@api.route(
    "PATCH",
    "/api/v1/crm/settings",
    summary="Change CRM settings (CRM administrators)",
    tag=TAG,
    body=CrmSettingsUpdate,
    response=CrmSettings,
    errors=(403, 422),
)
async def update_crm_settings(call: Call) -> CrmSettings:
    """Switching `counter_mode` or `due_minutes_before` recounts and re-pushes everyone's
    counters."""
    crm = services(call.request).crm
    await crm.require_admin(call.user_id)
    return await crm.config.update(call.body_as(CrmSettingsUpdate))


@api.route(
    "GET",
    "/api/v1/crm/roles",
    summary="CRM role grants (CRM administrators)",
    tag=TAG,
    response=RoleGrantList,
    errors=(403,),
)
async def list_roles(call: Call) -> RoleGrantList:
    crm = services(call.request).crm
    await crm.require_admin(call.user_id)
    return RoleGrantList(grants=await crm.config.grants())


@api.route(
    "PUT",
    "/api/v1/crm/roles",
    summary="Give a CRM role to a user, department or workgroup (CRM administrators)",
    tag=TAG,
    body=RoleGrantIn,
    response=RoleGrantOut,
    errors=(403, 404),
)
async def grant_role(call: Call) -> RoleGrantOut:
    """One grant per subject: giving another role replaces it. A user holding several
    (own, department's, workgroups') gets the highest. Extranet users get only a role granted
    to them by name."""
    crm = services(call.request).crm
    await crm.require_admin(call.user_id)
    return await crm.config.grant(call.body_as(RoleGrantIn))


@api.route(
    "DELETE",
    "/api/v1/crm/roles/{grant_id}",
    summary="Remove a role grant (CRM administrators)",
    tag=TAG,
    status=204,
    errors=(403, 404),
)
async def revoke_role(call: Call) -> None:
    crm = services(call.request).crm
    await crm.require_admin(call.user_id)
    await crm.config.revoke(call.path("grant_id"))


@api.route(
    "POST",
    "/api/v1/crm/counters/check",
    summary="Recount everyone's CRM counters from the activities (CRM administrators)",
    tag=TAG,
    body=CounterCheckRequest,
    response=CounterCheckReport,
    errors=(403,),
)
async def check_counters(call: Call) -> CounterCheckReport:
    """The same check as `portalhub counters check`; with `repair`, the corrected numbers
    are pushed to connected users at once."""
    crm = services(call.request).crm
    await crm.require_admin(call.user_id)
    report = await crm.counters.check(repair=call.body_as(CounterCheckRequest).repair)
    return CounterCheckReport(
        users=report.users_checked,
        open_activities=report.activities_checked,
        differences=report.counter_differences,
        stale_activities=report.stale_activities,
        stale_records=report.stale_records,
        repaired=report.repaired,
    )
