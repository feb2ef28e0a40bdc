"""Text XML 1.0 cannot carry never reaches an XMPP stream (issue #13, "XML-illegal characters",
"names refuse control and bidi characters").

First line: every entry refuses it (REST with a 422 problem naming the field and the character,
the CLI), names refuse control and bidirectional characters besides, and received mail is
cleaned. Second line: the XMPP serialiser replaces whatever is stored already, so a name or a
message written before these rules (here: straight into the database) cannot end a Jabber
session: not at login (roster, offline delivery), not in MAM, not live.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiosmtplib
import pytest
from slixmpp import JID

from server import cli
from server.settings import Settings
from server.store.database import Store
from tests.harness import DEFAULT_PASSWORD, HubHarness
from tests.xmpp_client import xmpp_login

# (a name, the character it is refused for)
NAME_REFUSED = {
    "NUL": ("An\x00na", "\x00"),
    "BEL": ("An\x07na", "\x07"),
    "ESC": ("\x1b[31mAnna", "\x1b"),
    "a line feed inside": ("Anna\nBob", "\n"),
    "a carriage return inside": ("Anna\rBob", "\r"),
    "a tab inside": ("Anna\tBob", "\t"),
    "DEL": ("Anna\x7f", "\x7f"),
    "a C1 control": ("An\x85na", "\x85"),
    "a line separator": ("Anna\u2028Bob", "\u2028"),
    "a right-to-left override": ("\u202eannA", "\u202e"),
    "a left-to-right embedding": ("\u202aAnna", "\u202a"),
    "an isolate": ("Anna\u2067", "\u2067"),
    "a noncharacter": ("Anna\ufffe", "\ufffe"),
}
NAME_ACCEPTED = [
    "Zoë-Ann O'Neil",
    "Анна",
    "אנה\u200f",  # a right-to-left mark: a letter with a direction, opens no scope
    "محمد\u061c",  # the Arabic letter mark
    "Anna 🌸",
    "👩\u200d💻 Anna",  # a zero width joiner inside an emoji
    "  Anna  \n",  # outer whitespace is stripped, as before
]


def domain(hub: HubHarness) -> str:
    xmpp = hub.services.xmpp
    assert xmpp is not None
    return xmpp.domain


async def raw_json(
    hub: HubHarness, method: str, path: str, token: str, body: dict[str, Any]
) -> Any:
    """``body`` sent as JSON text with every non-ASCII character escaped (``\\u0000``), as
    a browser's JSON.stringify would send a control character."""
    return await hub.request(
        method,
        path,
        token=token,
        data=json.dumps(body, ensure_ascii=True),
        headers={"Content-Type": "application/json"},
    )


def assert_refused(resp: Any, field: str, character: str, kind: str = "name_character") -> None:
    assert resp.status == 422, resp.body
    assert resp.content_type == "application/problem+json"
    assert resp.body["type"] == "urn:portalhub:problem:validation-error"
    [error] = resp.body["errors"]
    assert error["loc"][-1] == field, error
    assert error["type"] == kind
    assert f"U+{ord(character):04X}" in error["msg"]


# names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "bad"), NAME_REFUSED.values(), ids=NAME_REFUSED.keys())
async def test_a_name_with_a_control_or_bidi_character_is_refused(
    hub: HubHarness, name: str, bad: str
) -> None:
    alice_id, alice = await hub.create_user("alice", first_name="Anna")
    resp = await raw_json(hub, "PATCH", "/api/v1/users/me", alice, {"first_name": name})
    assert_refused(resp, "first_name", bad)
    stored = await hub.services.store.users.find_one({"_id": alice_id})
    assert stored is not None and stored["first_name"] == "Anna"


@pytest.mark.parametrize("name", NAME_ACCEPTED)
async def test_names_in_any_script_are_still_accepted(hub: HubHarness, name: str) -> None:
    _, alice = await hub.create_user("alice")
    resp = await raw_json(hub, "PATCH", "/api/v1/users/me", alice, {"last_name": name})
    assert resp.status == 200, resp.body
    assert resp.body["last_name"] == name.strip()


async def test_a_nul_in_a_name_leaves_every_colleague_able_to_log_in_over_jabber(
    hub: HubHarness,
) -> None:
    """The issue's scenario: a NUL in one person's first name, then a colleague logs in."""
    _, alice = await hub.create_user("alice", first_name="Alice")
    await hub.create_user("bob")
    resp = await hub.request("PATCH", "/api/v1/users/me", token=alice, json={"first_name": "A\0"})
    assert_refused(resp, "first_name", "\0")
    bob = await xmpp_login(hub, "bob")
    assert bob.client_roster[JID(f"alice@{domain(hub)}")]["name"] == "Alice"


async def test_every_kind_of_name_refuses_control_and_bidi_characters(hub: HubHarness) -> None:
    admin_id, admin = await hub.create_user("root", admin=True)
    bad = "Sales\u202e"
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/api/v1/departments", {"name": bad}, "name"),
        ("POST", "/api/v1/workgroups", {"name": bad}, "name"),
        ("POST", "/api/v1/im/chats", {"title": bad}, "title"),
        ("POST", "/api/v1/tasks", {"title": bad, "responsible_ids": [admin_id]}, "title"),
        (
            "POST",
            "/api/v1/tasks",
            {"title": "ok", "responsible_ids": [admin_id], "tags": [bad]},
            "0",
        ),
        ("POST", "/api/v1/crm/leads", {"title": bad}, "title"),
        ("POST", "/api/v1/crm/contacts", {"first_name": bad}, "first_name"),
        ("POST", "/api/v1/crm/companies", {"title": bad}, "title"),
        ("POST", "/api/v1/crm/deals", {"title": bad}, "title"),
        (
            "POST",
            "/api/v1/users",
            {"login": "eve", "email": "eve@example.test", "position": bad},
            "position",
        ),
        ("POST", "/api/v1/mail/templates", {"name": bad}, "name"),
        ("POST", "/api/v1/mail/templates", {"name": "Hello", "subject": "Hi\tthere"}, "subject"),
    ]
    for method, path, body, field in cases:
        resp = await hub.request(method, path, token=admin, json=body)
        character = "\t" if field == "subject" else "\u202e"
        assert_refused(resp, field, character)
    # the same name without the override is fine
    resp = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Sales"})
    assert resp.status == 201, resp.body


async def test_an_attachment_name_is_a_name_too(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    for name, bad in (("invoice\u202efdp.exe", "U+202E"), ("a\x07.txt", "U+0007")):
        resp = await hub.request(
            "POST", f"/api/v1/mail/attachments?filename={quote(name)}", token=alice, data=b"x"
        )
        assert resp.status == 422, resp.body
        assert bad in resp.body["detail"]
    resp = await hub.request(
        "POST", "/api/v1/mail/attachments?filename=invoice.pdf", token=alice, data=b"x"
    )
    assert resp.status == 201, resp.body


# free text -----------------------------------------------------------------------------------

TEXT_REFUSED = {
    "NUL": ("a\x00b", "\x00"),
    "BEL": ("ding\x07", "\x07"),
    "VT": ("a\x0bb", "\x0b"),
    "ESC": ("\x1b[2J", "\x1b"),
    "U+FFFE": ("a\ufffeb", "\ufffe"),
    "U+FFFF": ("a\uffffb", "\uffff"),
}


@pytest.mark.parametrize(("text", "bad"), TEXT_REFUSED.values(), ids=TEXT_REFUSED.keys())
async def test_a_message_xml_cannot_carry_is_refused_and_nothing_is_stored(
    hub: HubHarness, text: str, bad: str
) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    web = await hub.connect(bob)
    await web.wait_for("snapshot")
    resp = await raw_json(hub, "POST", "/api/v1/im/messages", alice, {"to": [bob_id], "text": text})
    assert_refused(resp, "text", bad, kind="text_character")
    assert await hub.services.store["messages"].count_documents({}) == 0
    # the next message gets through, to a Jabber session as well
    jabber = await xmpp_login(hub, "bob")
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=alice, json={"to": [bob_id], "text": "still here"}
    )
    assert resp.status == 201, resp.body
    await jabber.wait_for_condition(lambda: "still here" in jabber.bodies())
    assert not jabber.gone.is_set()


async def test_edits_comments_and_descriptions_refuse_it_too(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    sent = await hub.request(
        "POST", "/api/v1/im/messages", token=alice, json={"to": [bob_id], "text": "hello"}
    )
    message = sent.body["messages"][0]
    resp = await hub.request(
        "PATCH", f"/api/v1/im/messages/{message['id']}", token=alice, json={"text": "hel\x07lo"}
    )
    assert_refused(resp, "text", "\x07", kind="text_character")
    task = await hub.request(
        "POST", "/api/v1/tasks", token=alice, json={"title": "Plan", "responsible_ids": [alice_id]}
    )
    assert task.status == 201, task.body
    task_id = task.body["tasks"][0]["id"]
    resp = await hub.request(
        "POST", f"/api/v1/tasks/{task_id}/comments", token=alice, json={"text": "\x1b"}
    )
    assert_refused(resp, "text", "\x1b", kind="text_character")
    resp = await hub.request(
        "PATCH", f"/api/v1/tasks/{task_id}", token=alice, json={"description": "a\ufffe"}
    )
    assert_refused(resp, "description", "\ufffe", kind="text_character")
    history = await hub.request(
        "GET", f"/api/v1/im/chats/{message['chat_id']}/messages", token=alice
    )
    assert [m["text"] for m in history.body] == ["hello"]


async def test_text_keeps_line_breaks_tabs_and_right_to_left_marks(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    text = "line one\r\nline\ttwo\n\u202bعربي\u202c and \u2067\u05e9\u05dc\u05d5\u05dd\u2069 😀"
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=alice, json={"to": [bob_id], "text": text}
    )
    assert resp.status == 201, resp.body
    assert resp.body["messages"][0]["text"] == text


async def test_a_custom_crm_text_field_refuses_it(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    fields = {"lead": [{"code": "notes", "name": "Notes", "type": "string"}]}
    resp = await hub.request(
        "PATCH", "/api/v1/crm/settings", token=admin, json={"custom_fields": fields}
    )
    assert resp.status == 200, resp.body
    resp = await hub.request(
        "POST",
        "/api/v1/crm/leads",
        token=admin,
        json={"title": "Lead", "custom_fields": {"notes": "a\x00b"}},
    )
    assert resp.status == 422, resp.body
    assert "U+0000" in resp.body["detail"]


# the CLI ---------------------------------------------------------------------------------------


async def test_the_cli_refuses_such_a_name(settings: Settings, store: Store) -> None:
    args = cli.build_parser().parse_args(
        ["user", "add", "bob", "--email", "bob@example.test", "--first-name", "Bo\x07b"]
    )
    with pytest.raises(SystemExit) as refused:
        await cli.user_add(settings, args, DEFAULT_PASSWORD)
    assert "invalid first_name" in str(refused.value) and "U+0007" in str(refused.value)
    assert await store.users.find_one({"login": "bob"}) is None


# the second line: what is stored already --------------------------------------------------------


async def test_poison_stored_before_the_rules_never_breaks_a_stream(hub: HubHarness) -> None:
    """A first name, a position, a department name and messages holding NUL, BEL, ESC, U+FFFE
    and U+FFFF, written straight into the database as old data would be: a colleague's login
    (roster, offline messages), their vCard and MAM queries, a live notice - the session stays
    up throughout and another colleague logs in after it."""
    _, admin = await hub.create_user("root", admin=True)
    dept = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Ops"})
    alice_id, alice = await hub.create_user("alice", department_id=dept.body["id"])
    bob_id, _ = await hub.create_user("bob")
    await hub.create_user("carol")
    store = hub.services.store
    sent = await hub.request(
        "POST", "/api/v1/im/messages", token=alice, json={"to": [bob_id], "text": "clean"}
    )
    message_id = sent.body["messages"][0]["id"]
    await store["messages"].update_one(
        {"_id": message_id}, {"$set": {"text": "ding\x07dong\x00\ufffe\uffff\x1b"}}
    )
    await store.users.update_one(
        {"_id": alice_id}, {"$set": {"first_name": "An\x00na", "position": "Boss\x0b"}}
    )
    await store.departments.update_one({"_id": dept.body["id"]}, {"$set": {"name": "O\x01ps"}})
    # written behind the services' backs, as a restart would find it: drop what they cached
    hub.services.directory.forget_all()
    cleaned = "ding\ufffddong\ufffd\ufffd\ufffd\ufffd"
    d = domain(hub)

    bob = await xmpp_login(
        hub, "bob", plugins=("xep_0313", "xep_0059", "xep_0054", "xep_0203"), get_roster=False
    )
    # (a client whose parser choked never gets its answer: fail in seconds, not at the timeout)
    await asyncio.wait_for(bob.get_roster(), 10)
    alice_jid = JID(f"alice@{d}")
    assert bob.client_roster[alice_jid]["name"] == "An\ufffdna"
    assert bob.client_roster[alice_jid]["groups"] == ["O\ufffdps"]
    await bob.wait_for_condition(lambda: cleaned in bob.bodies())  # offline delivery

    archive = await bob.plugin["xep_0313"].retrieve(with_jid=alice_jid, timeout=10)
    bodies = [
        str(m["mam_result"]["forwarded"]["stanza"]["body"]) for m in archive["mam"]["results"]
    ]
    assert bodies == [cleaned]
    card = (await bob.plugin["xep_0054"].get_vcard(alice_jid, timeout=10))["vcard_temp"]
    assert card["N"]["GIVEN"] == "An\ufffdna" and card["TITLE"] == "Boss\ufffd"

    # live: a notice composed by the portal itself, which no request validated
    await hub.services.im.post_system_notice(bob_id, "bell\x07 from the portal")
    await bob.wait_for_condition(lambda: "bell\ufffd from the portal" in bob.bodies())

    assert not bob.gone.is_set() and not bob.stream_errors
    await asyncio.wait_for(bob.get_roster(), 10)  # the same session still answers
    carol = await xmpp_login(hub, "carol", get_roster=False)
    await asyncio.wait_for(carol.get_roster(), 10)
    assert carol.client_roster[alice_jid]["name"] == "An\ufffdna"
    # the web shows what is stored; the REST API is JSON, which carries any character
    resp = await hub.request("GET", f"/api/v1/users/{alice_id}", token=alice)
    assert resp.body["first_name"] == "An\x00na"


async def test_a_copy_of_a_task_stored_before_the_rules_is_cleaned_not_refused(
    hub: HubHarness,
) -> None:
    alice_id, alice = await hub.create_user("alice")
    created = await hub.request(
        "POST", "/api/v1/tasks", token=alice, json={"title": "Plan", "responsible_ids": [alice_id]}
    )
    task_id = created.body["tasks"][0]["id"]
    await hub.services.store["tasks"].update_one(
        {"_id": task_id},
        {"$set": {"title": "Plan\tB\u202e", "description": "a\x00b", "tags": ["x\x07y", "\x1b"]}},
    )
    resp = await hub.request("POST", f"/api/v1/tasks/{task_id}/actions/copy", token=alice)
    assert resp.status == 200, resp.body
    assert resp.body["title"] == "Plan B"
    assert resp.body["description"] == "a\ufffdb"
    assert resp.body["tags"] == ["x y"]


# mail: accepted as it is, stored and passed on cleaned ------------------------------------------


async def test_mail_holding_such_characters_is_accepted_and_stored_cleaned(
    hub: HubHarness,
) -> None:
    """A stranger's mail with BEL, VT, ESC and a right-to-left override in its display name,
    subject and body: accepted (250), made a lead and an email activity with cleaned text, and
    the notice to the lead's owner reaches their Jabber session without ending it."""
    await hub.create_user("root", admin=True)  # leads from mail go to the first admin
    jabber = await xmpp_login(hub, "root")
    address = hub.services.mail.address
    raw = (
        "From: =?utf-8?q?Ev=E2=80=AEil=07_Corp?= <evil@example.test>\r\n"
        f"To: {address}\r\n"
        "Subject: =?utf-8?q?Invoice=07=E2=80=AE_due?=\r\n"
        "Message-ID: <poison-1@example.test>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Pay now\x0b please \x1b[31m\r\n"
    ).encode()
    port = hub.services.mail.ports["smtp"]
    errors, response = await aiosmtplib.send(
        raw, sender="evil@example.test", recipients=[address], hostname="127.0.0.1", port=port
    )
    assert not errors and response.startswith("2"), response
    store = hub.services.store
    await hub.services.mail.spool_drain.settled()  # the spool into the database first
    for _ in range(200):
        await hub.services.mail.pipeline.drain()
        if await store["mail_raw"].count_documents({"status": "pending"}) == 0:
            break
        await asyncio.sleep(0.05)
    [lead] = [r async for r in store["crm_records"].find({"type": "lead"})]
    assert lead["title"] == "Lead from Evil Corp"
    assert (lead["first_name"], lead["last_name"]) == ("Evil", "Corp")  # the name, split
    [activity] = [a async for a in store["crm_activities"].find({"owner_id": lead["_id"]})]
    assert activity["subject"] == "Invoice due"
    assert activity["description"] == "Pay now\ufffd please \ufffd[31m"
    await jabber.wait_for_condition(
        lambda: any(b.startswith("New email from Evil Corp") for b in jabber.bodies())
    )
    assert not jabber.gone.is_set() and not jabber.stream_errors
