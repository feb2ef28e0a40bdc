"""REST conventions: problem+json for every error, body caps, and the OpenAPI contract."""

from __future__ import annotations

import json
import logging
import re

import pytest

from server.app import CLIENT_PAGES
from server.web.api import MAX_JSON_DEPTH
from tests.harness import HubHarness

PROBLEM = "application/problem+json"


def assert_problem(body: object, status: int, slug: str) -> None:
    assert isinstance(body, dict)
    assert body["status"] == status
    assert body["type"] == f"urn:portalhub:problem:{slug}"
    assert isinstance(body["title"], str) and body["title"]


async def test_malformed_json_is_a_400_problem(hub: HubHarness) -> None:
    resp = await hub.request(
        "POST",
        "/api/v1/auth/login",
        data=b'{"login": "alice", "password": ',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400 and resp.content_type == PROBLEM
    assert_problem(resp.body, 400, "malformed-json")


async def test_deeply_nested_json_is_a_400_problem(
    hub: HubHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the parser's depth it used to be a 500 with a traceback in the log; deeper than
    MAX_JSON_DEPTH it is refused before validation (a custom field could carry it)."""
    _, token = await hub.create_user("alice")

    def nested(depth: int) -> object:
        value: object = "x"
        for _ in range(depth):
            value = {"a": value}
        return value

    bodies = [
        ("/api/v1/auth/login", None, "[" * 100_000 + "]" * 100_000),
        ("/api/v1/auth/login", None, '{"login": ' + "[" * 5000 + "]" * 5000 + "}"),
        ("/api/v1/auth/login", None, json.dumps({"login": "a", "password": nested(40)})),
        ("/api/v1/crm/contacts", token, json.dumps({"title": "A", "custom_fields": nested(40)})),
    ]
    for path, auth, body in bodies:
        resp = await hub.request(
            "POST", path, token=auth, data=body, headers={"Content-Type": "application/json"}
        )
        assert resp.status == 400 and resp.content_type == PROBLEM, (path, resp.body)
        assert_problem(resp.body, 400, "malformed-json")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # nesting within the limit is judged by the schema as before
    fine = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "a", "password": nested(MAX_JSON_DEPTH - 1)}
    )
    assert fine.status == 422


async def test_wrong_types_and_unknown_fields_are_422_with_locations(hub: HubHarness) -> None:
    wrong = await hub.request("POST", "/api/v1/auth/login", json={"login": 5, "password": []})
    assert wrong.status == 422 and wrong.content_type == PROBLEM
    assert_problem(wrong.body, 422, "validation-error")
    assert {tuple(e["loc"]) for e in wrong.body["errors"]} == {("login",), ("password",)}
    extra = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "a", "password": "b", "admin": True}
    )
    assert extra.status == 422
    assert extra.body["errors"][0]["loc"] == ["admin"]
    not_object = await hub.request("POST", "/api/v1/auth/login", json=["login"])
    assert not_object.status == 422


async def test_oversize_body_is_413(hub: HubHarness) -> None:
    huge = '{"login": "' + "a" * (300 * 1024) + '", "password": "x"}'
    resp = await hub.request(
        "POST", "/api/v1/auth/login", data=huge, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 413 and resp.content_type == PROBLEM
    assert_problem(resp.body, 413, "body-too-large")


async def test_bad_query_string_is_422(hub: HubHarness) -> None:
    _, token = await hub.create_user("alice")
    resp = await hub.request("GET", "/api/v1/users?limit=many", token=token)
    assert resp.status == 422
    assert resp.body["errors"][0]["loc"] == ["limit"]


async def test_unknown_route_and_method_are_problems(hub: HubHarness) -> None:
    missing = await hub.request("GET", "/api/v1/nothing-here")
    assert missing.status == 404 and missing.content_type == PROBLEM
    assert_problem(missing.body, 404, "not-found")
    wrong_method = await hub.request("DELETE", "/api/v1/auth/login")
    assert wrong_method.status == 405
    assert_problem(wrong_method.body, 405, "method-not-allowed")
    assert "POST" in wrong_method.headers["Allow"]


async def test_auth_is_required_and_admin_routes_are_guarded(hub: HubHarness) -> None:
    anonymous = await hub.request("GET", "/api/v1/users")
    assert anonymous.status == 401
    assert_problem(anonymous.body, 401, "unauthorized")
    garbage = await hub.request("GET", "/api/v1/users", headers={"Authorization": "Bearer x y"})
    assert garbage.status == 401
    _, token = await hub.create_user("alice")
    resp = await hub.request(
        "POST", "/api/v1/departments", token=token, json={"name": "Skunkworks"}
    )
    assert resp.status == 403
    assert_problem(resp.body, 403, "forbidden")


async def test_health_and_readiness(hub: HubHarness) -> None:
    # (an external database: no process of the hub's own, no disk of its own to watch)
    nothing = {"database_process": None, "database_restarts": None, "disk": None, "reason": None}
    health = await hub.request("GET", "/healthz")
    assert health.body == {"status": "ok", "database": None, "redis": None, **nothing}
    ready = await hub.request("GET", "/readyz")
    assert ready.status == 200 and ready.body == {
        "status": "ready",
        "database": "ok",
        "redis": None,
        **nothing,
    }


async def test_every_route_is_in_the_openapi_document(hub: HubHarness) -> None:
    resp = await hub.request("GET", "/api/v1/openapi.json")
    assert resp.status == 200
    doc = resp.body
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for route in hub.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path is None or path.startswith("/socket.io") or route.method == "HEAD":
            continue
        if path == "/" or "prefix" in info:  # the web client's page and static files
            continue
        if path.split("/")[1] in CLIENT_PAGES:  # the web client's own addresses: its page
            continue
        served.add((route.method, path))
    assert served, "no routes found"
    assert served == documented
    # every documented operation names its models, and every $ref resolves
    schemas = doc["components"]["schemas"]
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', str(doc).replace("'", '"')):
        assert ref in schemas, ref
    login = doc["paths"]["/api/v1/auth/login"]["post"]
    assert "requestBody" in login and "security" not in login
    assert set(login["responses"]) >= {"200", "401", "422", "429"}
    assert doc["paths"]["/api/v1/users"]["get"]["security"] == [{"bearer": []}]
