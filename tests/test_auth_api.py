"""Login, logout, token expiry and throttling, over real HTTP against a real database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.settings import Settings
from server.store.database import Store
from tests.harness import DEFAULT_PASSWORD, HubHarness, start_hub


async def test_login_returns_token_and_user(hub: HubHarness) -> None:
    user_id, _ = await hub.create_user("alice", first_name="Alice")
    resp = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "Alice", "password": DEFAULT_PASSWORD}
    )
    assert resp.status == 200
    assert resp.body["user"]["id"] == user_id
    assert resp.body["user"]["name"] == "Alice"
    assert "password_hash" not in resp.body["user"]
    me = await hub.request("GET", "/api/v1/users/me", token=resp.body["token"])
    assert me.status == 200 and me.body["login"] == "alice"


async def test_password_is_stored_as_argon2id_and_tokens_only_hashed(hub: HubHarness) -> None:
    user_id, _ = await hub.create_user("alice")
    token = await hub.login("alice")
    doc = await hub.services.store.users.find_one({"_id": user_id})
    assert doc is not None and doc["password_hash"].startswith("$argon2id$")
    assert await hub.services.store.tokens.find_one({"_id": token}) is None
    assert await hub.services.store.tokens.count_documents({"user_id": user_id}) == 2


async def test_wrong_password_and_unknown_login_look_the_same(hub: HubHarness) -> None:
    await hub.create_user("alice")
    wrong = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "alice", "password": "nope"}
    )
    unknown = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "nobody", "password": "nope"}
    )
    assert wrong.status == unknown.status == 401
    assert wrong.content_type == "application/problem+json"
    assert wrong.body["type"] == unknown.body["type"] == "urn:portalhub:problem:invalid-credentials"
    assert wrong.body["detail"] == unknown.body["detail"]


async def test_ten_wrong_passwords_lock_the_login(hub: HubHarness) -> None:
    await hub.create_user("alice")
    await hub.create_user("bob")
    for _ in range(10):
        resp = await hub.request(
            "POST", "/api/v1/auth/login", json={"login": "alice", "password": "guess"}
        )
        assert resp.status == 401
    locked = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "alice", "password": DEFAULT_PASSWORD}
    )
    assert locked.status == 429
    assert locked.body["type"] == "urn:portalhub:problem:login-throttled"
    assert int(locked.headers["Retry-After"]) > 0
    # the lock is per login: others are not affected
    assert (await hub.login("bob")) != ""


async def test_logout_revokes_the_token(hub: HubHarness) -> None:
    await hub.create_user("alice")
    token = await hub.login("alice")
    other = await hub.login("alice")
    resp = await hub.request("POST", "/api/v1/auth/logout", token=token)
    assert resp.status == 204
    after = await hub.request("GET", "/api/v1/users/me", token=token)
    assert after.status == 401
    assert after.body["type"] == "urn:portalhub:problem:unauthorized"
    assert after.headers["WWW-Authenticate"].startswith("Bearer")
    # only that token: the other session goes on
    assert (await hub.request("GET", "/api/v1/users/me", token=other)).status == 200


@pytest.fixture
async def short_token_hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    async with start_hub(settings.model_copy(update={"token_ttl_seconds": 1}), store) as h:
        yield h


async def test_token_expires(short_token_hub: HubHarness) -> None:
    hub = short_token_hub
    await hub.create_user("alice")
    token = await hub.login("alice")
    assert (await hub.request("GET", "/api/v1/users/me", token=token)).status == 200
    await asyncio.sleep(1.2)
    assert (await hub.request("GET", "/api/v1/users/me", token=token)).status == 401
    assert await hub.services.auth.prune_expired_tokens() >= 1


async def test_self_registration_is_off_by_default(hub: HubHarness) -> None:
    resp = await hub.request(
        "POST",
        "/api/v1/auth/register",
        json={"login": "eve", "email": "eve@example.test", "password": "long enough"},
    )
    assert resp.status == 403
    assert resp.body["type"] == "urn:portalhub:problem:registration-closed"
    assert await hub.services.directory.user_by_login("eve") is None


async def test_deactivated_user_cannot_log_in_and_loses_sessions(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    alice_id, alice = await hub.create_user("alice")
    resp = await hub.request(
        "PATCH", f"/api/v1/users/{alice_id}", token=admin, json={"is_active": False}
    )
    assert resp.status == 200 and resp.body["is_active"] is False
    assert (await hub.request("GET", "/api/v1/users/me", token=alice)).status == 401
    login = await hub.request(
        "POST", "/api/v1/auth/login", json={"login": "alice", "password": DEFAULT_PASSWORD}
    )
    assert login.status == 401


async def test_admin_password_change_ends_sessions(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    alice_id, alice = await hub.create_user("alice")
    resp = await hub.request(
        "PATCH", f"/api/v1/users/{alice_id}", token=admin, json={"password": "brand new secret"}
    )
    assert resp.status == 200
    assert (await hub.request("GET", "/api/v1/users/me", token=alice)).status == 401
    assert await hub.login("alice", "brand new secret")
