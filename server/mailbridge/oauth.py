"""Access tokens for IMAP's XOAUTH2, from a configured OAuth client by the refresh flow.

Hosted mailboxes (Microsoft 365, Gmail) take no password over IMAP: the client proves itself
with a short-lived access token (RFC 6749's bearer token), got from the provider's token
endpoint with a long-lived refresh token (RFC 6749, 6) that the admin obtained once when
granting the portal access. Access tokens are kept in memory until shortly before they
expire; a refresh token the provider rotates is stored in place of the old one, since the
old one may stop working at once.

The refresh is one form POST (``grant_type=refresh_token``). oauthlib (the maintained,
spec-following OAuth 2 library under requests-oauthlib) writes its form and parses the answer,
its errors and its token; the request goes over the aiohttp client the hub already runs on
(Authlib's async client would bring httpx, a second HTTP stack, for this single request).

No secret is ever logged or returned: errors name the provider's ``error`` code only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from oauthlib.oauth2 import OAuth2Error, WebApplicationClient

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 15.0
MAX_RESPONSE_BYTES = 64 * 1024
# Taken as expired this long before the provider says, so a token does not run out between
# being handed over and the server checking it.
EARLY_SECONDS = 60.0
DEFAULT_LIFETIME_SECONDS = 3600.0


class OAuthError(Exception):
    """The token endpoint refused or could not be reached; the message holds no secret."""


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """An OAuth client as configured on a mailbox."""

    client_id: str
    client_secret: str
    token_url: str
    refresh_token: str
    scope: str | None = None

    def __repr__(self) -> str:  # never a secret in a log or a traceback
        return f"OAuthClient(client_id={self.client_id!r}, token_url={self.token_url!r})"


def check_token_url(url: str) -> str | None:
    """Why ``url`` may not be used as a token endpoint, or None. It receives the client
    secret and the refresh token: HTTPS, or plain HTTP to this machine only."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL"
    if not parts.hostname:
        return "the URL names no host"
    if parts.username or parts.password:
        return "the URL may not carry a user or password"
    if parts.scheme == "https":
        return None
    if parts.scheme != "http":
        return "the token URL must be https"
    host = parts.hostname
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return "the token URL must be https (plain http only to this machine)"


@dataclass
class _Held:
    token: str
    expires_at: float  # time.monotonic()


class TokenSource:
    """Access tokens per mailbox, refreshed when needed. ``on_rotated`` stores a new refresh
    token (mailbox id, token)."""

    def __init__(self, on_rotated: Callable[[str, str], Awaitable[None]]) -> None:
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._on_rotated = on_rotated
        self._refresh_tokens: dict[str, str] = {}  # rotated since the configuration was read

    def forget(self, mailbox_id: str) -> None:
        """The mailbox's client changed (or its token was refused): fetch a new token."""
        self._held.pop(mailbox_id, None)

    async def access_token(self, mailbox_id: str, client: OAuthClient) -> str:
        lock = self._locks.setdefault(mailbox_id, asyncio.Lock())
        async with lock:  # one refresh at a time per mailbox: a rotated token is used once
            held = self._held.get(mailbox_id)
            if held is not None and time.monotonic() < held.expires_at:
                return held.token
            token, lifetime, rotated = await refresh(
                client, self._refresh_tokens.get(mailbox_id, client.refresh_token)
            )
            self._held[mailbox_id] = _Held(token, time.monotonic() + lifetime - EARLY_SECONDS)
            if rotated:
                self._refresh_tokens[mailbox_id] = rotated
                await self._on_rotated(mailbox_id, rotated)
            return token


async def refresh(client: OAuthClient, refresh_token: str) -> tuple[str, float, str | None]:
    """(access token, its lifetime in seconds, a new refresh token if the provider rotated
    it), from the token endpoint (RFC 6749, 6). oauthlib writes the request's form and reads
    the answer (the error codes of RFC 6749, 5.2 among it); aiohttp carries it."""
    problem = check_token_url(client.token_url)
    if problem is not None:
        raise OAuthError(problem)
    oauth = WebApplicationClient(client.client_id)
    form = oauth.prepare_refresh_body(
        refresh_token=refresh_token,
        scope=client.scope or None,
        client_id=client.client_id,
        client_secret=client.client_secret,
    )
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                client.token_url,
                data=form,
                headers={
                    "Accept": "application/json",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
                allow_redirects=False,  # the secrets go to the configured URL only
            ) as resp,
        ):
            body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OAuthError(f"token endpoint unreachable: {type(exc).__name__}") from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise OAuthError("token endpoint answer too large")
    try:
        # No scope passed: providers widen it (Microsoft adds offline_access), which oauthlib
        # would raise as a changed scope.
        token = oauth.parse_request_body_response(body.decode("utf-8", "replace"))
    except OAuth2Error as exc:  # its ``error`` is the provider's code, never a secret
        raise OAuthError(f"token endpoint refused ({status}): {str(exc.error)[:100]}") from None
    except ValueError:
        raise OAuthError(f"token endpoint answered {status} without a token") from None
    access = token.get("access_token")
    if status != 200 or not isinstance(access, str) or not access:
        raise OAuthError(f"token endpoint answered {status} without a usable access_token")
    try:
        seconds = max(float(token.get("expires_in", DEFAULT_LIFETIME_SECONDS)), EARLY_SECONDS + 1)
    except (TypeError, ValueError):
        seconds = DEFAULT_LIFETIME_SECONDS
    rotated = token.get("refresh_token")
    if not isinstance(rotated, str) or not rotated or rotated == refresh_token:
        rotated = None
    return access, seconds, rotated
