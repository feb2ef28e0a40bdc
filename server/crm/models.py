"""CRM shapes at the API boundary: records, links, conversion, activities, settings, roles."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from server.directory.models import Email, Patch, PhoneNumber, Strict
from server.tasks.models import _aware
from server.text import NAME_TEXT, XML_TEXT

RecordType = Literal["lead", "contact", "company", "deal"]
PLURAL: dict[str, str] = {
    "lead": "leads",
    "contact": "contacts",
    "company": "companies",
    "deal": "deals",
}
SINGULAR: dict[str, str] = {plural: single for single, plural in PLURAL.items()}

# Titles, names and sources are shown inside other text (lists, notices): one line each.
Title = Annotated[str, StringConstraints(strip_whitespace=True, max_length=250), NAME_TEXT]
Name = Annotated[str, StringConstraints(strip_whitespace=True, max_length=100), NAME_TEXT]
Text = Annotated[str, StringConstraints(max_length=20_000), XML_TEXT]
Source = Annotated[str, StringConstraints(strip_whitespace=True, max_length=50), NAME_TEXT]
# Names of stages and custom fields, and a list field's options.
Label = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=60), NAME_TEXT
]
Currency = Annotated[
    str, StringConstraints(strip_whitespace=True, to_upper=True, pattern=r"^[A-Za-z]{3}$")
]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class TypedEmail(Strict):
    type: Literal["work", "home", "other"] = "work"
    value: Email


class TypedEmailOut(BaseModel):
    """An address as stored: not checked again on the way out, so that one stored before a
    rule was tightened cannot make its record unreadable."""

    type: Literal["work", "home", "other"] = "work"
    value: str


class TypedPhone(Strict):
    type: Literal["work", "mobile", "home", "fax", "other"] = "work"
    number: PhoneNumber


class RecordFields(Patch):
    """Fields every record type has. On update, left-out fields stay as they are."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    responsible_id: Id | None = Field(default=None, description="Defaults to the creator")
    emails: list[TypedEmail] | None = Field(default=None, max_length=20)
    phones: list[TypedPhone] | None = Field(default=None, max_length=20)
    source: Source | None = None
    comments: Text | None = None
    custom_fields: dict[str, Any] | None = Field(
        default=None, description="Values of the admin-defined fields of this record type"
    )


class LeadFields(RecordFields):
    title: Title | None = None
    first_name: Name | None = None
    last_name: Name | None = None
    company_title: Title | None = None
    status: Literal["new", "in_progress", "processed", "junk"] | None = Field(
        default=None, description="`converted` is set by conversion only"
    )
    amount: float | None = Field(default=None, ge=0, le=1e15)
    currency: Currency | None = None


class ContactFields(RecordFields):
    first_name: Name | None = None
    last_name: Name | None = None
    company_ids: list[Id] | None = Field(
        default=None, max_length=100, description="Companies the contact works for"
    )


class CompanyFields(RecordFields):
    title: Title | None = None
    contact_ids: list[Id] | None = Field(
        default=None, max_length=1000, description="The contacts who work for the company"
    )


class DealFields(RecordFields):
    nullable: ClassVar[frozenset[str]] = frozenset({"company_id"})

    title: Title | None = None
    stage_id: Id | None = None
    amount: float | None = Field(default=None, ge=0, le=1e15)
    currency: Currency | None = None
    company_id: Id | None = Field(
        default=None,
        description="At most one company. Setting it adds the company's contacts "
        "(all of them the first time, then those left on a deal the last time)",
    )
    contact_ids: list[Id] | None = Field(default=None, max_length=500)


class CreateOptions(Strict):
    ignore_duplicates: bool = Field(
        default=False, description="Create even when possible duplicates exist"
    )


class LeadCreate(LeadFields, CreateOptions):
    pass


class ContactCreate(ContactFields, CreateOptions):
    pass


class CompanyCreate(CompanyFields, CreateOptions):
    pass


class DealCreate(DealFields, CreateOptions):
    pass


CREATE_MODELS: dict[str, type[RecordFields]] = {
    "lead": LeadCreate,
    "contact": ContactCreate,
    "company": CompanyCreate,
    "deal": DealCreate,
}
UPDATE_MODELS: dict[str, type[RecordFields]] = {
    "lead": LeadFields,
    "contact": ContactFields,
    "company": CompanyFields,
    "deal": DealFields,
}


class Indicator(BaseModel):
    number: int
    colour: Literal["none", "green", "red", "red-green", "gray"]
    dot: Literal["blue", "gray"] | None = None


class RecordRef(BaseModel):
    type: RecordType
    id: str
    title: str


class RecordOut(BaseModel):
    id: str
    type: RecordType
    title: str = Field(description="Contacts: the full name")
    first_name: str | None = None
    last_name: str | None = None
    company_title: str | None = None
    status: str | None = Field(default=None, description="Leads")
    stage_id: str | None = Field(default=None, description="Deals")
    open: bool = Field(description="Leads not converted or junk, deals not won or lost")
    amount: float | None = None
    currency: str | None = None
    responsible_id: str
    emails: list[TypedEmailOut]
    phones: list[TypedPhone]
    source: str
    comments: str
    custom_fields: dict[str, Any]
    company_ids: list[str] | None = Field(default=None, description="Contacts")
    company_id: str | None = Field(default=None, description="Deals")
    contact_ids: list[str] | None = Field(default=None, description="Deals")
    lead_id: str | None = Field(default=None, description="The lead this was converted from")
    converted: dict[str, str] | None = Field(
        default=None, description="Leads: the records made by conversion, by type"
    )
    created_by: str
    created_at: datetime
    modified_by: str
    modified_at: datetime
    open_activities: int
    indicator: Indicator = Field(description="The activity column, for the caller")


class RecordDetail(RecordOut):
    links: dict[str, list[RecordRef]] = Field(
        description="Linked records by type: a contact's companies and deals, a company's "
        "contacts and deals, a deal's company and contacts, a lead's conversions"
    )


class RecordList(BaseModel):
    records: list[RecordOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")
    linked: dict[str, RecordRef] = Field(
        default_factory=dict,
        description="The records these link to (a contact's companies, a deal's company and "
        "contacts, a company's contacts) that the caller may see, by id: for the list's "
        "company and contact columns",
    )


class RecordQuery(Strict):
    q: str | None = Field(default=None, max_length=100, description="Title, name, email or phone")
    responsible_id: str | None = None
    activity_responsible_id: str | None = Field(
        default=None, description="Records with an open activity assigned to this person"
    )
    status: str | None = Field(default=None, description="Lead status or deal stage id")
    open: bool | None = None
    counted: bool = Field(
        default=False, description="Only records counted for the caller (a coloured number)"
    )
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = None


class DuplicateProbe(Strict):
    type: RecordType
    first_name: Name = ""
    last_name: Name = ""
    title: Title = Field(default="", description="Companies: the company title")
    company_title: Title = ""
    emails: list[Email] = Field(default_factory=list, max_length=20)
    phones: list[PhoneNumber] = Field(default_factory=list, max_length=20)
    exclude_id: str | None = Field(default=None, description="The record being edited")


class DuplicateMatch(BaseModel):
    """A matching record the caller may see."""

    type: RecordType
    id: str
    title: str
    responsible_id: str
    matched: list[Literal["email", "phone", "name", "company"]]


class DuplicateList(BaseModel):
    duplicates: list[DuplicateMatch] = Field(
        description="The matches the caller may see, strongest first, at most 20"
    )
    hidden: bool = Field(
        description="Whether records the caller may not see match too; nothing else about "
        "them is told"
    )


ConversionMode = Literal[
    "contact", "company", "contact+company", "deal", "deal+contact", "deal+contact+company"
]


class ConvertRequest(Strict):
    mode: ConversionMode
    contact_id: Id | None = Field(
        default=None,
        description="An existing contact to use instead of making one (modes with a contact)",
    )
    company_id: Id | None = Field(
        default=None,
        description="An existing company to use instead of making one (modes with a company)",
    )
    emails_to: Literal["deal", "contact", "company"] | None = Field(
        default=None,
        description="Which record the lead's e-mails (open and completed, with their threads "
        "and reply codes) move to; default: the deal, else the contact, else the company",
    )
    ignore_duplicates: bool = Field(
        default=False,
        description="Make a new contact or company even when existing ones match (409 "
        "`possible-duplicates` otherwise)",
    )


class ConversionCandidates(BaseModel):
    contacts: list[DuplicateMatch] = Field(
        description="Existing contacts like the one the lead would become, strongest first"
    )
    companies: list[DuplicateMatch] = Field(
        description="Existing companies like the one the lead would become"
    )
    hidden: bool = Field(description="Whether records the caller may not see match too")


class MergeRequest(Strict):
    other_id: str = Field(
        description="The duplicate to merge into this record (of the same type); it is "
        "deleted once its links, activities, mail and history are the survivor's"
    )


class ConversionResult(BaseModel):
    lead: RecordOut
    created: dict[str, RecordOut] = Field(description="The new records by type")


class HistoryEntry(BaseModel):
    id: str
    record_type: RecordType
    record_id: str
    user_id: str | None
    kind: str = Field(
        description="created, field, linked, converted, deleted, activity_added, "
        "activity_completed, activity_reopened, activity_removed, activity_moved. "
        "activity_added of a received e-mail: `after.from` names the sender; "
        "activity_moved (on both records): `before.record` and `after.record` are where "
        "the activity (`after.activity`) was and went"
    )
    field: str | None = None
    before: Any = None
    after: Any = None
    at: datetime


class HistoryList(BaseModel):
    history: list[HistoryEntry]


# Activities ----------------------------------------------------------------------------------

ActivityType = Literal["call", "meeting", "email", "task", "message"]


class ActivityFields(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"deadline"})

    subject: Title | None = None
    description: Text | None = None
    responsible_id: Id | None = None
    deadline: datetime | None = Field(default=None, description="Planned time")
    completed: bool | None = None

    _deadline = field_validator("deadline")(_aware)


class ActivityMove(Strict):
    owner_type: RecordType
    owner_id: Id


class ActivityCreate(ActivityFields):
    owner_type: RecordType
    owner_id: Id
    type: ActivityType
    direction: Literal["incoming", "outgoing"] = "outgoing"
    missed: bool = Field(default=False, description="Calls: an incoming call nobody answered")


class MailAttachment(BaseModel):
    id: str | None = Field(description="For GET /api/v1/mail/attachments/{id}; null: not kept")
    filename: str
    content_type: str
    size: int


class ActivityMail(BaseModel):
    """The mail behind an email activity. Bodies only in GET /crm/activities/{id}; lists and
    events carry the rest (the activity's description is the mail's new text)."""

    status: str | None = Field(
        default=None,
        description="Outgoing: queued, retrying, sent, failed or bounced; incoming: null",
    )
    error: str | None = None
    from_address: str | None = None
    from_name: str | None = None
    to: list[str] = Field(default_factory=list)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list, description="Outgoing: the blind copies")
    date: datetime | None = Field(
        default=None, description="Incoming: when the sender wrote it (its Date: header)"
    )
    received_at: datetime | None = Field(
        default=None, description="Incoming: when the hub received it"
    )
    message_id: str | None = None
    code: str | None = Field(default=None, description="Outgoing: the reply code it carries")
    match: str | None = Field(
        default=None, description="Incoming: code, thread, rule, sender, new-lead or assigned"
    )
    flagged: bool = Field(
        default=False,
        description="Incoming: a valid code, or a reply in a thread of ours, from an address "
        "not on the record",
    )
    suspicious: bool = Field(
        default=False,
        description="Incoming: the trusted mail server in front reported that the sender "
        "failed authentication (DMARC, or SPF without a DKIM signature of the From domain)",
    )
    suspicious_reason: str | None = Field(
        default=None, description="Incoming, when suspicious: what failed, e.g. dmarc=fail"
    )
    auto_reply: bool = False
    in_reply_to_activity: str | None = Field(
        default=None,
        description="Incoming: the mail of ours it answers; outgoing: the mail it answers",
    )
    bounced_recipients: list[str] = Field(default_factory=list)
    attachments: list[MailAttachment] = Field(default_factory=list)
    html: str | None = Field(default=None, description="Sanitised HTML (bodies only)")
    text: str | None = Field(default=None, description="Full text version (bodies only)")
    quoted: str | None = Field(default=None, description="Quoted history (bodies only)")


class ActivityOut(BaseModel):
    id: str
    owner_type: RecordType
    owner_id: str
    owner_title: str
    type: ActivityType
    direction: Literal["incoming", "outgoing"]
    missed: bool
    subject: str
    description: str
    responsible_id: str
    deadline: datetime | None
    completed: bool
    completed_at: datetime | None
    state: Literal["incoming", "overdue", "due", "future", "completed"] = Field(
        description="For the caller's time zone and the due-window setting"
    )
    created_by: str
    created_at: datetime
    modified_at: datetime
    mail: ActivityMail | None = Field(default=None, description="Email activities only")


class ActivityList(BaseModel):
    activities: list[ActivityOut]


class ActivityQuery(Strict):
    responsible_id: str | None = Field(
        default=None, description='Default: the caller ("my activities")'
    )
    owner_type: RecordType | None = None
    owner_id: str | None = None
    type: ActivityType | None = None
    status: Literal["open", "completed", "all"] = "open"
    deadline: Literal["incoming", "overdue", "due", "future"] | None = None
    limit: int = Field(default=100, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=100_000)


# Settings and roles --------------------------------------------------------------------------


class StageOut(Strict):
    """A deal stage as stored and shown. What is stored is not checked again on reading, so
    that a name stored before a rule was tightened cannot make the settings unreadable."""

    id: str
    name: str
    semantics: Literal["process", "won", "lost"] = "process"


class StageIn(StageOut):
    """A deal stage as a request sets it."""

    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
    name: Label


class FieldDefOut(Strict):
    """A custom field's definition as stored and shown (not checked again, as ``StageOut``)."""

    code: str
    name: str
    type: Literal["string", "number", "date", "bool", "list"]
    options: list[str] = Field(default_factory=list)
    required: bool = False


class FieldDefIn(FieldDefOut):
    """A custom field's definition as a request sets it."""

    code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    name: Label
    options: list[Annotated[str, StringConstraints(min_length=1, max_length=100), NAME_TEXT]] = (
        Field(default_factory=list, max_length=100)
    )


class CrmSettings(BaseModel):
    counter_mode: Literal["item", "activity"] = Field(
        default="item",
        description="item: the record's responsible person counts all of its activities; "
        "activity: each user counts the activities assigned to them",
    )
    due_minutes_before: int | None = Field(
        default=None,
        ge=1,
        le=7 * 24 * 60,
        description="null: an activity is due all day on its deadline's day; N: only in "
        "the last N minutes before its deadline",
    )
    deal_stages: list[StageOut]
    custom_fields: dict[RecordType, list[FieldDefOut]]
    default_role: Literal["none", "manager", "head", "chief", "admin"] = Field(
        default="manager",
        description="The role of employees no grant applies to (extranet users: none)",
    )


class CrmSettingsUpdate(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"due_minutes_before"})

    counter_mode: Literal["item", "activity"] | None = None
    due_minutes_before: int | None = Field(default=None, ge=1, le=7 * 24 * 60)
    deal_stages: list[StageIn] | None = Field(default=None, min_length=3, max_length=50)
    custom_fields: dict[RecordType, list[FieldDefIn]] | None = None
    default_role: Literal["none", "manager", "head", "chief", "admin"] | None = None


RoleName = Literal["none", "manager", "head", "chief", "admin"]


class RoleGrantIn(Strict):
    role: RoleName
    subject_kind: Literal["user", "department", "workgroup"]
    subject_id: Id


class RoleGrantOut(RoleGrantIn):
    model_config = ConfigDict(extra="ignore")

    id: str


class RoleGrantList(BaseModel):
    grants: list[RoleGrantOut]


class CrmMe(BaseModel):
    role: RoleName
    sees_others: bool = Field(description="Head of department and above")
    may_manage_settings: bool
    time_zone: str


class CounterCheckRequest(Strict):
    repair: bool = Field(default=False, description="Write the recounted numbers and push them")


class CounterCheckReport(BaseModel):
    users: int
    open_activities: int
    differences: dict[str, dict[str, dict[str, Any]]] = Field(
        description="User id -> record type -> the numbers that differed (recounted values)"
    )
    stale_activities: int
    stale_records: int
    repaired: bool
