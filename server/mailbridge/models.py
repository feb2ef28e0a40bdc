"""Mail bridge shapes at the API boundary."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, StringConstraints, model_validator

from server.directory.models import Email, Patch, Strict
from server.mailbridge.oauth import check_token_url
from server.text import NAME_TEXT, XML_TEXT

# One line, as a name: a subject cannot smuggle a header (compose() checks again).
Subject = Annotated[str, StringConstraints(max_length=500), NAME_TEXT]
# The whole request is capped by PORTALHUB_MAX_BODY_BYTES too (413 beyond it).
Body = Annotated[str, StringConstraints(max_length=100_000), XML_TEXT]
# What names a template or a mailbox in the settings.
Label = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), NAME_TEXT
]
# Server names, logins, folders: refused only what no text may hold.
Host = Annotated[str, StringConstraints(min_length=1, max_length=253), XML_TEXT]
Setting = Annotated[str, StringConstraints(min_length=1, max_length=254), XML_TEXT]
Folder = Annotated[str, StringConstraints(min_length=1, max_length=200), XML_TEXT]
Plain = Annotated[str, XML_TEXT]


class SendEmail(Strict):
    to: list[Email] = Field(
        min_length=1, max_length=100, description="Addresses of the record (or its contacts)"
    )
    cc: list[Email] = Field(
        default_factory=list, max_length=100, description="Copies, by the same rule as `to`"
    )
    bcc: list[Email] = Field(
        default_factory=list,
        max_length=100,
        description="Blind copies, by the same rule; in the envelope only, not in the mail",
    )
    in_reply_to: Annotated[str, StringConstraints(max_length=64), XML_TEXT] | None = Field(
        default=None,
        description="The e-mail activity of this record the mail answers: the mail continues "
        "its thread (In-Reply-To, References) and keeps the thread's reply code; an empty "
        "subject becomes `Re: ` and its subject",
    )
    subject: Subject = ""
    text: Body = Field(default="", description="Plain text body (placeholders allowed)")
    html: Body | None = Field(default=None, description="HTML body; sanitised before sending")
    template_id: str | None = Field(default=None, description="Fills subject and text if empty")
    attachment_ids: list[str] = Field(default_factory=list, max_length=20)
    bulk: bool = Field(default=False, description="One mail per recipient instead of one to all")


class SentEmail(BaseModel):
    activity_id: str
    to: list[str]
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    message_id: str
    code: str
    status: str


class EmailPreview(BaseModel):
    to: list[str]
    subject: str = Field(description="With the placeholders filled, before the reply code")
    text: str
    html: str | None = None


class EmailPreviews(BaseModel):
    previews: list[EmailPreview] = Field(
        description="One per mail that would be sent (one per recipient with `bulk`)"
    )


class SentEmails(BaseModel):
    emails: list[SentEmail]


class TemplateIn(Strict):
    name: Label
    subject: Subject = ""
    text: Body = ""


class TemplateOut(BaseModel):
    """A template as stored: not checked again on reading (see ``crm.models.StageOut``)."""

    id: str
    name: str
    subject: str
    text: str


class TemplateList(BaseModel):
    templates: list[TemplateOut]


class SubjectRuleIn(Strict):
    pattern: Annotated[str, StringConstraints(min_length=1, max_length=500), XML_TEXT]
    record_type: Literal["lead", "contact", "company", "deal"]
    field: Plain = Field(
        default="id",
        description="What the captured code is: the record id, or the code of one of the "
        "record type's custom fields",
    )


class SubjectRuleOut(BaseModel):
    """A rule as stored: not checked again on reading (see ``crm.models.StageOut``)."""

    id: str
    pattern: str
    record_type: Literal["lead", "contact", "company", "deal"]
    field: str = Field(
        default="id",
        description="What the captured code is: the record id, or the code of one of the "
        "record type's custom fields",
    )


class MailSettings(BaseModel):
    code_in: Literal["subject", "body"] = Field(
        default="subject", description="Where the reply code goes (always in Reply-To too)"
    )
    create_leads: bool = Field(default=True, description="A lead for mail from unknown senders")
    lead_exceptions: list[str] = Field(
        default_factory=list, description="Addresses and domains (@example.com) never made leads"
    )
    max_new_leads_per_sender: int = Field(default=3, ge=0, le=1000)
    lead_period_minutes: int = Field(default=24 * 60, ge=1, le=365 * 24 * 60)
    max_new_leads_per_hour: int = Field(
        default=20,
        ge=0,
        le=100_000,
        description="At most this many leads from mail in each clock hour, from all senders "
        "together; past it mail from new senders goes to the unmatched list (0: no leads)",
    )
    lead_responsible_id: str | None = Field(
        default=None, description="Who new leads from mail go to; default: the first admin"
    )
    subject_rules: list[SubjectRuleOut] = Field(default_factory=list)


class MailSettingsUpdate(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"lead_responsible_id"})

    code_in: Literal["subject", "body"] | None = None
    create_leads: bool | None = None
    lead_exceptions: list[Annotated[str, StringConstraints(max_length=254), XML_TEXT]] | None = (
        Field(default=None, max_length=1000)
    )
    max_new_leads_per_sender: int | None = Field(default=None, ge=0, le=1000)
    lead_period_minutes: int | None = Field(default=None, ge=1, le=365 * 24 * 60)
    max_new_leads_per_hour: int | None = Field(default=None, ge=0, le=100_000)
    lead_responsible_id: str | None = None
    subject_rules: list[SubjectRuleIn] | None = Field(default=None, max_length=50)


TokenUrl = Annotated[str, StringConstraints(min_length=8, max_length=2000), XML_TEXT]
Secret = Annotated[SecretStr, Field(min_length=1, max_length=8000)]


class OAuthClientIn(Strict):
    """The OAuth client the portal uses for XOAUTH2: an access token is got from
    ``token_url`` with the refresh token (the refresh flow). The secret and the refresh token
    are stored, never shown again."""

    client_id: Setting
    client_secret: Secret
    token_url: TokenUrl = Field(description="https, or http to this machine only")
    refresh_token: Secret
    scope: Setting | None = Field(
        default=None, description="e.g. https://outlook.office365.com/IMAP.AccessAsUser.All"
    )

    @model_validator(mode="after")
    def _safe_url(self) -> OAuthClientIn:
        problem = check_token_url(self.token_url)
        if problem is not None:
            raise ValueError(f"token_url: {problem}")
        return self


class OAuthClientUpdate(Patch):
    """Fields left out keep their stored value (the secret and the refresh token too)."""

    client_id: Setting | None = None
    client_secret: Secret | None = None
    token_url: TokenUrl | None = None
    refresh_token: Secret | None = None
    scope: Setting | None = None

    @model_validator(mode="after")
    def _safe_url(self) -> OAuthClientUpdate:
        problem = None if self.token_url is None else check_token_url(self.token_url)
        if problem is not None:
            raise ValueError(f"token_url: {problem}")
        return self


class OAuthClientOut(BaseModel):
    client_id: str
    token_url: str
    scope: str | None = None


Security = Literal["tls", "starttls", "none"]
SECURITY_HELP = (
    "tls: implicit TLS (IMAPS, usually port 993); starttls: plain connection upgraded with "
    "STARTTLS before logging in (usually 143), refused if the server does not offer it; "
    "none: no encryption (a server on this machine only)"
)
AuthMethod = Literal["password", "xoauth2"]
AUTH_HELP = (
    "password: LOGIN with login and password; xoauth2: AUTHENTICATE XOAUTH2 with an access "
    "token from the oauth client (Microsoft 365, Gmail)"
)


class MailboxIn(Strict):
    name: Label
    host: Host
    port: int = Field(default=993, ge=1, le=65535)
    security: Security = Field(default="tls", description=SECURITY_HELP)
    auth: AuthMethod = Field(default="password", description=AUTH_HELP)
    login: Setting
    password: SecretStr | None = Field(default=None, description="For auth password")
    oauth: OAuthClientIn | None = Field(default=None, description="For auth xoauth2")
    folder: Folder = "INBOX"
    processed_folder: Plain | None = Field(
        default="Processed", description="Where delivered mail is moved (unless deleted)"
    )
    delete_after_delivery: bool = False
    poll_seconds: int = Field(default=60, ge=5, le=3600)
    enabled: bool = True

    @model_validator(mode="after")
    def _credentials(self) -> MailboxIn:
        if self.auth == "password" and not self.password:
            raise ValueError("auth password needs a password")
        if self.auth == "xoauth2" and self.oauth is None:
            raise ValueError("auth xoauth2 needs the oauth client")
        return self


class MailboxUpdate(Patch):
    nullable: ClassVar[frozenset[str]] = frozenset({"processed_folder"})

    name: Label | None = None
    host: Host | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Security | None = None
    auth: AuthMethod | None = None
    login: Plain | None = None
    password: SecretStr | None = None
    oauth: OAuthClientUpdate | None = None
    folder: Plain | None = None
    processed_folder: Plain | None = None
    delete_after_delivery: bool | None = None
    poll_seconds: int | None = Field(default=None, ge=5, le=3600)
    enabled: bool | None = None


class MailboxOut(BaseModel):
    id: str
    name: str
    host: str
    port: int
    security: str
    auth: str = "password"
    login: str
    oauth: OAuthClientOut | None = Field(
        default=None, description="The OAuth client, without its secret and refresh token"
    )
    folder: str
    processed_folder: str | None
    delete_after_delivery: bool
    poll_seconds: int
    enabled: bool
    state: dict[str, Any] = Field(
        description="uidvalidity, last_uid, connected, idle, last_error, last_poll_at"
    )
    skipped: list[SkippedMail] = Field(
        default_factory=list,
        description="The latest messages left on the server as too large (newest first, 20)",
    )


class SkippedMail(BaseModel):
    uid: int
    size: int
    reason: str
    at: datetime


class MailboxList(BaseModel):
    mailboxes: list[MailboxOut]


class ConnectionTest(BaseModel):
    ok: bool
    detail: str
    capabilities: list[str] = Field(default_factory=list)
    messages: int | None = None


class UnmatchedMail(BaseModel):
    id: str
    received_at: datetime
    from_address: str
    subject: str
    reason: str
    candidates: list[dict[str, Any]] = Field(
        default_factory=list, description="Records the sender's address belongs to"
    )
    status: Literal["unmatched", "refused"] = Field(
        default="unmatched",
        description="refused: unsafe to parse (a MIME bomb, too deep): it can be downloaded "
        "or dismissed, not assigned",
    )
    size: int = Field(default=0, description="Bytes as received")
    suspicious: bool = Field(
        default=False,
        description="The sender failed authentication at the mail server in front; the "
        "reason says what failed. Not matched by its address: the candidates are whose "
        "address it claims",
    )
    from_name: str = ""
    date: datetime | None = Field(default=None, description="The mail's Date: header")
    preview: str = Field(
        default="", description="The beginning of its new text (without the quoted history)"
    )
    copies: int = Field(
        default=1, description="How often it came (the same Message-ID by another path)"
    )


class UnmatchedList(BaseModel):
    mails: list[UnmatchedMail]
    count: int = Field(description="How many mails wait on the list (refused ones included)")


class UnmatchedCount(BaseModel):
    count: int


class AssignMail(Strict):
    record_type: Literal["lead", "contact", "company", "deal"]
    record_id: str


class AttachmentOut(BaseModel):
    id: str
    filename: str
    content_type: str
    size: int
