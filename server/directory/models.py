"""Directory shapes at the API boundary (requests are strict; unknown fields are refused)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from server.text import NAME_TEXT, XML_TEXT

Login = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        to_lower=True,
        min_length=2,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    ),
]
Email = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
    ),
    XML_TEXT,
]
Name = Annotated[str, StringConstraints(strip_whitespace=True, max_length=100), NAME_TEXT]
# Department and workgroup names: required, one line.
GroupName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), NAME_TEXT
]
Password = Annotated[str, StringConstraints(min_length=8, max_length=1024)]
PhoneNumber = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=3, max_length=32, pattern=r"^\+?[0-9 ()./-]+$"
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Patch(Strict):
    """A partial update: a field left out stays as it is. ``null`` is refused, except for the
    fields listed in ``nullable``, where it means "none" (no department, no head)."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _no_stray_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None and key in cls.model_fields and key not in cls.nullable:
                    raise ValueError(f"{key} cannot be null; leave it out to keep it")
        return data


class Phone(Strict):
    type: Literal["work", "mobile", "home", "other"] = "work"
    number: PhoneNumber


def phone_digits(phones: list[Phone]) -> list[str]:
    return [re.sub(r"\D", "", p.number) for p in phones]


def display_name(doc: dict[str, Any]) -> str:
    """How a person is named everywhere: first and last name, or the login."""
    first, last = doc.get("first_name", ""), doc.get("last_name", "")
    return " ".join(p for p in (first, last) if p) or str(doc["login"])


class UserOut(BaseModel):
    id: str
    login: str
    email: str
    first_name: str
    last_name: str
    name: str = Field(description="Display name: first and last name, or the login")
    position: str
    phones: list[Phone]
    department_id: str | None
    is_admin: bool
    is_external: bool = Field(description="Extranet user: sees only their workgroups' members")
    is_active: bool
    time_zone: str | None = Field(description="null: the portal's default time zone")
    created_at: datetime

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> UserOut:
        first, last = doc.get("first_name", ""), doc.get("last_name", "")
        return cls(
            id=str(doc["_id"]),
            login=doc["login"],
            email=doc.get("email", ""),
            first_name=first,
            last_name=last,
            name=display_name(doc),
            position=doc.get("position", ""),
            phones=[Phone.model_validate(p) for p in doc.get("phones", [])],
            department_id=doc.get("department_id"),
            is_admin=bool(doc.get("is_admin")),
            is_external=bool(doc.get("is_external")),
            is_active=bool(doc.get("is_active", True)),
            time_zone=doc.get("time_zone"),
            created_at=doc["created_at"],
        )


def _known_time_zone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r}; use an IANA name such as Europe/Berlin"
        ) from None
    return value


TimeZone = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class ProfileFields(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"time_zone"})

    first_name: Name | None = None
    last_name: Name | None = None
    position: Name | None = None
    phones: list[Phone] | None = Field(default=None, max_length=10)
    time_zone: TimeZone | None = Field(
        default=None, description='IANA name; days (CRM "due today") are counted in it'
    )

    _time_zone = field_validator("time_zone")(_known_time_zone)


class UserCreate(ProfileFields):
    nullable = frozenset({"department_id", "password", "time_zone"})

    login: Login
    email: Email
    password: Password | None = Field(
        default=None, description="Without one the user cannot log in until a password is set"
    )
    department_id: str | None = None
    is_admin: bool = False
    is_external: bool = False


class RegisterRequest(ProfileFields):
    """Self-registration: a plain employee, without department or rights."""

    login: Login
    email: Email
    password: Password


class UserUpdate(ProfileFields):
    """Admin edit. Fields left out stay as they are."""

    nullable = frozenset({"department_id", "time_zone"})

    email: Email | None = None
    department_id: str | None = None
    is_admin: bool | None = None
    is_external: bool | None = None
    is_active: bool | None = None
    password: Password | None = None


class ProfileUpdate(ProfileFields):
    """What users may change about themselves."""


class UserQuery(Strict):
    q: Annotated[str, StringConstraints(max_length=100)] | None = Field(
        default=None,
        description="Words to find, each in the name, login, position, department name, "
        "e-mail or phone digits (case-insensitive); a phone number written with spaces or "
        "punctuation is also looked for as one run of digits",
    )
    name: Annotated[str, StringConstraints(max_length=100)] | None = Field(
        default=None, description="Part of the first name, last name or login (case-insensitive)"
    )
    position: Annotated[str, StringConstraints(max_length=100)] | None = Field(
        default=None, description="Part of the position (job title), case-insensitive"
    )
    department_id: str | None = None
    email: Annotated[str, StringConstraints(max_length=254)] | None = None
    phone: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, description="Digits contained in one of the user's phone numbers"
    )
    subtree: bool = Field(
        default=False, description="With department_id: include its subdepartments' people"
    )
    include_inactive: bool = False
    online: bool | None = Field(
        default=None, description="true: only users seen online/away/dnd; false: only offline"
    )
    limit: int = Field(default=100, ge=1, le=500)
    offset: int = Field(default=0, ge=0)

    @field_validator("phone")
    @classmethod
    def _digits(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = re.sub(r"\D", "", value)
        if not digits:
            raise ValueError("must contain digits")
        return digits


class DepartmentIn(Strict):
    name: GroupName
    parent_id: str | None = None
    head_id: str | None = None


class DepartmentUpdate(Patch):
    nullable = frozenset({"parent_id", "head_id"})

    name: GroupName | None = None
    parent_id: str | None = None
    head_id: str | None = None


class DepartmentOut(BaseModel):
    id: str
    name: str
    parent_id: str | None
    head_id: str | None

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> DepartmentOut:
        return cls(
            id=str(doc["_id"]),
            name=doc["name"],
            parent_id=doc.get("parent_id"),
            head_id=doc.get("head_id"),
        )


class WorkgroupIn(Strict):
    name: GroupName
    description: Annotated[str, StringConstraints(max_length=2000), XML_TEXT] = ""
    member_ids: list[str] = Field(default_factory=list, max_length=1000)


class WorkgroupMembers(Strict):
    user_ids: list[str] = Field(min_length=1, max_length=1000)
    moderator: bool = False


class WorkgroupOut(BaseModel):
    id: str
    name: str
    description: str
    owner_id: str
    member_ids: list[str]
    moderator_ids: list[str]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> WorkgroupOut:
        return cls(
            id=str(doc["_id"]),
            name=doc["name"],
            description=doc.get("description", ""),
            owner_id=doc["owner_id"],
            member_ids=list(doc.get("member_ids", [])),
            moderator_ids=list(doc.get("moderator_ids", [])),
        )
