"""Authorisation matrix (issue #8, "Hostile input"): as each role, try to read or subscribe to
what that role must not see, over REST, Socket.IO and XMPP, and get the documented refusal:

* REST: ``404 not-found`` for what is invisible (a chat to a non-member, a task to someone
  without a role on it, a CRM record outside one's CRM role, a user one may not see),
  ``403 forbidden`` where the docs say so (admin routes, CRM role ``none``, CRM
  administrators' routes, rules such as "not the author"), ``401 unauthorized`` without a
  token;
* Socket.IO: ``{ok: false, error: "forbidden"}`` acks to ``subscribe``, ``subscribe_error``
  for a forged ``since``, and no event of the stream afterwards;
* XMPP: the stanza error the module documents (``forbidden``, ``item-not-found``,
  ``registration-required``, ``service-unavailable``) and nothing of the hidden thing.

Every table has positive controls: the user who may see the thing gets it, over the same
transport, so no row passes just because nothing works. Rows are checked all together and
every mismatch is reported at once.

The cast (``World``): an admin; Sales (head Hank, CRM role ``head``; Mary and Sam, CRM
managers) and Finance (Fred, CRM manager); Nora (CRM role ``none``); the employees Alice and
Bob, who share a group chat, a dialog and a task; Oscar, an employee in none of them; Eve, an
extranet user in Alice's workgroup; Xavier, an extranet user in no workgroup (neither has a
CRM role); Erin, an extranet user given the CRM role ``manager`` by name; Dave, deactivated.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from tests.harness import HubHarness, Refused, SocketClient
from tests.test_xmpp_hostile import Parsed, RawXmpp, domain_of

STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
MAM = "urn:xmpp:mam:2"
MUC = "http://jabber.org/protocol/muc"
ROSTER = "jabber:iq:roster"


@dataclass
class World:
    hub: HubHarness
    ids: dict[str, str] = field(default_factory=dict)  # names -> ids, for paths and streams
    tokens: dict[str, str] = field(default_factory=dict)  # who -> bearer token

    def path(self, template: str) -> str:
        return template.format(**self.ids)


async def call(hub: HubHarness, token: str | None, method: str, path: str, body: Any = None) -> Any:
    resp = await hub.request(method, path, token=token, json=body)
    assert resp.status < 300, (method, path, resp.status, resp.body)
    return resp.body


async def build_world(hub: HubHarness) -> World:
    world = World(hub)
    ids, tokens = world.ids, world.tokens
    ids["admin"], tokens["admin"] = await hub.create_user("root", admin=True)
    admin = tokens["admin"]
    sales = await call(hub, admin, "POST", "/api/v1/departments", {"name": "Sales"})
    finance = await call(hub, admin, "POST", "/api/v1/departments", {"name": "Finance"})
    for who, dept in (("hank", sales), ("mary", sales), ("sam", sales), ("fred", finance)):
        ids[who], tokens[who] = await hub.create_user(who, department_id=dept["id"])
    await call(hub, admin, "PATCH", f"/api/v1/departments/{sales['id']}", {"head_id": ids["hank"]})
    for who in ("alice", "bob", "oscar", "nora", "dave"):
        ids[who], tokens[who] = await hub.create_user(who, first_name=who.title())
    for who in ("eve", "xavier", "erin"):
        ids[who], tokens[who] = await hub.create_user(who, external=True)
    for who, role in (("hank", "head"), ("nora", "none"), ("erin", "manager")):
        grant = {"role": role, "subject_kind": "user", "subject_id": ids[who]}
        await call(hub, admin, "PUT", "/api/v1/crm/roles", grant)

    alice, mary = tokens["alice"], tokens["mary"]
    group = await call(
        hub, alice, "POST", "/api/v1/workgroups", {"name": "Project X", "member_ids": [ids["eve"]]}
    )
    ids["group"] = group["id"]
    chat = await call(
        hub, alice, "POST", "/api/v1/im/chats", {"title": "Plans", "member_ids": [ids["bob"]]}
    )
    ids["chat"] = chat["id"]
    sent = await call(
        hub, alice, "POST", "/api/v1/im/messages", {"chat_id": chat["id"], "text": "secret plan"}
    )
    ids["message"] = sent["messages"][0]["id"]
    dialog = await call(
        hub, alice, "POST", "/api/v1/im/messages", {"to": [ids["bob"]], "text": "secret dialog"}
    )
    ids["dialog"] = dialog["messages"][0]["chat_id"]
    chats = await call(hub, alice, "GET", "/api/v1/im/dialogs")
    ids["group_chat"] = next(
        d["chat"]["id"] for d in chats if d["chat"].get("workgroup_id") == group["id"]
    )
    [task] = (
        await call(
            hub,
            alice,
            "POST",
            "/api/v1/tasks",
            {"title": "Secret report", "responsible_ids": [ids["bob"]]},
        )
    )["tasks"]
    ids["task"] = task["id"]
    await call(hub, alice, "POST", f"/api/v1/tasks/{task['id']}/comments", {"text": "psst"})

    contact = await call(
        hub,
        mary,
        "POST",
        "/api/v1/crm/contacts",
        {"first_name": "Carl", "emails": [{"value": "carl@client.example"}]},
    )
    deal = await call(
        hub,
        mary,
        "POST",
        "/api/v1/crm/deals",
        {"title": "Mary's deal", "contact_ids": [contact["id"]]},
    )
    ids["deal"], ids["contact"] = deal["id"], contact["id"]
    ids["lead"] = (await call(hub, mary, "POST", "/api/v1/crm/leads", {"title": "Mary's lead"}))[
        "id"
    ]
    ids["activity"] = (
        await call(
            hub,
            mary,
            "POST",
            "/api/v1/crm/activities",
            {"owner_type": "deal", "owner_id": deal["id"], "type": "call"},
        )
    )["id"]
    ids["fred_deal"] = (
        await call(hub, tokens["fred"], "POST", "/api/v1/crm/deals", {"title": "Fred's deal"})
    )["id"]
    upload = await hub.request(
        "POST",
        "/api/v1/mail/attachments?filename=offer.txt",
        token=mary,
        data=b"the offer",
        headers={"Content-Type": "text/plain"},
    )
    assert upload.status == 201, upload.body
    ids["file"] = upload.body["id"]
    await call(
        hub,
        mary,
        "POST",
        f"/api/v1/crm/deals/{deal['id']}/emails",
        {"to": ["carl@client.example"], "subject": "Offer", "attachment_ids": [ids["file"]]},
    )
    ids["template"] = (
        await call(hub, admin, "POST", "/api/v1/mail/templates", {"name": "T", "text": "Hi"})
    )["id"]
    await call(hub, admin, "DELETE", f"/api/v1/users/{ids['dave']}")
    await hub.services.crm.counters.settled()
    return world


# --- REST ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rest:
    """``who`` calls ``method path`` (ids filled in from the world) and gets ``status``; an
    error is the problem type ``slug``."""

    who: str
    method: str
    path: str
    status: int
    slug: str | None = None
    body: Any = None


ANY_CHAT_PATHS = ("/api/v1/im/chats/{chat}", "/api/v1/im/chats/{chat}/messages")
TASK_PATHS = (
    "/api/v1/tasks/{task}",
    "/api/v1/tasks/{task}/comments",
    "/api/v1/tasks/{task}/history",
)
RECORD_PATHS = ("/api/v1/crm/deals/{deal}", "/api/v1/crm/deals/{deal}/history")
CRM_ADMIN_ONLY: tuple[tuple[str, str, Any], ...] = (
    ("GET", "/api/v1/crm/roles", None),
    ("PUT", "/api/v1/crm/roles", {"role": "chief", "subject_kind": "user", "subject_id": "{sam}"}),
    (
        "PUT",
        "/api/v1/crm/roles",
        {"role": "chief", "subject_kind": "workgroup", "subject_id": "{group}"},
    ),
    ("PATCH", "/api/v1/crm/settings", {"default_role": "chief"}),
    ("POST", "/api/v1/crm/counters/check", {}),
    ("GET", "/api/v1/mail/settings", None),
    ("PATCH", "/api/v1/mail/settings", {"create_leads": False}),
    ("POST", "/api/v1/mail/rules/test", {"pattern": "x", "record_type": "deal", "subject": "x"}),
    ("POST", "/api/v1/mail/templates", {"name": "Mine", "text": "x"}),
    ("PUT", "/api/v1/mail/templates/{template}", {"name": "Mine", "text": "x"}),
    ("DELETE", "/api/v1/mail/templates/{template}", None),
    ("GET", "/api/v1/mail/mailboxes", None),
    (
        "POST",
        "/api/v1/mail/mailboxes/test",
        {"name": "x", "host": "127.0.0.1", "port": 9, "login": "x", "password": "x"},
    ),
    ("GET", "/api/v1/mail/unmatched", None),
    ("GET", "/api/v1/mail/unmatched/{deal}/raw", None),
    ("DELETE", "/api/v1/mail/unmatched/{deal}", None),
    ("POST", "/api/v1/mail/unmatched/{deal}/assign", {"record_type": "deal", "record_id": "x"}),
)
PORTAL_ADMIN_ONLY: tuple[tuple[str, str, Any], ...] = (
    ("POST", "/api/v1/users", {"login": "newbie", "email": "n@example.test"}),
    ("PATCH", "/api/v1/users/{bob}", {"position": "Boss"}),
    ("DELETE", "/api/v1/users/{bob}", None),
    ("POST", "/api/v1/departments", {"name": "Shadow"}),
    ("PUT", "/api/v1/portal/settings", {"self_registration": True}),
)

REST_ROWS: list[Rest] = [
    # anonymous: nothing but the public routes
    *[
        Rest("anonymous", "GET", path, 401, "unauthorized")
        for path in (
            "/api/v1/users/me",
            "/api/v1/users",
            *ANY_CHAT_PATHS,
            "/api/v1/tasks/{task}",
            "/api/v1/crm/deals",
            "/api/v1/crm/deals/{deal}",
            "/api/v1/mail/attachments/{file}",
            "/api/v1/mail/unmatched",
            "/api/v1/xmpp/account",
            "/api/v1/counters",
        )
    ],
    Rest("anonymous", "GET", "/api/v1/openapi.json", 200),
    # the directory: extranet users see themselves and their workgroups' members
    Rest("xavier", "GET", "/api/v1/users/{alice}", 404, "not-found"),
    Rest("xavier", "GET", "/api/v1/users/{eve}", 404, "not-found"),
    Rest("xavier", "GET", "/api/v1/users/{xavier}", 200),
    Rest("eve", "GET", "/api/v1/users/{alice}", 200),
    Rest("eve", "GET", "/api/v1/users/{bob}", 404, "not-found"),
    Rest("alice", "GET", "/api/v1/users/{xavier}", 404, "not-found"),
    Rest("alice", "GET", "/api/v1/users/{eve}", 200),
    Rest("bob", "GET", "/api/v1/users/{eve}", 404, "not-found"),
    Rest("alice", "GET", "/api/v1/users/{dave}", 404, "not-found"),
    Rest("admin", "GET", "/api/v1/users/{dave}", 200),
    Rest("admin", "GET", "/api/v1/users/{xavier}", 200),
    Rest("xavier", "GET", "/api/v1/workgroups/{group}", 404, "not-found"),
    Rest("eve", "GET", "/api/v1/workgroups/{group}", 200),
    Rest("xavier", "POST", "/api/v1/workgroups", 403, "forbidden", {"name": "Mine"}),
    Rest(
        "xavier",
        "POST",
        "/api/v1/workgroups/{group}/members",
        404,
        "not-found",
        {"user_ids": ["{xavier}"]},
    ),
    Rest(
        "bob",
        "POST",
        "/api/v1/workgroups/{group}/members",
        403,
        "forbidden",
        {"user_ids": ["{bob}"]},
    ),
    Rest("xavier", "GET", "/api/v1/presence?ids={alice}", 200),  # left out: see REST_ABSENT
    # admin-only routes
    *[Rest("alice", m, p, 403, "forbidden", b) for m, p, b in PORTAL_ADMIN_ONLY],
    *[Rest("hank", m, p, 403, "forbidden", b) for m, p, b in PORTAL_ADMIN_ONLY],
    Rest("admin", "PATCH", "/api/v1/users/{bob}", 200, None, {"position": "Clerk"}),
    # chats: invisible to non-members, whatever the operation
    *[Rest("oscar", "GET", p, 404, "not-found") for p in ANY_CHAT_PATHS],
    *[Rest("eve", "GET", p, 404, "not-found") for p in ANY_CHAT_PATHS],
    *[Rest("bob", "GET", p, 200) for p in ANY_CHAT_PATHS],
    Rest("oscar", "GET", "/api/v1/im/chats/{dialog}/messages", 404, "not-found"),
    Rest("bob", "GET", "/api/v1/im/chats/{dialog}/messages", 200),
    Rest("xavier", "GET", "/api/v1/im/chats/{group_chat}", 404, "not-found"),
    Rest("eve", "GET", "/api/v1/im/chats/{group_chat}", 200),
    Rest("admin", "GET", "/api/v1/im/chats/{chat}", 404, "not-found"),  # admins are no members
    Rest(
        "oscar",
        "POST",
        "/api/v1/im/messages",
        404,
        "not-found",
        {"chat_id": "{chat}", "text": "let me in"},
    ),
    Rest("oscar", "POST", "/api/v1/im/chats/{chat}/read", 404, "not-found", {"up_to": "{message}"}),
    Rest(
        "oscar",
        "POST",
        "/api/v1/im/chats/{chat}/members",
        404,
        "not-found",
        {"user_ids": ["{oscar}"]},
    ),
    Rest(
        "bob",
        "POST",
        "/api/v1/im/chats/{chat}/members",
        403,
        "forbidden",
        {"user_ids": ["{oscar}"]},
    ),
    Rest("oscar", "DELETE", "/api/v1/im/chats/{chat}/members/{bob}", 404, "not-found"),
    Rest("oscar", "PATCH", "/api/v1/im/messages/{message}", 404, "not-found", {"text": "mine"}),
    Rest("bob", "PATCH", "/api/v1/im/messages/{message}", 403, "forbidden", {"text": "mine"}),
    Rest("oscar", "DELETE", "/api/v1/im/messages/{message}", 404, "not-found"),
    Rest("bob", "DELETE", "/api/v1/im/messages/{message}", 403, "forbidden"),
    Rest(
        "xavier",
        "POST",
        "/api/v1/im/dialogs",
        422,
        "invalid-recipient",
        {"user_id": "{alice}"},
    ),
    Rest(
        "xavier",
        "POST",
        "/api/v1/im/messages",
        422,
        "invalid-recipient",
        {"to": ["{alice}"], "text": "hello?"},
    ),
    Rest("alice", "POST", "/api/v1/im/dialogs", 422, "invalid-recipient", {"user_id": "{xavier}"}),
    Rest("alice", "POST", "/api/v1/im/dialogs", 422, "invalid-recipient", {"user_id": "{dave}"}),
    Rest("alice", "POST", "/api/v1/im/dialogs", 200, None, {"user_id": "{eve}"}),
    # tasks: invisible without a role on them
    *[Rest("oscar", "GET", p, 404, "not-found") for p in TASK_PATHS],
    *[Rest("eve", "GET", p, 404, "not-found") for p in TASK_PATHS],
    *[Rest("bob", "GET", p, 200) for p in TASK_PATHS],
    *[Rest("admin", "GET", p, 200) for p in TASK_PATHS],
    Rest("oscar", "PATCH", "/api/v1/tasks/{task}", 404, "not-found", {"title": "Mine"}),
    Rest("oscar", "POST", "/api/v1/tasks/{task}/comments", 404, "not-found", {"text": "me too"}),
    Rest("oscar", "POST", "/api/v1/tasks/{task}/actions/start", 404, "not-found"),
    Rest("oscar", "DELETE", "/api/v1/tasks/{task}", 404, "not-found"),
    # the responsible person works on the task: 409 (observers get 403), per the docs
    Rest("bob", "DELETE", "/api/v1/tasks/{task}", 409, "action-not-allowed"),
    # CRM: a record outside one's role does not exist; role none is refused outright
    *[Rest("sam", "GET", p, 404, "not-found") for p in RECORD_PATHS],
    *[Rest("fred", "GET", p, 404, "not-found") for p in RECORD_PATHS],
    *[Rest("alice", "GET", p, 404, "not-found") for p in RECORD_PATHS],
    *[Rest("nora", "GET", p, 403, "forbidden") for p in RECORD_PATHS],
    # extranet users: no CRM role unless one is granted to them by name (Erin)
    *[Rest(who, "GET", p, 403, "forbidden") for who in ("eve", "xavier") for p in RECORD_PATHS],
    *[
        Rest(who, method, path, 403, "forbidden", body)
        for who in ("eve", "xavier")
        for method, path, body in (
            ("GET", "/api/v1/crm/deals", None),
            ("GET", "/api/v1/crm/settings", None),
            ("POST", "/api/v1/crm/leads", {"title": "Mine"}),
            ("POST", "/api/v1/crm/duplicates", {"type": "contact", "first_name": "Carl"}),
            ("GET", "/api/v1/crm/activities", None),
        )
    ],
    *[Rest("erin", "GET", p, 404, "not-found") for p in RECORD_PATHS],
    Rest("erin", "GET", "/api/v1/crm/deals", 200),
    Rest("erin", "GET", "/api/v1/crm/settings", 200),
    Rest("mary", "GET", "/api/v1/crm/settings", 200),
    # nor are they made responsible for CRM work, which would tell them of it
    Rest(
        "mary",
        "POST",
        "/api/v1/crm/activities",
        422,
        "unknown-reference",
        {"owner_type": "deal", "owner_id": "{deal}", "type": "call", "responsible_id": "{eve}"},
    ),
    Rest(
        "admin",
        "PATCH",
        "/api/v1/crm/deals/{fred_deal}",
        422,
        "unknown-reference",
        {"responsible_id": "{xavier}"},
    ),
    *[Rest("mary", "GET", p, 200) for p in RECORD_PATHS],
    *[Rest("hank", "GET", p, 200) for p in RECORD_PATHS],
    *[Rest("admin", "GET", p, 200) for p in RECORD_PATHS],
    Rest("hank", "GET", "/api/v1/crm/deals/{fred_deal}", 404, "not-found"),
    Rest("nora", "GET", "/api/v1/crm/deals", 403, "forbidden"),
    Rest("sam", "GET", "/api/v1/crm/leads/{lead}", 404, "not-found"),
    Rest("sam", "GET", "/api/v1/crm/contacts/{contact}", 404, "not-found"),
    Rest("sam", "PATCH", "/api/v1/crm/deals/{deal}", 404, "not-found", {"title": "Mine"}),
    Rest("sam", "DELETE", "/api/v1/crm/deals/{deal}", 404, "not-found"),
    Rest("sam", "POST", "/api/v1/crm/leads/{lead}/convert", 404, "not-found", {"mode": "contact"}),
    Rest(
        "sam",
        "POST",
        "/api/v1/crm/deals",
        403,
        "forbidden",
        {"title": "For Mary", "responsible_id": "{mary}"},
    ),
    Rest(
        "sam",
        "POST",
        "/api/v1/crm/activities",
        404,
        "not-found",
        {"owner_type": "deal", "owner_id": "{deal}", "type": "call"},
    ),
    Rest("sam", "GET", "/api/v1/crm/activities/{activity}", 404, "not-found"),
    Rest("sam", "PATCH", "/api/v1/crm/activities/{activity}", 404, "not-found", {"subject": "x"}),
    Rest("sam", "DELETE", "/api/v1/crm/activities/{activity}", 404, "not-found"),
    Rest("nora", "GET", "/api/v1/crm/activities/{activity}", 403, "forbidden"),
    Rest("hank", "GET", "/api/v1/crm/activities/{activity}", 200),
    Rest("sam", "GET", "/api/v1/crm/activities?responsible_id={mary}", 403, "forbidden"),
    Rest("hank", "GET", "/api/v1/crm/activities?responsible_id={mary}", 200),
    Rest("sam", "GET", "/api/v1/crm/activities?owner_type=deal&owner_id={deal}", 404, "not-found"),
    Rest("mary", "GET", "/api/v1/crm/activities?owner_type=deal&owner_id={deal}", 200),
    # mail: sending from and downloading for a record follow the record; role none is refused
    Rest(
        "sam",
        "POST",
        "/api/v1/crm/deals/{deal}/emails",
        404,
        "not-found",
        {"to": ["carl@client.example"], "subject": "Hi", "text": "Hi"},
    ),
    Rest(
        "nora",
        "POST",
        "/api/v1/crm/deals/{deal}/emails",
        403,
        "forbidden",
        {"to": ["carl@client.example"], "subject": "Hi", "text": "Hi"},
    ),
    Rest("sam", "GET", "/api/v1/mail/attachments/{file}", 404, "not-found"),
    Rest("fred", "GET", "/api/v1/mail/attachments/{file}", 404, "not-found"),
    Rest("nora", "GET", "/api/v1/mail/attachments/{file}", 403, "forbidden"),
    Rest("mary", "GET", "/api/v1/mail/attachments/{file}", 200),
    Rest("hank", "GET", "/api/v1/mail/attachments/{file}", 200),
    Rest("alice", "GET", "/api/v1/mail/templates", 200),
    Rest("alice", "GET", "/api/v1/mail/info", 200),
    # CRM administrators' routes: managers, heads and plain employees (Alice moderates a
    # workgroup: that gives no right to its CRM role) are refused
    *[
        Rest(who, m, p, 403, "forbidden", b)
        for who in ("mary", "hank", "alice")
        for m, p, b in CRM_ADMIN_ONLY
    ],
    Rest("admin", "GET", "/api/v1/crm/roles", 200),
    Rest("admin", "GET", "/api/v1/mail/unmatched", 200),
    Rest("hank", "GET", "/api/v1/crm/me", 200),
]


@dataclass(frozen=True)
class Absent:
    """``who`` lists ``path`` and must not find the id ``hidden`` anywhere in the answer,
    while ``allowed`` lists the same path and finds it; both get ``status``."""

    who: str
    allowed: str
    path: str
    hidden: str
    method: str = "GET"
    body: Any = None
    status: int = 200


CARL_PROBE = {"type": "contact", "emails": ["carl@client.example"]}
CARL_AGAIN = {"first_name": "Carl", "emails": [{"value": "carl@client.example"}]}


REST_ABSENT = [
    Absent("oscar", "alice", "/api/v1/im/search?q=secret", "message"),
    Absent("oscar", "bob", "/api/v1/im/dialogs", "chat"),
    Absent("oscar", "bob", "/api/v1/tasks", "task"),
    Absent("eve", "alice", "/api/v1/tasks?role=all", "task"),
    Absent("sam", "mary", "/api/v1/crm/deals", "deal"),
    Absent("fred", "hank", "/api/v1/crm/deals", "deal"),
    Absent("sam", "hank", "/api/v1/crm/leads", "lead"),
    Absent("xavier", "eve", "/api/v1/users", "alice"),
    Absent("bob", "alice", "/api/v1/users", "eve"),
    Absent("alice", "admin", "/api/v1/users?include_inactive=true", "dave"),
    Absent("xavier", "eve", "/api/v1/presence?ids={alice}", "alice"),
    Absent("xavier", "eve", "/api/v1/workgroups", "group"),
    Absent("sam", "mary", "/api/v1/crm/activities?status=all", "activity"),
    # duplicate control: of a match one may not see, not even the responsible person
    *[
        Absent("sam", "mary", "/api/v1/crm/duplicates", hidden, "POST", CARL_PROBE)
        for hidden in ("contact", "mary")
    ],
    *[
        Absent("sam", "mary", "/api/v1/crm/contacts", hidden, "POST", CARL_AGAIN, 409)
        for hidden in ("contact", "mary")
    ],
]


async def test_rest_refuses_what_each_role_must_not_see(hub: HubHarness) -> None:
    world = await build_world(hub)
    mismatches: list[str] = []
    for row in REST_ROWS:
        token = None if row.who == "anonymous" else world.tokens[row.who]
        body = fill(row.body, world)
        resp = await hub.request(row.method, world.path(row.path), token=token, json=body)
        got_slug = resp.body.get("type", "").rpartition(":")[2] if resp.status >= 400 else None
        if resp.status != row.status or (row.slug is not None and got_slug != row.slug):
            mismatches.append(
                f"{row.who} {row.method} {row.path}: expected {row.status} {row.slug or ''}, "
                f"got {resp.status} {got_slug or ''} {str(resp.body)[:200]}"
            )
        elif resp.status >= 400:
            if resp.content_type != "application/problem+json":
                mismatches.append(f"{row.who} {row.method} {row.path}: {resp.content_type}")
            if row.status == 401 and "WWW-Authenticate" not in resp.headers:
                mismatches.append(f"{row.who} {row.method} {row.path}: no WWW-Authenticate")
    for absent in REST_ABSENT:
        hidden = world.ids[absent.hidden]
        path, body = world.path(absent.path), fill(absent.body, world)
        denied, allowed = [
            await hub.request(absent.method, path, token=world.tokens[who], json=body)
            for who in (absent.who, absent.allowed)
        ]
        if denied.status != absent.status or hidden in str(denied.body):
            mismatches.append(f"{absent.who} {absent.method} {absent.path}: sees {absent.hidden}")
        if allowed.status != absent.status or hidden not in str(allowed.body):
            mismatches.append(
                f"{absent.allowed} {absent.method} {absent.path}: misses {absent.hidden}"
            )
    # one's own presence settings are private: colleagues see "offline", no manual or invisible
    bob = world.tokens["bob"]
    await call(hub, bob, "PUT", "/api/v1/presence/me", {"status": "dnd", "invisible": True})
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    own = (await call(hub, bob, "GET", world.path("/api/v1/presence?ids={bob}")))["presence"]
    seen = await call(hub, world.tokens["alice"], "GET", world.path("/api/v1/presence?ids={bob}"))
    if own[0]["manual"] != "dnd" or own[0]["invisible"] is not True:
        mismatches.append(f"bob's own presence view: {own}")
    expected = {"status": "offline", "manual": None, "invisible": None}
    if {k: seen["presence"][0][k] for k in expected} != expected:
        mismatches.append(f"alice sees bob's private presence settings: {seen}")
    assert not mismatches, "\n".join(mismatches)


def fill(body: Any, world: World) -> Any:
    if isinstance(body, str):
        return world.path(body)
    if isinstance(body, list):
        return [fill(item, world) for item in body]
    if isinstance(body, dict):
        return {key: fill(value, world) for key, value in body.items()}
    return body


# --- Socket.IO -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Subscribe:
    who: str
    stream: str  # a template: "chat:{chat}"
    allowed: bool


SUBSCRIBE_ROWS = [
    Subscribe("oscar", "user:{alice}", False),
    Subscribe("oscar", "chat:{chat}", False),
    Subscribe("oscar", "chat:{dialog}", False),
    Subscribe("eve", "chat:{chat}", False),
    Subscribe("xavier", "chat:{group_chat}", False),
    Subscribe("sam", "user:{mary}", False),  # CRM events of Mary's records are on her stream
    Subscribe("hank", "user:{mary}", False),  # even her head's CRM role opens no stream
    Subscribe("admin", "user:{alice}", False),  # nor does being an administrator
    Subscribe("admin", "chat:{chat}", False),
    Subscribe("oscar", "crm:deal:{deal}", False),  # kinds without a rule: nobody
    Subscribe("oscar", "task:{task}", False),
    Subscribe("oscar", "user:{alice}:x", False),
    Subscribe("oscar", "chat:{chat}\u0000", False),
    Subscribe("oscar", "CHAT:{chat}", False),
    Subscribe("oscar", "user:{oscar}", True),  # positive controls
    Subscribe("bob", "chat:{chat}", True),
    Subscribe("eve", "chat:{group_chat}", True),
]


async def test_socketio_subscribe_refuses_foreign_streams(hub: HubHarness) -> None:
    world = await build_world(hub)
    clients: dict[str, SocketClient] = {}
    mismatches: list[str] = []
    for row in SUBSCRIBE_ROWS:
        client = clients.get(row.who)
        if client is None:
            client = clients[row.who] = await hub.connect(world.tokens[row.who])
            await client.wait_for("snapshot")
        stream = world.path(row.stream)
        if row.allowed:  # joined at connect: leave first, so that subscribe really joins
            await client.call("unsubscribe", {"stream": stream})
        ack = await client.call("subscribe", {"stream": stream, "since": 0})
        expected = {"ok": False, "error": "forbidden"}
        if row.allowed and (ack.get("ok") is not True or not isinstance(ack.get("seq"), int)):
            mismatches.append(f"{row.who} subscribe {row.stream}: {ack}")
        if not row.allowed and ack != expected:
            mismatches.append(f"{row.who} subscribe {row.stream}: {ack}")
    # im.typing is a way into a chat's room too
    typing = await clients["oscar"].call("im.typing", {"chat_id": world.ids["chat"]})
    if typing != {"ok": False, "error": "forbidden"}:
        mismatches.append(f"oscar im.typing in the chat: {typing}")
    assert not mismatches, "\n".join(mismatches)

    # nothing of a refused stream arrives afterwards; the allowed ones get it
    await call(
        hub,
        world.tokens["alice"],
        "POST",
        "/api/v1/im/messages",
        {"chat_id": world.ids["chat"], "text": "after the attempts"},
    )
    await clients["bob"].wait_until(lambda: "after the attempts" in repr(clients["bob"].events))
    await asyncio.sleep(0.2)
    for who in ("oscar", "eve", "sam", "admin"):
        assert "after the attempts" not in repr(clients[who].events), who


async def test_socketio_forged_since_gets_subscribe_error_and_nothing_else(
    hub: HubHarness,
) -> None:
    world = await build_world(hub)
    ids = world.ids
    foreign = [
        f"user:{ids['alice']}",
        f"user:{ids['mary']}",
        f"chat:{ids['chat']}",
        f"chat:{ids['dialog']}",
        f"chat:{ids['group_chat']}",
        f"task:{ids['task']}",
    ]
    since = dict.fromkeys(foreign, 0)
    oscar = await hub.connect(world.tokens["oscar"], since=since)
    sam = await hub.connect(world.tokens["sam"], since={f"user:{ids['mary']}": 0})
    hank = await hub.connect(world.tokens["hank"])  # Mary's head: her records' events reach him
    bob = await hub.connect(world.tokens["bob"])
    await oscar.wait_for("subscribe_error", count=len(foreign))
    assert sorted(e["stream"] for e in oscar.of_type("subscribe_error")) == sorted(foreign)
    assert all(e["code"] == "forbidden" for e in oscar.of_type("subscribe_error"))
    [refused] = await sam.wait_for("subscribe_error")
    assert refused == {"stream": f"user:{ids['mary']}", "code": "forbidden"}
    for client in (hank, bob):
        await client.wait_for("snapshot")

    # what happened before (replay from 0) and what happens now (live) stays with its readers
    alice, mary = world.tokens["alice"], world.tokens["mary"]
    await call(hub, alice, "POST", "/api/v1/im/messages", {"chat_id": ids["chat"], "text": "live"})
    await call(hub, alice, "PATCH", f"/api/v1/tasks/{ids['task']}", {"title": "Renamed report"})
    await call(hub, mary, "PATCH", f"/api/v1/crm/deals/{ids['deal']}", {"title": "Renamed deal"})
    await bob.wait_until(
        lambda: "Renamed report" in repr(bob.events) and "live" in repr(bob.events)
    )
    await hank.wait_until(lambda: "Renamed deal" in repr(hank.events))
    await asyncio.sleep(0.3)
    for client, name in ((oscar, "oscar"), (sam, "sam")):
        seen = repr(client.events)
        for secret in ("secret plan", "secret dialog", "Secret report", "Renamed", "live"):
            assert secret not in seen, (name, secret)
        for event in client.events:
            data = event[1]
            if isinstance(data, dict) and "stream" in data and "type" in data:
                assert data["stream"] == f"user:{ids[name]}", (name, data)
        # the ids appear only in the refusals, which name the streams asked for
        told = repr([e for e in client.events if e[0] != "subscribe_error"])
        assert ids["deal"] not in told and ids["task"] not in told, name


async def test_a_workgroup_moderator_cannot_hand_out_the_workgroups_crm_role(
    hub: HubHarness,
) -> None:
    """Adding someone to a workgroup that holds a CRM role gives them that role: Hank, a
    moderator but no CRM admin, is refused over REST and Bob hears nothing over Socket.IO;
    the admin, doing the same, is let through and Bob's events follow (positive controls)."""
    world = await build_world(hub)
    ids, tokens = world.ids, world.tokens
    hank, admin = tokens["hank"], tokens["admin"]
    desk = await call(hub, hank, "POST", "/api/v1/workgroups", {"name": "Deal desk"})
    grant = {"role": "chief", "subject_kind": "workgroup", "subject_id": desk["id"]}
    await call(hub, admin, "PUT", "/api/v1/crm/roles", grant)
    bob = await hub.connect(tokens["bob"])
    await bob.wait_for("snapshot")
    members = f"/api/v1/workgroups/{desk['id']}/members"
    mismatches: list[str] = []

    for who in ("bob", "oscar"):
        resp = await hub.request("POST", members, token=hank, json={"user_ids": [ids[who]]})
        if resp.status != 403 or resp.content_type != "application/problem+json":
            mismatches.append(f"hank adds {who}: {resp.status} {resp.body}")
    # Eve joins (a workgroup's role does not reach extranet users) and stays outside the CRM
    resp = await hub.request("POST", members, token=hank, json={"user_ids": [ids["eve"]]})
    if resp.status != 200:
        mismatches.append(f"hank adds eve: {resp.status} {resp.body}")
    eve_deals = await hub.request("GET", "/api/v1/crm/deals", token=tokens["eve"])
    if eve_deals.status != 403:
        mismatches.append(f"eve lists deals after joining: {eve_deals.status}")
    bob_deal = await hub.request("GET", world.path("/api/v1/crm/deals/{deal}"), token=tokens["bob"])
    if bob_deal.status != 404:
        mismatches.append(f"bob reads Mary's deal after the refusal: {bob_deal.status}")
    await call(
        hub, tokens["mary"], "PATCH", world.path("/api/v1/crm/deals/{deal}"), {"title": "T1"}
    )

    await call(hub, admin, "POST", members, {"user_ids": [ids["bob"]]})
    await call(
        hub, tokens["mary"], "PATCH", world.path("/api/v1/crm/deals/{deal}"), {"title": "T2"}
    )
    await bob.wait_until(lambda: "T2" in repr(bob.of_type("crm.record.updated")))
    if "'T1'" in repr(bob.events):
        mismatches.append("bob got the deal's update from before he was given the role")
    bob_deal = await hub.request("GET", world.path("/api/v1/crm/deals/{deal}"), token=tokens["bob"])
    if bob_deal.status != 200:
        mismatches.append(f"bob reads Mary's deal once the admin added him: {bob_deal.status}")
    assert not mismatches, "\n".join(mismatches)


async def test_socketio_refuses_anonymous_and_bad_tokens(hub: HubHarness) -> None:
    for auth, code in ((None, "auth_required"), ({"token": "forged"}, "invalid_token")):
        with pytest.raises(Refused) as refused:
            await hub.connect(None, auth=auth if auth is not None else "")
        [reason] = refused.value.reasons
        assert reason["data"]["code"] == code, reason
    _, token = await hub.create_user("alice")
    await call(hub, token, "POST", "/api/v1/auth/logout")
    with pytest.raises(Refused) as refused:
        await hub.connect(token)
    assert refused.value.reasons[0]["data"]["code"] == "invalid_token"


# --- XMPP ----------------------------------------------------------------------------------


class Jabber:
    """A logged-in raw XMPP stream, with request/answer helpers."""

    def __init__(self, raw: RawXmpp, domain: str) -> None:
        self.raw = raw
        self.domain = domain
        self.n = 0

    @classmethod
    async def login(cls, hub: HubHarness, login: str) -> Jabber:
        raw = await RawXmpp.connect(hub)
        await raw.login(login)
        return cls(raw, domain_of(hub))

    def jid(self, local: str, resource: str = "") -> str:
        return f"{local}@{self.domain}" + (f"/{resource}" if resource else "")

    def room(self, chat_id: str, nick: str = "") -> str:
        return f"{chat_id}@conference.{self.domain}" + (f"/{nick}" if nick else "")

    async def answer(self, build: Callable[[str], str], timeout: float = 10) -> ET.Element:
        """Send what ``build(id)`` makes; the first top-level element naming that id back."""
        self.n += 1
        ident = f"q{self.n}"
        self.raw.send(build(ident))
        parsed = await self.raw.wait_for(
            lambda p: any(el.get("id") == ident for el in p.elements), timeout
        )
        return next(el for el in parsed.elements if el.get("id") == ident)

    async def iq(self, kind: str, to: str | None, payload: str) -> ET.Element:
        target = f" to='{to}'" if to else ""
        return await self.answer(lambda i: f"<iq type='{kind}' id='{i}'{target}>{payload}</iq>")

    def elements(self, since: int = 0) -> list[ET.Element]:
        return self.raw.parsed().elements[since:]


def sent_from(jid: str, since: int) -> Callable[[Parsed], bool]:
    """Whether an element from ``jid`` arrived after the first ``since`` ones."""
    return lambda parsed: any(el.get("from") == jid for el in parsed.elements[since:])


def chat_message(ident: str, *, to: str, body: str) -> str:
    return f"<message type='chat' id='{ident}' to='{to}'><body>{body}</body></message>"


def condition(stanza: ET.Element) -> str | None:
    """The stanza error condition of an answer, or None for a success."""
    if stanza.get("type") != "error":
        return None
    for error in stanza:
        if error.tag.endswith("}error"):
            for cond in error:
                if cond.tag.startswith(f"{{{STANZAS_NS}}}") and not cond.tag.endswith("}text"):
                    return cond.tag.rpartition("}")[2]
    return "?"


def text_of(element: ET.Element) -> str:
    return ET.tostring(element, encoding="unicode")


async def test_xmpp_refuses_what_each_user_must_not_see(hub: HubHarness) -> None:
    world = await build_world(hub)
    ids = world.ids
    logins = ("alice", "bob", "oscar", "eve", "xavier")
    jabbers = await asyncio.gather(*(Jabber.login(hub, n) for n in logins))
    clients = dict(zip(logins, jabbers, strict=True))
    alice, bob, oscar, eve, xavier = (clients[n] for n in logins)
    mismatches: list[str] = []

    def expect(label: str, got: str | None, wanted: str | None) -> None:
        if got != wanted:
            mismatches.append(f"{label}: expected {wanted or 'success'}, got {got or 'success'}")

    # MAM: only one's own archive, and in it only one's own dialogs
    mam = f"<query xmlns='{MAM}'/>"
    for client, name in ((oscar, "oscar"), (xavier, "xavier"), (bob, "bob")):
        got = await client.iq("set", alice.jid("alice"), mam)
        expect(f"{name} MAM on alice's archive", condition(got), "forbidden")
    form = (
        f"<query xmlns='{MAM}'><x xmlns='jabber:x:data' type='submit'>"
        f"<field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>"
        "<field var='with'><value>{with}</value></field></x></query>"
    )
    for client, name, other, visible in (
        (oscar, "oscar", "alice", False),
        (oscar, "oscar", "bob", False),
        (bob, "bob", "alice", True),  # the positive control: their dialog
        (alice, "alice", "bob", True),
    ):
        before = len(client.elements())
        got = await client.iq("set", None, form.replace("{with}", client.jid(other)))
        archived = [
            text_of(el) for el in client.elements(before) if el.find(f"{{{MAM}}}result") is not None
        ]
        expect(f"{name} MAM with {other}", condition(got), None)
        if visible != any("secret dialog" in a for a in archived):
            mismatches.append(f"{name} MAM with {other}: archived {archived}")
        if any("secret plan" in a for a in archived):
            mismatches.append(f"{name} MAM with {other}: group chat in the archive")

    # MUC: a room is joined, discovered and listed by its members only
    join = f"<x xmlns='{MUC}'><history maxstanzas='20'/></x>"
    joins: list[tuple[Jabber, str, str, str | None]] = [
        (oscar, "oscar", "chat", "registration-required"),
        (eve, "eve", "chat", "registration-required"),
        (xavier, "xavier", "group_chat", "registration-required"),
        (oscar, "oscar", "dialog", "registration-required"),  # a dialog is no room
    ]
    for client, name, chat, wanted in joins:
        room = client.room(ids[chat], name)
        before = len(client.elements())
        client.raw.send(f"<presence to='{room}'>{join}</presence>")
        parsed = await client.raw.wait_for(sent_from(room, before))
        [reply] = [el for el in parsed.elements[before:] if el.get("from") == room]
        expect(f"{name} joins {chat}", condition(reply), wanted)
        leaked = "".join(text_of(el) for el in client.elements(before))
        if "secret plan" in leaked:
            mismatches.append(f"{name} joining {chat} got the history")
    room = bob.room(ids["chat"], "bob")
    before = len(bob.elements())
    bob.raw.send(f"<presence to='{room}'>{join}</presence>")
    await bob.raw.wait_for(
        lambda p: any("secret plan" in text_of(el) for el in p.elements[before:])
    )  # the positive control: a member joins and gets the history

    rooms: list[tuple[Jabber, str, str | None]] = [
        (oscar, "oscar", "item-not-found"),
        (bob, "bob", None),
    ]
    for client, name, wanted in rooms:
        info = await client.iq(
            "get",
            client.room(ids["chat"]),
            "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        )
        expect(f"{name} disco#info of the room", condition(info), wanted)
        members = await client.iq(
            "get",
            client.room(ids["chat"]),
            "<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member'/>"
            "</query>",
        )
        expect(f"{name} member list of the room", condition(members), wanted)
        items = await client.iq(
            "get",
            f"conference.{client.domain}",
            "<query xmlns='http://jabber.org/protocol/disco#items'/>",
        )
        listed = ids["chat"] in text_of(items)
        if listed != (wanted is None):
            mismatches.append(f"{name} disco#items of the service lists the room: {listed}")
    sent = await oscar.answer(
        lambda i: (
            f"<message type='groupchat' id='{i}' to='{oscar.room(ids['chat'])}'>"
            "<body>let me in</body></message>"
        )
    )
    expect("oscar writes to the room", condition(sent), "not-acceptable")

    # vCard and roster: only people one may see
    cards: list[tuple[Jabber, str, str, str | None]] = [
        (xavier, "xavier", "alice", "item-not-found"),
        (xavier, "xavier", "eve", "item-not-found"),
        (alice, "alice", "xavier", "item-not-found"),
        (bob, "bob", "eve", "item-not-found"),
        (alice, "alice", "dave", "item-not-found"),
        (eve, "eve", "alice", None),
        (alice, "alice", "eve", None),
        (oscar, "oscar", "alice", None),
    ]
    for client, name, other, wanted in cards:
        card = await client.iq("get", client.jid(other), "<vCard xmlns='vcard-temp'/>")
        expect(f"{name} vCard of {other}", condition(card), wanted)
    rosters: dict[str, str] = {}
    for name, client in clients.items():
        got = await client.iq("get", None, f"<query xmlns='{ROSTER}'/>")
        rosters[name] = text_of(got)
    for name, other, present in (
        ("xavier", "alice", False),
        ("xavier", "eve", False),
        ("eve", "bob", False),
        ("eve", "alice", True),
        ("alice", "xavier", False),
        ("alice", "eve", True),
        ("bob", "eve", False),
        ("oscar", "dave", False),
        ("oscar", "alice", True),
    ):
        if (f"{other}@" in rosters[name]) != present:
            mismatches.append(f"{name}'s roster {'misses' if present else 'has'} {other}")

    # a message to someone one may not see goes nowhere
    for client, name, other in ((xavier, "xavier", "alice"), (alice, "alice", "xavier")):
        to = client.jid(other)
        got = await client.answer(partial(chat_message, to=to, body="psst"))
        expect(f"{name} writes to {other}", condition(got), "service-unavailable")
    await asyncio.sleep(0.2)
    if any("psst" in text_of(el) for el in alice.elements() + xavier.elements()):
        mismatches.append("a message to an invisible user arrived")
    assert not mismatches, "\n".join(mismatches)


# --- presence over XMPP follows who may see whom --------------------------------------------


async def test_xmpp_presence_probe_reveals_nothing_of_an_invisible_user(
    hub: HubHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    _, alice_token = await hub.create_user("alice")
    await hub.create_user("xavier", external=True)
    await hub.connect(alice_token)  # alice is online
    xavier = await Jabber.login(hub, "xavier")
    before = len(xavier.elements())
    xavier.raw.send(f"<presence type='probe' to='{xavier.jid('alice')}'/>")
    xavier.raw.send("<iq type='get' id='after'><ping xmlns='urn:xmpp:ping'/></iq>")
    parsed = await xavier.raw.wait_for(lambda p: any(el.get("id") == "after" for el in p.elements))
    answers = [text_of(el) for el in parsed.elements[before:] if el.tag.endswith("}presence")]
    assert not any("alice@" in a for a in answers), answers


async def test_xmpp_subscription_request_reveals_nothing_of_an_invisible_user(
    hub: HubHarness,
) -> None:
    await hub.create_user("alice")
    await hub.create_user("xavier", external=True)
    xavier = await Jabber.login(hub, "xavier")
    before = len(xavier.elements())
    for login in ("alice", "nobody"):
        xavier.raw.send(f"<presence type='subscribe' to='{xavier.jid(login)}'/>")
    xavier.raw.send("<iq type='get' id='after'><ping xmlns='urn:xmpp:ping'/></iq>")
    parsed = await xavier.raw.wait_for(lambda p: any(el.get("id") == "after" for el in p.elements))
    answers = [text_of(el) for el in parsed.elements[before:] if el.tag.endswith("}presence")]
    # an existing invisible user and a login nobody has must look the same
    assert not any("alice@" in a for a in answers), answers
