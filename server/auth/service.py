"""Login, tokens, logout and self-registration."""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.auth.addresses import UNKNOWN, client_key, networks
from server.auth.hashing import Busy, HashingPool, Ticket
from server.auth.passwords import (
    needs_rehash,
    password_fields,
    scram_outdated,
    verify_blocking,
)
from server.auth.sessions import SessionGuard, announce_revocation
from server.auth.throttle import LoginThrottle
from server.caching import BatchLoad, Cache
from server.directory.models import RegisterRequest, UserCreate
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.settings import Settings
from server.store.database import Document, Store, utcnow
from server.web.problems import Problem

PORTAL_SETTINGS_ID = "portal"
CREDENTIAL_FIELDS = {"login": True, "is_active": True, "scram": True, "password_stamp": True}


def token_hash(token: str) -> str:
    """Tokens are stored only as their SHA-256: a leaked database holds no usable token."""
    return hashlib.sha256(token.encode()).hexdigest()


def login_key(login: str) -> str:
    return login.strip().lower()


class LoginRefused(Problem):
    """A login refused before its password was checked: throttled (429) or busy (503).

    A ``Problem``, so REST answers it as it is; XMPP answers ``temporary-auth-failure``.
    """


def _refused(scope: str, wait: float) -> LoginRefused:
    seconds = max(1, math.ceil(wait))
    headers = {"Retry-After": str(seconds)}
    if scope == "server":
        return LoginRefused(
            503,
            "login-busy",
            "Too many logins under way",
            "the server is checking too many passwords; try again in a moment",
            headers=headers,
            retry_after=seconds,
        )
    detail = {
        "login": "this login is locked after repeated failures, or has attempts under way; "
        "try again later",
        "address": "too many failed or simultaneous logins from this address; try again later",
    }[scope]
    return LoginRefused(
        429,
        "login-throttled",
        "Too many failed logins",
        detail,
        headers=headers,
        retry_after=seconds,
        scope=scope,
    )


@dataclass
class LoginAttempt:
    """One password check, reserved in both throttles before it is made (see throttle.py).

    It ends exactly once: ``failed``, ``succeeded`` or ``released`` (no verdict: not counted).
    """

    _auth: AuthService
    login: str
    address: str
    ended: bool = False

    def _end(self) -> bool:
        if self.ended:
            return False
        self.ended = True
        return True

    def failed(self) -> None:
        if self._end():
            now = time.monotonic()
            self._auth.throttle.failed(self.login, now)
            if self.address != UNKNOWN:
                self._auth.address_throttle.failed(self.address, now)

    def succeeded(self) -> None:
        if self._end():
            now = time.monotonic()
            self._auth.throttle.succeeded(self.login, now)
            if self.address != UNKNOWN:
                self._auth.address_throttle.succeeded(self.address, now)

    def released(self) -> None:
        if self._end():
            now = time.monotonic()
            self._auth.throttle.released(self.login, now)
            if self.address != UNKNOWN:
                self._auth.address_throttle.released(self.address, now)


class AuthService:
    def __init__(
        self, store: Store, directory: DirectoryService, bus: EventBus, settings: Settings
    ) -> None:
        self._store = store
        self._bus = bus
        self._directory = directory
        self._ttl = timedelta(seconds=settings.token_ttl_seconds)
        # Both in memory, per node: see docs/architecture.md (Login throttling).
        self.throttle = LoginThrottle(settings.login_max_failures, settings.login_lockout_seconds)
        self.address_throttle = LoginThrottle(
            settings.login_address_max_failures,
            settings.login_lockout_seconds,
            window_seconds=settings.login_lockout_seconds,
            reset_on_success=False,
        )
        self.hashing = HashingPool(
            settings.login_hash_workers or os.cpu_count() or 1,
            per_address_waiting=settings.login_address_queue,
            max_waiting=settings.login_queue,
        )
        self.sessions = SessionGuard(store, bus)
        self._trusted_proxies = networks(settings.trusted_proxies)
        # token hash -> (user id, expires_at): a request or a connection costs no query for
        # its token once seen here. Revocations drop them on every node (the event, and the
        # durable record the guard polls while this holds any), expiry is checked at each use.
        self._tokens: Cache[str, tuple[str, datetime]] = Cache(
            settings.cache_max_entries,
            settings.cache_ttl_seconds,
            stale_seconds=settings.cache_stale_seconds,
        )
        # login -> what a SCRAM exchange needs of an active user (``credentials``), so that a
        # Jabber client logging in again costs no query. Never served stale (no
        # ``stale_seconds``): dropped on every node by the revocation that a new password or a
        # deactivation announces (the event, or the record the guard polls while any is kept),
        # and after the time to live at the latest.
        # The token records that connects and requests of the same moment ask for, read
        # together (a connect burst after a deploy: one query per round, not per token).
        self._token_reads: BatchLoad[str, tuple[str, datetime]] = BatchLoad(self._read_tokens)
        self._credentials: Cache[str, Document] = Cache(
            settings.cache_max_entries, settings.cache_ttl_seconds
        )
        self._credential_logins: dict[str, str] = {}  # user id -> login (never changes)
        self._max_credentials = settings.cache_max_entries
        self._revocations = 0  # hints so far: a read that overlapped one is not kept
        self.sessions.on_revocation(
            self._revoked,
            wants_records=lambda: len(self._tokens) > 0 or len(self._credentials) > 0,
        )

    def forget_all(self) -> None:
        """Every cached token and credential may be out of date (events may have been lost)."""
        self._revocations += 1
        self._tokens.clear()
        self._credentials.clear()

    async def close(self) -> None:
        """Stop the token cache's background refreshes."""
        await self._tokens.close()
        await self._credentials.close()

    def _revoked(self, user_id: str) -> None:
        """A logout, a new password or a deactivation of ``user_id``: forget the user's tokens
        (the database says which are still valid) and credentials."""
        for hashed, (owner, _) in self._tokens.values():
            if owner == user_id:
                self._tokens.invalidate(hashed)
        self._forget_credentials(user_id)
        self._directory.forget_user(user_id)

    def _forget_credentials(self, user_id: str) -> None:
        self._revocations += 1
        login = self._credential_logins.get(user_id)
        if login is not None:
            self._credentials.invalidate(login)

    async def credentials(self, login: str) -> Document | None:
        """The user with this login as a SCRAM exchange checks them (``_id``, ``login``,
        ``is_active``, ``scram``, ``password_stamp``), or None. Cached for active users only:
        a client that logs in again (a phone on and off the network) costs no query."""
        login = login.strip().lower()
        cached = self._credentials.get(login)
        if cached is not None:
            return cached
        before = self._revocations
        doc = await self._store.users.find_one({"login": login}, projection=CREDENTIAL_FIELDS)
        if doc is None:
            return None
        # Not kept when a revocation came while it was read: it may predate the change.
        if doc.get("is_active", True) and before == self._revocations:
            if len(self._credential_logins) >= self._max_credentials:
                self._credential_logins.clear()  # bounded; a login not found is read again
                self._credentials.clear()
            self._credential_logins[str(doc["_id"])] = login
            self._credentials.put(login, doc)
        return doc

    def client_address(self, peer: str | None, forwarded_for: str | None = None) -> str:
        """The per-address key of a client (see addresses.py): the peer, or the client a
        trusted proxy names."""
        return client_key(peer, forwarded_for, self._trusted_proxies)

    async def login(
        self, login: str, password: str, address: str = UNKNOWN
    ) -> tuple[str, Document]:
        user = await self.check_password(login, password, address)
        if user is None:
            raise Problem(
                401, "invalid-credentials", "Invalid credentials", "wrong login or password"
            )
        return await self.issue_token(str(user["_id"])), user

    def begin_attempt(self, login: str, address: str = UNKNOWN) -> LoginAttempt:
        """Reserve a password check for ``login`` from ``address``, or raise ``LoginRefused``.

        Both counts are checked, then both reserved, with no await in between: concurrent
        attempts see each other's reservations.
        """
        key = login_key(login)
        now = time.monotonic()
        wait = self.throttle.retry_after(key, now)
        if wait > 0:
            raise _refused("login", wait)
        if address != UNKNOWN:
            wait = self.address_throttle.retry_after(address, now)
            if wait > 0:
                raise _refused("address", wait)
            self.address_throttle.reserve(address, now)
        self.throttle.reserve(key, now)
        return LoginAttempt(self, key, address)

    def hashing_ticket(self, address: str) -> Ticket:
        """A place in the password-checking pool, or ``LoginRefused`` at once."""
        try:
            return self.hashing.admit(address)
        except Busy as exc:
            raise _refused(exc.scope, 1.0) from None

    async def check_password(
        self, login: str, password: str, address: str = UNKNOWN
    ) -> Document | None:
        """The active user with this login and password, or None (counted as a failure).

        Raises ``LoginRefused`` when throttled or when too many checks wait already. Shared by
        web logins and XMPP PLAIN, so failures over either count together.
        """
        attempt = self.begin_attempt(login, address)
        try:
            ticket = self.hashing_ticket(address)
            try:
                user = await self._directory.user_by_login(attempt.login)
                stored = user.get("password_hash") if user else None
                ok = await ticket.run(verify_blocking, stored, password)
            finally:
                ticket.cancel()
        except BaseException:
            attempt.released()  # no verdict reached: nothing learnt, nothing counted
            raise
        if not ok or user is None or not user.get("is_active", True):
            attempt.failed()
            return None
        attempt.succeeded()
        if (stored and needs_rehash(stored)) or scram_outdated(user.get("scram")):
            # Users from before SCRAM (or an older hash, or verifiers of another iteration
            # count) get fresh fields on their next login.
            fields = await password_fields(password)
            await self._store.users.update_one({"_id": user["_id"]}, {"$set": fields})
            self._forget_credentials(str(user["_id"]))  # verifiers of today's count
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
        found = await self.session_for(token)
        return found[0] if found else None

    async def session_for(self, token: str | None) -> tuple[Document, Document] | None:
        """(user, token record) for a valid token of an active user, else None."""
        if not token or len(token) > 256:
            return None
        hashed = token_hash(token)

        found = await self._tokens.get_or_load(hashed, lambda: self._token_reads.load(hashed))
        if found is None or found[1] <= datetime.now(UTC):
            return None
        user_id, expires_at = found
        user = await self._directory.cached_user(user_id)
        if user is None or not user.get("is_active", True):
            return None
        return user, {"_id": hashed, "user_id": user_id, "expires_at": expires_at}

    async def _read_tokens(self, hashes: list[str]) -> dict[str, tuple[str, datetime]]:
        return {
            record["_id"]: (record["user_id"], record["expires_at"])
            async for record in self._store.tokens.find(
                {"_id": {"$in": hashes}}, projection={"user_id": True, "expires_at": True}
            )
        }

    async def logout(self, token: str) -> None:
        """Revoke this token; connections opened with it are closed, the user's others stay."""
        hashed = token_hash(token)
        record = await self._store.tokens.find_one_and_delete({"_id": hashed})
        self._tokens.invalidate(hashed)  # here at once; elsewhere through the revocation
        if record is not None:
            await announce_revocation(self._store, self._bus, record["user_id"], "logout", hashed)

    async def prune_expired_tokens(self) -> int:
        result = await self._store.tokens.delete_many({"expires_at": {"$lte": datetime.now(UTC)}})
        await self.sessions.prune()  # old revocation records go with them
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
