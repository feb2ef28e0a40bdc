"""The directory over real HTTP: users, departments, workgroups, extranet and portal settings."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from server.directory.models import DepartmentIn, WorkgroupIn
from server.events.models import Event
from tests.harness import DEFAULT_PASSWORD, HubHarness, Response, SocketClient

PROBLEM = "application/problem+json"


def assert_problem(resp: Response, status: int, slug: str) -> None:
    assert resp.status == status, resp.body
    assert resp.content_type == PROBLEM
    assert isinstance(resp.body, dict)
    assert resp.body["status"] == status
    assert resp.body["type"] == f"urn:portalhub:problem:{slug}"
    assert isinstance(resp.body["title"], str) and resp.body["title"]


async def department(hub: HubHarness, name: str, parent_id: str | None = None) -> str:
    dept = await hub.services.directory.create_department(
        DepartmentIn(name=name, parent_id=parent_id)
    )
    return dept.id


async def workgroup(hub: HubHarness, owner_id: str, name: str, *member_ids: str) -> str:
    group = await hub.services.directory.create_workgroup(
        owner_id, WorkgroupIn(name=name, member_ids=list(member_ids))
    )
    return group.id


async def list_logins(hub: HubHarness, token: str, **params: Any) -> list[str]:
    query = f"?{urlencode(params)}" if params else ""
    resp = await hub.request("GET", f"/api/v1/users{query}", token=token)
    assert resp.status == 200, resp.body
    assert isinstance(resp.body, list)
    return [user["login"] for user in resp.body]


async def connected(hub: HubHarness, token: str) -> SocketClient:
    client = await hub.connect(token)
    await client.wait_for("snapshot")
    return client


# Other domains (the messenger, ...) publish on the user's stream too; these tests look only
# at what the directory publishes there.
DIRECTORY_EVENT_PREFIXES = ("user.", "workgroup.")


def is_directory_event(event_type: str) -> bool:
    return event_type.startswith(DIRECTORY_EVENT_PREFIXES)


async def stored_events(hub: HubHarness, user_id: str) -> list[Event]:
    events = await hub.services.streams.read_since(f"user:{user_id}", 0)
    assert events is not None
    return [event for event in events if is_directory_event(event.type)]


def without_created_at(user: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in user.items() if k != "created_at"}


def directory_events(client: SocketClient, user_id: str) -> list[dict[str, Any]]:
    """The directory's events the client received on ``user_id``'s personal stream."""
    return [
        event
        for event in client.stream_events(f"user:{user_id}")
        if is_directory_event(event["type"])
    ]


def event_types(client: SocketClient, user_id: str) -> list[str]:
    return [event["type"] for event in directory_events(client, user_id)]


async def wait_for_types(client: SocketClient, user_id: str, types: list[str]) -> None:
    """Wait until the user's stream has delivered exactly these event types, in order."""
    await client.wait_until(lambda: event_types(client, user_id) == types)


# users: admin CRUD ------------------------------------------------------------------------------


async def test_admin_creates_a_user_with_every_field(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    sales = await department(hub, "Sales")
    resp = await hub.request(
        "POST",
        "/api/v1/users",
        token=admin,
        json={
            "login": "  carol.m ",
            "email": "Carol.Meyer@Example.TEST",
            "password": "a long secret",
            "first_name": " Carol ",
            "last_name": "Meyer",
            "position": "Account manager",
            "phones": [
                {"type": "mobile", "number": "+49 (30) 1234-567"},
                {"number": "030 9876"},
            ],
            "department_id": sales,
            "is_admin": False,
            "is_external": False,
            "time_zone": "Europe/Berlin",
        },
    )
    assert resp.status == 201, resp.body
    assert resp.content_type == "application/json"
    user = resp.body
    assert isinstance(user["id"], str) and user["id"]
    assert isinstance(user["created_at"], str) and user["created_at"]
    assert {k: v for k, v in user.items() if k not in ("id", "created_at")} == {
        "login": "carol.m",
        "email": "carol.meyer@example.test",
        "first_name": "Carol",
        "last_name": "Meyer",
        "name": "Carol Meyer",
        "position": "Account manager",
        "phones": [
            {"type": "mobile", "number": "+49 (30) 1234-567"},
            {"type": "work", "number": "030 9876"},
        ],
        "department_id": sales,
        "is_admin": False,
        "is_external": False,
        "is_active": True,
        "time_zone": "Europe/Berlin",
    }
    fetched = await hub.request("GET", f"/api/v1/users/{user['id']}", token=admin)
    assert fetched.status == 200
    assert without_created_at(fetched.body) == without_created_at(user)
    # the password was set: the new user can log in, and sees the same record as "me"
    token = await hub.login("carol.m", "a long secret")
    me = await hub.request("GET", "/api/v1/users/me", token=token)
    assert me.status == 200 and me.body == fetched.body


async def test_create_response_carries_the_stored_created_at(hub: HubHarness) -> None:
    # The database keeps datetimes to the millisecond; the 201 body must show what a later
    # GET shows, or clients see the same user's created_at change.
    _, admin = await hub.create_user("root", admin=True)
    created = await hub.request(
        "POST", "/api/v1/users", token=admin, json={"login": "carol", "email": "c@example.test"}
    )
    assert created.status == 201
    fetched = await hub.request("GET", f"/api/v1/users/{created.body['id']}", token=admin)
    assert fetched.status == 200
    assert created.body["created_at"] == fetched.body["created_at"]


async def test_created_user_without_names_is_displayed_by_login(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    resp = await hub.request(
        "POST", "/api/v1/users", token=admin, json={"login": "svc-bot", "email": "bot@example.test"}
    )
    assert resp.status == 201
    assert resp.body["name"] == "svc-bot"
    assert resp.body["phones"] == [] and resp.body["department_id"] is None
    # created without a password: nobody can log in as this user
    login = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "svc-bot", "password": DEFAULT_PASSWORD}
    )
    assert_problem(login, 401, "invalid-credentials")


async def test_duplicate_login_is_a_409_conflict(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    first = await hub.request(
        "POST", "/api/v1/users", token=admin, json={"login": "dup", "email": "a@example.test"}
    )
    assert first.status == 201
    again = await hub.request(
        "POST", "/api/v1/users", token=admin, json={"login": "dup", "email": "b@example.test"}
    )
    assert_problem(again, 409, "conflict")
    assert "dup" in again.body["detail"]
    assert await hub.services.store.users.count_documents({"login": "dup"}) == 1


async def test_logins_are_normalised_to_lower_case(hub: HubHarness) -> None:
    # Login declares to_lower=True and login lookups are case-insensitive, so a mixed-case
    # login is stored in lower case - and then collides with its lower-case twin.
    _, admin = await hub.create_user("root", admin=True)
    created = await hub.request(
        "POST", "/api/v1/users", token=admin, json={"login": "Carol.M", "email": "c@example.test"}
    )
    assert created.status == 201, created.body
    assert created.body["login"] == "carol.m"
    twin = await hub.request(
        "POST", "/api/v1/users", token=admin, json={"login": "carol.m", "email": "d@example.test"}
    )
    assert_problem(twin, 409, "conflict")


async def test_create_user_validates_fields_and_references(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    bad = await hub.request(
        "POST",
        "/api/v1/users",
        token=admin,
        json={"login": "-x", "email": "not-an-email", "phones": [{"number": "call me"}]},
    )
    assert_problem(bad, 422, "validation-error")
    assert {tuple(e["loc"]) for e in bad.body["errors"]} == {
        ("login",),
        ("email",),
        ("phones", "0", "number"),
    }
    unknown_dept = await hub.request(
        "POST",
        "/api/v1/users",
        token=admin,
        json={"login": "x1", "email": "x1@example.test", "department_id": "nope"},
    )
    assert_problem(unknown_dept, 422, "unknown-reference")
    assert await hub.services.directory.user_by_login("x1") is None


async def test_non_admin_cannot_create_change_or_deactivate_users(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    create = await hub.request(
        "POST", "/api/v1/users", token=alice, json={"login": "eve", "email": "eve@example.test"}
    )
    assert_problem(create, 403, "forbidden")
    assert await hub.services.directory.user_by_login("eve") is None
    patch = await hub.request(
        "PATCH", f"/api/v1/users/{bob_id}", token=alice, json={"position": "hacked"}
    )
    assert_problem(patch, 403, "forbidden")
    promote = await hub.request(
        "PATCH", f"/api/v1/users/{alice_id}", token=alice, json={"is_admin": True}
    )
    assert_problem(promote, 403, "forbidden")
    delete = await hub.request("DELETE", f"/api/v1/users/{bob_id}", token=alice)
    assert_problem(delete, 403, "forbidden")
    bob = await hub.services.directory.user_document(bob_id)
    assert bob["position"] == "" and bob["is_active"] is True
    me = await hub.services.directory.user_document(alice_id)
    assert me["is_admin"] is False


async def test_get_unknown_user_is_404(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    resp = await hub.request("GET", "/api/v1/users/000000000000000000000000", token=alice)
    assert_problem(resp, 404, "not-found")


async def test_admin_patches_a_user(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    sales = await department(hub, "Sales")
    it = await department(hub, "IT")
    bob_id, bob = await hub.create_user("bob", department_id=sales, first_name="Bob")
    resp = await hub.request(
        "PATCH",
        f"/api/v1/users/{bob_id}",
        token=admin,
        json={
            "last_name": "Builder",
            "email": "BOB.B@example.test",
            "department_id": it,
            "phones": [{"type": "home", "number": "555 12"}],
        },
    )
    assert resp.status == 200, resp.body
    assert resp.body["name"] == "Bob Builder"
    assert resp.body["first_name"] == "Bob"  # untouched
    assert resp.body["email"] == "bob.b@example.test"
    assert resp.body["department_id"] == it
    assert resp.body["phones"] == [{"type": "home", "number": "555 12"}]
    fetched = await hub.request("GET", f"/api/v1/users/{bob_id}", token=bob)
    assert fetched.body == resp.body
    # the stored phone digits follow the new numbers
    doc = await hub.services.directory.user_document(bob_id)
    assert doc["phone_digits"] == ["55512"]
    # promote, then move out of every department
    promoted = await hub.request(
        "PATCH",
        f"/api/v1/users/{bob_id}",
        token=admin,
        json={"is_admin": True, "department_id": None},
    )
    assert promoted.status == 200
    assert promoted.body["is_admin"] is True and promoted.body["department_id"] is None
    unknown_dept = await hub.request(
        "PATCH", f"/api/v1/users/{bob_id}", token=admin, json={"department_id": "nope"}
    )
    assert_problem(unknown_dept, 422, "unknown-reference")
    missing = await hub.request(
        "PATCH", "/api/v1/users/000000000000000000000000", token=admin, json={"position": "x"}
    )
    assert_problem(missing, 404, "not-found")


async def test_deactivation_ends_sessions_and_logins(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_second = await hub.login("bob")
    assert (await hub.request("GET", "/api/v1/users/me", token=bob)).status == 200

    resp = await hub.request("DELETE", f"/api/v1/users/{bob_id}", token=admin)
    assert resp.status == 204
    assert resp.body is None

    for token in (bob, bob_second):
        gone = await hub.request("GET", "/api/v1/users/me", token=token)
        assert_problem(gone, 401, "unauthorized")
    assert await hub.services.store.tokens.count_documents({"user_id": bob_id}) == 0
    login = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "bob", "password": DEFAULT_PASSWORD}
    )
    assert_problem(login, 401, "invalid-credentials")
    # the user is kept, inactive: admins still see them, colleagues no longer do
    as_admin = await hub.request("GET", f"/api/v1/users/{bob_id}", token=admin)
    assert as_admin.status == 200 and as_admin.body["is_active"] is False
    as_colleague = await hub.request("GET", f"/api/v1/users/{bob_id}", token=alice)
    assert_problem(as_colleague, 404, "not-found")
    # deactivating twice is harmless; an unknown user is 404
    assert (await hub.request("DELETE", f"/api/v1/users/{bob_id}", token=admin)).status == 204
    missing = await hub.request("DELETE", "/api/v1/users/000000000000000000000000", token=admin)
    assert_problem(missing, 404, "not-found")


async def test_deactivation_is_announced_on_the_users_stream(hub: HubHarness) -> None:
    admin_id, admin = await hub.create_user("root", admin=True)
    bob_id, _ = await hub.create_user("bob")
    assert (await hub.request("DELETE", f"/api/v1/users/{bob_id}", token=admin)).status == 204
    [event] = await stored_events(hub, bob_id)
    assert event.type == "user.updated"
    assert event.data["changed"] == ["is_active"]
    assert event.data["by"] == admin_id
    assert event.data["user"]["is_active"] is False


async def test_admin_cannot_deactivate_or_demote_themselves(hub: HubHarness) -> None:
    root_id, root = await hub.create_user("root", admin=True)
    delete = await hub.request("DELETE", f"/api/v1/users/{root_id}", token=root)
    assert_problem(delete, 409, "conflict")
    deactivate = await hub.request(
        "PATCH", f"/api/v1/users/{root_id}", token=root, json={"is_active": False}
    )
    assert_problem(deactivate, 409, "conflict")
    demote = await hub.request(
        "PATCH", f"/api/v1/users/{root_id}", token=root, json={"is_admin": False}
    )
    assert_problem(demote, 409, "conflict")
    me = await hub.request("GET", "/api/v1/users/me", token=root)
    assert me.status == 200
    assert me.body["is_active"] is True and me.body["is_admin"] is True


# users: search --------------------------------------------------------------------------------


async def directory_fixture(hub: HubHarness) -> dict[str, str]:
    """alice, bob, mali, dave in two departments, and an employee 'viewer' without one."""
    sales = await department(hub, "Sales")
    it = await department(hub, "IT")
    await hub.create_user(
        "alice",
        department_id=sales,
        first_name="Alice",
        last_name="Anders",
        phones=[{"type": "work", "number": "+49 (30) 1234-567"}],
    )
    await hub.create_user(
        "bob",
        department_id=it,
        first_name="Robert",
        last_name="Kalinowski",
        phones=[
            {"type": "mobile", "number": "0171 555 0199"},
            {"type": "work", "number": "030 9876"},
        ],
    )
    await hub.create_user("mali", department_id=sales, first_name="Carl", last_name="Smith")
    await hub.create_user("dave", department_id=it, first_name="Dave", last_name="Jones")
    _, viewer = await hub.create_user("viewer", first_name="Vera", last_name="Viewer")
    return {"sales": sales, "it": it, "viewer": viewer}


async def test_search_by_name_part_is_case_insensitive_on_names_and_login(
    hub: HubHarness,
) -> None:
    ctx = await directory_fixture(hub)
    viewer = ctx["viewer"]
    # "ali": Alice (first name and login), Kalinowski (last name), mali (login)
    assert sorted(await list_logins(hub, viewer, name="ali")) == ["alice", "bob", "mali"]
    assert sorted(await list_logins(hub, viewer, name="ALI")) == ["alice", "bob", "mali"]
    assert await list_logins(hub, viewer, name="robert") == ["bob"]
    assert await list_logins(hub, viewer, name="JONES") == ["dave"]
    assert await list_logins(hub, viewer, name="nobody") == []
    # regex metacharacters are taken literally
    assert await list_logins(hub, viewer, name=".*") == []


async def test_search_by_department_email_and_combined(hub: HubHarness) -> None:
    ctx = await directory_fixture(hub)
    viewer = ctx["viewer"]
    assert sorted(await list_logins(hub, viewer, department_id=ctx["sales"])) == ["alice", "mali"]
    assert sorted(await list_logins(hub, viewer, department_id=ctx["it"])) == ["bob", "dave"]
    assert await list_logins(hub, viewer, department_id="nope") == []
    assert await list_logins(hub, viewer, email="ALICE@") == ["alice"]
    assert sorted(await list_logins(hub, viewer, email="e@ex")) == ["alice", "dave"]
    assert await list_logins(hub, viewer, email="a.ice") == []
    assert sorted(await list_logins(hub, viewer, name="ali", department_id=ctx["sales"])) == [
        "alice",
        "mali",
    ]
    assert await list_logins(hub, viewer, name="ali", department_id=ctx["it"]) == ["bob"]


async def test_search_by_phone_digits(hub: HubHarness) -> None:
    ctx = await directory_fixture(hub)
    viewer = ctx["viewer"]
    # alice's number is stored as "+49 (30) 1234-567"
    assert await list_logins(hub, viewer, phone="301234") == ["alice"]
    assert await list_logins(hub, viewer, phone="1234-567") == ["alice"]
    assert await list_logins(hub, viewer, phone="+49 30 1234") == ["alice"]
    # bob has two numbers; either one finds him
    assert await list_logins(hub, viewer, phone="555-01") == ["bob"]
    assert await list_logins(hub, viewer, phone="9876") == ["bob"]
    assert sorted(await list_logins(hub, viewer, phone="30")) == ["alice", "bob"]
    assert await list_logins(hub, viewer, phone="999999") == []
    no_digits = await hub.request("GET", "/api/v1/users?phone=abc", token=viewer)
    assert_problem(no_digits, 422, "validation-error")
    assert no_digits.body["errors"][0]["loc"] == ["phone"]


async def test_one_search_box_finds_name_position_department_email_and_phone(
    hub: HubHarness,
) -> None:
    ctx = await directory_fixture(hub)
    viewer = ctx["viewer"]
    await hub.create_user(
        "erin", department_id=ctx["it"], first_name="Erin", last_name="Evans",
        position="Chief Accountant",
    )  # fmt: skip
    await hub.create_user("frank", first_name="Frank", last_name="Fox", position="Sales manager")
    # position (job title), case-insensitive, any part of it
    assert await list_logins(hub, viewer, q="accountant") == ["erin"]
    assert await list_logins(hub, viewer, position="ACCOUNT") == ["erin"]
    # the department's name: "sales" finds the Sales department and Frank's position
    assert sorted(await list_logins(hub, viewer, q="sales")) == ["alice", "frank", "mali"]
    # e-mail, name, login
    assert await list_logins(hub, viewer, q="dave@example") == ["dave"]
    assert sorted(await list_logins(hub, viewer, q="ALI")) == ["alice", "bob", "mali"]
    # every word must be found somewhere: name and department together
    assert await list_logins(hub, viewer, q="carl sales") == ["mali"]
    assert await list_logins(hub, viewer, q="carl jones") == []
    assert await list_logins(hub, viewer, q="chief it") == ["erin"]
    # phone digits, whether typed as one number with punctuation or as a word
    assert await list_logins(hub, viewer, q="+49 (30) 1234") == ["alice"]
    assert await list_logins(hub, viewer, q="0171 555") == ["bob"]
    assert await list_logins(hub, viewer, q="9876") == ["bob"]
    # regex metacharacters are taken literally; nothing is found by nonsense
    assert await list_logins(hub, viewer, q=".*") == []
    assert await list_logins(hub, viewer, q="nobody") == []
    # the other filters still narrow it
    assert await list_logins(hub, viewer, q="a", department_id=ctx["it"]) == ["erin", "dave", "bob"]


async def test_inactive_users_are_hidden_unless_an_admin_asks(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    ctx = await directory_fixture(hub)
    dave = await hub.services.directory.user_by_login("dave")
    assert dave is not None
    assert (await hub.request("DELETE", f"/api/v1/users/{dave['_id']}", token=admin)).status == 204

    assert "dave" not in await list_logins(hub, ctx["viewer"])
    assert "dave" not in await list_logins(hub, ctx["viewer"], include_inactive="true")
    assert "dave" not in await list_logins(hub, admin)
    assert "dave" in await list_logins(hub, admin, include_inactive="true")
    assert await list_logins(hub, admin, include_inactive="true", name="dave") == ["dave"]
    assert await list_logins(hub, admin, include_inactive="false", name="dave") == []


async def test_list_is_sorted_and_paginated(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    await hub.create_user("z1", first_name="Zoe", last_name="Zeta")
    await hub.create_user("a2", first_name="Bea", last_name="Alpha")
    await hub.create_user("a1", first_name="Ann", last_name="Alpha")
    await hub.create_user("m1", first_name="Max", last_name="Mid")
    # by last name, then first name, then login; "root" has no last name
    assert await list_logins(hub, admin) == ["root", "a1", "a2", "m1", "z1"]
    assert await list_logins(hub, admin, limit=2) == ["root", "a1"]
    assert await list_logins(hub, admin, limit=2, offset=1) == ["a1", "a2"]
    assert await list_logins(hub, admin, offset=4) == ["z1"]
    assert await list_logins(hub, admin, offset=10) == []


async def test_limit_and_offset_are_validated(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    for query, field in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-3", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("include_inactive=maybe", "include_inactive"),
        ("sort=name", "sort"),
    ]:
        resp = await hub.request("GET", f"/api/v1/users?{query}", token=alice)
        assert_problem(resp, 422, "validation-error")
        assert [e["loc"] for e in resp.body["errors"]] == [[field]], query
    assert await list_logins(hub, alice, limit=500) == ["alice"]
    assert await list_logins(hub, alice, limit=1) == ["alice"]


async def test_listing_requires_a_token(hub: HubHarness) -> None:
    resp = await hub.request("GET", "/api/v1/users")
    assert_problem(resp, 401, "unauthorized")


# extranet -------------------------------------------------------------------------------------


async def test_extranet_user_sees_only_members_of_their_workgroups(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    carol_id, _ = await hub.create_user("carol")
    ext_id, ext = await hub.create_user("ext", external=True)
    other_ext_id, _ = await hub.create_user("other-ext", external=True)
    group = await workgroup(hub, alice_id, "Project X", ext_id, carol_id)
    await workgroup(hub, bob_id, "Project Y", other_ext_id)

    assert sorted(await list_logins(hub, ext)) == ["alice", "carol", "ext"]
    assert await list_logins(hub, ext, name="bob") == []
    assert await list_logins(hub, ext, name="car") == ["carol"]
    for visible in (alice_id, carol_id, ext_id):
        resp = await hub.request("GET", f"/api/v1/users/{visible}", token=ext)
        assert resp.status == 200 and resp.body["id"] == visible
    for hidden in (bob_id, other_ext_id):
        resp = await hub.request("GET", f"/api/v1/users/{hidden}", token=ext)
        assert_problem(resp, 404, "not-found")

    # the extranet user sees only their own workgroups
    groups = await hub.request("GET", "/api/v1/workgroups", token=ext)
    assert groups.status == 200
    assert [g["id"] for g in groups.body] == [group]

    # once removed from the group, the colleagues disappear again (at once: the directory's
    # cached workgroups are corrected by the change's directory.changed)
    owner = await hub.services.directory.user_document(alice_id)
    await hub.services.directory.remove_workgroup_member(owner, group, ext_id)
    assert await list_logins(hub, ext) == ["ext"]
    resp = await hub.request("GET", f"/api/v1/users/{alice_id}", token=ext)
    assert_problem(resp, 404, "not-found")


async def test_extranet_user_without_workgroups_sees_only_themselves(hub: HubHarness) -> None:
    await hub.create_user("alice")
    ext_id, ext = await hub.create_user("ext", external=True)
    assert await list_logins(hub, ext) == ["ext"]
    me = await hub.request("GET", f"/api/v1/users/{ext_id}", token=ext)
    assert me.status == 200 and me.body["is_external"] is True


async def test_employee_sees_an_extranet_user_only_through_a_shared_workgroup(
    hub: HubHarness,
) -> None:
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    ext_id, _ = await hub.create_user("ext", external=True)
    await workgroup(hub, alice_id, "Project X", ext_id)

    shared = await hub.request("GET", f"/api/v1/users/{ext_id}", token=alice)
    assert shared.status == 200 and shared.body["login"] == "ext"
    not_shared = await hub.request("GET", f"/api/v1/users/{ext_id}", token=bob)
    assert_problem(not_shared, 404, "not-found")


async def test_employee_directory_list_hides_extranet_users_outside_shared_workgroups(
    hub: HubHarness,
) -> None:
    alice_id, alice = await hub.create_user("alice")
    _, bob = await hub.create_user("bob")
    ext_id, _ = await hub.create_user("ext", external=True)
    await hub.create_user("loner-ext", external=True)
    await workgroup(hub, alice_id, "Project X", ext_id)

    # the list must agree with GET /users/{id}: bob gets 404 for ext, so ext is not listed
    assert sorted(await list_logins(hub, bob)) == ["alice", "bob"]
    assert sorted(await list_logins(hub, bob, name="ext")) == []
    assert sorted(await list_logins(hub, alice)) == ["alice", "bob", "ext"]


async def test_admin_sees_extranet_users(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    ext_id, _ = await hub.create_user("ext", external=True)
    assert sorted(await list_logins(hub, admin)) == ["ext", "root"]
    resp = await hub.request("GET", f"/api/v1/users/{ext_id}", token=admin)
    assert resp.status == 200 and resp.body["is_external"] is True


# own profile ----------------------------------------------------------------------------------


async def test_patch_me_changes_the_profile_and_publishes_user_updated(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice", first_name="Alice")
    client = await connected(hub, alice)
    resp = await hub.request(
        "PATCH",
        "/api/v1/users/me",
        token=alice,
        json={
            "last_name": "Anders",
            "position": "Team lead",
            "phones": [{"type": "mobile", "number": "0171 222"}],
        },
    )
    assert resp.status == 200, resp.body
    assert resp.body["id"] == alice_id
    assert resp.body["name"] == "Alice Anders"
    assert resp.body["position"] == "Team lead"
    assert resp.body["phones"] == [{"type": "mobile", "number": "0171 222"}]
    me = await hub.request("GET", "/api/v1/users/me", token=alice)
    assert me.body == resp.body

    await wait_for_types(client, alice_id, ["user.updated"])
    [event] = directory_events(client, alice_id)
    assert event["stream"] == f"user:{alice_id}"
    assert isinstance(event["seq"], int) and event["seq"] >= 1
    assert event["data"]["changed"] == ["last_name", "phones", "position"]
    assert event["data"]["by"] == alice_id
    assert event["data"]["user"] == resp.body
    # the new number is searchable
    assert await list_logins(hub, alice, phone="0171222") == ["alice"]


async def test_patch_me_without_a_change_publishes_nothing(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice", position="Dev")
    client = await connected(hub, alice)
    resp = await hub.request("PATCH", "/api/v1/users/me", token=alice, json={"position": "Dev"})
    assert resp.status == 200 and resp.body["position"] == "Dev"
    await asyncio.sleep(0.3)
    assert directory_events(client, alice_id) == []
    assert await stored_events(hub, alice_id) == []


async def test_patch_me_refuses_privileged_and_unknown_fields(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    sales = await department(hub, "Sales")
    for field, value in [
        ("is_admin", True),
        ("is_external", True),
        ("is_active", False),
        ("email", "new@example.test"),
        ("department_id", sales),
        ("login", "root"),
        ("password", "a new long password"),
    ]:
        resp = await hub.request(
            "PATCH", "/api/v1/users/me", token=alice, json={"position": "x", field: value}
        )
        assert_problem(resp, 422, "validation-error")
        assert [(e["loc"], e["type"]) for e in resp.body["errors"]] == [
            ([field], "extra_forbidden")
        ], field
    doc = await hub.services.directory.user_document(alice_id)
    assert doc["is_admin"] is False and doc["position"] == "" and doc["department_id"] is None
    assert await stored_events(hub, alice_id) == []


async def test_profile_changes_reach_only_the_users_own_stream(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await connected(hub, bob)
    alice_client = await connected(hub, alice)
    resp = await hub.request("PATCH", "/api/v1/users/me", token=alice, json={"position": "CEO"})
    assert resp.status == 200
    await wait_for_types(alice_client, alice_id, ["user.updated"])
    await asyncio.sleep(0.2)
    assert bob_client.stream_events(f"user:{alice_id}") == []
    assert not any("CEO" in repr(data) for _name, data in bob_client.events)
    assert event_types(bob_client, bob_id) == []


# departments ----------------------------------------------------------------------------------


async def test_department_crud(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    head_id, employee = await hub.create_user("boss")
    created = await hub.request(
        "POST", "/api/v1/departments", token=admin, json={"name": " Sales ", "head_id": head_id}
    )
    assert created.status == 201, created.body
    sales = created.body["id"]
    assert created.body == {"id": sales, "name": "Sales", "parent_id": None, "head_id": head_id}
    child = await hub.request(
        "POST",
        "/api/v1/departments",
        token=admin,
        json={"name": "Key accounts", "parent_id": sales},
    )
    assert child.status == 201
    child_id = child.body["id"]
    assert child.body["parent_id"] == sales and child.body["head_id"] is None

    got = await hub.request("GET", f"/api/v1/departments/{child_id}", token=employee)
    assert got.status == 200 and got.body == child.body

    renamed = await hub.request(
        "PATCH",
        f"/api/v1/departments/{child_id}",
        token=admin,
        json={"name": "Major accounts", "head_id": head_id},
    )
    assert renamed.status == 200
    assert renamed.body == {
        "id": child_id,
        "name": "Major accounts",
        "parent_id": sales,
        "head_id": head_id,
    }
    to_root = await hub.request(
        "PATCH", f"/api/v1/departments/{child_id}", token=admin, json={"parent_id": None}
    )
    assert to_root.status == 200 and to_root.body["parent_id"] is None
    assert to_root.body["name"] == "Major accounts"

    deleted = await hub.request("DELETE", f"/api/v1/departments/{child_id}", token=admin)
    assert deleted.status == 204
    gone = await hub.request("GET", f"/api/v1/departments/{child_id}", token=admin)
    assert_problem(gone, 404, "not-found")
    again = await hub.request("DELETE", f"/api/v1/departments/{child_id}", token=admin)
    assert_problem(again, 404, "not-found")
    patch_gone = await hub.request(
        "PATCH", f"/api/v1/departments/{child_id}", token=admin, json={"name": "x"}
    )
    assert_problem(patch_gone, 404, "not-found")


async def test_null_department_name_is_refused_and_leaves_the_tree_readable(
    hub: HubHarness,
) -> None:
    # DepartmentUpdate lets "name" be null; a department must still always have a name.
    _, admin = await hub.create_user("root", admin=True)
    sales = await department(hub, "Sales")
    resp = await hub.request(
        "PATCH", f"/api/v1/departments/{sales}", token=admin, json={"name": None}
    )
    assert resp.status in (200, 422), resp.body
    listed = await hub.request("GET", "/api/v1/departments", token=admin)
    assert listed.status == 200, listed.body
    assert listed.body == [{"id": sales, "name": "Sales", "parent_id": None, "head_id": None}]


async def test_everyone_lists_departments_sorted_by_name(hub: HubHarness) -> None:
    _, employee = await hub.create_user("alice")
    _, ext = await hub.create_user("ext", external=True)
    it = await department(hub, "IT")
    sales = await department(hub, "Sales")
    ops = await department(hub, "Operations", parent_id=it)
    for token in (employee, ext):
        resp = await hub.request("GET", "/api/v1/departments", token=token)
        assert resp.status == 200
        assert resp.body == [
            {"id": it, "name": "IT", "parent_id": None, "head_id": None},
            {"id": ops, "name": "Operations", "parent_id": it, "head_id": None},
            {"id": sales, "name": "Sales", "parent_id": None, "head_id": None},
        ]
    assert_problem(await hub.request("GET", "/api/v1/departments"), 401, "unauthorized")


async def test_unknown_parent_or_head_is_422_unknown_reference(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    sales = await department(hub, "Sales")
    for body in ({"name": "X", "parent_id": "nope"}, {"name": "X", "head_id": "nobody"}):
        resp = await hub.request("POST", "/api/v1/departments", token=admin, json=body)
        assert_problem(resp, 422, "unknown-reference")
    for patch in ({"parent_id": "nope"}, {"head_id": "nobody"}):
        resp = await hub.request("PATCH", f"/api/v1/departments/{sales}", token=admin, json=patch)
        assert_problem(resp, 422, "unknown-reference")
    listed = await hub.request("GET", "/api/v1/departments", token=admin)
    assert listed.body == [{"id": sales, "name": "Sales", "parent_id": None, "head_id": None}]


async def test_moving_a_department_below_itself_is_a_cycle(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    top = await department(hub, "Top")
    middle = await department(hub, "Middle", parent_id=top)
    bottom = await department(hub, "Bottom", parent_id=middle)
    for new_parent in (bottom, middle, top):
        resp = await hub.request(
            "PATCH", f"/api/v1/departments/{top}", token=admin, json={"parent_id": new_parent}
        )
        assert_problem(resp, 422, "department-cycle")
    resp = await hub.request(
        "PATCH", f"/api/v1/departments/{middle}", token=admin, json={"parent_id": bottom}
    )
    assert_problem(resp, 422, "department-cycle")
    tree = await hub.services.directory.department_tree()
    assert {d: n.parent_id for d, n in tree.items()} == {
        top: None,
        middle: top,
        bottom: middle,
    }
    # moving a leaf up is fine
    ok = await hub.request(
        "PATCH", f"/api/v1/departments/{bottom}", token=admin, json={"parent_id": top}
    )
    assert ok.status == 200 and ok.body["parent_id"] == top


async def test_department_with_subdepartments_or_employees_cannot_be_deleted(
    hub: HubHarness,
) -> None:
    _, admin = await hub.create_user("root", admin=True)
    parent = await department(hub, "Parent")
    child = await department(hub, "Child", parent_id=parent)
    staffed = await department(hub, "Staffed")
    alice_id, _ = await hub.create_user("alice", department_id=staffed)

    has_child = await hub.request("DELETE", f"/api/v1/departments/{parent}", token=admin)
    assert_problem(has_child, 409, "conflict")
    assert "subdepartments" in has_child.body["detail"]
    has_staff = await hub.request("DELETE", f"/api/v1/departments/{staffed}", token=admin)
    assert_problem(has_staff, 409, "conflict")
    assert "employees" in has_staff.body["detail"]
    assert set(await hub.services.directory.department_tree()) == {parent, child, staffed}

    # empty them, and deletion goes through
    assert (await hub.request("DELETE", f"/api/v1/departments/{child}", token=admin)).status == 204
    assert (await hub.request("DELETE", f"/api/v1/departments/{parent}", token=admin)).status == 204
    moved = await hub.request(
        "PATCH", f"/api/v1/users/{alice_id}", token=admin, json={"department_id": None}
    )
    assert moved.status == 200
    assert (
        await hub.request("DELETE", f"/api/v1/departments/{staffed}", token=admin)
    ).status == 204
    assert await hub.services.directory.department_tree() == {}


async def test_non_admin_cannot_change_departments(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    sales = await department(hub, "Sales")
    create = await hub.request("POST", "/api/v1/departments", token=alice, json={"name": "Mine"})
    assert_problem(create, 403, "forbidden")
    patch = await hub.request(
        "PATCH", f"/api/v1/departments/{sales}", token=alice, json={"name": "Mine"}
    )
    assert_problem(patch, 403, "forbidden")
    delete = await hub.request("DELETE", f"/api/v1/departments/{sales}", token=alice)
    assert_problem(delete, 403, "forbidden")
    listed = await hub.request("GET", "/api/v1/departments", token=alice)
    assert listed.body == [{"id": sales, "name": "Sales", "parent_id": None, "head_id": None}]


# workgroups -----------------------------------------------------------------------------------


async def test_creating_a_workgroup_makes_the_creator_owner_and_tells_members(
    hub: HubHarness,
) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    ext_id, ext = await hub.create_user("ext", external=True)
    _, carol = await hub.create_user("carol")
    clients = {
        alice_id: await connected(hub, alice),
        bob_id: await connected(hub, bob),
        ext_id: await connected(hub, ext),
    }
    carol_client = await connected(hub, carol)

    resp = await hub.request(
        "POST",
        "/api/v1/workgroups",
        token=alice,
        json={
            "name": " Project X ",
            "description": "secret",
            "member_ids": [bob_id, ext_id, bob_id],
        },
    )
    assert resp.status == 201, resp.body
    group = resp.body
    assert group == {
        "id": group["id"],
        "name": "Project X",
        "description": "secret",
        "owner_id": alice_id,
        "member_ids": [alice_id, bob_id, ext_id],
        "moderator_ids": [alice_id],
    }
    for user_id, client in clients.items():
        await wait_for_types(client, user_id, ["workgroup.joined"])
        [event] = directory_events(client, user_id)
        assert event["type"] == "workgroup.joined"
        assert event["data"]["workgroup"] == group
    await asyncio.sleep(0.2)
    # carol is not a member: she hears nothing about the group
    assert not any(group["id"] in repr(data) for _name, data in carol_client.events)

    got = await hub.request("GET", f"/api/v1/workgroups/{group['id']}", token=bob)
    assert got.status == 200 and got.body == group


async def test_workgroup_with_unknown_member_is_refused(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    resp = await hub.request(
        "POST",
        "/api/v1/workgroups",
        token=alice,
        json={"name": "X", "member_ids": ["000000000000000000000000"]},
    )
    assert_problem(resp, 422, "unknown-reference")
    assert await hub.services.store.workgroups.count_documents({}) == 0


async def test_extranet_user_cannot_create_a_workgroup(hub: HubHarness) -> None:
    _, ext = await hub.create_user("ext", external=True)
    resp = await hub.request("POST", "/api/v1/workgroups", token=ext, json={"name": "Mine"})
    assert_problem(resp, 403, "forbidden")
    assert await hub.services.store.workgroups.count_documents({}) == 0


async def test_extranet_user_cannot_see_a_foreign_workgroup(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    _, ext = await hub.create_user("ext", external=True)
    group = await workgroup(hub, alice_id, "Internal")
    resp = await hub.request("GET", f"/api/v1/workgroups/{group}", token=ext)
    assert_problem(resp, 404, "not-found")
    listed = await hub.request("GET", "/api/v1/workgroups", token=ext)
    assert listed.status == 200 and listed.body == []
    employee_view = await hub.request("GET", "/api/v1/workgroups", token=alice)
    assert [g["id"] for g in employee_view.body] == [group]


async def test_non_moderators_cannot_change_members(hub: HubHarness) -> None:
    alice_id, _ = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    carol_id, carol = await hub.create_user("carol")
    dave_id, _ = await hub.create_user("dave")
    group = await workgroup(hub, alice_id, "Project X", bob_id)

    for token in (bob, carol):  # a plain member, and an employee outside the group
        add = await hub.request(
            "POST", f"/api/v1/workgroups/{group}/members", token=token, json={"user_ids": [dave_id]}
        )
        assert_problem(add, 403, "forbidden")
        remove = await hub.request(
            "DELETE", f"/api/v1/workgroups/{group}/members/{alice_id}", token=token
        )
        assert_problem(remove, 403, "forbidden")
    doc = await hub.services.store.workgroups.find_one({"_id": group})
    assert doc is not None
    assert doc["member_ids"] == [alice_id, bob_id]
    assert doc["moderator_ids"] == [alice_id]
    assert carol_id not in doc["member_ids"]


async def test_moderator_adds_and_removes_members(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    carol_id, carol = await hub.create_user("carol")
    dave_id, dave = await hub.create_user("dave")
    group = await workgroup(hub, alice_id, "Project X")

    # the owner makes bob a moderator; bob adds carol and dave
    made = await hub.request(
        "POST",
        f"/api/v1/workgroups/{group}/members",
        token=alice,
        json={"user_ids": [bob_id], "moderator": True},
    )
    assert made.status == 200, made.body
    assert made.body["member_ids"] == [alice_id, bob_id]
    assert made.body["moderator_ids"] == [alice_id, bob_id]

    carol_client = await connected(hub, carol)
    dave_client = await connected(hub, dave)
    added = await hub.request(
        "POST",
        f"/api/v1/workgroups/{group}/members",
        token=bob,
        json={"user_ids": [carol_id, dave_id]},
    )
    assert added.status == 200, added.body
    assert added.body["member_ids"] == [alice_id, bob_id, carol_id, dave_id]
    assert added.body["moderator_ids"] == [alice_id, bob_id]
    for user_id, client in ((carol_id, carol_client), (dave_id, dave_client)):
        await wait_for_types(client, user_id, ["workgroup.joined"])
        [event] = directory_events(client, user_id)
        assert event["data"]["workgroup"]["id"] == group
        assert user_id in event["data"]["workgroup"]["member_ids"]

    removed = await hub.request(
        "DELETE", f"/api/v1/workgroups/{group}/members/{carol_id}", token=bob
    )
    assert removed.status == 200, removed.body
    assert removed.body["member_ids"] == [alice_id, bob_id, dave_id]
    await wait_for_types(carol_client, carol_id, ["workgroup.joined", "workgroup.left"])
    left = directory_events(carol_client, carol_id)[-1]
    assert left["data"] == {"workgroup_id": group}
    await asyncio.sleep(0.2)
    assert event_types(dave_client, dave_id) == ["workgroup.joined"]

    # a removed moderator loses the moderator role too
    demoted = await hub.request(
        "DELETE", f"/api/v1/workgroups/{group}/members/{bob_id}", token=alice
    )
    assert demoted.status == 200
    assert demoted.body["member_ids"] == [alice_id, dave_id]
    assert demoted.body["moderator_ids"] == [alice_id]
    again = await hub.request(
        "POST", f"/api/v1/workgroups/{group}/members", token=bob, json={"user_ids": [carol_id]}
    )
    assert_problem(again, 403, "forbidden")


async def test_adding_an_existing_member_does_not_announce_a_second_join(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    group = await workgroup(hub, alice_id, "Project X", bob_id)
    resp = await hub.request(
        "POST", f"/api/v1/workgroups/{group}/members", token=alice, json={"user_ids": [bob_id]}
    )
    assert resp.status == 200
    assert resp.body["member_ids"] == [alice_id, bob_id]
    events = await stored_events(hub, bob_id)
    assert [e.type for e in events] == ["workgroup.joined"]


async def test_owner_cannot_be_removed(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    alice_id, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    group = await workgroup(hub, alice_id, "Project X", bob_id)
    for token in (alice, admin):
        resp = await hub.request(
            "DELETE", f"/api/v1/workgroups/{group}/members/{alice_id}", token=token
        )
        assert_problem(resp, 409, "conflict")
    doc = await hub.services.store.workgroups.find_one({"_id": group})
    assert doc is not None
    assert doc["member_ids"] == [alice_id, bob_id] and doc["moderator_ids"] == [alice_id]


async def test_members_of_an_unknown_workgroup_is_404(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    resp = await hub.request(
        "POST",
        "/api/v1/workgroups/000000000000000000000000/members",
        token=alice,
        json={"user_ids": [alice_id]},
    )
    assert_problem(resp, 404, "not-found")


# portal settings and self-registration --------------------------------------------------------


async def test_only_admins_change_portal_settings(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    current = await hub.request("GET", "/api/v1/portal/settings", token=alice)
    assert current.status == 200 and current.body == {"self_registration": False}
    refused = await hub.request(
        "PUT", "/api/v1/portal/settings", token=alice, json={"self_registration": True}
    )
    assert_problem(refused, 403, "forbidden")
    assert await hub.services.auth.self_registration_enabled() is False


async def test_self_registration_follows_the_portal_setting(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    plain = {
        "login": "newbie",
        "email": "newbie@example.test",
        "password": "long enough secret",
        "first_name": "New",
    }
    privileged = {**plain, "is_admin": True, "is_external": True}
    closed = await hub.request("POST", "/api/v1/auth/register", json=privileged)
    assert_problem(closed, 403, "registration-closed")
    closed_plain = await hub.request("POST", "/api/v1/auth/register", json=plain)
    assert_problem(closed_plain, 403, "registration-closed")
    assert await hub.services.directory.user_by_login("newbie") is None

    opened = await hub.request(
        "PUT", "/api/v1/portal/settings", token=admin, json={"self_registration": True}
    )
    assert opened.status == 200 and opened.body == {"self_registration": True}
    current = await hub.request("GET", "/api/v1/portal/settings", token=admin)
    assert current.body == {"self_registration": True}

    # asking for rights either is refused outright or is ignored - it never grants them
    resp = await hub.request("POST", "/api/v1/auth/register", json=privileged)
    if resp.status != 201:
        assert_problem(resp, 422, "validation-error")
        assert sorted(e["loc"] for e in resp.body["errors"]) == [["is_admin"], ["is_external"]]
        assert await hub.services.directory.user_by_login("newbie") is None
        resp = await hub.request("POST", "/api/v1/auth/register", json=plain)
    assert resp.status == 201, resp.body
    token = resp.body["token"]
    assert isinstance(token, str) and len(token) >= 32
    user = resp.body["user"]
    assert user["login"] == "newbie" and user["name"] == "New"
    assert user["is_admin"] is False and user["is_external"] is False and user["is_active"]
    me = await hub.request("GET", "/api/v1/users/me", token=token)
    assert me.status == 200 and me.body == user
    doc = await hub.services.directory.user_document(user["id"])
    assert doc["is_admin"] is False and doc["is_external"] is False
    # the token is that of a plain employee
    admin_only = await hub.request(
        "POST", "/api/v1/departments", token=token, json={"name": "Mine"}
    )
    assert_problem(admin_only, 403, "forbidden")
    assert await hub.login("newbie", "long enough secret")

    taken = await hub.request("POST", "/api/v1/auth/register", json=plain)
    assert_problem(taken, 409, "conflict")
    no_password = await hub.request(
        "POST", "/api/v1/auth/register", json={"login": "nopw", "email": "nopw@example.test"}
    )
    assert_problem(no_password, 422, "validation-error")
    assert await hub.services.directory.user_by_login("nopw") is None

    closed_again = await hub.request(
        "PUT", "/api/v1/portal/settings", token=admin, json={"self_registration": False}
    )
    assert closed_again.status == 200 and closed_again.body == {"self_registration": False}
    late = await hub.request(
        "POST",
        "/api/v1/auth/register",
        json={"login": "late", "email": "late@example.test", "password": "long enough secret"},
    )
    assert_problem(late, 403, "registration-closed")
    assert await hub.services.directory.user_by_login("late") is None


async def test_portal_settings_body_is_strict(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    resp = await hub.request(
        "PUT",
        "/api/v1/portal/settings",
        token=admin,
        json={"self_registration": True, "open_to_all": True},
    )
    assert_problem(resp, 422, "validation-error")
    assert [e["loc"] for e in resp.body["errors"]] == [["open_to_all"]]
    missing = await hub.request("PUT", "/api/v1/portal/settings", token=admin, json={})
    assert_problem(missing, 422, "validation-error")
    assert await hub.services.auth.self_registration_enabled() is False


async def test_department_filter_can_include_subdepartments(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    top = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Top"})
    below = await hub.request(
        "POST",
        "/api/v1/departments",
        token=admin,
        json={"name": "Below", "parent_id": top.body["id"]},
    )
    upper_id, _ = await hub.create_user("upper", department_id=top.body["id"])
    lower_id, _ = await hub.create_user("lower", department_id=below.body["id"])
    only = await hub.request("GET", f"/api/v1/users?department_id={top.body['id']}", token=admin)
    assert [u["id"] for u in only.body] == [upper_id]
    tree = await hub.request(
        "GET", f"/api/v1/users?department_id={top.body['id']}&subtree=true", token=admin
    )
    assert {u["id"] for u in tree.body} == {upper_id, lower_id}


async def test_a_time_zone_must_be_a_known_iana_name(hub: HubHarness) -> None:
    _, token = await hub.create_user("tess")
    bad = await hub.request(
        "PATCH", "/api/v1/users/me", token=token, json={"time_zone": "Mars/Olympus"}
    )
    assert bad.status == 422 and "Mars/Olympus" in str(bad.body)
    good = await hub.request(
        "PATCH", "/api/v1/users/me", token=token, json={"time_zone": "Asia/Tokyo"}
    )
    assert good.status == 200 and good.body["time_zone"] == "Asia/Tokyo"
    back = await hub.request("PATCH", "/api/v1/users/me", token=token, json={"time_zone": None})
    assert back.status == 200 and back.body["time_zone"] is None
