"""The pure CRM rules: stages, open records, roles and scopes, company links, lead conversion,
duplicates, custom fields and change history."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.crm.rules import (
    DEFAULT_DEAL_STAGES,
    LEAD_STATUSES,
    MATCH_FIELDS,
    MAX_DUPLICATES_SHOWN,
    RECORD_TYPES,
    Candidate,
    ConversionMode,
    CrmRole,
    CrmUser,
    DuplicateReport,
    FieldChange,
    FieldDef,
    FieldType,
    Probe,
    RoleGrant,
    Scope,
    Stage,
    StageSemantics,
    changes,
    clean_custom_values,
    company_from_lead,
    contact_from_lead,
    contacts_for_company_link,
    creates,
    deal_from_lead,
    duplicate_report,
    effective_role,
    find_duplicates,
    joining_raises_role,
    matched_fields,
    may_convert,
    may_grant_roles,
    may_manage_settings,
    may_see,
    merged_record,
    normal_email,
    normal_name,
    phone_digits,
    phones_match,
    record_is_open,
    remembered_selection,
    sees_others,
    validate_field_defs,
    validate_stages,
    visibility_scope,
    with_added,
)
from server.directory.rules import DepartmentNode

# --- deal stages ----------------------------------------------------------------------------

PROCESS, WON, LOST = StageSemantics.PROCESS, StageSemantics.WON, StageSemantics.LOST


def test_default_stages_are_valid_and_in_bitrix_order() -> None:
    validate_stages(DEFAULT_DEAL_STAGES)
    assert [(s.id, s.semantics) for s in DEFAULT_DEAL_STAGES] == [
        ("new", PROCESS),
        ("preparation", PROCESS),
        ("proposal", PROCESS),
        ("negotiation", PROCESS),
        ("won", WON),
        ("lost", LOST),
    ]


def test_stage_defaults_to_process() -> None:
    assert Stage("x", "X").semantics is PROCESS


def test_smallest_valid_pipeline_and_several_lost_stages() -> None:
    validate_stages([Stage("a", "A"), Stage("w", "W", WON), Stage("l", "L", LOST)])
    validate_stages(
        [Stage("a", "A"), Stage("w", "W", WON), Stage("l1", "L", LOST), Stage("l2", "L", LOST)]
    )


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "at least one stage"),
        ([Stage("w", "W", WON), Stage("l", "L", LOST)], "process"),
        ([Stage("a", "A"), Stage("l", "L", LOST)], "exactly one won"),
        (
            [Stage("a", "A"), Stage("w1", "W", WON), Stage("w2", "W", WON), Stage("l", "L", LOST)],
            "exactly one won",
        ),
        ([Stage("a", "A"), Stage("w", "W", WON)], "lost"),
        (
            [Stage("a", "A"), Stage("a", "B"), Stage("w", "W", WON), Stage("l", "L", LOST)],
            "used twice",
        ),
        ([Stage("a", " "), Stage("w", "W", WON), Stage("l", "L", LOST)], "name"),
    ],
)
def test_invalid_pipelines(stages: list[Stage], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_stages(stages)


@pytest.mark.parametrize("stage_id", ["", "A", "with-dash", "a b", "é", "x" * 33, "ok\n"])
def test_invalid_stage_ids(stage_id: str) -> None:
    with pytest.raises(ValueError, match="id must be"):
        validate_stages([Stage(stage_id, "S"), Stage("w", "W", WON), Stage("l", "L", LOST)])


@pytest.mark.parametrize("stage_id", ["a", "0", "in_work_2", "x" * 32])
def test_valid_stage_ids(stage_id: str) -> None:
    validate_stages([Stage(stage_id, "S"), Stage("w", "W", WON), Stage("l", "L", LOST)])


# --- open records ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "is_open"),
    [
        ("new", True),
        ("in_progress", True),
        ("processed", True),
        ("converted", False),
        ("junk", False),
    ],
)
def test_lead_open_by_status(status: str, is_open: bool) -> None:
    assert status in LEAD_STATUSES
    assert record_is_open("lead", status, None) is is_open


@pytest.mark.parametrize(
    ("semantics", "is_open"), [(PROCESS, True), (WON, False), (LOST, False), (None, False)]
)
def test_deal_open_by_stage_semantics(semantics: StageSemantics | None, is_open: bool) -> None:
    assert record_is_open("deal", None, semantics) is is_open


@pytest.mark.parametrize("record_type", ["contact", "company"])
def test_contacts_and_companies_are_always_open(record_type: str) -> None:
    assert record_is_open(record_type, None, None)
    assert record_is_open(record_type, "junk", LOST)


def test_record_types_and_unknown_type() -> None:
    assert RECORD_TYPES == ("lead", "contact", "company", "deal")
    with pytest.raises(ValueError, match="unknown CRM record type"):
        record_is_open("invoice", None, None)


# --- roles ----------------------------------------------------------------------------------


def tree_of(*nodes: tuple[str, str | None, str | None]) -> dict[str, DepartmentNode]:
    return {dept_id: DepartmentNode(dept_id, parent, head) for dept_id, parent, head in nodes}


# company                  head: ceo
# +-- sales                head: sam
# |   +-- sales-north      head: nora
# |   |   +-- north-field  head: None
# |   +-- sales-south      head: None
# +-- it                   head: None
# +-- support              head: hana (hana is placed in "it", not in "support")
TREE = tree_of(
    ("company", None, "ceo"),
    ("sales", "company", "sam"),
    ("sales-north", "sales", "nora"),
    ("north-field", "sales-north", None),
    ("sales-south", "sales", None),
    ("it", "company", None),
    ("support", "company", "hana"),
)
DEPARTMENT_OF: dict[str, str | None] = {
    "ceo": "company",
    "sam": "sales",
    "nora": "sales-north",
    "nick": "sales-north",
    "fred": "north-field",
    "sue": "sales-south",
    "ivan": "it",
    "hana": "it",
    "sven": "support",
    "drifter": None,
}


def user(user_id: str, **changes: Any) -> CrmUser:
    return dataclasses.replace(CrmUser(user_id, DEPARTMENT_OF[user_id]), **changes)


def test_no_grant_gives_the_default() -> None:
    assert effective_role(user("fred"), [], TREE) is CrmRole.MANAGER
    assert effective_role(user("fred"), [], TREE, default=CrmRole.NONE) is CrmRole.NONE
    unrelated = [
        RoleGrant(CrmRole.ADMIN, "user", "sue"),
        RoleGrant(CrmRole.ADMIN, "department", "sales-south"),
        RoleGrant(CrmRole.ADMIN, "workgroup", "g9"),
    ]
    assert effective_role(user("fred"), unrelated, TREE) is CrmRole.MANAGER


def test_grant_to_the_user() -> None:
    grants = [RoleGrant(CrmRole.CHIEF, "user", "fred")]
    assert effective_role(user("fred"), grants, TREE) is CrmRole.CHIEF


def test_grant_to_own_department() -> None:
    grants = [RoleGrant(CrmRole.HEAD, "department", "north-field")]
    assert effective_role(user("fred"), grants, TREE) is CrmRole.HEAD


def test_grant_to_a_parent_department_reaches_subdepartment_members() -> None:
    grants = [RoleGrant(CrmRole.HEAD, "department", "sales")]
    assert effective_role(user("fred"), grants, TREE) is CrmRole.HEAD
    assert effective_role(user("sue"), grants, TREE) is CrmRole.HEAD
    # not upwards, not sideways
    assert effective_role(user("ceo"), grants, TREE) is CrmRole.MANAGER
    assert effective_role(user("ivan"), grants, TREE) is CrmRole.MANAGER
    assert effective_role(user("drifter"), grants, TREE) is CrmRole.MANAGER


def test_grant_to_a_workgroup() -> None:
    grants = [RoleGrant(CrmRole.CHIEF, "workgroup", "g1")]
    member = user("ivan", workgroup_ids=frozenset({"g0", "g1"}))
    assert effective_role(member, grants, TREE) is CrmRole.CHIEF
    assert effective_role(user("ivan"), grants, TREE) is CrmRole.MANAGER


def test_grant_kinds_do_not_mix_ids() -> None:
    # a workgroup called like a department, a department called like a user
    grants = [
        RoleGrant(CrmRole.ADMIN, "workgroup", "sales"),
        RoleGrant(CrmRole.ADMIN, "department", "fred"),
        RoleGrant(CrmRole.ADMIN, "user", "north-field"),
    ]
    assert effective_role(user("fred"), grants, TREE) is CrmRole.MANAGER


def test_highest_of_several_grants_wins() -> None:
    grants = [
        RoleGrant(CrmRole.NONE, "user", "fred"),
        RoleGrant(CrmRole.CHIEF, "department", "company"),
        RoleGrant(CrmRole.HEAD, "workgroup", "g1"),
    ]
    member = user("fred", workgroup_ids=frozenset({"g1"}))
    assert effective_role(member, grants, TREE) is CrmRole.CHIEF
    assert effective_role(member, grants[:1] + grants[2:], TREE) is CrmRole.HEAD


def test_a_none_grant_denies_only_when_nothing_higher_applies() -> None:
    deny = RoleGrant(CrmRole.NONE, "user", "fred")
    assert effective_role(user("fred"), [deny], TREE) is CrmRole.NONE
    assert effective_role(user("fred"), [deny], TREE, default=CrmRole.CHIEF) is CrmRole.NONE
    more = [deny, RoleGrant(CrmRole.MANAGER, "department", "sales")]
    assert effective_role(user("fred"), more, TREE) is CrmRole.MANAGER


def test_portal_admins_are_crm_admins_whatever_the_grants() -> None:
    admin = user("fred", is_portal_admin=True)
    assert effective_role(admin, [RoleGrant(CrmRole.NONE, "user", "fred")], TREE) is CrmRole.ADMIN
    assert effective_role(admin, [], TREE, default=CrmRole.NONE) is CrmRole.ADMIN


# Extranet users: only a grant naming them counts (issue 13, item 10).

EVERY_GRANT_BUT_THEIR_OWN = [
    RoleGrant(CrmRole.CHIEF, "department", "company"),
    RoleGrant(CrmRole.CHIEF, "department", "north-field"),
    RoleGrant(CrmRole.CHIEF, "workgroup", "g1"),
    RoleGrant(CrmRole.ADMIN, "user", "nick"),
]


def outsider(**changes: Any) -> CrmUser:
    """An extranet user placed in a department (an admin may) and in workgroup g1."""
    return dataclasses.replace(
        CrmUser("fred", "north-field", frozenset({"g1"}), is_external=True), **changes
    )


def test_extranet_users_do_not_get_the_default_role() -> None:
    for default in CrmRole:
        assert effective_role(outsider(), [], TREE, default=default) is CrmRole.NONE
    assert effective_role(user("fred"), [], TREE) is CrmRole.MANAGER  # the employee does


def test_department_and_workgroup_grants_do_not_reach_extranet_users() -> None:
    assert effective_role(outsider(), EVERY_GRANT_BUT_THEIR_OWN, TREE) is CrmRole.NONE
    # the same person as an employee would be chief twice over
    employee = outsider(is_external=False)
    assert effective_role(employee, EVERY_GRANT_BUT_THEIR_OWN, TREE) is CrmRole.CHIEF


@pytest.mark.parametrize("role", list(CrmRole))
def test_a_grant_naming_the_extranet_user_gives_them_that_role(role: CrmRole) -> None:
    grants = [*EVERY_GRANT_BUT_THEIR_OWN, RoleGrant(role, "user", "fred")]
    assert effective_role(outsider(), grants, TREE, default=CrmRole.ADMIN) is role


def test_an_extranet_portal_admin_is_still_a_crm_admin() -> None:
    assert effective_role(outsider(is_portal_admin=True), [], TREE) is CrmRole.ADMIN


def test_joining_a_workgroup_with_a_higher_role_raises_an_employee() -> None:
    grants = [RoleGrant(CrmRole.CHIEF, "workgroup", "g7")]
    assert joining_raises_role(user("ivan"), "g7", grants, TREE)
    assert not joining_raises_role(user("ivan"), "g8", grants, TREE)  # a group without a role


def test_joining_raises_nobody_who_holds_as_much_already() -> None:
    grants = [
        RoleGrant(CrmRole.HEAD, "workgroup", "g7"),
        RoleGrant(CrmRole.CHIEF, "user", "sue"),
        RoleGrant(CrmRole.HEAD, "department", "sales"),
    ]
    assert not joining_raises_role(user("sue"), "g7", grants, TREE)  # chief anyway
    assert not joining_raises_role(user("fred"), "g7", grants, TREE)  # head through sales
    assert joining_raises_role(user("ivan"), "g7", grants, TREE)
    # a role no higher than the default gives nothing; with a lower default it does
    manager = [RoleGrant(CrmRole.MANAGER, "workgroup", "g7")]
    assert not joining_raises_role(user("ivan"), "g7", manager, TREE)
    assert joining_raises_role(user("ivan"), "g7", manager, TREE, default=CrmRole.NONE)
    # a NONE grant never takes anything away, so it never raises either
    deny = [RoleGrant(CrmRole.NONE, "workgroup", "g7")]
    assert not joining_raises_role(user("ivan"), "g7", deny, TREE, default=CrmRole.NONE)
    # already a member: nothing changes
    member = user("ivan", workgroup_ids=frozenset({"g7"}))
    assert not joining_raises_role(member, "g7", grants, TREE)


def test_joining_raises_no_extranet_user() -> None:
    grants = [RoleGrant(CrmRole.ADMIN, "workgroup", "g7")]
    assert not joining_raises_role(outsider(), "g7", grants, TREE)
    assert not joining_raises_role(outsider(), "g7", grants, TREE, default=CrmRole.ADMIN)


def test_only_crm_admins_grant_roles() -> None:
    assert [r for r in CrmRole if may_grant_roles(r)] == [CrmRole.ADMIN]


def test_unknown_grant_subject_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="subject kind"):
        RoleGrant(CrmRole.HEAD, "team", "x")


def test_roles_are_ordered() -> None:
    assert list(CrmRole) == sorted(CrmRole)
    assert [r.name for r in CrmRole] == ["NONE", "MANAGER", "HEAD", "CHIEF", "ADMIN"]


@pytest.mark.parametrize(
    ("role", "others", "settings"),
    [
        (CrmRole.NONE, False, False),
        (CrmRole.MANAGER, False, False),
        (CrmRole.HEAD, True, False),
        (CrmRole.CHIEF, True, False),
        (CrmRole.ADMIN, True, True),
    ],
)
def test_role_capabilities(role: CrmRole, others: bool, settings: bool) -> None:
    assert sees_others(role) is others
    assert may_manage_settings(role) is settings


# --- scopes ---------------------------------------------------------------------------------


def scope_of(user_id: str, role: CrmRole) -> Scope:
    return visibility_scope(user(user_id), role, TREE, DEPARTMENT_OF)


def test_none_sees_nothing_not_even_own() -> None:
    scope = scope_of("fred", CrmRole.NONE)
    assert scope == Scope(everyone=False, user_ids=frozenset())
    assert not may_see(scope, "fred")


def test_manager_sees_own_only() -> None:
    scope = scope_of("nick", CrmRole.MANAGER)
    assert scope == Scope(everyone=False, user_ids=frozenset({"nick"}))
    assert may_see(scope, "nick")
    assert not may_see(scope, "nora")


def test_head_sees_own_department_and_below_but_not_siblings_or_above() -> None:
    scope = scope_of("nora", CrmRole.HEAD)
    assert not scope.everyone
    assert scope.user_ids == {"nora", "nick", "fred"}
    assert not may_see(scope, "sue")  # sibling department
    assert not may_see(scope, "sam")  # the department above


def test_head_role_for_a_plain_member_covers_their_department() -> None:
    # the role, not the head_id, decides: nick heads nothing and still sees his department
    assert scope_of("nick", CrmRole.HEAD).user_ids == {"nick", "nora", "fred"}


def test_head_of_a_department_they_are_not_a_member_of() -> None:
    scope = scope_of("hana", CrmRole.HEAD)
    # "it", where she is placed, and "support", which she heads
    assert scope.user_ids == {"hana", "ivan", "sven"}


def test_head_high_in_the_tree_sees_all_below() -> None:
    assert scope_of("sam", CrmRole.HEAD).user_ids == {"sam", "nora", "nick", "fred", "sue"}


def test_head_without_department_sees_own_only() -> None:
    assert scope_of("drifter", CrmRole.HEAD).user_ids == {"drifter"}


@pytest.mark.parametrize("role", [CrmRole.CHIEF, CrmRole.ADMIN])
def test_chief_and_admin_see_everyone(role: CrmRole) -> None:
    scope = scope_of("ivan", role)
    assert scope.everyone
    assert may_see(scope, "fred")
    assert may_see(scope, "someone-not-in-the-directory")


# --- links ----------------------------------------------------------------------------------


def test_with_added_keeps_order_and_drops_duplicates() -> None:
    assert with_added(["a", "b"], ["c", "a", "d", "c"]) == ["a", "b", "c", "d"]
    assert with_added([], []) == []
    assert with_added(["a", "a"], []) == ["a"]


def test_company_link_memory_scenario() -> None:
    company = ["c1", "c2", "c3"]

    # first link: all of the company's contacts
    offered = contacts_for_company_link(company, None)
    assert offered == ["c1", "c2", "c3"]

    # the user removes c2 from the deal and also adds someone from elsewhere
    deal_contacts = ["c3", "x9", "c1"]
    remembered = remembered_selection(company, deal_contacts)
    assert remembered == ["c1", "c3"]  # company order, outsiders not remembered

    # the same company on another deal: only the kept ones
    assert contacts_for_company_link(company, remembered) == ["c1", "c3"]

    # c3 leaves the company, c4 joins: c3 is not added, nor c4 while something is remembered
    company = ["c1", "c2", "c4"]
    assert contacts_for_company_link(company, remembered) == ["c1"]

    # added to what the deal already has, without doubles
    assert with_added(["x9", "c1"], contacts_for_company_link(company, remembered)) == [
        "x9",
        "c1",
    ]


def test_remembering_nothing_adds_nothing() -> None:
    assert contacts_for_company_link(["c1", "c2"], []) == []
    assert remembered_selection(["c1", "c2"], []) == []


def test_company_without_contacts() -> None:
    assert contacts_for_company_link([], None) == []
    assert contacts_for_company_link([], ["c1"]) == []


# --- lead conversion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "types"),
    [
        (ConversionMode.CONTACT, ("contact",)),
        (ConversionMode.COMPANY, ("company",)),
        (ConversionMode.CONTACT_COMPANY, ("company", "contact")),
        (ConversionMode.DEAL, ("deal",)),
        (ConversionMode.DEAL_CONTACT, ("contact", "deal")),
        (ConversionMode.DEAL_CONTACT_COMPANY, ("company", "contact", "deal")),
    ],
)
def test_conversion_creates(mode: ConversionMode, types: tuple[str, ...]) -> None:
    assert creates(mode) == types
    # the mode's name lists the same types
    assert set(mode.value.split("+")) == set(types)


def test_conversion_modes_by_value() -> None:
    assert ConversionMode("deal+contact+company") is ConversionMode.DEAL_CONTACT_COMPANY


@pytest.mark.parametrize(
    ("status", "allowed"),
    [
        ("new", True),
        ("in_progress", True),
        ("processed", True),
        ("converted", False),
        ("junk", False),
    ],
)
def test_may_convert(status: str, allowed: bool) -> None:
    assert may_convert(status) is allowed


def make_lead(**changes: Any) -> dict[str, Any]:
    lead: dict[str, Any] = {
        "id": "L1",
        "title": "Website request",
        "first_name": "Anna",
        "last_name": "Berg",
        "company_title": "Berg GmbH",
        "emails": [{"type": "work", "value": "anna@berg.example"}],
        "phones": [{"type": "mobile", "number": "+49 170 1234567"}],
        "source": "web",
        "comments": "Wants a quote",
        "amount": 1200.5,
        "currency": "EUR",
        "custom_fields": {"industry": "retail"},
        "responsible_id": "nick",
        "status": "in_progress",
    }
    lead.update(changes)
    return lead


def test_contact_from_lead() -> None:
    lead = make_lead()
    assert contact_from_lead(lead) == {
        "first_name": "Anna",
        "last_name": "Berg",
        "emails": [{"type": "work", "value": "anna@berg.example"}],
        "phones": [{"type": "mobile", "number": "+49 170 1234567"}],
        "source": "web",
        "comments": "Wants a quote",
        "responsible_id": "nick",
        "custom_fields": {"industry": "retail"},
        "lead_id": "L1",
    }


def test_contact_from_a_lead_without_a_name_is_named_after_the_title() -> None:
    contact = contact_from_lead(make_lead(first_name="", last_name=None))
    assert (contact["first_name"], contact["last_name"]) == ("", "Website request")
    # one of the names is enough
    contact = contact_from_lead(make_lead(first_name="Anna", last_name=""))
    assert (contact["first_name"], contact["last_name"]) == ("Anna", "")


def test_company_from_lead() -> None:
    assert company_from_lead(make_lead()) == {
        "title": "Berg GmbH",
        "emails": [{"type": "work", "value": "anna@berg.example"}],
        "phones": [{"type": "mobile", "number": "+49 170 1234567"}],
        "source": "web",
        "comments": "Wants a quote",
        "responsible_id": "nick",
        "custom_fields": {"industry": "retail"},
        "lead_id": "L1",
    }


def test_company_from_a_lead_without_company_title_takes_the_lead_title() -> None:
    assert company_from_lead(make_lead(company_title=""))["title"] == "Website request"
    assert company_from_lead(make_lead(company_title=None))["title"] == "Website request"


def test_deal_from_lead() -> None:
    assert deal_from_lead(make_lead()) == {
        "title": "Website request",
        "amount": 1200.5,
        "currency": "EUR",
        "source": "web",
        "comments": "Wants a quote",
        "responsible_id": "nick",
        "custom_fields": {"industry": "retail"},
        "lead_id": "L1",
    }


def test_conversion_of_a_sparse_lead() -> None:
    lead = {"id": "L2", "title": "Call back", "responsible_id": "sue"}
    contact = contact_from_lead(lead)
    assert contact["emails"] == contact["phones"] == []
    assert contact["custom_fields"] == {}
    assert contact["source"] == contact["comments"] == ""
    assert contact["last_name"] == "Call back"
    deal = deal_from_lead(lead)
    assert (deal["amount"], deal["currency"]) == (None, None)


def test_conversion_does_not_share_mutable_values_with_the_lead() -> None:
    lead = make_lead()
    for record in (contact_from_lead(lead), company_from_lead(lead), deal_from_lead(lead)):
        record["custom_fields"]["industry"] = "changed"
        for key in ("emails", "phones"):
            if key in record:
                record[key][0]["type"] = "changed"
                record[key].append({})
    assert lead == make_lead()


# --- duplicates -----------------------------------------------------------------------------


def test_normalisation() -> None:
    assert normal_email("  Anna.Berg@Example.COM ") == "anna.berg@example.com"
    assert phone_digits("+49 (30) 123-45 67") == "49301234567"
    assert phone_digits("call me") == ""
    assert phone_digits("١٢٣٤٥") == ""  # Arabic-Indic digits are not dialled here
    assert normal_name("  Anna \t  BERG ") == "anna berg"
    assert normal_name("Straße") == normal_name("STRASSE")


@given(st.text())
def test_normalisation_is_idempotent(s: str) -> None:
    assert normal_email(normal_email(s)) == normal_email(s)
    assert phone_digits(phone_digits(s)) == phone_digits(s)
    assert normal_name(normal_name(s)) == normal_name(s)


def test_probe_of_normalises_and_drops_empties() -> None:
    probe = Probe.of(
        emails=[" A@B.example", "", "a@b.EXAMPLE"],
        phones=["+49 30 1234567", "n/a"],
        first_name=" Anna ",
        last_name="BERG",
        company_title="  Berg   GmbH ",
    )
    assert probe == Probe(
        emails=frozenset({"a@b.example"}),
        phones=frozenset({"49301234567"}),
        full_name="anna berg",
        company_title="berg gmbh",
    )
    assert Probe.of() == Probe(frozenset(), frozenset(), "", "")


def cand(record_type: str = "contact", record_id: str = "1", **fields: Any) -> Candidate:
    return Candidate.of(
        type=record_type,
        id=record_id,
        title=f"{record_type} {record_id}",
        responsible_id="u1",
        **fields,
    )


def test_candidate_of_normalises_like_probe() -> None:
    c = cand(emails=["X@Y.example"], phones=["030 1234567"], first_name="A", last_name="B")
    assert (c.emails, c.phones, c.full_name, c.company_title) == (
        frozenset({"x@y.example"}),
        frozenset({"0301234567"}),
        "a b",
        "",
    )
    assert (c.type, c.id, c.title, c.responsible_id) == ("contact", "1", "contact 1", "u1")


def test_match_by_each_field() -> None:
    probe = Probe.of(
        emails=["anna@berg.example"],
        phones=["030 1234567"],
        first_name="Anna",
        last_name="Berg",
        company_title="Berg GmbH",
    )
    assert matched_fields(probe, cand(emails=["ANNA@berg.example", "x@y.example"])) == ("email",)
    assert matched_fields(probe, cand(phones=["+49 30 1234567"])) == ("phone",)
    assert matched_fields(probe, cand(first_name="anna", last_name=" berg")) == ("name",)
    assert matched_fields(probe, cand("company", company_title="BERG gmbh")) == ("company",)
    assert matched_fields(probe, cand(emails=["other@berg.example"], first_name="Anna")) == ()


def test_match_on_several_fields_in_field_order() -> None:
    probe = Probe.of(
        emails=["anna@berg.example"],
        phones=["030 1234567"],
        first_name="Anna",
        last_name="Berg",
        company_title="Berg GmbH",
    )
    everything = cand(
        "lead",
        company_title="Berg GmbH",
        last_name="Berg",
        first_name="Anna",
        phones=["0301234567"],
        emails=["anna@berg.example"],
    )
    assert (
        matched_fields(probe, everything) == MATCH_FIELDS == ("email", "phone", "name", "company")
    )


def test_empty_fields_never_match() -> None:
    empty_probe = Probe.of()
    empty_candidate = cand()
    assert matched_fields(empty_probe, empty_candidate) == ()
    # even records built without the classmethods, holding empty strings
    raw = Probe(frozenset({""}), frozenset({""}), "", "")
    raw_candidate = Candidate("lead", "9", "t", "u", frozenset({""}), frozenset({""}), "", "")
    assert matched_fields(raw, raw_candidate) == ()
    assert find_duplicates(empty_probe, [empty_candidate]) == []


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        ("+49 30 1234567", "030 1234567", True),  # country code vs trunk prefix
        ("0049 30 1234567", "+49 30 1234567", True),  # international prefix 00
        ("+1 (555) 123-4567", "555.123.4567", True),
        ("030 1234567", "1234567", True),  # without area code: 7 digits
        ("+49 30 1234567", "+49 40 1234567", False),  # another city
        ("030 1234567", "030 1234568", False),
        ("12345", "12345", True),  # a short extension, written the same way
        ("1234", "1234", False),  # too short to mean anything
        ("0123456", "123456", False),  # a common 6-digit tail is not enough
        ("+49 30 1234567", "234567", False),
        ("", "", False),
    ],
)
def test_phone_matching(a: str, b: str, match: bool) -> None:
    assert phones_match(phone_digits(a), phone_digits(b)) is match
    assert phones_match(phone_digits(b), phone_digits(a)) is match
    probe = Probe.of(phones=[a])
    assert (matched_fields(probe, cand(phones=[b])) == ("phone",)) is match


@given(st.text(alphabet="0123456789", max_size=14), st.text(alphabet="0123456789", max_size=14))
def test_phone_matching_is_symmetric(a: str, b: str) -> None:
    assert phones_match(a, b) == phones_match(b, a)


def test_name_match_needs_the_full_name() -> None:
    probe = Probe.of(first_name="Anna", last_name="Berg")
    assert matched_fields(probe, cand(last_name="Berg")) == ()
    assert matched_fields(Probe.of(last_name="Berg"), cand(last_name="Berg")) == ("name",)


def test_find_duplicates_orders_strongest_first_then_by_type() -> None:
    probe = Probe.of(
        emails=["anna@berg.example"], phones=["030 1234567"], first_name="Anna", last_name="Berg"
    )
    company_email = cand("company", "k1", emails=["anna@berg.example"])
    contact_phone = cand("contact", "c1", phones=["+49301234567"])
    lead_name = cand("lead", "l1", first_name="Anna", last_name="Berg")
    contact_two = cand(
        "contact", "c2", emails=["anna@berg.example"], first_name="Anna", last_name="Berg"
    )
    lead_three = cand(
        "lead",
        "l2",
        emails=["anna@berg.example"],
        phones=["0301234567"],
        first_name="Anna",
        last_name="Berg",
    )
    stranger = cand("contact", "c3", emails=["x@y.example"])
    deal = cand("deal", "d1", emails=["anna@berg.example"])
    found = find_duplicates(
        probe, [company_email, stranger, deal, contact_phone, lead_name, contact_two, lead_three]
    )
    assert [(c.type, c.id, fields) for c, fields in found] == [
        ("lead", "l2", ("email", "phone", "name")),
        ("contact", "c2", ("email", "name")),
        ("lead", "l1", ("name",)),
        ("contact", "c1", ("phone",)),
        ("company", "k1", ("email",)),
        ("deal", "d1", ("email",)),  # an unexpected type goes last
    ]


def test_find_duplicates_keeps_the_given_order_among_equals() -> None:
    probe = Probe.of(emails=["a@b.example"])
    first, second = (cand("contact", i, emails=["a@b.example"]) for i in ("z", "a"))
    assert [c.id for c, _ in find_duplicates(probe, [first, second])] == ["z", "a"]


def test_find_duplicates_excludes_the_record_being_edited() -> None:
    probe = Probe.of(emails=["a@b.example"])
    me = cand("contact", "c1", emails=["a@b.example"])
    lead_same_id = cand("lead", "c1", emails=["a@b.example"])
    found = find_duplicates(probe, [me, lead_same_id], exclude=("contact", "c1"))
    assert [(c.type, c.id) for c, _ in found] == [("lead", "c1")]


def test_find_duplicates_lists_a_candidate_once() -> None:
    probe = Probe.of(emails=["a@b.example"], phones=["030 1234567"])
    by_email = cand("contact", "c1", emails=["a@b.example"], phones=["030 1234567"])
    found = find_duplicates(probe, [by_email, by_email])
    assert [(c.id, fields) for c, fields in found] == [("c1", ("email", "phone"))]


def owned(candidate: Candidate, responsible_id: str) -> Candidate:
    return dataclasses.replace(candidate, responsible_id=responsible_id)


def test_duplicate_report_lists_only_visible_matches_and_flags_the_others() -> None:
    probe = Probe.of(emails=["a@b.example"], first_name="Ann", last_name="Lee")
    mine = owned(cand("contact", "c1", emails=["a@b.example"]), "me")
    theirs = owned(
        cand("lead", "l1", emails=["a@b.example"], first_name="Ann", last_name="Lee"), "x"
    )
    stranger = owned(cand("company", "k1", emails=["z@b.example"]), "x")
    report = duplicate_report(probe, [theirs, mine, stranger], lambda uid: uid == "me")
    assert report == DuplicateReport(shown=[(mine, ("email",))], hidden=True)
    # nothing matches that the caller may not see: no flag
    report = duplicate_report(probe, [mine, stranger], lambda uid: uid == "me")
    assert report == DuplicateReport(shown=[(mine, ("email",))], hidden=False)
    # only invisible matches: nothing listed, but the caller is warned
    assert duplicate_report(probe, [theirs], lambda uid: False) == DuplicateReport([], True)


def test_duplicate_report_does_not_count_invisible_matches() -> None:
    probe = Probe.of(emails=["a@b.example"])
    hidden = [owned(cand("lead", f"h{i}", emails=["a@b.example"]), "x") for i in range(30)]
    shown = [owned(cand("contact", f"s{i}", emails=["a@b.example"]), "me") for i in range(30)]
    one = duplicate_report(probe, [*hidden[:1], *shown], lambda uid: uid == "me")
    many = duplicate_report(probe, [*hidden, *shown], lambda uid: uid == "me")
    # one invisible match or thirty: the same answer, and they crowd out no visible one
    assert one == many
    assert [c.id for c, _ in many.shown] == [f"s{i}" for i in range(MAX_DUPLICATES_SHOWN)]


def test_duplicate_report_excludes_only_a_record_the_caller_sees() -> None:
    probe = Probe.of(emails=["a@b.example"])
    mine = owned(cand("contact", "c1", emails=["a@b.example"]), "me")
    theirs = owned(cand("contact", "c2", emails=["a@b.example"]), "x")

    def sees(responsible_id: str) -> bool:
        return responsible_id == "me"

    assert duplicate_report(probe, [mine], sees, exclude=("contact", "c1")) == DuplicateReport(
        [], False
    )
    # "exclude c2" must not turn the warning off: that would tell that c2 is the match
    assert duplicate_report(probe, [theirs], sees, exclude=("contact", "c2")).hidden
    assert duplicate_report(probe, [theirs], sees, exclude=("contact", "nope")).hidden


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["lead", "contact", "company"]),
            st.sampled_from(["a@b.example", "c@d.example"]),
            st.sampled_from(["me", "boss", "other"]),
        ),
        max_size=40,
    )
)
def test_duplicate_report_tells_nothing_but_one_flag_of_what_is_hidden(
    rows: list[tuple[str, str, str]],
) -> None:
    probe = Probe.of(emails=["a@b.example"])
    visible = {"me", "boss"}
    candidates = [
        owned(cand(t, f"r{i}", emails=[email]), who) for i, (t, email, who) in enumerate(rows)
    ]
    report = duplicate_report(probe, candidates, visible.__contains__)
    # the answer is the one for the visible records alone, plus whether anything else matched
    alone = duplicate_report(
        probe, [c for c in candidates if c.responsible_id in visible], visible.__contains__
    )
    assert report.shown == alone.shown
    assert report.hidden == any(
        c.responsible_id not in visible and "a@b.example" in c.emails for c in candidates
    )


# --- custom fields --------------------------------------------------------------------------

DEFS = (
    FieldDef("note", "Note", FieldType.STRING),
    FieldDef("budget", "Budget", FieldType.NUMBER),
    FieldDef("met_on", "Met on", FieldType.DATE),
    FieldDef("vip", "VIP", FieldType.BOOL),
    FieldDef("size", "Size", FieldType.LIST, options=("small", "large")),
    FieldDef("region", "Region", FieldType.STRING, required=True),
)


def test_valid_field_defs() -> None:
    validate_field_defs(DEFS)
    validate_field_defs([])
    validate_field_defs([FieldDef(f"f{i}", "F", FieldType.BOOL) for i in range(50)])
    validate_field_defs([FieldDef("a" + "b" * 31, "F", FieldType.BOOL)])


@pytest.mark.parametrize(
    ("defs", "message"),
    [
        ([FieldDef("1abc", "X", FieldType.STRING)], "code must"),
        ([FieldDef("_abc", "X", FieldType.STRING)], "code must"),
        ([FieldDef("Abc", "X", FieldType.STRING)], "code must"),
        ([FieldDef("a-b", "X", FieldType.STRING)], "code must"),
        ([FieldDef("", "X", FieldType.STRING)], "code must"),
        ([FieldDef("a" * 33, "X", FieldType.STRING)], "code must"),
        ([FieldDef("ab\n", "X", FieldType.STRING)], "code must"),
        ([FieldDef("a", "X", FieldType.STRING), FieldDef("a", "Y", FieldType.BOOL)], "twice"),
        ([FieldDef("a", " ", FieldType.STRING)], "name"),
        ([FieldDef("a", "X", FieldType.LIST)], "at least one option"),
        ([FieldDef("a", "X", FieldType.LIST, options=("x", "y", "x"))], "listed twice"),
        ([FieldDef("a", "X", FieldType.LIST, options=("x", " "))], "option is empty"),
        ([FieldDef("a", "X", FieldType.STRING, options=("x",))], "only list fields"),
        ([FieldDef(f"f{i}", "F", FieldType.BOOL) for i in range(51)], "at most 50"),
    ],
)
def test_invalid_field_defs(defs: list[FieldDef], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_field_defs(defs)


def test_clean_values_of_every_type() -> None:
    values = {
        "vip": True,
        "note": "call after lunch",
        "budget": 10,
        "met_on": "2024-02-29",
        "size": "large",
        "region": "north",
    }
    cleaned = clean_custom_values(DEFS, values)
    assert cleaned == values
    assert list(cleaned) == ["note", "budget", "met_on", "vip", "size", "region"]  # defs order
    assert clean_custom_values(DEFS, {"region": "x", "budget": 2.5})["budget"] == 2.5
    assert clean_custom_values(DEFS, {"region": "x", "vip": False}) == {"region": "x", "vip": False}
    assert clean_custom_values(DEFS, {"region": "x", "budget": 0}) == {"region": "x", "budget": 0}
    assert clean_custom_values(DEFS, {"region": "x" * 2000})["region"] == "x" * 2000


@pytest.mark.parametrize(
    ("code", "value", "message"),
    [
        ("note", 5, "expected text"),
        ("note", "x" * 2001, "at most 2000"),
        ("budget", "10", "expected a number"),
        ("budget", True, "expected a number"),
        ("budget", math.inf, "finite"),
        ("budget", math.nan, "finite"),
        ("met_on", "2024-02-30", "not a calendar date"),
        ("met_on", "20240101", "YYYY-MM-DD"),
        ("met_on", "2024-01-01T10:00", "YYYY-MM-DD"),
        ("met_on", "2024-1-1", "YYYY-MM-DD"),
        ("met_on", 20240101, "YYYY-MM-DD"),
        ("vip", 1, "true or false"),
        ("vip", "true", "true or false"),
        ("size", "medium", "one of 'small', 'large'"),
        ("size", ["small"], "one of"),
    ],
)
def test_wrong_types_are_refused(code: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        clean_custom_values(DEFS, {"region": "x", code: value})
    assert repr(code) in str(error.value)
    with pytest.raises(ValueError, match=message):
        clean_custom_values(DEFS, {code: value}, partial=True)


def test_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown custom field 'colour'"):
        clean_custom_values(DEFS, {"region": "x", "colour": "red"})
    with pytest.raises(ValueError, match="unknown custom field"):
        clean_custom_values(DEFS, {"colour": None}, partial=True)


def test_required_field_missing_or_cleared() -> None:
    with pytest.raises(ValueError, match="'region' is required"):
        clean_custom_values(DEFS, {"note": "x"})
    for cleared in (None, "", "   "):
        with pytest.raises(ValueError, match="'region' is required"):
            clean_custom_values(DEFS, {"region": cleared})
        # a partial write may leave it out, but not clear it
        with pytest.raises(ValueError, match="'region' is required"):
            clean_custom_values(DEFS, {"region": cleared}, partial=True)
    assert clean_custom_values(DEFS, {"note": "x"}, partial=True) == {"note": "x"}


def test_none_clears_a_value() -> None:
    assert clean_custom_values(DEFS, {"region": "x", "note": None, "budget": None}) == {
        "region": "x"
    }
    assert clean_custom_values(DEFS, {"note": "", "budget": None}, partial=True) == {
        "note": None,
        "budget": None,
    }


def test_no_defs_no_values() -> None:
    assert clean_custom_values([], {}) == {}
    assert clean_custom_values([], {}, partial=True) == {}


# --- history --------------------------------------------------------------------------------


def test_changes_lists_differing_fields_in_the_given_order() -> None:
    before = {"title": "A", "amount": 10, "stage_id": "new", "source": "web"}
    after = {"title": "B", "amount": 10, "stage_id": "won", "source": "web"}
    assert changes(before, after, ["stage_id", "amount", "title"]) == [
        FieldChange("stage_id", "new", "won"),
        FieldChange("title", "A", "B"),
    ]


def test_changes_treats_missing_as_none() -> None:
    assert changes({}, {"comments": None}, ["comments"]) == []
    assert changes({}, {"comments": "hi"}, ["comments"]) == [FieldChange("comments", None, "hi")]
    assert changes({"amount": 5}, {}, ["amount"]) == [FieldChange("amount", 5, None)]


def test_changes_compares_nested_values_and_ignores_other_fields() -> None:
    before = {"emails": [{"type": "work", "value": "a@b.example"}], "x": 1}
    after = {"emails": [{"type": "home", "value": "a@b.example"}], "x": 2}
    assert changes(before, after, ["emails"]) == [
        FieldChange("emails", before["emails"], after["emails"])
    ]
    assert changes(before, dict(before), ["emails", "x"]) == []
    assert changes(before, after, []) == []


# --- merging duplicates ---------------------------------------------------------------------


def test_merge_keeps_the_survivors_values_and_takes_in_what_it_lacks() -> None:
    survivor: dict[str, Any] = {
        "type": "contact",
        "first_name": "Hans",
        "last_name": "",
        "emails": [{"type": "work", "value": "Hans@Acme.example"}],
        "phones": [{"type": "work", "number": "+49 30 1234567"}],
        "source": "",
        "comments": "met at the fair",
        "custom_fields": {"size": None, "region": "north"},
        "company_ids": ["c1"],
    }
    other = {
        "type": "contact",
        "first_name": "Hannes",
        "last_name": "Meier",
        "emails": [
            {"type": "home", "value": "hans@acme.example"},
            {"type": "home", "value": "h.meier@mail.example"},
        ],
        "phones": [
            {"type": "mobile", "number": "+49-30-1234567"},
            {"type": "mobile", "number": "0171 5"},
        ],
        "source": "web",
        "comments": "asked for a quote",
        "custom_fields": {"size": 50, "region": "south"},
        "company_ids": ["c2", "c1"],
    }
    assert merged_record(survivor, other) == {
        "last_name": "Meier",  # the survivor's first name stays
        "emails": [survivor["emails"][0], {"type": "home", "value": "h.meier@mail.example"}],
        "phones": [survivor["phones"][0], {"type": "mobile", "number": "0171 5"}],
        "source": "web",
        "comments": "met at the fair\n\nasked for a quote",
        "custom_fields": {"size": 50, "region": "north"},
        "company_ids": ["c1", "c2"],
    }


def test_merging_a_record_with_nothing_new_changes_nothing() -> None:
    company = {"type": "company", "title": "Acme", "emails": [], "phones": [], "comments": "x"}
    assert merged_record(company, {**company, "title": "ACME Inc"}) == {}
    assert merged_record({**company, "comments": ""}, company) == {"comments": "x"}


def test_only_leads_contacts_and_companies_of_one_type_are_merged() -> None:
    with pytest.raises(ValueError):
        merged_record({"type": "deal"}, {"type": "deal"})
    with pytest.raises(ValueError):
        merged_record({"type": "lead"}, {"type": "contact"})
