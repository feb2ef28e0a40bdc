"""Login, tokens, logout and self-registration."""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC, datetime, timedelta

from server.auth.passwords import needs_rehash, password_fields, verify_password
from server.auth.throttle import LoginThrottle
from server.directory.models import RegisterRequest, UserCreate
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.events.models import EphemeralEvent
from server.events.streams import user_stream
from server.settings import Settings
from server.store.database import Document, Store, utcnow
from server.web.problems import Problem

PORTAL_SETTINGS_ID = "portal"


def token_hash(token: str) -> str:
    """Tokens are stored only as their SHA-256: a leaked database holds no usable token."""
    return hashlib.sha256(token.encode()).hexdigest()


class AuthService:
    def __init__(
        self, store: Store, directory: DirectoryService, bus: EventBus, settings: Settings
    ) -> None:
        self._store = store
        self._bus = bus
        self._directory = directory
        self._ttl = timedelta(seconds=settings.token_ttl_seconds)
        self.throttle = LoginThrottle(settings.login_max_failures, settings.login_lockout_seconds)

    async def login(self, login: str, password: str) -> tuple[str, Document]:
        key = login.strip().lower()
        wait = self.throttle.retry_after(key, time.monotonic())
        if wait > 0:
            raise Problem(
                429,
                "login-throttled",
                "Too many failed logins",
                "this login is locked after repeated failures; try again later",
                headers={"Retry-After": str(int(wait) + 1)},
                retry_after=int(wait) + 1,
            )
        user = await self.check_password(key, password)
        if user is None:
            raise Problem(
                401, "invalid-credentials", "Invalid credentials", "wrong login or password"
            )
        return await self.issue_token(str(user["_id"])), user

    async def check_password(self, login: str, password: str) -> Document | None:
        """The active user with this login and password, or None (counted as a failure).

        The caller checks ``throttle`` first. Shared by web logins and XMPP PLAIN, so failures
        over either count together.
        """
        key = login.strip().lower()
        user = await self._directory.user_by_login(key)
        stored = user.get("password_hash") if user else None
        ok = await verify_password(stored, password)
        if not ok or user is None or not user.get("is_active", True):
            self.throttle.failure(key, time.monotonic())
            return None
        self.throttle.success(key)
        if (stored and needs_rehash(stored)) or not user.get("scram"):
            # Users from before SCRAM (or an older hash) get fresh fields on their next login.
            fields = await password_fields(password)
            await self._store.users.update_one({"_id": user["_id"]}, {"$set": fields})
            user.update(fields)
        return user

    async def issue_token(self, user_id: str) -> str:
        token = secrets.token_urlsafe(32)
        now = utcnow()
        await self._store.tokens.insert_one(
            {
                "_id": token_hash(token),
                "user_id": user_id,
                "created_at": now,
                "expires_at": now + self._ttl,
            }
        )
        return token

    async def authenticate(self, token: str | None) -> Document | None:
        """The active user a token belongs to, or None (unknown, revoked, expired, inactive)."""
        if not token or len(token) > 256:
            return None
        record = await self._store.tokens.find_one({"_id": token_hash(token)})
        if record is None or record["expires_at"] <= datetime.now(UTC):
            return None
        user = await self._store.users.find_one({"_id": record["user_id"]})
        if user is None or not user.get("is_active", True):
            return None
        return user

    async def logout(self, token: str) -> None:
        """Revoke this token; connections opened with it are closed, the user's others stay."""
        hashed = token_hash(token)
        record = await self._store.tokens.find_one_and_delete({"_id": hashed})
        if record is not None:
            await self._bus.publish_ephemeral(
                EphemeralEvent(
                    "session.revoked",
                    {"reason": "logout"},
                    (user_stream(record["user_id"]),),
                    private={"token_hash": hashed},
                )
            )

    async def prune_expired_tokens(self) -> int:
        result = await self._store.tokens.delete_many({"expires_at": {"$lte": datetime.now(UTC)}})
        return result.deleted_count

    async def self_registration_enabled(self) -> bool:
        doc = await self._store.portal.find_one({"_id": PORTAL_SETTINGS_ID})
        return bool(doc and doc.get("self_registration"))

    async def set_self_registration(self, enabled: bool) -> None:
        await self._store.portal.update_one(
            {"_id": PORTAL_SETTINGS_ID}, {"$set": {"self_registration": enabled}}, upsert=True
        )

    async def require_registration_open(self) -> None:
        if not await self.self_registration_enabled():
            raise Problem(
                403,
                "registration-closed",
                "Registration closed",
                "self-registration is turned off on this portal",
            )

    async def register(self, data: RegisterRequest) -> tuple[str, Document]:
        await self.require_registration_open()
        user = await self._directory.create_user(UserCreate(**data.model_dump(exclude_none=True)))
        doc = await self._directory.user_document(user.id)
        return await self.issue_token(user.id), doc
