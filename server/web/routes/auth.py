"""Authentication routes."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from server.directory.models import RegisterRequest, UserOut
from server.services import services
from server.web.api import Call
from server.web.routes import api


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    login: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class TokenResponse(BaseModel):
    token: str
    user: UserOut


def bearer_token(call: Call) -> str:
    header = call.request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


@api.route(
    "POST",
    "/api/v1/auth/login",
    summary="Log in with login and password",
    tag="auth",
    auth="none",
    body=LoginRequest,
    response=TokenResponse,
    errors=(401, 429, 503),
    stores=False,  # a session is small, and without one nobody can read
)
async def login(call: Call) -> TokenResponse:
    """Returns a bearer token. Ten failures in a row lock the login for a while, and too many
    failed or simultaneous logins from one address lock that address (429, with
    Retry-After); too many password checks waiting on the server answer 503."""
    body = call.body_as(LoginRequest)
    auth = services(call.request).auth
    request = call.request
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", []))
    address = auth.client_address(request.remote, forwarded)
    token, user = await auth.login(body.login, body.password, address)
    return TokenResponse(token=token, user=UserOut.from_document(user))


@api.route(
    "POST",
    "/api/v1/auth/logout",
    summary="Revoke the token used for this request",
    tag="auth",
    status=204,
    stores=False,
)
async def logout(call: Call) -> None:
    await services(call.request).auth.logout(bearer_token(call))


@api.route(
    "POST",
    "/api/v1/auth/register",
    summary="Self-registration (when the portal allows)",
    tag="auth",
    auth="none",
    body=RegisterRequest,
    response=TokenResponse,
    status=201,
    errors=(403, 409),
    precheck=lambda request: services(request).auth.require_registration_open(),
)
async def register(call: Call) -> TokenResponse:
    """Answers 403 while self-registration is off (the default), whatever the body. A new
    user is a plain employee: rights and department are for an administrator to give."""
    token, user = await services(call.request).auth.register(call.body_as(RegisterRequest))
    return TokenResponse(token=token, user=UserOut.from_document(user))
