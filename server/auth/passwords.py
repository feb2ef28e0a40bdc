"""Password hashing with argon2id, always off the event loop (it costs tens of milliseconds)."""

from __future__ import annotations

import asyncio
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id with argon2-cffi's RFC 9106 low-memory profile

# Verified when a login names no user, so that the answer takes as long as a real check.
_DUMMY_HASH = _hasher.hash("portalhub-timing-equaliser")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def verify_blocking(stored_hash: str | None, password: str) -> bool:
    """``verify_password`` without the thread, for a caller that runs it in one of its own."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """True only for a real hash matching ``password``; a missing hash still costs a check."""
    return await asyncio.to_thread(verify_blocking, stored_hash, password)


async def password_fields(password: str) -> dict[str, Any]:
    """Everything stored for a password: the argon2id hash, and the SCRAM verifiers that let
    Jabber clients log in with SCRAM (the password itself is never stored)."""
    from server.xmpp.sasl import scram_verifiers

    return {
        "password_hash": await hash_password(password),
        "scram": await scram_verifiers(password),
    }


def scram_outdated(scram: dict[str, Any] | None) -> bool:
    """Whether the stored SCRAM verifiers are missing or of another iteration count."""
    from server.xmpp.sasl import outdated

    return outdated(scram)


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)
