"""Mail bridge routes: sending from records, attachments, and the CRM inbox's administration."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, Field

from server.crm.models import PLURAL
from server.files.rules import content_disposition
from server.mailbridge.models import (
    AssignMail,
    AttachmentOut,
    ConnectionTest,
    EmailPreviews,
    MailboxIn,
    MailboxList,
    MailboxOut,
    MailboxUpdate,
    MailSettings,
    MailSettingsUpdate,
    SendEmail,
    SentEmails,
    SubjectRuleIn,
    SubjectRuleOut,
    TemplateIn,
    TemplateList,
    TemplateOut,
    UnmatchedCount,
    UnmatchedList,
)
from server.mailbridge.rules import validate_rule
from server.mailbridge.service import MAX_UPLOAD_BYTES
from server.services import services
from server.text import XML_TEXT, describe, find_name_illegal
from server.web.api import Call
from server.web.problems import Problem
from server.web.routes import api

TAG = "mail"


class MailInfo(BaseModel):
    address: str = Field(description="The CRM inbox; replies go to its plus-addresses")
    smtp_port: int | None
    lmtp_port: int | None
    relay_configured: bool


class RuleTest(SubjectRuleIn):
    subject: Annotated[str, XML_TEXT] = Field(max_length=1000)


class RuleTestResult(BaseModel):
    code: str | None = Field(description="What the rule extracts from the subject, if anything")


async def _admin(call: Call) -> None:
    await services(call.request).crm.require_admin(call.user_id)


for _type, _plural in PLURAL.items():

    def _declare(record_type: str, plural: str) -> None:
        @api.route(
            "POST",
            f"/api/v1/crm/{plural}/{{record_id}}/emails",
            summary=f"Email from a {record_type}",
            tag=TAG,
            body=SendEmail,
            response=SentEmails,
            status=201,
            errors=(403, 404, 422),
        )
        async def send(call: Call) -> SentEmails:
            """Each mail is stored as an outgoing email activity and queued; it carries a reply
            code (subject or body, and the Reply-To plus-address)."""
            mail = services(call.request).mail
            return SentEmails(
                emails=await mail.send(
                    call.user_id, record_type, call.path("record_id"), call.body_as(SendEmail)
                )
            )

        send.__name__ = f"send_email_{record_type}"

        @api.route(
            "POST",
            f"/api/v1/crm/{plural}/{{record_id}}/emails/preview",
            summary=f"What an email from a {record_type} would say, placeholders filled",
            tag=TAG,
            body=SendEmail,
            response=EmailPreviews,
            errors=(403, 404, 422),
            stores=False,
        )
        async def preview(call: Call) -> EmailPreviews:
            """Checked as sending is (recipients, the mail answered), nothing sent or stored.
            The subject is shown without the reply code sending adds."""
            mail = services(call.request).mail
            return EmailPreviews(
                previews=await mail.preview(
                    call.user_id, record_type, call.path("record_id"), call.body_as(SendEmail)
                )
            )

        preview.__name__ = f"preview_email_{record_type}"

    _declare(_type, _plural)


@api.route(
    "POST",
    "/api/v1/mail/attachments",
    summary="Upload an attachment for a mail to send",
    tag=TAG,
    response=AttachmentOut,
    status=201,
    errors=(403, 413, 422),
    description="The raw file as the body; `?filename=` names it; `Content-Type` types it. "
    "10 MiB at most.",
)
async def upload_attachment(call: Call) -> AttachmentOut:
    request = call.request
    filename = request.query.get("filename", "attachment").strip()[:200] or "attachment"
    if any(c in filename for c in "\r\n\x00/\\"):
        raise Problem(422, "invalid-value", "Invalid value", "no line breaks or slashes")
    bad = find_name_illegal(filename)  # a name: no controls, no U+202E turning "exe" around
    if bad is not None:
        raise Problem(
            422, "invalid-value", "Invalid value", f"the file name must not contain {describe(bad)}"
        )
    # Read past the JSON body cap, but never more than the attachment limit.
    data = await request.content.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise Problem(413, "body-too-large", "Attachment too large", "10 MiB at most")
    content_type = request.content_type or "application/octet-stream"
    file_id = await services(request).mail.upload(call.user_id, filename, content_type, data)
    return AttachmentOut(id=file_id, filename=filename, content_type=content_type, size=len(data))


@api.route(
    "GET",
    "/api/v1/mail/attachments/{file_id}",
    summary="Download an attachment of a mail (received or sent)",
    tag=TAG,
    errors=(403, 404),
    extra_responses={"200": {"description": "The file"}},
)
async def download_attachment(call: Call) -> web.Response:
    meta, data = await services(call.request).mail.attachment(call.user_id, call.path("file_id"))
    # A sender's file name may hold anything: an ASCII fallback plus RFC 6266's UTF-8 form.
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={
            "Content-Disposition": content_disposition(meta.filename, inline=False),
            "X-Content-Type-Options": "nosniff",
        },
    )


@api.route("GET", "/api/v1/mail/info", summary="The CRM inbox", tag=TAG, response=MailInfo)
async def mail_info(call: Call) -> MailInfo:
    svc = services(call.request)
    ports = svc.mail.ports
    return MailInfo(
        address=svc.mail.address,
        smtp_port=ports.get("smtp"),
        lmtp_port=ports.get("lmtp"),
        relay_configured=svc.settings.smtp_relay_url is not None,
    )


@api.route(
    "GET",
    "/api/v1/mail/settings",
    summary="Mail settings (CRM administrators)",
    tag=TAG,
    response=MailSettings,
    errors=(403,),
)
async def get_mail_settings(call: Call) -> MailSettings:
    await _admin(call)
    return await services(call.request).mail.settings()


@api.route(
    "PATCH",
    "/api/v1/mail/settings",
    summary="Change mail settings (CRM administrators)",
    tag=TAG,
    body=MailSettingsUpdate,
    response=MailSettings,
    errors=(403, 422),
)
async def update_mail_settings(call: Call) -> MailSettings:
    """Subject rules are validated (a pattern prone to catastrophic backtracking is refused)."""
    await _admin(call)
    return await services(call.request).mail.update_settings(call.body_as(MailSettingsUpdate))


@api.route(
    "POST",
    "/api/v1/mail/rules/test",
    summary="Try a subject rule on a subject",
    tag=TAG,
    body=RuleTest,
    response=RuleTestResult,
    errors=(403, 422),
    stores=False,
)
async def test_rule(call: Call) -> RuleTestResult:
    await _admin(call)
    body = call.body_as(RuleTest)
    try:
        validate_rule(body.pattern)
    except ValueError as exc:
        raise Problem(422, "invalid-value", "Invalid value", str(exc)) from None
    rule = SubjectRuleOut(
        id="test", pattern=body.pattern, record_type=body.record_type, field=body.field
    )
    return RuleTestResult(code=services(call.request).mail.test_rule(rule, body.subject))


@api.route(
    "GET", "/api/v1/mail/templates", summary="Mail templates", tag=TAG, response=TemplateList
)
async def list_templates(call: Call) -> TemplateList:
    return TemplateList(templates=await services(call.request).mail.templates())


@api.route(
    "POST",
    "/api/v1/mail/templates",
    summary="Add a template (CRM administrators)",
    tag=TAG,
    body=TemplateIn,
    response=TemplateOut,
    status=201,
    errors=(403,),
)
async def add_template(call: Call) -> TemplateOut:
    """Placeholders: {{record.title}}, {{record.first_name}}, {{record.last_name}},
    {{user.name}}, {{user.email}}."""
    await _admin(call)
    return await services(call.request).mail.save_template(call.body_as(TemplateIn))


@api.route(
    "PUT",
    "/api/v1/mail/templates/{template_id}",
    summary="Change a template (CRM administrators)",
    tag=TAG,
    body=TemplateIn,
    response=TemplateOut,
    errors=(403, 404),
)
async def put_template(call: Call) -> TemplateOut:
    await _admin(call)
    return await services(call.request).mail.save_template(
        call.body_as(TemplateIn), call.path("template_id")
    )


@api.route(
    "DELETE",
    "/api/v1/mail/templates/{template_id}",
    summary="Delete a template (CRM administrators)",
    tag=TAG,
    status=204,
    errors=(403, 404),
)
async def delete_template(call: Call) -> None:
    await _admin(call)
    await services(call.request).mail.delete_template(call.path("template_id"))


@api.route(
    "GET",
    "/api/v1/mail/mailboxes",
    summary="IMAP mailboxes (CRM administrators)",
    tag=TAG,
    response=MailboxList,
    errors=(403,),
)
async def list_mailboxes(call: Call) -> MailboxList:
    await _admin(call)
    return MailboxList(mailboxes=await services(call.request).mail.mailboxes())


@api.route(
    "POST",
    "/api/v1/mail/mailboxes",
    summary="Add an IMAP mailbox to collect from (CRM administrators)",
    tag=TAG,
    body=MailboxIn,
    response=MailboxOut,
    status=201,
    errors=(403,),
)
async def add_mailbox(call: Call) -> MailboxOut:
    await _admin(call)
    return await services(call.request).mail.add_mailbox(call.body_as(MailboxIn))


@api.route(
    "POST",
    "/api/v1/mail/mailboxes/test",
    summary="Test IMAP settings without saving them (CRM administrators)",
    tag=TAG,
    body=MailboxIn,
    response=ConnectionTest,
    errors=(403,),
    stores=False,
)
async def test_mailbox(call: Call) -> ConnectionTest:
    await _admin(call)
    return await services(call.request).mail.test_mailbox(call.body_as(MailboxIn))


@api.route(
    "PATCH",
    "/api/v1/mail/mailboxes/{mailbox_id}",
    summary="Change an IMAP mailbox (CRM administrators)",
    tag=TAG,
    body=MailboxUpdate,
    response=MailboxOut,
    errors=(403, 404),
)
async def update_mailbox(call: Call) -> MailboxOut:
    await _admin(call)
    return await services(call.request).mail.update_mailbox(
        call.path("mailbox_id"), call.body_as(MailboxUpdate)
    )


@api.route(
    "DELETE",
    "/api/v1/mail/mailboxes/{mailbox_id}",
    summary="Remove an IMAP mailbox (CRM administrators)",
    tag=TAG,
    status=204,
    errors=(403, 404),
)
async def delete_mailbox(call: Call) -> None:
    await _admin(call)
    await services(call.request).mail.delete_mailbox(call.path("mailbox_id"))


@api.route(
    "GET",
    "/api/v1/mail/unmatched",
    summary="Mail no record matched (CRM administrators)",
    tag=TAG,
    response=UnmatchedList,
    errors=(403,),
)
async def list_unmatched(call: Call) -> UnmatchedList:
    await _admin(call)
    mail = services(call.request).mail
    return UnmatchedList(mails=await mail.unmatched(), count=await mail.unmatched_count())


@api.route(
    "GET",
    "/api/v1/mail/unmatched/count",
    summary="How many mails wait on the unmatched list (CRM administrators)",
    tag=TAG,
    response=UnmatchedCount,
    errors=(403,),
    description="The same number comes live as the ephemeral Socket.IO event "
    "`mail.unmatched` `{count}` after every change, and in the snapshot's `mail.unmatched`.",
)
async def count_unmatched(call: Call) -> UnmatchedCount:
    await _admin(call)
    return UnmatchedCount(count=await services(call.request).mail.unmatched_count())


class Assigned(BaseModel):
    activity_id: str


@api.route(
    "POST",
    "/api/v1/mail/unmatched/{mail_id}/assign",
    summary="Put an unmatched mail on a record (CRM administrators)",
    tag=TAG,
    body=AssignMail,
    response=Assigned,
    errors=(403, 404, 409),
)
async def assign_unmatched(call: Call) -> Assigned:
    await _admin(call)
    body = call.body_as(AssignMail)
    return Assigned(
        activity_id=await services(call.request).mail.assign(
            call.path("mail_id"), body.record_type, body.record_id
        )
    )


@api.route(
    "GET",
    "/api/v1/mail/unmatched/{mail_id}/raw",
    summary="The unmatched or refused mail as received (CRM administrators)",
    tag=TAG,
    errors=(403, 404),
    extra_responses={"200": {"description": "The message (message/rfc822)"}},
)
async def unmatched_raw(call: Call) -> web.Response:
    await _admin(call)
    raw = await services(call.request).mail.unmatched_raw(call.path("mail_id"))
    return web.Response(
        body=raw,
        content_type="application/octet-stream",  # never rendered by the browser
        headers={
            "Content-Disposition": f'attachment; filename="{call.path("mail_id")}.eml"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@api.route(
    "DELETE",
    "/api/v1/mail/unmatched/{mail_id}",
    summary="Dismiss an unmatched or refused mail: off the list, on no record",
    tag=TAG,
    status=204,
    errors=(403, 404),
)
async def dismiss_unmatched(call: Call) -> None:
    await _admin(call)
    await services(call.request).mail.dismiss(call.path("mail_id"))
