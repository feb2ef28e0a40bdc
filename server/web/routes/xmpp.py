"""What a user types into a Jabber client to connect."""

from __future__ import annotations

from pydantic import BaseModel, Field

from server.services import services
from server.web.api import Call
from server.web.problems import Problem
from server.web.routes import api


class XmppAccount(BaseModel):
    jid: str = Field(description="The Jabber ID: login@domain")
    login: str
    domain: str = Field(description="The server (domain) to enter in the client")
    host: str = Field(
        description="Where to connect if the client asks for a host: the domain, unless "
        "PORTALHUB_XMPP_PUBLIC_HOST names another"
    )
    starttls_port: int = Field(description="Port for STARTTLS ('require encryption')")
    tls_port: int = Field(description="Port for direct TLS ('old-style SSL')")
    fingerprint: str = Field(description="SHA-256 fingerprint of the server certificate")
    fingerprint_sha1: str = Field(
        description="SHA-1 fingerprint of the same certificate, for clients that show only that"
    )
    self_signed: bool
    mechanisms: list[str]


@api.route(
    "GET",
    "/api/v1/xmpp/account",
    summary="Jabber client settings for the caller",
    tag="xmpp",
    response=XmppAccount,
    errors=(404,),
)
async def xmpp_account(call: Call) -> XmppAccount:
    svc = services(call.request)
    xmpp = svc.xmpp
    if xmpp is None or not xmpp.ports:
        raise Problem(404, "not-found", "Not found", "XMPP is turned off on this portal")
    assert call.user is not None
    login = str(call.user["login"])
    settings = svc.settings
    return XmppAccount(
        jid=f"{login}@{xmpp.domain}",
        login=login,
        domain=xmpp.domain,
        host=settings.xmpp_public_host or xmpp.domain,
        starttls_port=xmpp.ports["starttls"],
        tls_port=xmpp.ports["tls"],
        fingerprint=xmpp.fingerprint,
        fingerprint_sha1=xmpp.fingerprint_sha1,
        self_signed=settings.xmpp_cert_file is None,
        mechanisms=["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN (over TLS only)"],
    )
