"""Declared routes: one declaration drives validation, authorisation and the OpenAPI document."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from server.web.problems import PROBLEM_CONTENT_TYPE, Problem

AuthLevel = Literal["none", "user", "admin"]
M = TypeVar("M", bound=BaseModel)

_PATH_PARAM = re.compile(r"{(\w+)}")


@dataclass
class Call:
    """What a handler gets: the request, its validated body and query, and the caller."""

    request: web.Request
    body: BaseModel | None
    query: BaseModel | None
    user: dict[str, Any] | None

    def body_as(self, model: type[M]) -> M:
        assert isinstance(self.body, model)
        return self.body

    def query_as(self, model: type[M]) -> M:
        assert isinstance(self.query, model)
        return self.query

    def path(self, name: str) -> str:
        return self.request.match_info[name]

    @property
    def user_id(self) -> str:
        assert self.user is not None
        return str(self.user["_id"])

    @property
    def is_admin(self) -> bool:
        return bool(self.user and self.user.get("is_admin"))


Result = BaseModel | Sequence[BaseModel] | dict[str, Any] | None | web.StreamResponse
HandlerFn = Callable[[Call], Awaitable[Result]]
Precheck = Callable[[web.Request], Awaitable[None]]
Authenticator = Callable[[web.Request], Awaitable[dict[str, Any] | None]]
# Why new writes are refused right now (the disk is nearly full), or None.
WriteRefusal = Callable[[], str | None]
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
INSUFFICIENT_STORAGE = 507
STORAGE_RETRY_SECONDS = 30


@dataclass
class Operation:
    method: str
    path: str
    handler: HandlerFn
    summary: str
    tag: str
    auth: AuthLevel
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    many: bool
    status: int
    errors: tuple[int, ...]
    description: str = ""
    extra_responses: dict[str, Any] = field(default_factory=dict)
    precheck: Precheck | None = None
    # Refused with 507 while the disk is nearly full: every route that stores something.
    stores: bool = True


def validation_problem(exc: ValidationError, where: str) -> Problem:
    errors = [
        {"loc": [str(p) for p in err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    return Problem(
        422,
        "validation-error",
        "Invalid request",
        f"the {where} does not match the expected schema",
        errors=errors,
    )


class Api:
    """Collects operations; registers them on an app and describes them as OpenAPI 3.1."""

    def __init__(self, title: str, version: str) -> None:
        self.title = title
        self.version = version
        self.operations: list[Operation] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        tag: str,
        auth: AuthLevel = "user",
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        many: bool = False,
        status: int = 200,
        errors: tuple[int, ...] = (),
        description: str = "",
        extra_responses: dict[str, Any] | None = None,
        precheck: Precheck | None = None,
        stores: bool | None = None,
    ) -> Callable[[HandlerFn], HandlerFn]:
        """``stores``: whether the route writes what a client sent, and so is refused (507)
        while the disk is nearly full. By default every POST, PUT, PATCH and DELETE does;
        a POST that only reads (a search, a test) or whose small write keeps people able to
        read (login, logout) says ``stores=False``."""

        def register(fn: HandlerFn) -> HandlerFn:
            self.operations.append(
                Operation(
                    method.upper(),
                    path,
                    fn,
                    summary,
                    tag,
                    auth,
                    body,
                    query,
                    response,
                    many,
                    status,
                    errors,
                    description or (fn.__doc__ or "").strip(),
                    extra_responses or {},
                    precheck,
                    method.upper() in UNSAFE_METHODS if stores is None else stores,
                )
            )
            return fn

        return register

    def install(
        self,
        app: web.Application,
        authenticate: Authenticator,
        write_refusal: WriteRefusal = lambda: None,
    ) -> None:
        for op in self.operations:
            app.router.add_route(op.method, op.path, self._wrap(op, authenticate, write_refusal))

    def _wrap(
        self, op: Operation, authenticate: Authenticator, write_refusal: WriteRefusal
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            user = None
            if op.auth != "none":
                user = await authenticate(request)
                if user is None:
                    raise Problem(
                        401,
                        "unauthorized",
                        "Authentication required",
                        "send a valid token as 'Authorization: Bearer <token>'",
                        headers={"WWW-Authenticate": 'Bearer realm="portalhub"'},
                    )
                if op.auth == "admin" and not user.get("is_admin"):
                    raise Problem(403, "forbidden", "Forbidden", "administrators only")
            if op.stores and (refused := write_refusal()) is not None:
                # Before the body is read: nothing of it would be kept.
                raise Problem(
                    INSUFFICIENT_STORAGE,
                    "insufficient-storage",
                    "Insufficient storage",
                    refused,
                    headers={"Retry-After": str(STORAGE_RETRY_SECONDS)},
                )
            if op.precheck is not None:
                # Refusals that do not depend on the body come before its validation.
                await op.precheck(request)
            body = await _parse_body(request, op.body) if op.body is not None else None
            query = None
            if op.query is not None:
                try:
                    query = op.query.model_validate(dict(request.query))
                except ValidationError as exc:
                    raise validation_problem(exc, "query string") from None
            result = await op.handler(Call(request, body, query, user))
            return _respond(result, op.status)

        return handle

    def openapi(self) -> dict[str, Any]:
        models: list[type[BaseModel]] = []
        for op in self.operations:
            for model in (op.body, op.response):
                if model is not None and model not in models:
                    models.append(model)
        keyed: list[tuple[type[BaseModel], JsonSchemaMode]] = [
            (m, "validation" if any(op.body is m for op in self.operations) else "serialization")
            for m in models
        ]
        refs, top = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
        schemas: dict[str, Any] = dict(top.get("$defs", {}))
        schemas["Problem"] = PROBLEM_SCHEMA

        def ref(model: type[BaseModel]) -> dict[str, Any]:
            for (m, _mode), schema in refs.items():
                if m is model:
                    return schema
            raise KeyError(model)

        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            entry: dict[str, Any] = {
                "operationId": op.handler.__name__,
                "summary": op.summary,
                "tags": [op.tag],
                "responses": {},
            }
            if op.description:
                entry["description"] = op.description
            params: list[dict[str, Any]] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _PATH_PARAM.findall(op.path)
            ]
            if op.query is not None:
                qschema = op.query.model_json_schema()
                required = set(qschema.get("required", []))
                for name, prop in qschema.get("properties", {}).items():
                    params.append(
                        {"name": name, "in": "query", "required": name in required, "schema": prop}
                    )
            if params:
                entry["parameters"] = params
            if op.body is not None:
                entry["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": ref(op.body)}},
                }
            if op.auth != "none":
                entry["security"] = [{"bearer": []}]
            ok: dict[str, Any] = {"description": "Success"}
            if op.response is not None:
                schema = ref(op.response)
                if op.many:
                    schema = {"type": "array", "items": schema}
                ok["content"] = {"application/json": {"schema": schema}}
            entry["responses"][str(op.status)] = ok
            entry["responses"].update(op.extra_responses)
            codes = set(op.errors) | {500}
            if op.body is not None or op.query is not None:
                # a body that is not JSON at all (or nested too deep): 400 malformed-json;
                # a body that did not arrive in time: 408 (docs/api.md, Errors)
                codes |= {400, 408, 413, 422} if op.body is not None else {422}
            if op.auth != "none":
                codes.add(401)
            if op.auth == "admin":
                codes.add(403)
            if op.stores:
                codes.add(INSUFFICIENT_STORAGE)
            for code in sorted(codes):
                entry["responses"][str(code)] = {
                    "description": "Problem",
                    "content": {
                        PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}
                    },
                }
            paths.setdefault(op.path, {})[op.method.lower()] = entry
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
        "retry_after": {"type": "integer"},
    },
    "required": ["type", "title", "status"],
}


MAX_JSON_DEPTH = 32  # no request body nests deeper; the database takes at most 100


def json_depth_exceeds(data: Any, limit: int) -> bool:
    """True when ``data`` has arrays or objects nested more than ``limit`` deep."""
    level: list[Any] = [data]  # the values at one depth; containers there sit one deeper
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return False
    return any(isinstance(item, dict | list) for item in level)


async def _parse_body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()  # aiohttp enforces client_max_size here (413)
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise Problem(
            400, "malformed-json", "Malformed JSON", "the request body is not valid JSON"
        ) from None
    except RecursionError:  # deeper than the parser goes (about a thousand levels)
        data = None
        too_deep = True
    else:
        # Counting brackets is quick; the walk is for bodies that have enough of them.
        too_deep = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth_exceeds(
            data, MAX_JSON_DEPTH
        )
    if too_deep:
        raise Problem(
            400,
            "malformed-json",
            "Malformed JSON",
            f"the request body nests arrays or objects more than {MAX_JSON_DEPTH} deep",
        )
    if not isinstance(data, dict):
        raise Problem(
            422,
            "validation-error",
            "Invalid request",
            "the request body must be a JSON object",
            errors=[],
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc, "request body") from None


def _respond(result: Result, status: int) -> web.StreamResponse:
    if isinstance(result, web.StreamResponse):
        return result
    if result is None:
        return web.Response(status=204)
    payload: Any
    if isinstance(result, BaseModel):
        payload = result.model_dump(mode="json")
    elif isinstance(result, Sequence):
        payload = [item.model_dump(mode="json") for item in result]
    else:
        payload = result
    return web.json_response(payload, status=status)
