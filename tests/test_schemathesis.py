"""Schemathesis against the served OpenAPI document (issue #8, "Hostile input").

For every operation of ``/api/v1/openapi.json``, requests generated from the document - valid
ones and invalid ones - are sent as an admin, who gets past every 401 and 403. Every answer
must be: no 5xx, a status code the document lists for the operation, its content type, and a
body that matches its schema. Three passes:

1. positive: valid requests; path ids are random, so most of them answer 404;
2. negative: requests that break the schema (bodies, query strings, path parameters); they
   must be refused with a documented 4xx, never a 5xx;
3. seeded: valid requests whose path ids are real records (a chat, a task, a deal, a mail
   ...), so the 200/201/204 answers and their bodies are checked against the schemas too.
   DELETEs run last, so they do not empty the others' records.

The hub runs in-process on the test's event loop; schemathesis' synchronous client runs in a
worker thread, so the loop keeps serving while the client waits. The run is deterministic
(derandomized) and bounded: ``PORTALHUB_SCHEMATHESIS_EXAMPLES`` (default 10) examples per
operation and pass. Raise it for a longer run, e.g. ``PORTALHUB_SCHEMATHESIS_EXAMPLES=200``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, TypeVar

import aiosmtplib
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject
from hypothesis import settings as hsettings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from scramp.utils import ScramException, saslprep

from server.files.rules import sign
from server.web.limits import REQUEST_LINE_BYTES
from tests.harness import HubHarness

T = TypeVar("T")
Operation = APIOperation[Any, Any, Any, Any]

# schemathesis' own strategies draw from ``random``; that is its business, not a finding here
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

EXAMPLES = int(os.environ.get("PORTALHUB_SCHEMATHESIS_EXAMPLES", "10"))
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# aiohttp's HTTP parser refuses a request line (or a header line) longer than this with a
# plain-text 400 before the application, its middleware and so the OpenAPI document are
# involved. Negative query strings can be that long; such answers are checked separately.
# The hub raises aiohttp's default (8190) to this (server/web/limits.py).
HTTP_LINE_LIMIT = REQUEST_LINE_BYTES


def closed_loopback_port() -> int:
    """A loopback port nobody listens on: IMAP connections there fail at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Run:
    """What the worker thread needs, and what it found."""

    hub: HubHarness
    loop: asyncio.AbstractEventLoop
    admin_id: str
    token: str
    imap_port: int
    failures: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    line_too_long: int = 0
    succeeded: set[str] = field(default_factory=set)  # "pass: operation" that got a 2xx

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def keep_on_this_machine(case: Case[Any], run: Run) -> None:
    """An IMAP mailbox is tried (``/test``) or collected from (created, changed) at once: its
    host is always loopback, on a port where nothing listens, never a generated host name."""
    if "/mail/mailboxes" in case.operation.path and isinstance(case.body, dict):
        if "host" in case.body:
            case.body["host"] = "127.0.0.1"
        port = case.body.get("port", 993)
        if isinstance(port, int | float) and not isinstance(port, bool):  # 993.0 is 993 too
            case.body["port"] = run.imap_port


def saslprep_refuses(case: Case[Any]) -> bool:
    """A password SASLprep refuses (an emoji, a control character): the known 500 of
    ``test_a_password_that_saslprep_refuses_is_no_server_error``, kept out of this run."""
    password = case.body.get("password") if isinstance(case.body, dict) else None
    if not isinstance(password, str):
        return False
    try:
        saslprep(password)
    except ScramException:
        return True
    return False


def request_line_length(case: Case[Any], base_url: str) -> int:
    kwargs = case.as_transport_kwargs(base_url=base_url)
    prepared = requests.Request(
        method=kwargs["method"], url=kwargs["url"], params=kwargs.get("params")
    ).prepare()
    return len(prepared.path_url or "")


def exercise(
    run: Run,
    operation: Operation,
    mode: GenerationMode,
    session: requests.Session,
    pass_name: str,
    path_parameters: dict[str, Any] | None = None,
) -> None:
    label = f"{pass_name}: {operation.label}"
    statuses = run.statuses.setdefault(pass_name, Counter())

    @hsettings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
        report_multiple_bugs=True,
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def check(case: Case[Any]) -> None:
        keep_on_this_machine(case, run)
        if saslprep_refuses(case):
            reject()
        token = run.token
        if operation.path == "/api/v1/auth/logout":  # logs out its own token, not the run's
            token = run.on_loop(run.hub.services.auth.issue_token(run.admin_id))
        headers = {"Authorization": f"Bearer {token}"}
        response = case.call(
            base_url=run.hub.base_url, session=session, headers=headers, timeout=30
        )
        statuses[response.status_code] += 1
        if response.status_code < 300:
            run.succeeded.add(label)
        if request_line_length(case, run.hub.base_url) > HTTP_LINE_LIMIT:
            run.line_too_long += 1
            assert response.status_code == 400, response.status_code
            return
        case.validate_response(response, checks=CHECKS, headers=headers)

    try:
        check()
    except Unsatisfiable:
        # Nothing to break: an operation without parameters or body has no negative case.
        assert mode is GenerationMode.NEGATIVE, label
    except (Exception, BaseExceptionGroup) as exc:
        run.failures[label] = str(exc)[:4000]


# real records, for the seeded pass ------------------------------------------------------------


async def post(hub: HubHarness, token: str, path: str, body: Any, status: int = 201) -> Any:
    resp = await hub.request("POST", path, token=token, json=body)
    assert resp.status == status, (path, resp.body)
    return resp.body


async def unmatched_mails(hub: HubHarness, token: str) -> list[str]:
    """Two mails from a stranger while leads from mail are off: they wait in the unmatched
    list (one to assign, one to read and dismiss)."""
    resp = await hub.request(
        "PATCH", "/api/v1/mail/settings", token=token, json={"create_leads": False}
    )
    assert resp.status == 200, resp.body
    for n in (1, 2):
        message = EmailMessage()
        message["From"] = "stranger@example.test"
        message["To"] = hub.services.mail.address
        message["Subject"] = f"Question {n}"
        message["Message-ID"] = f"<question-{n}@example.test>"
        message.set_content("Hello, who are you?")
        await aiosmtplib.send(
            message,
            recipients=[hub.services.mail.address],
            hostname="127.0.0.1",
            port=hub.services.mail.ports["smtp"],
        )
    for _ in range(200):
        await hub.services.mail.pipeline.drain()
        listed = await hub.request("GET", "/api/v1/mail/unmatched", token=token)
        if len(listed.body["mails"]) == 2:
            return [mail["id"] for mail in listed.body["mails"]]
        await asyncio.sleep(0.05)
    raise AssertionError("the mails never reached the unmatched list")


@dataclass
class Seeds:
    """Real ids for the path parameters (by path prefix; "*" for the rest), and hand-made
    valid requests for the operations whose bodies must name real things too."""

    path_parameters: dict[str, dict[str, str]]
    explicit: list[tuple[str, str, dict[str, str], Any]]

    def for_operation(self, operation: Operation) -> dict[str, str]:
        names = {p.name for p in operation.path_parameters}
        values = next(
            (v for prefix, v in self.path_parameters.items() if operation.path.startswith(prefix)),
            self.path_parameters["*"],
        )
        return {k: v for k, v in values.items() if k in names}


async def seed(hub: HubHarness, token: str, imap_port: int) -> Seeds:
    """One of everything a path can name."""
    victim_id, _ = await hub.create_user("victim", first_name="Vic")
    other_id, _ = await hub.create_user("other", first_name="Otto")
    department = await post(hub, token, "/api/v1/departments", {"name": "Sales"})
    group = await post(hub, token, "/api/v1/workgroups", {"name": "Q4", "member_ids": [victim_id]})
    chat = await post(hub, token, "/api/v1/im/chats", {"title": "Plans", "member_ids": [victim_id]})
    sent = await post(hub, token, "/api/v1/im/messages", {"chat_id": chat["id"], "text": "hi"})
    [task] = (
        await post(hub, token, "/api/v1/tasks", {"title": "Report", "responsible_ids": [victim_id]})
    )["tasks"]
    records = {
        "contacts": {"first_name": "Carl", "emails": [{"value": "carl@client.example"}]},
        "companies": {"title": "Acme", "emails": [{"value": "info@acme.example"}]},
        "leads": {"title": "Enquiry", "emails": [{"value": "lena@lead.example"}]},
    }
    made = {
        kind: await post(hub, token, f"/api/v1/crm/{kind}", body) for kind, body in records.items()
    }
    made["deals"] = await post(
        hub, token, "/api/v1/crm/deals", {"title": "Order", "contact_ids": [made["contacts"]["id"]]}
    )
    addresses = {
        "contacts": "carl@client.example",
        "deals": "carl@client.example",
        "companies": "info@acme.example",
        "leads": "lena@lead.example",
    }
    activity = await post(
        hub,
        token,
        "/api/v1/crm/activities",
        {"owner_type": "deal", "owner_id": made["deals"]["id"], "type": "call"},
    )
    grant = await hub.request(
        "PUT",
        "/api/v1/crm/roles",
        token=token,
        json={"role": "head", "subject_kind": "user", "subject_id": victim_id},
    )
    assert grant.status == 200, grant.body
    template = await post(
        hub, token, "/api/v1/mail/templates", {"name": "Hello", "subject": "Hi", "text": "Hi"}
    )
    mailbox = await post(
        hub,
        token,
        "/api/v1/mail/mailboxes",
        {
            "name": "Inbox",
            "host": "127.0.0.1",
            "port": imap_port,
            "security": "none",
            "login": "crm",
            "password": "secret",
            "enabled": False,
        },
    )
    upload = await hub.request(
        "POST",
        "/api/v1/mail/attachments?filename=offer.txt",
        token=token,
        data=b"the offer",
        headers={"Content-Type": "text/plain"},
    )
    assert upload.status == 201, upload.body
    offer = await post(
        hub,
        token,
        f"/api/v1/crm/deals/{made['deals']['id']}/emails",
        {"to": ["carl@client.example"], "subject": "Offer", "attachment_ids": [upload.body["id"]]},
    )
    mail_id, assigned_id = await unmatched_mails(hub, token)
    action = next(a for a in task["allowed_actions"] if a not in ("delete", "edit", "comment"))
    common = {
        "user_id": victim_id,
        "department_id": department["id"],
        "group_id": group["id"],
        "chat_id": chat["id"],
        "message_id": sent["messages"][0]["id"],
        "task_id": task["id"],
        "action": action,
        "activity_id": activity["id"],
        "grant_id": grant.body["id"],
        "template_id": template["id"],
        "mailbox_id": mailbox["id"],
        "file_id": upload.body["id"],
        "mail_id": mail_id,
    }
    # A file sent in the chat (downloads, its signed link) and an XEP-0363 slot of 0 bytes
    # (the PUT has no body in the document).
    chat_file = await hub.request(
        "POST", "/api/v1/files?name=seed.png", token=token, data=b"\x89PNG\r\n\x1a\nseed"
    )
    assert chat_file.status == 201, chat_file.body
    await post(
        hub,
        token,
        "/api/v1/im/messages",
        {"chat_id": chat["id"], "file_ids": [chat_file.body["id"]]},
    )
    files = hub.services.im.files
    admin = await hub.services.auth.authenticate(token)
    assert admin is not None
    slot = await files.slot(str(admin["_id"]), "s", 0)
    path_parameters = {
        "/api/v1/files/": {"file_id": chat_file.body["id"]},
        "/files/upload/": {"token": slot.put_url.rsplit("/", 1)[1]},
        "/files/": {
            "file_id": chat_file.body["id"],
            "signature": sign(await files.key(), chat_file.body["id"]),
            "name": "seed.png",
        },
        "*": common,
    }
    explicit: list[tuple[str, str, dict[str, str], Any]] = []
    for plural, record in made.items():
        path_parameters[f"/api/v1/crm/{plural}/"] = {**common, "record_id": record["id"]}
        explicit.append(
            (
                "POST",
                f"/api/v1/crm/{plural}/{{record_id}}/emails",
                {"record_id": record["id"]},
                {"to": [addresses[plural]], "subject": "Hello", "text": "Hello {name}"},
            )
        )
        explicit.append(
            (
                "POST",
                f"/api/v1/crm/{plural}/{{record_id}}/emails/preview",
                {"record_id": record["id"]},
                {"to": [addresses[plural]], "text": "Dear {{record.first_name}}"},
            )
        )
    explicit += [
        ("POST", "/api/v1/im/chats/{chat_id}/read", {}, {"up_to": sent["messages"][0]["id"]}),
        ("POST", "/api/v1/im/chats/{chat_id}/members", {}, {"user_ids": [other_id]}),
        ("POST", "/api/v1/workgroups/{group_id}/members", {}, {"user_ids": [other_id]}),
        (
            "POST",
            "/api/v1/mail/unmatched/{mail_id}/assign",
            {"mail_id": assigned_id},
            {"record_type": "deal", "record_id": made["deals"]["id"]},
        ),
        (
            "POST",
            "/api/v1/crm/activities/{activity_id}/move",
            {"activity_id": offer["emails"][0]["activity_id"]},
            {"owner_type": "contact", "owner_id": made["contacts"]["id"]},
        ),
        ("DELETE", "/api/v1/crm/activities/{activity_id}", {}, None),
    ]
    for plural in ("contacts", "companies", "leads"):  # deals cannot be merged
        duplicate = await post(
            hub, token, f"/api/v1/crm/{plural}", {**records[plural], "ignore_duplicates": True}
        )
        explicit.append(
            (
                "POST",
                f"/api/v1/crm/{plural}/{{record_id}}/merge",
                {"record_id": made[plural]["id"]},
                {"other_id": duplicate["id"]},
            )
        )
    explicit = [(m, path, {**common, **fixed}, body) for m, path, fixed, body in explicit]
    return Seeds(path_parameters, explicit)


def run_explicit(run: Run, schema: Any, seeds: Seeds, session: requests.Session) -> None:
    """The hand-made valid requests: each must succeed, and its answer match the document."""
    for method, path, path_parameters, body in seeds.explicit:
        operation = schema[path][method]
        label = f"seeded: {operation.label}"
        names = {p.name for p in operation.path_parameters}
        fixed = {k: v for k, v in path_parameters.items() if k in names}
        case = (
            operation.Case(path_parameters=fixed, body=body)
            if body
            else operation.Case(path_parameters=fixed)
        )
        headers = {"Authorization": f"Bearer {run.token}"}
        response = case.call(
            base_url=run.hub.base_url, session=session, headers=headers, timeout=30
        )
        run.statuses.setdefault("explicit", Counter())[response.status_code] += 1
        try:
            assert response.status_code < 300, (response.status_code, response.text[:500])
            run.succeeded.add(label)
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:
            run.failures[f"explicit: {operation.label}"] = str(exc)[:4000]


# the test -------------------------------------------------------------------------------------


async def test_every_operation_conforms_to_the_openapi_document(hub: HubHarness) -> None:
    admin_id, token = await hub.create_user("root", admin=True)
    imap_port = closed_loopback_port()
    seeds = await seed(hub, token, imap_port)
    doc = (await hub.request("GET", "/api/v1/openapi.json")).body
    config = schemathesis.Config()  # explicit: no schemathesis.toml is looked for
    # The run's own admin token goes on every request; negative cases break the request, not
    # the credentials (401 is test_rest_conventions' and test_authorization's business).
    config.projects.default.generation.update(with_security_parameters=False)
    schema = schemathesis.openapi.from_dict(doc, config=config)
    run = Run(hub, asyncio.get_running_loop(), admin_id, token, imap_port)
    loaded = list(schema.get_all_operations())
    operations = [result.ok() for result in loaded if isinstance(result, Ok)]
    assert len(operations) == len(loaded), [r for r in loaded if not isinstance(r, Ok)]
    # DELETEs last, so the other operations still find the seeded records
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    timings: dict[str, float] = {}

    def work() -> None:
        with requests.Session() as session:
            for pass_name, mode in (
                ("positive", GenerationMode.POSITIVE),
                ("negative", GenerationMode.NEGATIVE),
            ):
                started = time.monotonic()
                for operation in operations:
                    exercise(run, operation, mode, session, pass_name)
                timings[pass_name] = time.monotonic() - started
            started = time.monotonic()
            seeded = [op for op in operations if seeds.for_operation(op)]
            deletes = [op for op in seeded if op.method.upper() == "DELETE"]
            for operation in [op for op in seeded if op not in deletes]:
                fixed = seeds.for_operation(operation)
                exercise(run, operation, GenerationMode.POSITIVE, session, "seeded", fixed)
            run_explicit(run, schema, seeds, session)
            for operation in deletes:
                fixed = seeds.for_operation(operation)
                exercise(run, operation, GenerationMode.POSITIVE, session, "seeded", fixed)
            timings["seeded"] = time.monotonic() - started

    await asyncio.to_thread(work)
    summary = {name: dict(sorted(counts.items())) for name, counts in run.statuses.items()}
    print(f"\nstatuses by pass: {summary}; request line too long: {run.line_too_long}")
    print("seconds by pass:", {k: round(v, 1) for k, v in timings.items()})
    for label, message in run.failures.items():
        print("=" * 100)
        print(label)
        print(message)
    assert not run.failures, list(run.failures)
    # the seeded pass really reached the records: every operation got a 2xx at least once
    seeded = {op.label for op in operations if seeds.for_operation(op)}
    missed = sorted(label for label in seeded if f"seeded: {label}" not in run.succeeded)
    assert not missed, missed


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("POST", "/api/v1/users", "password"),
        ("PATCH", "/api/v1/users/{victim}", "password"),
        ("POST", "/api/v1/auth/register", "password"),
    ],
)
async def test_a_password_that_saslprep_refuses_is_no_server_error(
    hub: HubHarness, method: str, path: str, field: str
) -> None:
    _, token = await hub.create_user("root", admin=True)
    victim_id, _ = await hub.create_user("victim")
    opened = await hub.request(
        "PUT", "/api/v1/portal/settings", token=token, json={"self_registration": True}
    )
    assert opened.status == 200, opened.body
    body: dict[str, Any] = {field: "correct horse \U0001f600"}  # any emoji; or a tab
    if method == "POST":
        body |= {"login": "emoji", "email": "emoji@example.test"}
    resp = await hub.request(method, path.format(victim=victim_id), token=token, json=body)
    assert resp.status < 500, resp.body


async def test_presence_of_500_users_fits_in_a_request(hub: HubHarness) -> None:
    _, token = await hub.create_user("alice")
    ids = ",".join(f"{i:024x}" for i in range(500))
    resp = await hub.request("GET", f"/api/v1/presence?ids={ids}", token=token)
    assert resp.status == 200, (resp.status, resp.content_type, str(resp.body)[:100])
