"""SASL for XMPP: SCRAM-SHA-1 and SCRAM-SHA-256 (via scramp), and PLAIN over TLS only.

SCRAM needs salted verifiers, which are derived from the password. They are computed whenever
the portal sees the password (set by an admin, changed, or used to log in) and stored beside
the argon2 hash, so a Jabber client can log in with SCRAM without the server ever storing the
password itself.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from scramp import ScramException, ScramMechanism

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1")
# RFC 7677 asks for at least 4096; more makes a stolen verifier costlier to attack, but every
# client pays the count at every login, and many pay it in slow code: slixmpp derives the key
# in pure Python (50,000 iterations: 0.3 s of CPU per login here, 5x Prosody's login), phones
# on battery. 10,000 is Prosody's default (0.12): the same cost for clients as the servers
# they know. The argon2id hash next to the verifiers stays the strong copy of the password.
ITERATIONS = 10_000


def _verifiers(password: str) -> dict[str, Any]:
    stored: dict[str, Any] = {}
    for name in SCRAM_MECHANISMS:
        try:
            salt, stored_key, server_key, iterations = ScramMechanism(name).make_auth_info(
                password, iteration_count=ITERATIONS
            )
        except (ScramException, ValueError, UnicodeError):
            # SASLprep refuses some characters (unassigned code points such as many emoji,
            # control characters): such a password works on the web and over XMPP PLAIN
            # (on TLS), not with SCRAM.
            return {}
        stored[name.replace("-", "_")] = {
            "salt": base64.b64encode(salt).decode(),
            "stored_key": base64.b64encode(stored_key).decode(),
            "server_key": base64.b64encode(server_key).decode(),
            "iterations": iterations,
        }
    return stored


async def scram_verifiers(password: str) -> dict[str, Any]:
    """The document to store under ``users.scram`` (computed in a thread: PBKDF2 is slow)."""
    return await asyncio.to_thread(_verifiers, password)


def outdated(scram: dict[str, Any] | None) -> bool:
    """Whether stored verifiers are missing or were derived with another iteration count
    (an older default): they are derived again the next time the password is seen."""
    if not scram:
        return True
    return any(
        int((scram.get(name.replace("-", "_")) or {}).get("iterations", 0)) != ITERATIONS
        for name in SCRAM_MECHANISMS
    )


def auth_info(
    scram: dict[str, Any] | None, mechanism: str
) -> tuple[bytes, bytes, bytes, int] | None:
    entry = (scram or {}).get(mechanism.replace("-", "_"))
    if not entry:
        return None
    return (
        base64.b64decode(entry["salt"]),
        base64.b64decode(entry["stored_key"]),
        base64.b64decode(entry["server_key"]),
        int(entry["iterations"]),
    )


def parse_plain(payload: bytes) -> tuple[str, str, str]:
    """(authzid, authcid, password) from a PLAIN message (RFC 4616)."""
    parts = payload.split(b"\x00")
    if len(parts) != 3:
        raise ValueError("malformed PLAIN message")
    authzid, authcid, password = (p.decode("utf-8") for p in parts)
    if not authcid or not password:
        raise ValueError("empty PLAIN credentials")
    return authzid, authcid, password


__all__ = [
    "SCRAM_MECHANISMS",
    "ScramException",
    "ScramMechanism",
    "auth_info",
    "outdated",
    "parse_plain",
    "scram_verifiers",
]
