"""CRM over the real stack: records, links, conversion, duplicates, roles and their events."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import SecretStr

from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, SocketClient, start_hub
from tests.redis_server import RedisServer


async def make(hub: HubHarness, token: str, kind: str, **body: Any) -> dict[str, Any]:
    resp = await hub.request("POST", f"/api/v1/crm/{kind}", token=token, json=body)
    assert resp.status == 201, resp.body
    record: dict[str, Any] = resp.body
    return record


async def patch(hub: HubHarness, token: str, kind: str, rid: str, **body: Any) -> dict[str, Any]:
    resp = await hub.request("PATCH", f"/api/v1/crm/{kind}/{rid}", token=token, json=body)
    assert resp.status == 200, resp.body
    record: dict[str, Any] = resp.body
    return record


def record_events(client: SocketClient, rid: str) -> list[dict[str, Any]]:
    return [
        e["data"]["record"]
        for e in client.of_type("crm.record.updated")
        if e["data"]["record"]["id"] == rid
    ]


async def test_smoke_create_list_get(hub: HubHarness) -> None:
    _, mary = await hub.create_user("mary")
    lead = await make(hub, mary, "leads", title="Website enquiry", first_name="Ann")
    assert lead["type"] == "lead" and lead["status"] == "new" and lead["open"]
    assert lead["indicator"] == {"number": 0, "colour": "none", "dot": None}
    listed = await hub.request("GET", "/api/v1/crm/leads", token=mary)
    assert listed.status == 200, listed.body
    assert [r["id"] for r in listed.body["records"]] == [lead["id"]]
    got = await hub.request("GET", f"/api/v1/crm/leads/{lead['id']}", token=mary)
    assert got.status == 200 and got.body["links"] == {"converted": []}
    counters = await hub.request("GET", "/api/v1/counters", token=mary)
    assert counters.body["crm"]["lead"]["idle"] == 1


async def grant(hub: HubHarness, admin: str, role: str, kind: str, subject: str) -> None:
    resp = await hub.request(
        "PUT",
        "/api/v1/crm/roles",
        token=admin,
        json={"role": role, "subject_kind": kind, "subject_id": subject},
    )
    assert resp.status == 200, resp.body


async def department(hub: HubHarness, admin: str, name: str, parent: str | None = None) -> str:
    body: dict[str, Any] = {"name": name}
    if parent:
        body["parent_id"] = parent
    resp = await hub.request("POST", "/api/v1/departments", token=admin, json=body)
    assert resp.status == 201, resp.body
    dept_id: str = resp.body["id"]
    return dept_id


# links ---------------------------------------------------------------------------------------


async def test_contacts_and_companies_are_many_to_many(hub: HubHarness) -> None:
    _, mary = await hub.create_user("mary")
    acme = await make(hub, mary, "companies", title="Acme")
    globex = await make(hub, mary, "companies", title="Globex")
    ann = await make(
        hub, mary, "contacts", first_name="Ann", company_ids=[acme["id"], globex["id"]]
    )
    assert ann["title"] == "Ann" and ann["company_ids"] == [acme["id"], globex["id"]]
    bob = await make(hub, mary, "contacts", first_name="Bob")
    # the company's side: Bob joins Acme
    acme = await patch(hub, mary, "companies", acme["id"], contact_ids=[ann["id"], bob["id"]])
    assert sorted(acme["contact_ids"]) == sorted([ann["id"], bob["id"]])
    assert {r["id"] for r in acme["links"]["contact"]} == {ann["id"], bob["id"]}
    got = await hub.request("GET", f"/api/v1/crm/contacts/{bob['id']}", token=mary)
    assert got.body["company_ids"] == [acme["id"]]
    assert [r["title"] for r in got.body["links"]["company"]] == ["Acme"]
    # and Ann leaves Globex from her side
    await patch(hub, mary, "contacts", ann["id"], company_ids=[acme["id"]])
    globex_now = await hub.request("GET", f"/api/v1/crm/companies/{globex['id']}", token=mary)
    assert globex_now.body["contact_ids"] == []


async def test_a_deal_has_one_company_and_remembers_the_contacts_left_on_it(
    hub: HubHarness,
) -> None:
    _, mary = await hub.create_user("mary")
    acme = await make(hub, mary, "companies", title="Acme")
    other = await make(hub, mary, "companies", title="Other")
    people = [
        await make(hub, mary, "contacts", first_name=name, company_ids=[acme["id"]])
        for name in ("Ann", "Bob", "Cid")
    ]
    ids = [p["id"] for p in people]
    outsider = await make(hub, mary, "contacts", first_name="Dan")
    # first time: all of the company's contacts come with it
    deal1 = await make(hub, mary, "deals", title="First", company_id=acme["id"])
    assert deal1["company_id"] == acme["id"] and sorted(deal1["contact_ids"]) == sorted(ids)
    # the user removes Bob from the deal, adds an outsider
    deal1 = await patch(
        hub, mary, "deals", deal1["id"], contact_ids=[ids[0], ids[2], outsider["id"]]
    )
    # next deal with the same company: only those left on the deal the last time
    deal2 = await make(hub, mary, "deals", title="Second", company_id=acme["id"])
    assert sorted(deal2["contact_ids"]) == sorted([ids[0], ids[2]])
    # a new contact of the company is not added once a selection is remembered
    await make(hub, mary, "contacts", first_name="Eve", company_ids=[acme["id"]])
    deal3 = await make(hub, mary, "deals", title="Third")
    deal3 = await patch(hub, mary, "deals", deal3["id"], company_id=acme["id"])
    assert sorted(deal3["contact_ids"]) == sorted([ids[0], ids[2]])
    # at most one company: switching replaces it and adds the new company's contacts
    deal3 = await patch(hub, mary, "deals", deal3["id"], company_id=other["id"])
    assert deal3["company_id"] == other["id"]
    assert [r["id"] for r in deal3["links"]["company"]] == [other["id"]]
    # contacts chosen in the same request win over the remembered ones
    deal4 = await make(
        hub, mary, "deals", title="Fourth", company_id=acme["id"], contact_ids=[ids[1]]
    )
    assert deal4["contact_ids"] == [ids[1]]
    bad = await hub.request(
        "POST", "/api/v1/crm/deals", token=mary, json={"title": "x", "company_id": ids[0]}
    )
    assert bad.status == 422, bad.body


# conversion ----------------------------------------------------------------------------------


EXPECTED_TYPES = {
    "contact": {"contact"},
    "company": {"company"},
    "contact+company": {"contact", "company"},
    "deal": {"deal"},
    "deal+contact": {"deal", "contact"},
    "deal+contact+company": {"deal", "contact", "company"},
}


async def test_each_conversion_mode_creates_links_and_marks_the_lead(hub: HubHarness) -> None:
    _, mary = await hub.create_user("mary")
    for mode, types in EXPECTED_TYPES.items():
        lead = await make(
            hub,
            mary,
            "leads",
            title=f"Enquiry {mode}",
            first_name="Ann",
            last_name=f"Lee {mode}",
            company_title=f"Acme {mode}",
            emails=[{"type": "work", "value": f"ann.{len(mode)}.{mode.count('+')}@acme.test"}],
            amount=1200,
            currency="EUR",
            ignore_duplicates=True,
        )
        resp = await hub.request(
            "POST", f"/api/v1/crm/leads/{lead['id']}/convert", token=mary, json={"mode": mode}
        )
        assert resp.status == 201, (mode, resp.body)
        created = resp.body["created"]
        assert set(created) == types, mode
        assert resp.body["lead"]["status"] == "converted" and not resp.body["lead"]["open"]
        assert resp.body["lead"]["converted"] == {t: r["id"] for t, r in created.items()}
        for record in created.values():
            assert record["lead_id"] == lead["id"]
        if "contact" in created:
            assert created["contact"]["last_name"] == f"Lee {mode}"
            assert created["contact"]["emails"] == lead["emails"]
        if "company" in created:
            assert created["company"]["title"] == f"Acme {mode}"
        if "contact" in created and "company" in created:
            assert created["contact"]["company_ids"] == [created["company"]["id"]]
        if "deal" in created:
            deal = created["deal"]
            assert deal["title"] == f"Enquiry {mode}" and deal["amount"] == 1200
            assert deal["currency"] == "EUR"
            assert deal["company_id"] == created.get("company", {}).get("id")
            assert deal["contact_ids"] == (
                [created["contact"]["id"]] if "contact" in created else []
            )
        detail = await hub.request("GET", f"/api/v1/crm/leads/{lead['id']}", token=mary)
        assert {r["id"] for r in detail.body["links"]["converted"]} == {
            r["id"] for r in created.values()
        }
        again = await hub.request(
            "POST", f"/api/v1/crm/leads/{lead['id']}/convert", token=mary, json={"mode": mode}
        )
        assert again.status == 409, again.body
    junk = await make(hub, mary, "leads", title="Spam", status="junk")
    refused = await hub.request(
        "POST", f"/api/v1/crm/leads/{junk['id']}/convert", token=mary, json={"mode": "deal"}
    )
    assert refused.status == 409


async def test_converting_twice_at_once_makes_one_set_of_records(hub: HubHarness) -> None:
    import asyncio

    _, mary = await hub.create_user("mary")
    lead = await make(hub, mary, "leads", title="Race")
    answers = await asyncio.gather(
        *(
            hub.request(
                "POST", f"/api/v1/crm/leads/{lead['id']}/convert", token=mary, json={"mode": "deal"}
            )
            for _ in range(4)
        )
    )
    assert sorted(a.status for a in answers) == [201, 409, 409, 409]
    deals = await hub.request("GET", "/api/v1/crm/deals", token=mary)
    assert len(deals.body["records"]) == 1


# duplicates ----------------------------------------------------------------------------------


async def test_duplicate_warnings_name_the_matched_fields_and_hide_what_the_user_may_not_see(
    hub: HubHarness,
) -> None:
    _, mary = await hub.create_user("mary")
    bob_id, bob = await hub.create_user("bob")
    mine = await make(
        hub,
        mary,
        "contacts",
        first_name="Ann",
        last_name="Lee",
        emails=[{"value": "Ann@Acme.test"}],
        phones=[{"number": "+49 30 1234567"}],
    )
    theirs = await make(hub, bob, "companies", title="Acme GmbH", phones=[{"number": "555-0100"}])
    # same email (case), same phone written differently, same name
    resp = await hub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={
            "first_name": "ann",
            "last_name": " LEE",
            "emails": [{"value": "ann@acme.test"}],
            "phones": [{"number": "030 1234567"}],
        },
    )
    assert resp.status == 409, resp.body
    assert resp.body["type"] == "urn:portalhub:problem:possible-duplicates"
    (match,) = resp.body["duplicates"]
    assert match["id"] == mine["id"] and match["matched"] == ["email", "phone", "name"]
    assert resp.body["hidden"] is False
    # while typing: a company title that belongs to someone else's record
    probe = await hub.request(
        "POST",
        "/api/v1/crm/duplicates",
        token=mary,
        json={"type": "company", "title": "acme   gmbh"},
    )
    assert probe.status == 200
    # nothing of it but that it exists: no id, type, title, responsible person or fields
    assert probe.body == {"duplicates": [], "hidden": True}
    # the client may create anyway
    forced = await hub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={"first_name": "Ann", "last_name": "Lee", "ignore_duplicates": True},
    )
    assert forced.status == 201
    # and editing a record does not report the record itself
    self_probe = await hub.request(
        "POST",
        "/api/v1/crm/duplicates",
        token=mary,
        json={"type": "contact", "emails": ["ann@acme.test"], "exclude_id": mine["id"]},
    )
    assert self_probe.body["duplicates"] == []
    # the invisible one still cannot be read
    hidden = await hub.request("GET", f"/api/v1/crm/companies/{theirs['id']}", token=mary)
    assert hidden.status == 404
    assert bob_id  # Bob's id is what the hidden match must not give away (see the next test)


async def test_duplicate_control_tells_nothing_of_records_the_user_may_not_see(
    hub: HubHarness,
) -> None:
    """Issue 13, item 10: the 409 and the probe gave the title and responsible person of
    records the caller may not see. Now only that such a record exists, once, whatever
    their number."""
    bob_id, bob = await hub.create_user("bob")
    _, mary = await hub.create_user("mary")
    secret = {
        "first_name": "Zed",
        "last_name": "Quill",
        "emails": [{"value": "zed@rival.example"}],
        "phones": [{"number": "+44 20 7946 0958"}],
    }
    theirs = [
        await make(hub, bob, "leads", title="Rival takeover", **secret),
        await make(hub, bob, "contacts", ignore_duplicates=True, **secret),
    ]
    secrets = [bob_id, "Rival", "takeover", "Zed", "Quill"] + [r["id"] for r in theirs]

    def reveals(body: object) -> list[str]:
        return [s for s in secrets if s in str(body)]

    same = {"first_name": "zed", "last_name": "QUILL", "emails": [{"value": "ZED@rival.example"}]}
    refused = await hub.request("POST", "/api/v1/crm/contacts", token=mary, json=same)
    assert refused.status == 409, refused.body
    assert refused.content_type == "application/problem+json"
    assert refused.body["duplicates"] == [] and refused.body["hidden"] is True
    assert reveals(refused.body) == []
    probes = [
        {"type": "contact", "first_name": "Zed", "last_name": "Quill"},
        {"type": "lead", "emails": ["zed@rival.example"], "phones": ["020 7946 0958"]},
        # naming the hidden record as the one being edited changes nothing
        {"type": "contact", "emails": ["zed@rival.example"], "exclude_id": theirs[1]["id"]},
    ]
    for body in probes:
        probe = await hub.request("POST", "/api/v1/crm/duplicates", token=mary, json=body)
        assert probe.status == 200, probe.body
        assert probe.body == {"duplicates": [], "hidden": True}, body
    # Mary's own match is listed in full, next to the flag; creating anyway still works
    own = await make(hub, mary, "contacts", ignore_duplicates=True, **same)
    both = await hub.request("POST", "/api/v1/crm/contacts", token=mary, json=same)
    assert both.status == 409
    assert [d["id"] for d in both.body["duplicates"]] == [own["id"]]
    assert both.body["hidden"] is True and reveals(both.body) == []
    # positive control: Bob, who sees his records, gets them listed
    bobs = await hub.request(
        "POST",
        "/api/v1/crm/duplicates",
        token=bob,
        json={"type": "contact", "emails": ["zed@rival.example"]},
    )
    assert {d["id"] for d in bobs.body["duplicates"]} == {r["id"] for r in theirs}
    assert bobs.body["hidden"] is True  # Mary's contact


# roles ---------------------------------------------------------------------------------------


async def test_roles_decide_whose_records_and_events_each_user_sees(hub: HubHarness) -> None:
    _, root = await hub.create_user("root", admin=True)
    company = await department(hub, root, "Company")
    sales = await department(hub, root, "Sales", company)
    east = await department(hub, root, "Sales East", sales)
    support = await department(hub, root, "Support", company)
    head_id, head = await hub.create_user("hank", department_id=sales)
    m1_id, m1 = await hub.create_user("mia", department_id=east)
    m2_id, m2 = await hub.create_user("max", department_id=sales)
    s_id, sup = await hub.create_user("sue", department_id=support)
    ceo_id, ceo = await hub.create_user("cleo", department_id=company)
    await grant(hub, root, "head", "user", head_id)
    await grant(hub, root, "chief", "user", ceo_id)
    clients = {
        name: await hub.connect(tok)
        for name, tok in (("hank", head), ("mia", m1), ("max", m2), ("sue", sup), ("cleo", ceo))
    }
    for client in clients.values():  # a connection without `since` starts at its snapshot
        await client.wait_for("snapshot")
    deal = await make(hub, m1, "deals", title="East deal")
    other = await make(hub, m2, "deals", title="Max deal")
    support_deal = await make(hub, sup, "deals", title="Support deal")
    await clients["cleo"].wait_until(
        lambda: len(clients["cleo"].of_type("crm.record.updated")) >= 3
    )
    await clients["hank"].wait_until(
        lambda: len(clients["hank"].of_type("crm.record.updated")) >= 2
    )

    async def visible(token: str) -> set[str]:
        resp = await hub.request("GET", "/api/v1/crm/deals", token=token)
        assert resp.status == 200, resp.body
        return {r["title"] for r in resp.body["records"]}

    assert await visible(m1) == {"East deal"}
    assert await visible(m2) == {"Max deal"}
    assert await visible(head) == {"East deal", "Max deal"}  # department + subdepartments
    assert await visible(ceo) == {"East deal", "Max deal", "Support deal"}
    assert await visible(sup) == {"Support deal"}
    # reads, writes and activities on others' records are refused as "not found"
    for method, body in (("GET", None), ("PATCH", {"title": "mine now"}), ("DELETE", None)):
        resp = await hub.request(method, f"/api/v1/crm/deals/{deal['id']}", token=m2, json=body)
        assert resp.status == 404, (method, resp.body)
    act = await hub.request(
        "POST",
        "/api/v1/crm/activities",
        token=m2,
        json={"owner_type": "deal", "owner_id": deal["id"], "type": "call"},
    )
    assert act.status == 404
    # a manager may not hand a record to someone else's care; a head may, within the department
    give = await hub.request(
        "PATCH", f"/api/v1/crm/deals/{other['id']}", token=m2, json={"responsible_id": m1_id}
    )
    assert give.status == 403
    moved = await patch(hub, head, "deals", deal["id"], responsible_id=m2_id)
    assert moved["responsible_id"] == m2_id
    # events: Mia loses the deal, Max gains it, Sue never heard of any of it
    await clients["mia"].wait_until(lambda: bool(clients["mia"].of_type("crm.record.removed")))
    await clients["max"].wait_until(lambda: bool(record_events(clients["max"], deal["id"])))
    titles_seen_by_sue = {
        e["data"]["record"]["title"] for e in clients["sue"].of_type("crm.record.updated")
    }
    assert titles_seen_by_sue == {"Support deal"}
    assert not record_events(clients["mia"], other["id"])
    assert not record_events(clients["max"], support_deal["id"])
    # a role given to a department reaches its subdepartments: everyone in Sales is a head
    # of their own department: Max (Sales) sees Sales and East, Mia (East) only East
    await make(hub, m1, "deals", title="Mia's second")
    await grant(hub, root, "head", "department", sales)
    assert await visible(m2) == {"East deal", "Max deal", "Mia's second"}
    assert await visible(m1) == {"Mia's second"}
    # a workgroup grant: the highest role wins
    group = await hub.request("POST", "/api/v1/workgroups", token=root, json={"name": "Board"})
    assert group.status == 201, group.body
    added = await hub.request(
        "POST",
        f"/api/v1/workgroups/{group.body['id']}/members",
        token=root,
        json={"user_ids": [s_id]},
    )
    assert added.status in (200, 201, 204), added.body
    await grant(hub, root, "chief", "workgroup", group.body["id"])
    assert await visible(sup) == {"East deal", "Max deal", "Support deal", "Mia's second"}
    me = await hub.request("GET", "/api/v1/crm/me", token=sup)
    assert me.body["role"] == "chief" and me.body["sees_others"] is True
    # settings and role grants are for CRM administrators only
    assert (
        await hub.request(
            "PATCH", "/api/v1/crm/settings", token=ceo, json={"counter_mode": "activity"}
        )
    ).status == 403
    assert (await hub.request("GET", "/api/v1/crm/roles", token=head)).status == 403
    # a "none" grant closes the CRM for a user with no higher role
    await grant(hub, root, "none", "user", m1_id)
    await hub.request("DELETE", "/api/v1/crm/roles/x", token=root)
    grants = (await hub.request("GET", "/api/v1/crm/roles", token=root)).body["grants"]
    dept_grant = next(g for g in grants if g["subject_id"] == sales)
    assert (
        await hub.request("DELETE", f"/api/v1/crm/roles/{dept_grant['id']}", token=root)
    ).status == 204
    closed = await hub.request("GET", "/api/v1/crm/deals", token=m1)
    assert closed.status == 403, closed.body


async def test_the_demo_crm_is_seeded_once_with_every_counter_state(hub: HubHarness) -> None:
    from server.demo import seed_demo

    svc = hub.services
    await seed_demo(svc.store, svc.directory, crm=svc.crm)
    await seed_demo(svc.store, svc.directory, crm=svc.crm)  # idempotent
    assert await svc.store["crm_records"].count_documents({"type": "deal"}) == 5
    sarah = await hub.login("sarah", "demo-pass")
    counters = (await hub.request("GET", "/api/v1/counters", token=sarah)).body["crm"]
    assert counters["deal"]["colour"] == "red-green" and counters["lead"]["colour"] == "green"
    ceo = await hub.login("ceo", "demo-pass")
    deals = (await hub.request("GET", "/api/v1/crm/deals", token=ceo)).body["records"]
    colours = {r["indicator"]["colour"] for r in deals}
    assert "gray" in colours  # the chief sees others' urgent work as gray numbers
    await svc.crm.counters.settled()
    report = await svc.crm.counters.check()
    assert report.clean, report


# extranet users and who gives CRM roles (issue 13, item 10) ---------------------------------


async def role_of(hub: HubHarness, token: str) -> str:
    resp = await hub.request("GET", "/api/v1/crm/me", token=token)
    assert resp.status == 200, resp.body
    role: str = resp.body["role"]
    return role


async def add_members(
    hub: HubHarness, token: str, group_id: str, *user_ids: str
) -> tuple[int, dict[str, Any]]:
    resp = await hub.request(
        "POST",
        f"/api/v1/workgroups/{group_id}/members",
        token=token,
        json={"user_ids": list(user_ids)},
    )
    return resp.status, resp.body


async def test_extranet_users_have_no_crm_role_unless_one_is_granted_to_them(
    hub: HubHarness,
) -> None:
    """They got the default role `manager`, like employees; a department or workgroup grant
    reached them too. Now only a grant naming them does."""
    _, root = await hub.create_user("root", admin=True)
    sales = await department(hub, root, "Sales")
    _, alice = await hub.create_user("alice", department_id=sales)
    eve_id, eve = await hub.create_user("eve", external=True, department_id=sales)
    group = await hub.request(
        "POST", "/api/v1/workgroups", token=alice, json={"name": "Project", "member_ids": [eve_id]}
    )
    assert group.status == 201, group.body
    await grant(hub, root, "chief", "department", sales)
    await grant(hub, root, "admin", "workgroup", group.body["id"])
    resp = await hub.request(
        "PATCH", "/api/v1/crm/settings", token=root, json={"default_role": "head"}
    )
    assert resp.status == 200, resp.body

    assert await role_of(hub, eve) == "none"
    assert await role_of(hub, alice) == "admin"  # positive control: the same grants, an employee
    for method, path, body in (
        ("GET", "/api/v1/crm/deals", None),
        ("GET", "/api/v1/crm/settings", None),
        ("POST", "/api/v1/crm/leads", {"title": "Mine"}),
        ("POST", "/api/v1/crm/duplicates", {"type": "lead", "last_name": "X"}),
        ("GET", "/api/v1/crm/activities", None),
    ):
        refused = await hub.request(method, path, token=eve, json=body)
        assert refused.status == 403, (path, refused.body)
        assert refused.content_type == "application/problem+json"
        assert refused.body["detail"] == "you have no CRM role"
    # nor can she be made responsible for CRM work, which would tell her of it
    deal = await make(hub, alice, "deals", title="Secret deal")
    for method, path, body in (
        ("PATCH", f"/api/v1/crm/deals/{deal['id']}", {"responsible_id": eve_id}),
        (
            "POST",
            "/api/v1/crm/activities",
            {
                "owner_type": "deal",
                "owner_id": deal["id"],
                "type": "call",
                "responsible_id": eve_id,
            },
        ),
    ):
        refused = await hub.request(method, path, token=alice, json=body)
        assert refused.status == 422, refused.body
        assert refused.body["type"] == "urn:portalhub:problem:unknown-reference"

    # a grant naming her gives her that role, at once
    await grant(hub, root, "manager", "user", eve_id)
    assert await role_of(hub, eve) == "manager"
    lead = await make(hub, eve, "leads", title="Her lead")
    listed = await hub.request("GET", "/api/v1/crm/deals", token=eve)
    assert listed.status == 200 and listed.body["records"] == []  # Alice's deal stays hers
    assert (await hub.request("GET", "/api/v1/crm/settings", token=eve)).status == 200
    moved = await hub.request(
        "PATCH", f"/api/v1/crm/deals/{deal['id']}", token=alice, json={"responsible_id": eve_id}
    )
    assert moved.status == 200, moved.body
    assert lead["responsible_id"] == eve_id

    # made an employee, the department's and workgroup's roles reach her at once; and back
    turned = await hub.request(
        "PATCH", f"/api/v1/users/{eve_id}", token=root, json={"is_external": False}
    )
    assert turned.status == 200, turned.body
    assert await role_of(hub, eve) == "admin"
    await hub.request("PATCH", f"/api/v1/users/{eve_id}", token=root, json={"is_external": True})
    assert await role_of(hub, eve) == "manager"


async def test_only_crm_admins_give_a_workgroups_crm_role_to_new_members(
    hub: HubHarness,
) -> None:
    """A moderator adding people to a workgroup that holds a CRM role gave them that role (up
    to chief), extranet users included. Now that takes a CRM administrator."""
    _, root = await hub.create_user("root", admin=True)
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    carl_id, _ = await hub.create_user("carl")
    eve_id, eve = await hub.create_user("eve", external=True)
    crm_admin_id, crm_admin = await hub.create_user("cora")
    await grant(hub, root, "admin", "user", crm_admin_id)
    _, mary = await hub.create_user("mary")
    group = await hub.request(
        "POST", "/api/v1/workgroups", token=alice, json={"name": "Key accounts"}
    )
    assert group.status == 201, group.body
    group_id = group.body["id"]
    await grant(hub, root, "chief", "workgroup", group_id)
    # the moderator may not grant the role directly either
    direct = await hub.request(
        "PUT",
        "/api/v1/crm/roles",
        token=alice,
        json={"role": "chief", "subject_kind": "user", "subject_id": bob_id},
    )
    assert direct.status == 403 and direct.content_type == "application/problem+json"

    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    status, body = await add_members(hub, alice, group_id, eve_id, bob_id)
    assert status == 403, body
    assert body["type"] == "urn:portalhub:problem:forbidden"
    assert "CRM administrators" in body["detail"]
    # refused as a whole: nobody joined, nobody's role changed
    got = await hub.request("GET", f"/api/v1/workgroups/{group_id}", token=alice)
    assert bob_id not in got.body["member_ids"] and eve_id not in got.body["member_ids"]
    assert await role_of(hub, bob) == "manager"
    await make(hub, mary, "deals", title="Mary's secret deal")
    await asyncio.sleep(0.3)
    assert not bob_client.of_type("crm.record.updated")

    # what raises nobody's role stays the moderators' business: an extranet user (workgroup
    # roles do not reach them), or someone who holds as much already
    assert (await add_members(hub, alice, group_id, eve_id))[0] == 200
    assert await role_of(hub, eve) == "none"
    await grant(hub, root, "chief", "user", carl_id)
    assert (await add_members(hub, alice, group_id, carl_id))[0] == 200
    # positive controls: a portal admin and a CRM admin (made a moderator) may give the role
    promoted = await hub.request(
        "POST",
        f"/api/v1/workgroups/{group_id}/members",
        token=root,
        json={"user_ids": [crm_admin_id], "moderator": True},
    )
    assert promoted.status == 200, promoted.body
    dan_id, dan = await hub.create_user("dan")
    assert (await add_members(hub, crm_admin, group_id, dan_id))[0] == 200
    assert await role_of(hub, dan) == "chief"
    assert (await add_members(hub, root, group_id, bob_id))[0] == 200
    assert await role_of(hub, bob) == "chief"
    await make(hub, mary, "deals", title="Mary's next deal")
    await bob_client.wait_until(lambda: bool(bob_client.of_type("crm.record.updated")))


async def test_a_revoked_role_ends_the_events_on_every_node_at_once(
    settings: Settings,
    store: Store,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each node keeps the CRM roles in a snapshot. A grant revoked on one node left the
    others telling the user about records for as long as they kept theirs; now the change
    drops every node's snapshot through the bus. The snapshots are kept for a minute here, so
    only that can make the other node forget."""
    monkeypatch.setattr("server.crm.access.TTL_SECONDS", 60.0)
    shared = settings.model_copy(update={"redis_url": SecretStr(redis_server.url)})
    async with start_hub(shared, store) as one, start_hub(shared, store) as two:
        _, root = await one.create_user("root", admin=True)
        _, mary = await one.create_user("mary")
        bob_id, bob = await one.create_user("bob")
        await grant(one, root, "chief", "user", bob_id)
        deal = await make(one, mary, "deals", title="Watched")
        bob_on_two = await two.connect(bob)
        mary_on_two = await two.connect(mary)
        for client in (bob_on_two, mary_on_two):
            await client.wait_for("snapshot")
        await patch(two, mary, "deals", deal["id"], title="Seen by Bob")
        await bob_on_two.wait_until(
            lambda: "Seen by Bob" in repr(record_events(bob_on_two, deal["id"]))
        )
        assert await role_of(two, bob) == "chief"  # node two holds its snapshot now

        grants = (await one.request("GET", "/api/v1/crm/roles", token=root)).body["grants"]
        revoked = await one.request("DELETE", f"/api/v1/crm/roles/{grants[0]['id']}", token=root)
        assert revoked.status == 204
        for _ in range(200):  # 10 s: the bus is quick, but the machine may be busy
            if await role_of(two, bob) == "manager":
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("node two kept the revoked role")
        await patch(two, mary, "deals", deal["id"], title="Not for Bob")
        await mary_on_two.wait_until(
            lambda: "Not for Bob" in repr(record_events(mary_on_two, deal["id"]))
        )
        await asyncio.sleep(0.3)
        assert "Not for Bob" not in repr(bob_on_two.events)


# search, list columns, merging duplicates -----------------------------------------------------


async def titles(hub: HubHarness, token: str, kind: str, q: str) -> list[str]:
    resp = await hub.request("GET", f"/api/v1/crm/{kind}?q={quote(q)}", token=token)
    assert resp.status == 200, resp.body
    return sorted(r["title"] for r in resp.body["records"])


async def test_search_finds_part_of_an_email_a_phone_or_the_company(hub: HubHarness) -> None:
    _, mary = await hub.create_user("mary")
    _, olga = await hub.create_user("olga")
    acme = await make(hub, mary, "companies", title="Acme Industries")
    await make(
        hub, mary, "contacts", first_name="Hans", last_name="Huber",
        emails=[{"value": "hans@acme.example"}], phones=[{"number": "+1 555-1234 77"}],
    )  # fmt: skip
    await make(hub, mary, "contacts", first_name="Ina", company_ids=[acme["id"]])
    await make(
        hub, mary, "leads", title="Enquiry", emails=[{"value": "x@globex.example"}],
        ignore_duplicates=True,
    )  # fmt: skip
    await make(hub, mary, "deals", title="Big order", company_id=acme["id"])
    await make(hub, olga, "contacts", first_name="Otto", emails=[{"value": "otto@acme.example"}])
    # part of an e-mail address: "acme" finds hans@acme.example (and Ina, of the Acme company)
    assert await titles(hub, mary, "contacts", "acme") == ["Hans Huber", "Ina"]
    assert await titles(hub, mary, "contacts", "ACME.EX") == ["Hans Huber"]
    assert await titles(hub, mary, "leads", "globex") == ["Enquiry"]
    # part of a phone number, typed with other spacing: the digits in order
    assert await titles(hub, mary, "contacts", "5551234") == ["Hans Huber"]
    assert await titles(hub, mary, "contacts", "555 12") == ["Hans Huber"]
    assert await titles(hub, mary, "contacts", "34 77") == ["Hans Huber"]
    assert await titles(hub, mary, "contacts", "999") == []
    # the company a deal or contact belongs to
    assert await titles(hub, mary, "deals", "industries") == ["Big order"]
    assert await titles(hub, mary, "companies", "acme") == ["Acme Industries"]
    # only what the caller may see; regex characters are literal
    assert await titles(hub, olga, "contacts", "acme") == ["Otto"]
    assert await titles(hub, mary, "contacts", ".*") == []


async def test_lists_name_the_linked_companies_and_contacts_the_caller_may_see(
    hub: HubHarness,
) -> None:
    _, mary = await hub.create_user("mary")
    acme = await make(hub, mary, "companies", title="Acme")
    ann = await make(hub, mary, "contacts", first_name="Ann", company_ids=[acme["id"]])
    deal = await make(hub, mary, "deals", title="Order", company_id=acme["id"])
    deals = await hub.request("GET", "/api/v1/crm/deals", token=mary)
    assert deals.body["records"][0]["id"] == deal["id"]
    assert deals.body["linked"] == {
        acme["id"]: {"type": "company", "id": acme["id"], "title": "Acme"},
        ann["id"]: {"type": "contact", "id": ann["id"], "title": "Ann"},
    }
    contacts = await hub.request("GET", "/api/v1/crm/contacts", token=mary)
    assert set(contacts.body["linked"]) == {acme["id"]}
    companies = await hub.request("GET", "/api/v1/crm/companies", token=mary)
    assert set(companies.body["linked"]) == {ann["id"]}
    assert (await hub.request("GET", "/api/v1/crm/leads", token=mary)).body["linked"] == {}


async def test_merging_two_duplicates_moves_links_activities_and_history(hub: HubHarness) -> None:
    mary_id, mary = await hub.create_user("mary")
    _, olga = await hub.create_user("olga")
    client = await hub.connect(mary)
    await client.wait_for("snapshot")
    acme = await make(hub, mary, "companies", title="Acme")
    globex = await make(hub, mary, "companies", title="Globex")
    keep = await make(
        hub, mary, "contacts", first_name="Hans", emails=[{"value": "hans@acme.example"}],
        company_ids=[acme["id"]],
    )  # fmt: skip
    dupe = await make(
        hub, mary, "contacts", first_name="Hans", last_name="Huber",
        emails=[{"value": "HANS@acme.example"}, {"value": "h.huber@mail.example"}],
        phones=[{"number": "+49 30 1234567"}], company_ids=[globex["id"]],
        ignore_duplicates=True,
    )  # fmt: skip
    deal = await make(hub, mary, "deals", title="Order", contact_ids=[dupe["id"]])
    both = await make(hub, mary, "deals", title="Shared", contact_ids=[keep["id"], dupe["id"]])
    call = await hub.request(
        "POST",
        "/api/v1/crm/activities",
        token=mary,
        json={"owner_type": "contact", "owner_id": dupe["id"], "type": "call", "subject": "Ring"},
    )
    assert call.status == 201, call.body
    otto = await make(hub, olga, "contacts", first_name="Hans", last_name="Otto")

    # refused: someone else's record (not found), another type, itself, a deal
    url = f"/api/v1/crm/contacts/{keep['id']}/merge"
    for other, status in ((otto["id"], 404), (acme["id"], 404), (keep["id"], 422)):
        resp = await hub.request("POST", url, token=mary, json={"other_id": other})
        assert resp.status == status, resp.body
    refused = await hub.request(
        "POST",
        f"/api/v1/crm/contacts/{otto['id']}/merge",
        token=olga,
        json={"other_id": keep["id"]},
    )
    assert refused.status == 404
    assert (
        await hub.request("POST", f"/api/v1/crm/deals/{deal['id']}/merge", token=mary)
    ).status in (404, 405)

    merged = await hub.request("POST", url, token=mary, json={"other_id": dupe["id"]})
    assert merged.status == 200, merged.body
    survivor = merged.body
    # the survivor keeps its own values and takes in what it lacked
    assert survivor["id"] == keep["id"] and survivor["title"] == "Hans Huber"
    assert [e["value"] for e in survivor["emails"]] == ["hans@acme.example", "h.huber@mail.example"]
    assert [p["number"] for p in survivor["phones"]] == ["+49 30 1234567"]
    assert survivor["company_ids"] == [acme["id"], globex["id"]]
    assert {r["id"] for r in survivor["links"]["deal"]} == {deal["id"], both["id"]}
    # the duplicate is gone; the deals name the survivor once
    gone = await hub.request("GET", f"/api/v1/crm/contacts/{dupe['id']}", token=mary)
    assert gone.status == 404
    for d, expected in ((deal, [keep["id"]]), (both, [keep["id"]])):
        got = await hub.request("GET", f"/api/v1/crm/deals/{d['id']}", token=mary)
        assert got.body["contact_ids"] == expected
    globex_now = await hub.request("GET", f"/api/v1/crm/companies/{globex['id']}", token=mary)
    assert globex_now.body["contact_ids"] == [keep["id"]]
    # its activity and its history are the survivor's
    timeline = await hub.request(
        "GET",
        f"/api/v1/crm/activities?owner_type=contact&owner_id={keep['id']}&status=all",
        token=mary,
    )
    assert [a["subject"] for a in timeline.body["activities"]] == ["Ring"]
    assert survivor["open_activities"] == 1
    history = await hub.request("GET", f"/api/v1/crm/contacts/{keep['id']}/history", token=mary)
    kinds = [h["kind"] for h in history.body["history"]]
    assert kinds.count("created") == 2 and "merged" in kinds and "activity_added" in kinds
    # the duplicate now finds nothing; the survivor is found by the other's address
    assert await titles(hub, mary, "contacts", "h.huber") == ["Hans Huber"]
    # viewers are told: the duplicate removed (merged into the survivor), the survivor changed
    await client.wait_until(
        lambda: any(
            e["data"] == {"type": "contact", "id": dupe["id"], "merged_into": keep["id"]}
            for e in client.of_type("crm.record.removed")
        )
    )
    await client.wait_until(
        lambda: any(
            e["data"]["activity"]["owner_id"] == keep["id"]
            for e in client.of_type("crm.activity.updated")
        )
    )
    assert mary_id in {survivor["responsible_id"]}
