"""The rules of the CRM: when a record is open, who sees whose records, which contacts a deal
takes from its company, what a lead converts into, which records look like duplicates, what
admin-defined fields accept, and what changed. Pure, no I/O.

Access follows Bitrix24's CRM roles, simplified to one ladder (``CrmRole``): a manager works
with the records they are responsible for, a head of department also with those of everyone
in the departments they belong to or head, a chief executive with everybody's, and an
administrator also changes the settings. A user's role is the highest granted to them, to a
department above them or to one of their workgroups, so adding a grant never takes a right
away. Extranet (external) users are the exception, as in Bitrix24: only a grant naming them
gives them a CRM role.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from enum import IntEnum, StrEnum
from typing import Any

from server.directory.rules import DepartmentNode, ancestors, descendants
from server.text import describe, find_xml_illegal

RECORD_TYPES: tuple[str, ...] = ("lead", "contact", "company", "deal")

LEAD_STATUSES: tuple[str, ...] = ("new", "in_progress", "processed", "converted", "junk")
LEAD_CLOSED_STATUSES: frozenset[str] = frozenset({"converted", "junk"})
"""A lead in these is finished with: it is not open, counts for nobody, and is not converted."""


# --- deal stages ----------------------------------------------------------------------------


class StageSemantics(StrEnum):
    PROCESS = "process"  # still being worked on
    WON = "won"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Stage:
    id: str
    name: str
    semantics: StageSemantics = StageSemantics.PROCESS


DEFAULT_DEAL_STAGES: tuple[Stage, ...] = (
    Stage("new", "New"),
    Stage("preparation", "Preparation"),
    Stage("proposal", "Proposal"),
    Stage("negotiation", "Negotiation"),
    Stage("won", "Won", StageSemantics.WON),
    Stage("lost", "Lost", StageSemantics.LOST),
)

_STAGE_ID = re.compile(r"[a-z0-9_]{1,32}")


def validate_stages(stages: Sequence[Stage]) -> None:
    """Raises ``ValueError`` unless ``stages`` is a usable deal pipeline.

    A deal must be able to be worked on, and to end well or badly: at least one process
    stage and one lost stage (several reasons to lose are common), and exactly one won stage,
    so that "won" is a single, unambiguous place to close a deal in and count it.
    """
    if not stages:
        raise ValueError("deal stages: at least one stage is required")
    seen: set[str] = set()
    for stage in stages:
        # fullmatch: ``$`` in a pattern would let a trailing newline through
        if not _STAGE_ID.fullmatch(stage.id):
            raise ValueError(f"deal stage {stage.id!r}: the id must be 1 to 32 of a-z, 0-9 and _")
        if stage.id in seen:
            raise ValueError(f"deal stage {stage.id!r}: the id is used twice")
        if not stage.name.strip():
            raise ValueError(f"deal stage {stage.id!r}: the name must not be empty")
        seen.add(stage.id)
    count = {s: sum(1 for stage in stages if stage.semantics is s) for s in StageSemantics}
    if count[StageSemantics.PROCESS] < 1:
        raise ValueError("deal stages: at least one process stage is required")
    if count[StageSemantics.WON] != 1:
        raise ValueError(
            f"deal stages: exactly one won stage is required, not {count[StageSemantics.WON]}"
        )
    if count[StageSemantics.LOST] < 1:
        raise ValueError("deal stages: at least one lost stage is required")


def record_is_open(
    record_type: str, status: str | None, stage_semantics: StageSemantics | None
) -> bool:
    """Whether the record is still being worked on. Contacts and companies never close; a
    deal whose stage is unknown (``None``) is treated as closed rather than counted as work
    nobody can move on."""
    if record_type == "lead":
        return status not in LEAD_CLOSED_STATUSES
    if record_type == "deal":
        return stage_semantics is StageSemantics.PROCESS
    if record_type in ("contact", "company"):
        return True
    raise ValueError(f"unknown CRM record type {record_type!r}")


# --- roles ----------------------------------------------------------------------------------


class CrmRole(IntEnum):
    """Ordered: each role may do what the ones below it may."""

    NONE = 0  # no CRM access at all
    MANAGER = 1  # the records they are responsible for
    HEAD = 2  # also those of their department's and subdepartments' members
    CHIEF = 3  # everybody's records
    ADMIN = 4  # everybody's records, and the CRM settings


GRANT_SUBJECT_KINDS: tuple[str, ...] = ("user", "department", "workgroup")


@dataclass(frozen=True, slots=True)
class RoleGrant:
    role: CrmRole
    subject_kind: str  # one of GRANT_SUBJECT_KINDS
    subject_id: str

    def __post_init__(self) -> None:
        # A misspelt kind would otherwise match nobody, silently granting nothing.
        if self.subject_kind not in GRANT_SUBJECT_KINDS:
            raise ValueError(f"CRM role grant: unknown subject kind {self.subject_kind!r}")


@dataclass(frozen=True, slots=True)
class CrmUser:
    id: str
    department_id: str | None
    workgroup_ids: frozenset[str] = frozenset()
    is_portal_admin: bool = False
    is_external: bool = False


def effective_role(
    user: CrmUser,
    grants: Iterable[RoleGrant],
    tree: Mapping[str, DepartmentNode],
    default: CrmRole = CrmRole.MANAGER,
) -> CrmRole:
    """The highest role granted to the user, to their department or any department above it,
    or to one of their workgroups; ``default`` when no grant applies.

    Portal admins are always CRM admins, so that no grant can lock the portal's owners out of
    the CRM settings. A grant of NONE is the lowest of all: it only denies access where
    nothing higher applies, since "highest wins" is what makes grants predictable.

    An extranet user gets only what a grant naming them gives, else NONE: not the default
    (meant for the staff), not a department's grant (the company's structure is not theirs),
    and not a workgroup's - their workgroups are where the staff work with outsiders, and any
    moderator may add an outsider to one, so a workgroup's role would reach them by accident.
    """
    if user.is_portal_admin:
        return CrmRole.ADMIN
    if user.is_external:
        named = (g.role for g in grants if g.subject_kind == "user" and g.subject_id == user.id)
        return max(named, default=CrmRole.NONE)
    departments = set(ancestors(user.department_id, tree))
    applicable = [
        grant.role
        for grant in grants
        if (grant.subject_kind == "user" and grant.subject_id == user.id)
        or (grant.subject_kind == "department" and grant.subject_id in departments)
        or (grant.subject_kind == "workgroup" and grant.subject_id in user.workgroup_ids)
    ]
    return max(applicable, default=default)


def joining_raises_role(
    user: CrmUser,
    workgroup_id: str,
    grants: Iterable[RoleGrant],
    tree: Mapping[str, DepartmentNode],
    default: CrmRole = CrmRole.MANAGER,
) -> bool:
    """Whether ``user`` joining the workgroup would give them a higher CRM role: adding them
    is then granting a role, which only CRM administrators may do. Joining a workgroup whose
    role they hold anyway, or whose role does not reach them (extranet users), grants nothing.
    """
    grants = list(grants)
    joined = replace(user, workgroup_ids=user.workgroup_ids | {workgroup_id})
    return effective_role(joined, grants, tree, default) > effective_role(
        user, grants, tree, default
    )


def may_grant_roles(role: CrmRole) -> bool:
    """Giving or changing CRM roles, also by adding someone to a workgroup holding one, is for
    CRM administrators (portal admins are always CRM admins)."""
    return role is CrmRole.ADMIN


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose records a viewer sees, by the records' responsible person. ``user_ids`` means
    nothing when ``everyone`` is set."""

    everyone: bool
    user_ids: frozenset[str]


def visibility_scope(
    viewer: CrmUser,
    role: CrmRole,
    tree: Mapping[str, DepartmentNode],
    department_of: Mapping[str, str | None],
) -> Scope:
    """The ``Scope`` of ``viewer`` holding ``role``. ``department_of`` maps every user's id to
    their department.

    A head sees the members of their own department and of every department they head, each
    with all its subdepartments: a head may lead a department without being placed in it, and
    their role was granted to them for the teams they run, not for sibling teams.
    """
    if role >= CrmRole.CHIEF:
        return Scope(everyone=True, user_ids=frozenset())
    if role is CrmRole.NONE:
        return Scope(everyone=False, user_ids=frozenset())
    if role is CrmRole.MANAGER:
        return Scope(everyone=False, user_ids=frozenset({viewer.id}))
    roots = {dept_id for dept_id, node in tree.items() if node.head_id == viewer.id}
    if viewer.department_id is not None:
        roots.add(viewer.department_id)
    covered: set[str] = set()
    for root in roots:
        covered |= descendants(root, tree)
    members = {user_id for user_id, dept_id in department_of.items() if dept_id in covered}
    return Scope(everyone=False, user_ids=frozenset(members | {viewer.id}))


def may_see(scope: Scope, responsible_id: str) -> bool:
    return scope.everyone or responsible_id in scope.user_ids


def sees_others(role: CrmRole) -> bool:
    """Whether the role sees records others are responsible for: head of department and up."""
    return role >= CrmRole.HEAD


def may_manage_settings(role: CrmRole) -> bool:
    return role is CrmRole.ADMIN


# --- links ----------------------------------------------------------------------------------


def with_added(existing: Sequence[str], added: Sequence[str]) -> list[str]:
    """``existing`` followed by what ``added`` brings that is new, each id once."""
    return list(dict.fromkeys([*existing, *added]))


def contacts_for_company_link(
    company_contact_ids: Sequence[str], remembered: Sequence[str] | None
) -> list[str]:
    """The contacts a deal takes when it is linked to a company, in the company's order.

    The first time, all of the company's contacts (``remembered`` is None). After that, Bitrix24
    remembers whom the user kept on a deal of that company, and offers those again - but only
    the ones still working for the company. A contact who joined the company since is not
    added: the user's last choice, not the company's list, says who deals are done with.
    """
    if remembered is None:
        return with_added([], company_contact_ids)
    kept = set(remembered)
    return with_added([], [c for c in company_contact_ids if c in kept])


def remembered_selection(
    company_contact_ids: Sequence[str], deal_contact_ids: Sequence[str]
) -> list[str]:
    """What to remember for the company once a deal's contacts are saved: the deal's contacts
    who work for the company, in the company's order. Others on the deal are not the company's
    to remember."""
    on_deal = set(deal_contact_ids)
    return with_added([], [c for c in company_contact_ids if c in on_deal])


# --- lead conversion ------------------------------------------------------------------------


class ConversionMode(StrEnum):
    CONTACT = "contact"
    COMPANY = "company"
    CONTACT_COMPANY = "contact+company"
    DEAL = "deal"
    DEAL_CONTACT = "deal+contact"
    DEAL_CONTACT_COMPANY = "deal+contact+company"


# Company first, then contact, then deal: each record links to the ones made before it.
_CREATES: Mapping[ConversionMode, tuple[str, ...]] = {
    ConversionMode.CONTACT: ("contact",),
    ConversionMode.COMPANY: ("company",),
    ConversionMode.CONTACT_COMPANY: ("company", "contact"),
    ConversionMode.DEAL: ("deal",),
    ConversionMode.DEAL_CONTACT: ("contact", "deal"),
    ConversionMode.DEAL_CONTACT_COMPANY: ("company", "contact", "deal"),
}


def creates(mode: ConversionMode) -> tuple[str, ...]:
    """The record types a conversion creates, in the order to create them."""
    return _CREATES[mode]


def may_convert(status: str) -> bool:
    """A lead converts once: not again after it was converted, and not once it is junk."""
    return status not in LEAD_CLOSED_STATUSES


def _text(lead: Mapping[str, Any], key: str) -> str:
    # The API leaves unset lead fields out or None; the new records want plain strings.
    value = lead.get(key)
    return value if isinstance(value, str) else ""


def _copied_entries(lead: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    # Fresh dicts, so the new record and the lead never share a mutable list.
    return [dict(entry) for entry in lead.get(key) or ()]


def _common(lead: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "source": _text(lead, "source"),
        "comments": _text(lead, "comments"),
        "responsible_id": lead["responsible_id"],
        "custom_fields": dict(lead.get("custom_fields") or {}),
        "lead_id": lead["id"],
    }


def contact_from_lead(lead: Mapping[str, Any]) -> dict[str, Any]:
    """The contact a lead converts into. A lead without a person's name still makes a contact
    with a name someone can find: its title stands in as the last name.

    ``custom_fields`` are copied as they are; the caller keeps the codes contacts define.
    """
    first_name = _text(lead, "first_name").strip()
    last_name = _text(lead, "last_name").strip()
    if not first_name and not last_name:
        last_name = _text(lead, "title").strip()
    return {
        "first_name": first_name,
        "last_name": last_name,
        "emails": _copied_entries(lead, "emails"),
        "phones": _copied_entries(lead, "phones"),
        **_common(lead),
    }


def company_from_lead(lead: Mapping[str, Any]) -> dict[str, Any]:
    """The company a lead converts into, named after the lead's company or else the lead."""
    title = _text(lead, "company_title").strip() or _text(lead, "title").strip()
    return {
        "title": title,
        "emails": _copied_entries(lead, "emails"),
        "phones": _copied_entries(lead, "phones"),
        **_common(lead),
    }


def deal_from_lead(lead: Mapping[str, Any]) -> dict[str, Any]:
    """The deal a lead converts into. Its contact and company, when the conversion makes
    them, are linked by the caller."""
    return {
        "title": _text(lead, "title").strip(),
        "amount": lead.get("amount"),
        "currency": lead.get("currency"),
        **_common(lead),
    }


# --- duplicates -----------------------------------------------------------------------------


def normal_email(s: str) -> str:
    """Addresses compare case-insensitively: nobody runs a mailbox whose case matters."""
    return s.strip().casefold()


def phone_digits(s: str) -> str:
    # ASCII only: ``str.isdigit`` would also keep superscripts and other scripts' digits.
    return "".join(ch for ch in s if "0" <= ch <= "9")


def normal_name(s: str) -> str:
    return " ".join(s.casefold().split())


@dataclass(frozen=True, slots=True)
class Probe:
    """What a record being entered is compared on; every field normalised, empties left out."""

    emails: frozenset[str]
    phones: frozenset[str]
    full_name: str
    company_title: str

    @classmethod
    def of(
        cls,
        *,
        emails: Iterable[str] = (),
        phones: Iterable[str] = (),
        first_name: str = "",
        last_name: str = "",
        company_title: str = "",
    ) -> Probe:
        return cls(
            emails=_normal_set(emails, normal_email),
            phones=_normal_set(phones, phone_digits),
            full_name=normal_name(f"{first_name} {last_name}"),
            company_title=normal_name(company_title),
        )


@dataclass(frozen=True, slots=True)
class Candidate:
    """An existing record a probe may duplicate, normalised like a ``Probe`` (build it with
    ``Candidate.of``). A company's own title is its ``company_title``."""

    type: str
    id: str
    title: str
    responsible_id: str
    emails: frozenset[str]
    phones: frozenset[str]
    full_name: str
    company_title: str

    @classmethod
    def of(
        cls,
        *,
        type: str,
        id: str,
        title: str,
        responsible_id: str,
        emails: Iterable[str] = (),
        phones: Iterable[str] = (),
        first_name: str = "",
        last_name: str = "",
        company_title: str = "",
    ) -> Candidate:
        probe = Probe.of(
            emails=emails,
            phones=phones,
            first_name=first_name,
            last_name=last_name,
            company_title=company_title,
        )
        return cls(
            type=type,
            id=id,
            title=title,
            responsible_id=responsible_id,
            emails=probe.emails,
            phones=probe.phones,
            full_name=probe.full_name,
            company_title=probe.company_title,
        )


def _normal_set(values: Iterable[str], normal: Callable[[str], str]) -> frozenset[str]:
    return frozenset(n for n in (normal(v) for v in values) if n)


MIN_PHONE_DIGITS = 5
"""Shorter numbers are too common to mean the same person; 5 still matches office extensions."""

MIN_SUFFIX_DIGITS = 7
"""A subscriber number: the shortest tail two differently written numbers must share."""


def phones_match(a: str, b: str) -> bool:
    """Whether two digit strings are the same number, written the same way or not.

    Equal strings of at least ``MIN_PHONE_DIGITS`` digits match. Otherwise the number written
    with a country code is recognised in the one written without it: leading zeros (the trunk
    prefix "0" and the international "00") are dropped, and the numbers match when one ends
    with the other and the shorter keeps at least ``MIN_SUFFIX_DIGITS`` digits. So
    +49 30 1234567 matches 030 1234567 and 0049 30 1234567, but not +49 40 1234567.
    Comparing a fixed number of trailing digits instead would not: the trunk "0" sits where the
    country code's last digit does.
    """
    if a == b:
        return len(a) >= MIN_PHONE_DIGITS
    a, b = a.lstrip("0"), b.lstrip("0")
    shorter, longer = (a, b) if len(a) <= len(b) else (b, a)
    return len(shorter) >= MIN_SUFFIX_DIGITS and longer.endswith(shorter)


MATCH_FIELDS: tuple[str, ...] = ("email", "phone", "name", "company")


def matched_fields(probe: Probe, candidate: Candidate) -> tuple[str, ...]:
    """The fields on which ``candidate`` looks like the record ``probe`` describes, in the
    order of ``MATCH_FIELDS``. An empty value matches nothing, not even another empty one."""
    found: list[str] = []
    if (probe.emails & candidate.emails) - {""}:
        found.append("email")
    if any(phones_match(p, c) for p in probe.phones for c in candidate.phones):
        found.append("phone")
    if probe.full_name and probe.full_name == candidate.full_name:
        found.append("name")
    if probe.company_title and probe.company_title == candidate.company_title:
        found.append("company")
    return tuple(found)


_TYPE_ORDER: Mapping[str, int] = {"lead": 0, "contact": 1, "company": 2}


def find_duplicates(
    probe: Probe,
    candidates: Iterable[Candidate],
    exclude: tuple[str, str] | None = None,
) -> list[tuple[Candidate, tuple[str, ...]]]:
    """The candidates matching ``probe`` on any field, with the fields, strongest first: more
    matched fields first, then leads, contacts, companies (anything else last), then in the
    order given. ``exclude`` is the (type, id) of the record being edited, which would match
    itself. A candidate given twice (found by email and by phone, say) is listed once.
    """
    found: dict[tuple[str, str], tuple[Candidate, tuple[str, ...]]] = {}
    for candidate in candidates:
        key = (candidate.type, candidate.id)
        if key == exclude or key in found:
            continue
        fields = matched_fields(probe, candidate)
        if fields:
            found[key] = (candidate, fields)
    # sorted() is stable, so equally strong candidates keep the caller's order
    return sorted(
        found.values(),
        key=lambda item: (-len(item[1]), _TYPE_ORDER.get(item[0].type, len(_TYPE_ORDER))),
    )


MAX_DUPLICATES_SHOWN = 20


@dataclass(frozen=True, slots=True)
class DuplicateReport:
    """What a caller is told about the records a probe matches: those they may see, strongest
    first, and whether any they may not see match too."""

    shown: list[tuple[Candidate, tuple[str, ...]]]
    hidden: bool


def duplicate_report(
    probe: Probe,
    candidates: Iterable[Candidate],
    sees: Callable[[str], bool],
    exclude: tuple[str, str] | None = None,
    limit: int = MAX_DUPLICATES_SHOWN,
) -> DuplicateReport:
    """The duplicates of ``probe`` as the caller may learn them. ``sees`` says whether the
    caller sees the records of a responsible person.

    Of a record the caller may not see, nothing is told: not its id, type, title, responsible
    person or matched fields, nor how many such records there are - only, once, that one
    exists (Bitrix24 says as much: "a duplicate you have no access to"), so that the user can
    ask around before entering it again. Invisible matches do not count towards ``limit``.
    ``exclude`` (the record being edited) is left out only if the caller sees it: leaving out
    an invisible record would tell whether that record matches.
    """
    listed = list(candidates)
    if exclude is not None and not any(
        (c.type, c.id) == exclude and sees(c.responsible_id) for c in listed
    ):
        exclude = None
    shown: list[tuple[Candidate, tuple[str, ...]]] = []
    hidden = False
    for candidate, fields in find_duplicates(probe, listed, exclude):
        if not sees(candidate.responsible_id):
            hidden = True
        elif len(shown) < limit:
            shown.append((candidate, fields))
    return DuplicateReport(shown, hidden)


# --- custom fields --------------------------------------------------------------------------


class FieldType(StrEnum):
    STRING = "string"
    NUMBER = "number"
    DATE = "date"  # an ISO date, "YYYY-MM-DD", kept as that string
    BOOL = "bool"
    LIST = "list"  # one of the field's options


@dataclass(frozen=True, slots=True)
class FieldDef:
    code: str
    name: str
    type: FieldType
    options: tuple[str, ...] = ()
    required: bool = False


MAX_FIELD_DEFS = 50
MAX_STRING_LENGTH = 2000
_FIELD_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def validate_field_defs(defs: Sequence[FieldDef]) -> None:
    """Raises ``ValueError`` unless ``defs`` are usable definitions for one record type.

    Options belong to list fields only: on any other type they would be kept, shown in the
    settings and never checked.
    """
    if len(defs) > MAX_FIELD_DEFS:
        raise ValueError(f"custom fields: at most {MAX_FIELD_DEFS} per record type")
    seen: set[str] = set()
    for d in defs:
        if not _FIELD_CODE.fullmatch(d.code):
            raise ValueError(
                f"custom field {d.code!r}: the code must start with a-z and have at most 32 "
                "of a-z, 0-9 and _"
            )
        if d.code in seen:
            raise ValueError(f"custom field {d.code!r}: the code is used twice")
        seen.add(d.code)
        if not d.name.strip():
            raise ValueError(f"custom field {d.code!r}: the name must not be empty")
        if d.type is FieldType.LIST:
            if not d.options:
                raise ValueError(f"custom field {d.code!r}: a list needs at least one option")
            if len(set(d.options)) != len(d.options):
                raise ValueError(f"custom field {d.code!r}: an option is listed twice")
            if any(not option.strip() for option in d.options):
                raise ValueError(f"custom field {d.code!r}: an option is empty")
        elif d.options:
            raise ValueError(f"custom field {d.code!r}: only list fields have options")


def _clean_value(d: FieldDef, value: Any) -> Any:
    """``value`` as stored for ``d``, or ``ValueError``. Never None."""
    where = f"custom field {d.code!r}"
    if d.type is FieldType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected text")
        if len(value) > MAX_STRING_LENGTH:
            raise ValueError(f"{where}: at most {MAX_STRING_LENGTH} characters")
        bad = find_xml_illegal(value)
        if bad is not None:
            raise ValueError(f"{where}: must not contain {describe(bad)}")
        return value
    if d.type is FieldType.NUMBER:
        # bool is an int to Python, but True is no amount anyone typed
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number")
        return value
    if d.type is FieldType.DATE:
        if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
            raise ValueError(f"{where}: expected a date as YYYY-MM-DD")
        try:
            date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a calendar date") from None
        return value
    if d.type is FieldType.BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
        return value
    if not isinstance(value, str) or value not in d.options:
        raise ValueError(f"{where}: expected one of {', '.join(map(repr, d.options))}")
    return value


def _is_empty(value: Any) -> bool:
    # A blank text box is how a form clears a field; it must not satisfy "required".
    return value is None or (isinstance(value, str) and not value.strip())


def clean_custom_values(
    defs: Sequence[FieldDef], values: Mapping[str, Any], partial: bool = False
) -> dict[str, Any]:
    """The custom field values to store, checked against ``defs``; ``ValueError`` otherwise.

    None or a blank string clears a value. A full write (``partial`` false) is the whole set
    of values: cleared ones are left out, and every required field must have a value. A
    partial write changes only the codes given: cleared ones are kept as None so the caller
    can unset them, and a required field may be left out but not cleared. The result follows
    the order of ``defs``.
    """
    by_code = {d.code: d for d in defs}
    for code in values:
        if code not in by_code:
            raise ValueError(f"unknown custom field {code!r}")
    cleaned: dict[str, Any] = {}
    for d in defs:
        if d.code not in values:
            if d.required and not partial:
                raise ValueError(f"custom field {d.code!r} is required")
            continue
        value = values[d.code]
        if _is_empty(value):
            if d.required:
                raise ValueError(f"custom field {d.code!r} is required")
            if partial:
                cleaned[d.code] = None
            continue
        cleaned[d.code] = _clean_value(d, value)
    return cleaned


# --- history --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    old: Any
    new: Any


def changes(
    before: Mapping[str, Any], after: Mapping[str, Any], fields: Iterable[str]
) -> list[FieldChange]:
    """The ``fields`` whose value differs between ``before`` and ``after``, in the order given.
    A field missing from a record counts as None, so leaving out an unset field is no change.
    """
    found: list[FieldChange] = []
    for name in fields:
        old, new = before.get(name), after.get(name)
        if old != new:
            found.append(FieldChange(name, old, new))
    return found


# --- merging duplicates ---------------------------------------------------------------------

MERGEABLE_TYPES: frozenset[str] = frozenset({"lead", "contact", "company"})
"""The types duplicate control looks at; deals have none and are not merged."""

# What a survivor lacks is taken from the duplicate: these, when empty on the survivor.
_FILLED: dict[str, tuple[str, ...]] = {
    "lead": ("title", "first_name", "last_name", "company_title", "amount", "source"),
    "contact": ("first_name", "last_name", "source"),
    "company": ("title", "source"),
}


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def merged_record(survivor: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """The survivor of two duplicates after taking in the other: its own values stay; what
    it lacks (a name, a source, an amount) comes from the other; e-mails and phones are the
    union, the survivor's first and no address or number twice; both comments are kept; custom
    fields it has no value for come over; a contact keeps the companies of both.

    Returns the changed fields only (an empty dict: nothing to take in)."""
    kind = str(survivor["type"])
    if kind != other.get("type") or kind not in MERGEABLE_TYPES:
        raise ValueError("only two leads, two contacts or two companies are merged")
    out: dict[str, Any] = {}
    for name in _FILLED[kind]:
        if _empty(survivor.get(name)) and not _empty(other.get(name)):
            out[name] = other[name]
    emails = list(survivor.get("emails", []))
    seen_emails = {normal_email(e["value"]) for e in emails}
    for e in other.get("emails", []):
        if normal_email(e["value"]) not in seen_emails:
            seen_emails.add(normal_email(e["value"]))
            emails.append(e)
    if len(emails) != len(survivor.get("emails", [])):
        out["emails"] = emails
    phones = list(survivor.get("phones", []))
    seen_phones = {phone_digits(p["number"]) for p in phones}
    for p in other.get("phones", []):
        if phone_digits(p["number"]) not in seen_phones:
            seen_phones.add(phone_digits(p["number"]))
            phones.append(p)
    if len(phones) != len(survivor.get("phones", [])):
        out["phones"] = phones
    mine, theirs = str(survivor.get("comments") or ""), str(other.get("comments") or "")
    if theirs.strip() and theirs.strip() not in mine:
        out["comments"] = f"{mine}\n\n{theirs}" if mine.strip() else theirs
    custom = dict(survivor.get("custom_fields") or {})
    for code, value in (other.get("custom_fields") or {}).items():
        if _empty(custom.get(code)) and not _empty(value):
            custom[code] = value
    if custom != dict(survivor.get("custom_fields") or {}):
        out["custom_fields"] = custom
    if kind == "contact":
        companies = list(
            dict.fromkeys([*survivor.get("company_ids", []), *other.get("company_ids", [])])
        )
        if companies != list(survivor.get("company_ids", [])):
            out["company_ids"] = companies
    return out
