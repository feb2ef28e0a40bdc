"""IMAP with STARTTLS and XOAUTH2 against a real Dovecot: its ``oauth2`` passdb checks each
access token with a local OAuth provider (this test's token and introspection endpoints, as
Microsoft's or Google's would), and the hub gets its tokens from that provider by the refresh
flow of the mailbox's OAuth client. The secrets never show in the API or the logs."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import logging
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.settings import Settings
from server.store.database import Store
from server.store.embedded import free_loopback_port
from tests.conftest import require_binary
from tests.harness import HubHarness, start_hub
from tests.test_mail_imap import LOGIN, PASSWORD, Dovecot, message, wait_for
from tests.test_mail_imap import dovecot as dovecot  # the plain server, as a fixture

RECIPE = Path(__file__).parent / "dovecot" / "dovecot-test.conf"
CLIENT_ID, CLIENT_SECRET = "portal-hub", "client-secret-" + secrets.token_hex(8)
FIRST_REFRESH = "refresh-one-" + secrets.token_hex(8)
# STARTTLS, then XOAUTH2 against the provider; the password passdb stays for LOGIN
OAUTH_CONF = """
ssl = yes
ssl_cert = <@DIR@/cert.pem
ssl_key = <@DIR@/key.pem
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = @DIR@/oauth2.conf.ext
}
"""


@dataclass
class Provider:
    """The OAuth provider: a token endpoint (refresh flow, rotating the refresh token) and
    the introspection endpoint Dovecot asks about each access token."""

    url: str = ""
    refresh_token: str = FIRST_REFRESH
    refreshed_with: list[str] = field(default_factory=list)
    live: set[str] = field(default_factory=set)  # access tokens not revoked
    introspected: int = 0

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        ok = (
            form.get("grant_type") == "refresh_token"
            and form.get("client_id") == CLIENT_ID
            and form.get("client_secret") == CLIENT_SECRET
            and form.get("refresh_token") == self.refresh_token
        )
        self.refreshed_with.append(str(form.get("refresh_token")))
        if not ok:
            return web.json_response({"error": "invalid_grant"}, status=400)
        access = "access-" + secrets.token_hex(12)
        self.live.add(access)
        self.refresh_token = "refresh-" + secrets.token_hex(8)  # rotated, as Microsoft does
        return web.json_response(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": 3600,
                "refresh_token": self.refresh_token,
            }
        )

    async def introspect(self, request: web.Request) -> web.Response:
        self.introspected += 1
        form = await request.post()
        token = str(form.get("token", ""))
        if token in self.live:
            return web.json_response({"active": True, "username": LOGIN})
        return web.json_response({"active": False})


def certificate(base: Path) -> Path:
    """A CA and a certificate for 127.0.0.1 signed by it; the CA's file is returned."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test mail CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (base / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (base / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca_file = base / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_file


@dataclass
class OAuthDovecot:
    port: int
    base: Path
    doveadm: str

    def kick(self) -> None:
        conf = str(self.base / "dovecot.conf")
        subprocess.run([self.doveadm, "-c", conf, "kick", LOGIN], check=True)

    def log(self) -> str:
        return (self.base / "dovecot.log").read_text(errors="replace")


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    found = Provider()
    app = web.Application()
    app.router.add_post("/token", found.token)
    app.router.add_post("/introspect", found.introspect)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_loopback_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    found.url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


@pytest.fixture
def dovecot_oauth(provider: Provider, monkeypatch: pytest.MonkeyPatch) -> Iterator[OAuthDovecot]:
    binary = require_binary("dovecot", "dovecot-imapd")
    doveadm = require_binary("doveadm", "dovecot-core")
    base = Path(tempfile.mkdtemp(prefix="dovecot-oauth-"))
    base.chmod(0o755)
    port = free_loopback_port()
    conf = RECIPE.read_text() + OAUTH_CONF
    conf = conf.replace("@DIR@", str(base)).replace("@PORT@", str(port))
    (base / "dovecot.conf").write_text(conf)
    (base / "passwd").write_text(f"{LOGIN}:{{PLAIN}}not-used-here:::::\n")
    (base / "oauth2.conf.ext").write_text(
        "introspection_mode = post\n"
        f"introspection_url = {provider.url}/introspect\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
        "force_introspection = yes\n"
    )
    # the hub trusts the test CA as it would a public one (ssl.create_default_context)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate(base)))
    (base / "mail").mkdir()
    shutil.chown(base / "mail", "dovecot", "dovecot")
    subprocess.run([binary, "-c", str(base / "dovecot.conf")], check=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError((base / "dovecot.log").read_text()) from None
            time.sleep(0.1)
    yield OAuthDovecot(port, base, doveadm)
    subprocess.run([doveadm, "-c", str(base / "dovecot.conf"), "stop"], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def hub(settings: Settings, store: Store) -> AsyncIterator[HubHarness]:
    configured = settings.model_copy(update={"domain": "portal.test"})
    async with start_hub(configured, store) as harness:
        yield harness


async def test_starttls_and_xoauth2_with_a_refreshed_token(
    hub: HubHarness,
    dovecot_oauth: OAuthDovecot,
    provider: Provider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the hub's own loggers at DEBUG, and aioimaplib's (which the hub holds at WARNING: its
    # DEBUG lines carry what it sends, so the AUTHENTICATE line must be scrubbed anyway)
    caplog.set_level(logging.DEBUG, logger="server")
    caplog.set_level(logging.DEBUG, logger="aioimaplib")
    _, root = await hub.create_user("root", admin=True)
    body = {
        "name": "Hosted inbox",
        "host": "127.0.0.1",
        "port": dovecot_oauth.port,
        "security": "starttls",
        "auth": "xoauth2",
        "login": LOGIN,
        "oauth": {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "token_url": f"{provider.url}/token",
            "refresh_token": FIRST_REFRESH,
            "scope": "https://outlook.office365.com/IMAP.AccessAsUser.All",
        },
        "poll_seconds": 5,
    }
    tested = await hub.request("POST", "/api/v1/mail/mailboxes/test", token=root, json=body)
    assert tested.status == 200 and tested.body["ok"], tested.body
    assert provider.refreshed_with == [FIRST_REFRESH] and provider.introspected >= 1
    # the test's refresh rotated the token; the mailbox is configured with the new one
    body["oauth"]["refresh_token"] = provider.refresh_token  # type: ignore[index]
    created = await hub.request("POST", "/api/v1/mail/mailboxes", token=root, json=body)
    assert created.status == 201, created.body
    box_id = created.body["id"]
    store = hub.services.store

    await dovecot_oauth_append(dovecot_oauth, provider)

    async def delivered() -> bool:
        return await store["crm_records"].count_documents({"type": "lead"}) == 1

    await wait_for(delivered, timeout=40)
    # logged in by XOAUTH2 over TLS (Dovecot's own account of the session)
    assert "method=XOAUTH2" in dovecot_oauth.log() and ", TLS" in dovecot_oauth.log()
    # the provider rotated the refresh token again: the mailbox keeps the new one
    stored = await store["mail_mailboxes"].find_one({"_id": box_id})
    assert stored is not None and stored["oauth"]["refresh_token"] == provider.refresh_token

    # a revoked access token: the collector is refused, refreshes once and goes on
    issued = set(provider.live)
    provider.live.clear()
    dovecot_oauth.kick()
    await dovecot_oauth_append(dovecot_oauth, provider, sender="second@client.test")

    async def both() -> bool:
        return await store["crm_records"].count_documents({"type": "lead"}) == 2

    await wait_for(both, timeout=60)
    assert len(provider.refreshed_with) >= 3

    # neither the API nor any log line shows a secret
    listed = await hub.request("GET", "/api/v1/mail/mailboxes", token=root)
    text = json.dumps(listed.body)
    assert listed.body["mailboxes"][0]["oauth"]["client_id"] == CLIENT_ID
    assert listed.body["mailboxes"][0]["auth"] == "xoauth2"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "AUTHENTICATE XOAUTH2" in logged  # aioimaplib's DEBUG line, scrubbed
    tokens = issued | provider.live
    sasl = {
        base64.b64encode(f"user={LOGIN}\x01auth=Bearer {t}\x01\x01".encode()).decode()
        for t in tokens
    }
    for secret in [CLIENT_SECRET, *provider.refreshed_with, *tokens, *sasl]:
        assert secret not in text and secret not in logged


async def dovecot_oauth_append(
    server: OAuthDovecot, provider: Provider, sender: str = "first@client.test"
) -> None:
    """A message put into the mailbox with a token of the test's own."""
    import aioimaplib

    token = "access-test-" + secrets.token_hex(8)
    provider.live.add(token)
    client = aioimaplib.IMAP4("127.0.0.1", server.port, timeout=10)
    await client.wait_hello_from_server()
    assert (await client.xoauth2(LOGIN, token)).result == "OK"
    response = await client.append(message(sender, "Question"), mailbox="INBOX")
    assert response.result == "OK", response
    await client.logout()
    provider.live.discard(token)


async def test_starttls_is_required_when_asked_for(hub: HubHarness, dovecot: Dovecot) -> None:
    """A server without STARTTLS (the plain recipe: ssl = no): the connection is refused,
    never continued in plain text, and no password is sent."""
    _, root = await hub.create_user("root", admin=True)
    body = {
        "name": "Plain only",
        "host": "127.0.0.1",
        "port": dovecot.port,
        "security": "starttls",
        "login": LOGIN,
        "password": PASSWORD,
    }
    tested = await hub.request("POST", "/api/v1/mail/mailboxes/test", token=root, json=body)
    assert tested.status == 200 and not tested.body["ok"], tested.body
    assert "STARTTLS" in tested.body["detail"]
    log = await asyncio.to_thread((dovecot.conf.parent / "dovecot.log").read_text, errors="replace")
    assert "Login:" not in log and "auth failed" not in log
    # and an OAuth token URL that would send the secrets in plain text elsewhere
    refused = await hub.request(
        "POST",
        "/api/v1/mail/mailboxes",
        token=root,
        json={
            **body,
            "auth": "xoauth2",
            "password": None,
            "oauth": {
                "client_id": "x",
                "client_secret": "y",
                "token_url": "http://login.example.com/token",
                "refresh_token": "z",
            },
        },
    )
    assert refused.status == 422, refused.body
    assert "token_url" in json.dumps(refused.body)
    # a mailbox switched to XOAUTH2 needs its OAuth client, in full
    made = await hub.request(
        "POST",
        "/api/v1/mail/mailboxes",
        token=root,
        json={**body, "security": "none", "enabled": False},
    )
    assert made.status == 201, made.body
    path = f"/api/v1/mail/mailboxes/{made.body['id']}"
    for patch, why in (
        ({"auth": "xoauth2"}, "xoauth2 needs oauth"),
        ({"auth": "xoauth2", "oauth": {"client_id": "x"}}, "oauth needs client_secret"),
    ):
        bad = await hub.request("PATCH", path, token=root, json=patch)
        assert bad.status == 422 and why in bad.body["detail"], bad.body
