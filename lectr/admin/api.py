"""Declaring admin routes: one decorator that registers a Klein route and
records everything the OpenAPI document says about it.

Every route names its :class:`~lectr.managers.users.Permission`, its request
body schema and query parameters, and its responses::

    @api.route("PUT", "/admin/orgs/{org_id}", Permission.ORG_WRITE,
               summary="Rename an organization", body=schemas.RENAME_ORG,
               responses={200: "Org"})
    async def rename_org(self, request, call: Call) -> Reply: ...

The :class:`Dispatcher` then does the same steps for every route, in this
order: authenticate → authorize (404 for an org the caller cannot see, 403
for a role that lacks the permission) → parse and validate the query string
and the JSON body → run the handler → one JSON error format for everything
that goes wrong (``{"error": {"code", "message"}}``; anything that is not a
:class:`~lectr.errors.LectrError` is a generic 500, traceback in the log).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.resource import Resource

from lectr.admin.validation import (
    QueryParam,
    check_schema,
    decode_path,
    decode_query,
    parse_json_body,
    parse_query,
    validate,
)
from lectr.db.database import DatabaseUnavailable
from lectr.errors import BadRequest, LectrError
from lectr.managers.users import Access, Permission, UserManager
from lectr.metrics import Registry
from lectr.tracing import Tracing, activate, deactivate

MAX_BODY_BYTES = 1 << 20


class PayloadTooLarge(LectrError):
    status = 413
    code = "payload_too_large"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    payload: Any = None  # JSON-able; None with 204
    content_type: bytes = b"application/json"


def ok(payload: Any) -> Reply:
    return Reply(200, payload)


def created(payload: Any) -> Reply:
    return Reply(201, payload)


def no_content() -> Reply:
    return Reply(204)


def text(body: str, content_type: bytes) -> Reply:
    return Reply(200, body, content_type)


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler receives besides the request."""

    access: Access
    params: dict[str, str]  # path parameters, as matched
    query: dict[str, Any]
    body: Any

    @property
    def org_id(self) -> str:
        """The org of an org-scoped route, canonical and authorized."""
        assert self.access.org_id is not None
        return self.access.org_id

    @property
    def principal(self):
        return self.access.principal


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # OpenAPI template: /admin/orgs/{org_id}
    name: str  # operationId
    permission: Permission
    summary: str
    description: str
    tags: tuple[str, ...]
    body: dict | None
    body_required: bool
    query: tuple[QueryParam, ...]
    responses: dict[int, Any]  # status → component name, inline schema, or None
    errors: tuple[int, ...]  # error statuses beyond those the permission implies
    path_params: dict[str, dict] = field(default_factory=dict)

    @property
    def klein_path(self) -> str:
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)


Handler = Callable[..., Awaitable[Reply]]

_UUID_PARAM = {"type": "string", "format": "uuid"}


class Api:
    """A declarative table of routes, attached to a Klein app."""

    def __init__(self, app: Klein) -> None:
        self.app = app
        self.operations: list[Operation] = []

    def route(
        self,
        method: str,
        path: str,
        permission: Permission,
        *,
        summary: str,
        responses: dict[int, Any],
        description: str = "",
        tags: tuple[str, ...] = (),
        body: dict | None = None,
        body_required: bool = True,
        query: tuple[QueryParam, ...] = (),
        errors: tuple[int, ...] = (),
        path_params: dict[str, dict] | None = None,
    ) -> Callable[[Handler], Handler]:
        if body is not None:
            check_schema(body, f"{method} {path} body")
        for param in query:
            check_schema(param.schema, f"{method} {path} ?{param.name}")
        names = re.findall(r"\{(\w+)\}", path)
        declared = dict(path_params or {})
        params = {n: declared.get(n, _UUID_PARAM) for n in names}
        if permission.org_scoped and "org_id" not in names:
            raise ValueError(f"{method} {path}: an org-scoped route needs {{org_id}}")

        def deco(fn: Handler) -> Handler:
            op = Operation(
                method=method,
                path=path,
                name=fn.__name__,
                permission=permission,
                summary=summary,
                description=description or (fn.__doc__ or "").strip(),
                tags=tags,
                body=body,
                body_required=body_required,
                query=tuple(query),
                responses=dict(responses),
                errors=tuple(errors),
                path_params=params,
            )
            if any(o.name == op.name for o in self.operations):
                raise ValueError(f"duplicate operation {op.name}")
            self.operations.append(op)

            def endpoint(instance, request, **kwargs):
                return instance.dispatcher.run(op, fn, instance, request, kwargs)

            endpoint.__name__ = fn.__name__
            self.app.route(op.klein_path, methods=[method], endpoint=fn.__name__)(endpoint)
            return fn

        return deco


# --- responses ----------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(request, status: int, payload: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    if payload is None:
        return b""
    return json.dumps(payload, separators=(",", ":"), default=_json_default).encode()


def error_payload(code: str, message: str) -> dict:
    """The admin API's error envelope (also what the site's raw refusals send)."""
    return {"error": {"code": code, "message": message}}


def write_error(request, status: int, code: str, message: str) -> bytes:
    if status == 401:
        challenge = b'Bearer realm="lectr"'
        if code == "invalid_token":
            challenge += b', error="invalid_token"'
        request.setHeader(b"www-authenticate", challenge)
    return write_json(request, status, error_payload(code, message))


class TextGate(Resource):
    """The admin app's root: a request whose target (path or query string)
    is not text (:func:`~lectr.admin.validation.decode_path`) is answered
    400 ``invalid_text`` in the API's error format before it is routed;
    everything else goes to the Klein app. (Klein itself would answer a
    non-UTF-8 path with a plain-text 400 and log a traceback; and an encoded
    surrogate or NUL that reached a handler would end as a 500.)"""

    isLeaf = True
    _log = Logger()

    def __init__(self, app: Resource) -> None:
        super().__init__()
        self._app = app

    def render(self, request):
        try:
            decode_path(request.uri)
            decode_query(request.uri)
        except BadRequest as e:
            self._log.info(
                "admin request refused: {status} {code}: {message}",
                status=e.status,
                code=e.code,
                message=e.message,
            )
            return write_error(request, e.status, e.code, e.message)
        return self._app.render(request)


def read_body(request) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    raw = content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return raw


class Dispatcher:
    """Runs one declared operation for one request (state on the instance:
    the authenticator, the authorization manager, metrics)."""

    _log = Logger()

    def __init__(
        self, *, authenticator, users: UserManager, metrics: Registry, clock, tracing=None
    ) -> None:
        self._auth = authenticator
        self._users = users
        self._clock = clock
        self._tracing = tracing if tracing is not None else Tracing.disabled(reactor=clock)
        self._m_requests = metrics.counter(
            "lectr_admin_requests_total", "Admin API requests", ["operation", "status"]
        )
        self._m_seconds = metrics.histogram(
            "lectr_admin_request_seconds", "Admin API request duration", ["operation"]
        )

    async def run(self, op: Operation, handler: Handler, owner, request, params: dict) -> bytes:
        # (a duration: on a clock that never steps back, not the reactor's
        # wall clock, where NTP made negative durations and lowered _sum)
        started = time.perf_counter()
        access: Access | None = None
        status = 500
        # one span per call (health checks and /metrics excepted), its
        # database operations as children
        trace = (
            self._tracing.begin(request.requestHeaders)
            if self._tracing.enabled and "health" not in op.tags
            else None
        )
        token = activate(trace) if trace is not None else None
        try:
            principal = None
            if op.permission is not Permission.PUBLIC:
                principal = await self._auth.authenticate(request)
            access = await self._users.authorize(principal, op.permission, params.get("org_id"))
            query = parse_query(decode_query(request.uri), op.query)
            body = self._body(op, request)
            reply = await handler(owner, request, Call(access, params, query, body))
            status = reply.status
            if reply.content_type == b"application/json":
                out = write_json(request, reply.status, reply.payload)
            else:
                request.setResponseCode(reply.status)
                request.setHeader(b"content-type", reply.content_type)
                out = reply.payload.encode() if isinstance(reply.payload, str) else reply.payload
            if op.method != "GET":
                self._log.info(
                    "admin {operation} by {who}{org}: {status}",
                    operation=op.name,
                    who=access.principal.describe() if access.principal else "anonymous",
                    org=f" in org {access.org_id}" if access.org_id else "",
                    status=status,
                )
            return out
        except CancelledError:
            status = 499
            raise
        except LectrError as e:
            status = e.status
            self._log.info(
                "admin {operation}: {status} {code}: {message}",
                operation=op.name,
                status=e.status,
                code=e.code,
                message=e.message,
            )
            return write_error(request, e.status, e.code, e.message)
        except DatabaseUnavailable as e:
            status = 503
            self._log.warn(
                "admin {operation}: database unavailable ({reason})",
                operation=op.name,
                reason=str(e),
            )
            return write_error(
                request, 503, "database_unavailable", "the database is unavailable; try again"
            )
        except Exception:
            status = 500
            self._log.failure("admin {operation} failed", operation=op.name)
            return write_error(request, 500, "internal_error", "internal error")
        finally:
            self._m_requests.inc(1, op.name, str(status))
            self._m_seconds.observe(time.perf_counter() - started, op.name)
            if token is not None:
                deactivate(token)
                self._tracing.finish_server(
                    trace,
                    name=f"{op.method} {op.path}",
                    status=status,
                    attributes={
                        "http.request.method": op.method,
                        "http.route": op.path,
                        "lectr.operation": op.name,
                        "lectr.org_id": access.org_id if access is not None else None,
                    },
                )

    def _body(self, op: Operation, request) -> Any:
        raw = read_body(request)
        if op.body is None:
            if raw.strip():
                raise BadRequest("this endpoint takes no request body")
            return None
        if not raw.strip():
            if op.body_required:
                raise BadRequest("a JSON request body is required")
            return {}
        doc = parse_json_body(raw)
        validate(doc, op.body)
        return doc
