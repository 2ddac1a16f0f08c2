"""The admin API (Klein) on the admin port.

State lives on the instance (``app = Klein()`` is a class attribute with
routed methods), so tests can build as many apps as they like. Every route is
declared through :class:`lectr.admin.api.Api` with the permission it needs;
the same declarations generate ``GET /admin/openapi.json``.

Handlers parse and format only: the logic is in the managers.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from lectr import __version__
from lectr.admin import schemas as s
from lectr.admin.api import (
    Api,
    Call,
    Dispatcher,
    Reply,
    TextGate,
    created,
    no_content,
    ok,
    text,
)
from lectr.admin.api import write_error as _write_error
from lectr.admin.openapi import build_openapi
from lectr.db.database import Database, DatabaseUnavailable
from lectr.errors import BadRequest, NotFound, ServiceUnavailable
from lectr.limits.model import usd_text
from lectr.managers.orgs import IssuedKey
from lectr.managers.usage import hour_floor
from lectr.managers.users import Permission, Principal, UserManager
from lectr.metrics import Registry
from lectr.providers.custom import CustomProvider
from lectr.storage.api_keys import ApiKey
from lectr.storage.members import Member
from lectr.storage.orgs import Org
from lectr.storage.users import User
from lectr.util.deferred import OperationTimedOut, timeout_without_cancel
from lectr.util.secret import Secret

P = Permission


# --- views: what each resource looks like in JSON (see lectr/admin/schemas.py) ---


def org_view(org: Org, role: str | None) -> dict:
    return {
        "id": org.id,
        "name": org.name,
        "enabled": org.enabled,
        "created_at": org.created_at,
        "updated_at": org.updated_at,
        "role": role,
    }


def key_view(key: ApiKey) -> dict:
    return {
        "id": key.id,
        "org_id": key.org_id,
        "name": key.name,
        "prefix": key.prefix,
        "active": key.active,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


def issued_view(issued: IssuedKey) -> dict:
    # The one place a Lectr key's plaintext leaves the process.
    return {**key_view(issued.key), "key": issued.plaintext.reveal()}


def user_view(user: User) -> dict:
    return {
        "id": user.id,
        "subject": user.subject,
        "email": user.email,
        "email_verified": user.email_verified,
        "is_admin": user.is_admin,
        "created_at": user.created_at,
        "last_seen_at": user.last_seen_at,
    }


def member_view(m: Member) -> dict:
    return {
        "org_id": m.org_id,
        "user_id": m.user_id,
        "role": m.role,
        "subject": m.subject,
        "email": m.email,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
    }


def provider_key_view(k, health=None) -> dict:
    cooldown = health.cooldown(k.id) if health is not None else None
    return {
        "id": k.id,
        "org_id": k.org_id,
        "provider": k.provider,
        "name": k.name,
        "last4": k.last4,
        "enabled": k.enabled,
        "weight": k.weight,
        "base_url": k.base_url,
        "api_version": k.api_version,
        "created_at": k.created_at,
        "cooldown": None
        if cooldown is None
        else {
            "reason": cooldown.reason,
            "since": datetime.fromtimestamp(cooldown.at, UTC),
            "until": datetime.fromtimestamp(cooldown.at + cooldown.seconds, UTC),
        },
    }


def provider_view(p, row=None) -> dict:
    return {
        "name": p.name,
        "display_name": p.display_name,
        "dialect": p.dialect.name,
        "base_url": p.base_url,
        "custom": p.custom,
        "auth": getattr(p, "auth_scheme", None),
        "models_path": p.models_path.decode("ascii"),
        "key_base_url": bool(p.key_base_url_hosts),
        "key_api_version": p.accepts_api_version,
        "created_at": row.created_at if row is not None else None,
        "updated_at": row.updated_at if row is not None else None,
    }


def settings_view(st) -> dict:
    return {
        "org_id": st.org_id,
        "provider": st.provider,
        "enabled": st.enabled,
        "allowed_models": list(st.allowed_models),
        "blocked_models": list(st.blocked_models),
        "updated_at": st.updated_at,
    }


def limits_view(v) -> dict:
    """A LimitsView (lectr.limits): amounts of USD as decimal strings."""
    lim = v.limits
    return {
        "org_id": v.org_id,
        "key_id": v.key_id,
        "rpm": lim.rpm,
        "tpm": lim.tpm,
        "max_concurrent": lim.max_concurrent,
        "usd_per_day": usd_text(lim.usd_per_day) if lim.usd_per_day is not None else None,
        "usd_per_month": usd_text(lim.usd_per_month) if lim.usd_per_month is not None else None,
        "updated_at": v.updated_at,
        "usage": dict(v.usage),
    }


def rotation_view(r) -> dict:
    return {
        "current_kek": r.current_kek,
        "next_kek": r.next_kek,
        "rows_by_kek": dict(r.rows_by_kek),
        "done": r.done,
    }


def record_view(record: Any, fields: tuple[str, ...]) -> dict:
    """A dataclass (of JSON types only, as the managers answer) as JSON,
    limited to the documented fields. (Read field by field: ``asdict``
    deep-copied every row, 25 µs each: a page of 200 requests or 1,000
    usage groups held the reactor 25 ms.)"""
    if dataclasses.is_dataclass(record):
        return {f: getattr(record, f, None) for f in fields}
    values = dict(record)
    return {f: values.get(f) for f in fields}


def items(values) -> dict:
    return {"items": list(values)}


class AdminApp:
    app = Klein()
    api = Api(app)
    _log = Logger()

    def __init__(
        self,
        *,
        reactor,
        database: Database,
        metrics: Registry,
        users: UserManager,
        authenticator,
        orgs=None,
        vault=None,
        settings=None,
        usage=None,
        registry=None,
        routes=None,
        custom_providers=None,
        health=None,
        explainer=None,
        limits=None,
        sign_in=None,
        pricing=None,
        tracing=None,
    ) -> None:
        self._reactor = reactor
        self._db = database
        self._metrics = metrics
        self._users = users
        self._orgs = orgs
        self._vault = vault
        self._settings = settings
        self._usage = usage
        self._registry = registry
        self._routes = routes
        self._custom = custom_providers
        self._health = health
        self._explainer = explainer
        self._limits = limits
        self._sign_in = sign_in  # lectr.admin.signin.SignInOptions
        self._pricing = pricing
        self.dispatcher = Dispatcher(
            authenticator=authenticator,
            users=users,
            metrics=metrics,
            clock=reactor,
            tracing=tracing,
        )
        self._openapi: tuple[tuple[str, ...], bytes] | None = None

    def resource(self):
        return TextGate(self.app.resource())

    @classmethod
    def openapi(cls, providers: list[str] | None = None) -> dict:
        """The OpenAPI document; ``providers`` (the registry's names, custom
        ones included) become the enum of every provider field."""
        return build_openapi(cls.api.operations, s.COMPONENTS, providers=providers)

    def _openapi_bytes(self) -> bytes:
        names = tuple(self._registry.names()) if self._registry is not None else ()
        if self._openapi is None or self._openapi[0] != names:
            doc = self.openapi(list(names) or None)
            self._openapi = (names, json.dumps(doc, separators=(",", ":")).encode())
        return self._openapi[1]

    @staticmethod
    def _need(manager, what: str):
        if manager is None:
            raise ServiceUnavailable(f"{what} are not available on this node")
        return manager

    # --- errors the router raises (unknown path, wrong method) -------------------

    @app.handle_errors(HTTPException)
    def _routing_error(self, request, failure):
        error = failure.value
        if isinstance(error, MethodNotAllowed):
            allowed = sorted(set(error.valid_methods or ()) - {"HEAD"})
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return _write_error(
                request, 405, "method_not_allowed", f"use {' or '.join(allowed)} on this path"
            )
        return _write_error(request, 404, "not_found", "no such endpoint")

    @app.handle_errors
    def _unexpected_error(self, request, failure):
        self._log.failure("admin API request failed", failure)
        return _write_error(request, 500, "internal_error", "internal error")

    # --- health ------------------------------------------------------------------

    @api.route(
        "GET", "/healthz", P.PUBLIC, summary="Liveness", tags=("health",), responses={200: "Health"}
    )
    async def healthz(self, request, call: Call) -> Reply:
        return ok({"status": "ok"})

    @api.route(
        "GET",
        "/readyz",
        P.PUBLIC,
        summary="Readiness: is the database reachable?",
        tags=("health",),
        responses={200: "Ready", 503: "Ready"},
    )
    async def readyz(self, request, call: Call) -> Reply:
        try:
            await timeout_without_cancel(self._db.ping(), 2.0, self._reactor)
        except (DatabaseUnavailable, OperationTimedOut) as e:
            reason = "timed out" if isinstance(e, OperationTimedOut) else "unreachable"
            return Reply(503, {"status": "unavailable", "database": reason})
        return ok({"status": "ready", "database": "ok"})

    @api.route(
        "GET",
        "/metrics",
        P.PUBLIC,
        summary="Prometheus metrics",
        tags=("health",),
        responses={200: {"type": "string", "x-content-type": "text/plain"}},
    )
    async def metrics(self, request, call: Call) -> Reply:
        return text(self._metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    @api.route(
        "GET",
        "/admin/openapi.json",
        P.PUBLIC,
        summary="This API's OpenAPI document",
        tags=("meta",),
        responses={200: {"type": "object"}},
    )
    async def openapi_document(self, request, call: Call) -> Reply:
        return Reply(200, self._openapi_bytes(), b"application/json; charset=utf-8")

    @api.route(
        "GET",
        "/admin/ui-config",
        P.PUBLIC,
        summary="How the dashboard signs in",
        description=(
            "Whether the admin token is accepted, and the OIDC issuer, client id, audience "
            "and endpoints for a sign-in with authorization code + PKCE."
        ),
        tags=("meta",),
        responses={200: "UIConfig"},
    )
    async def ui_config(self, request, call: Call) -> Reply:
        options = self._sign_in
        if options is None:
            return ok({"version": __version__, "admin_token": False, "oidc": None})
        return ok(await options.describe())

    # --- identity ------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/me",
        P.AUTHENTICATED,
        summary="The caller and their orgs",
        tags=("identity",),
        responses={200: "Me"},
    )
    async def me(self, request, call: Call) -> Reply:
        principal: Principal = call.principal
        memberships = await self._users.memberships(principal)
        return ok(
            {
                "kind": principal.kind,
                "is_admin": principal.is_admin,
                "user": user_view(principal.user) if principal.user else None,
                "memberships": [
                    {"org_id": m.org_id, "org_name": m.org_name, "role": m.role}
                    for m in memberships
                ],
            }
        )

    @api.route(
        "GET",
        "/admin/users",
        P.GLOBAL_ADMIN,
        summary="List user identities",
        tags=("identity",),
        responses={200: "UserList"},
    )
    async def list_users(self, request, call: Call) -> Reply:
        return ok(items(user_view(u) for u in await self._users.list_users()))

    @api.route(
        "PUT",
        "/admin/users/{user_id}",
        P.GLOBAL_ADMIN,
        summary="Grant or revoke global admin rights",
        tags=("identity",),
        body=s.SET_USER,
        responses={200: "User"},
    )
    async def update_user(self, request, call: Call) -> Reply:
        user = await self._users.set_admin(call.params["user_id"], call.body["is_admin"])
        return ok(user_view(user))

    # --- organizations ------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs",
        P.AUTHENTICATED,
        summary="List the orgs the caller can see",
        tags=("orgs",),
        responses={200: "OrgList"},
    )
    async def list_orgs(self, request, call: Call) -> Reply:
        visible = await self._users.visible_orgs(call.principal)
        if visible is None:  # a global admin sees every org
            roles = await self._users.roles(call.principal)
            found = await self._orgs.list_orgs()
        else:
            roles = visible
            found = await self._orgs.list_orgs(list(visible)) if visible else []
        return ok(items(org_view(o, roles.get(o.id)) for o in found))

    @api.route(
        "POST",
        "/admin/orgs",
        P.AUTHENTICATED,
        summary="Create an org; the caller becomes its owner",
        tags=("orgs",),
        description=(
            "The answer carries the org's first Lectr key, shown this once. Names are unique "
            "per deployment, whatever their case (409 name_taken)."
        ),
        body=s.CREATE_ORG,
        responses={201: "CreatedOrg"},
        errors=(409,),
    )
    async def create_org(self, request, call: Call) -> Reply:
        org, issued = await self._orgs.create_org(
            call.body["name"],
            call.body.get("key_name", "default"),
            owner_id=call.principal.user_id,
        )
        role = "owner" if call.principal.user_id else None
        return created({"org": org_view(org, role), "key": issued_view(issued)})

    @api.route(
        "GET",
        "/admin/orgs/{org_id}",
        P.ORG_READ,
        summary="Read an org",
        tags=("orgs",),
        responses={200: "Org"},
    )
    async def get_org(self, request, call: Call) -> Reply:
        return ok(org_view(await self._orgs.get_org(call.org_id), call.access.role))

    @api.route(
        "PUT",
        "/admin/orgs/{org_id}",
        P.ORG_WRITE,
        summary="Rename an org",
        description="Names are unique per deployment, whatever their case (409 name_taken).",
        tags=("orgs",),
        body=s.RENAME_ORG,
        responses={200: "Org"},
        errors=(409,),
    )
    async def rename_org(self, request, call: Call) -> Reply:
        org = await self._orgs.rename_org(call.org_id, call.body["name"])
        return ok(org_view(org, call.access.role))

    @api.route(
        "DELETE",
        "/admin/orgs/{org_id}",
        P.ORG_OWNER,
        summary="Delete an org with its keys, settings, members and request logs",
        tags=("orgs",),
        responses={204: None},
    )
    async def delete_org(self, request, call: Call) -> Reply:
        await self._orgs.delete_org(call.org_id)
        return no_content()

    @api.route(
        "PUT",
        "/admin/orgs/{org_id}/enabled",
        P.ORG_WRITE,
        summary="Kill switch: enable or disable every key of the org",
        description="Effective on every node within a second.",
        tags=("orgs",),
        body=s.SET_ENABLED,
        responses={200: "Org"},
    )
    async def set_org_enabled(self, request, call: Call) -> Reply:
        org = await self._orgs.set_enabled(call.org_id, call.body["enabled"])
        return ok(org_view(org, call.access.role))

    @api.route(
        "POST",
        "/admin/orgs/{org_id}/rotate-key",
        P.ORG_WRITE,
        summary="Revoke all of the org's Lectr keys and issue one new key",
        description="The new key is shown this once; the old keys stop working at once.",
        tags=("keys",),
        body=s.NEW_KEY,
        body_required=False,
        responses={201: "IssuedKey"},
    )
    async def rotate_key(self, request, call: Call) -> Reply:
        issued = await self._orgs.rotate_keys(call.org_id, call.body.get("name", "default"))
        return created(issued_view(issued))

    # --- Lectr keys ---------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/keys",
        P.ORG_READ,
        summary="List the org's Lectr keys (prefixes only)",
        tags=("keys",),
        responses={200: "ApiKeyList"},
    )
    async def list_keys(self, request, call: Call) -> Reply:
        return ok(items(key_view(k) for k in await self._orgs.list_keys(call.org_id)))

    @api.route(
        "POST",
        "/admin/orgs/{org_id}/keys",
        P.ORG_WRITE,
        summary="Create a named Lectr key (shown this once)",
        tags=("keys",),
        body=s.NEW_KEY,
        body_required=False,
        responses={201: "IssuedKey"},
    )
    async def create_key(self, request, call: Call) -> Reply:
        issued = await self._orgs.create_key(call.org_id, call.body.get("name", "default"))
        return created(issued_view(issued))

    @api.route(
        "DELETE",
        "/admin/orgs/{org_id}/keys/{key_id}",
        P.ORG_WRITE,
        summary="Revoke a Lectr key",
        tags=("keys",),
        responses={204: None},
    )
    async def revoke_key(self, request, call: Call) -> Reply:
        await self._orgs.revoke_key(call.org_id, call.params["key_id"])
        return no_content()

    # --- provider keys (BYOK) ------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/provider-keys",
        P.ORG_READ,
        summary="List the org's provider keys (last four characters only)",
        tags=("provider keys",),
        responses={200: "ProviderKeyList"},
    )
    async def list_provider_keys(self, request, call: Call) -> Reply:
        vault = self._need(self._vault, "provider keys")
        keys = await vault.list_keys(call.org_id)
        return ok(items(provider_key_view(k, self._health) for k in keys))

    @api.route(
        "POST",
        "/admin/orgs/{org_id}/provider-keys",
        P.ORG_WRITE,
        summary="Add a provider key, after checking it with the provider",
        description="The key is stored encrypted; no answer ever contains it.",
        tags=("provider keys",),
        body=s.ADD_PROVIDER_KEY,
        responses={201: "ProviderKey"},
        errors=(422, 502),
    )
    async def add_provider_key(self, request, call: Call) -> Reply:
        vault = self._need(self._vault, "provider keys")
        body = call.body
        info = await vault.add_key(
            call.org_id,
            body["provider"],
            Secret(body["key"]),
            body.get("name"),
            weight=body.get("weight"),
            base_url=body.get("base_url"),
            api_version=body.get("api_version"),
        )
        return created(provider_key_view(info, self._health))

    @api.route(
        "PATCH",
        "/admin/orgs/{org_id}/provider-keys/{key_id}",
        P.ORG_WRITE,
        summary="Enable or disable a provider key, change its weight in the pool, rename it",
        tags=("provider keys",),
        body=s.UPDATE_PROVIDER_KEY,
        responses={200: "ProviderKey"},
    )
    async def update_provider_key(self, request, call: Call) -> Reply:
        vault = self._need(self._vault, "provider keys")
        body = call.body
        info = await vault.update_key(
            call.org_id,
            call.params["key_id"],
            enabled=body.get("enabled"),
            weight=body.get("weight"),
            name=body.get("name"),
        )
        return ok(provider_key_view(info, self._health))

    @api.route(
        "DELETE",
        "/admin/orgs/{org_id}/provider-keys/{key_id}",
        P.ORG_WRITE,
        summary="Delete a provider key",
        tags=("provider keys",),
        responses={204: None},
    )
    async def delete_provider_key(self, request, call: Call) -> Reply:
        vault = self._need(self._vault, "provider keys")
        await vault.delete_key(call.org_id, call.params["key_id"])
        return no_content()

    # --- provider settings -----------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/providers",
        P.ORG_READ,
        summary="The org's provider settings (one entry per provider)",
        tags=("providers",),
        responses={200: "ProviderSettingsList"},
    )
    async def list_providers(self, request, call: Call) -> Reply:
        settings = self._need(self._settings, "provider settings")
        return ok(items(settings_view(x) for x in await settings.list(call.org_id)))

    @api.route(
        "PUT",
        "/admin/orgs/{org_id}/providers/{provider}",
        P.ORG_WRITE,
        summary="Enable or disable a provider, allow or block models",
        description="Fields left out keep their values. Effective within a second.",
        tags=("providers",),
        body=s.UPDATE_PROVIDER,
        responses={200: "ProviderSettings"},
        path_params={"provider": s.PROVIDER},
    )
    async def update_provider(self, request, call: Call) -> Reply:
        settings = self._need(self._settings, "provider settings")
        updated = await settings.update(
            call.org_id,
            call.params["provider"],
            enabled=call.body.get("enabled"),
            allowed_models=call.body.get("allowed_models"),
            blocked_models=call.body.get("blocked_models"),
        )
        return ok(settings_view(updated))

    # --- limits and budgets ------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/limits",
        P.ORG_READ,
        summary="The org's limits and budgets, and its consumption in the current windows",
        tags=("limits",),
        responses={200: "Limits"},
    )
    async def get_org_limits(self, request, call: Call) -> Reply:
        limits = self._need(self._limits, "limits")
        return ok(limits_view(await limits.get(call.org_id)))

    @api.route(
        "PUT",
        "/admin/orgs/{org_id}/limits",
        P.ORG_WRITE,
        summary="Set the org's limits and budgets",
        description=(
            "Requests and tokens per UTC minute, concurrent requests, USD per UTC day and per "
            "calendar month (UTC), shared by all of the org's keys. null removes a limit; "
            "fields left out keep their values. Effective on every node within a second."
        ),
        tags=("limits",),
        body=s.PUT_LIMITS,
        responses={200: "Limits"},
    )
    async def put_org_limits(self, request, call: Call) -> Reply:
        limits = self._need(self._limits, "limits")
        return ok(limits_view(await limits.update(call.org_id, None, call.body)))

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/keys/{key_id}/limits",
        P.ORG_READ,
        summary="A Lectr key's own limits and budgets, and its consumption",
        tags=("limits",),
        responses={200: "Limits"},
    )
    async def get_key_limits(self, request, call: Call) -> Reply:
        limits = self._need(self._limits, "limits")
        return ok(limits_view(await limits.get(call.org_id, call.params["key_id"])))

    @api.route(
        "PUT",
        "/admin/orgs/{org_id}/keys/{key_id}/limits",
        P.ORG_WRITE,
        summary="Set a Lectr key's own limits and budgets",
        description=(
            "They apply on top of the org's: a request must pass both. null removes a limit; "
            "fields left out keep their values."
        ),
        tags=("limits",),
        body=s.PUT_LIMITS,
        responses={200: "Limits"},
    )
    async def put_key_limits(self, request, call: Call) -> Reply:
        limits = self._need(self._limits, "limits")
        view = await limits.update(call.org_id, call.params["key_id"], call.body)
        return ok(limits_view(view))

    # --- request logs and usage ----------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/requests",
        P.ORG_READ,
        summary="Recent requests, newest first (keyset pagination)",
        description=(
            "Pass next_cursor back as cursor (with the same filters) for the next, older "
            "page. Pass live_cursor back as after for the requests stored since, in the "
            "order they were committed, however late (a live view polls this way; a full "
            "page means more are waiting). "
            "limit is clamped to 1..200."
        ),
        tags=("usage",),
        query=(
            s.LIMIT,
            s.CURSOR,
            s.AFTER,
            s.PROVIDER_FILTER,
            s.MODEL_FILTER,
            s.KEY_FILTER,
            s.STATUS_FILTER,
            s.SINCE,
            s.UNTIL,
        ),
        responses={200: "RequestPage"},
    )
    async def list_requests(self, request, call: Call) -> Reply:
        usage = self._need(self._usage, "request logs")
        q = call.query
        page = await usage.recent_requests(
            call.org_id,
            limit=q["limit"],
            cursor=q.get("cursor"),
            after=q.get("after"),
            provider=q.get("provider"),
            model=q.get("model"),
            key_id=q.get("key_id"),
            status=q.get("status"),
            since=q.get("since"),
            until=q.get("until"),
        )
        return ok(
            {
                "items": [record_view(r, s.REQUEST_FIELDS) for r in page.items],
                "next_cursor": page.next_cursor,
                "live_cursor": page.live_cursor,
            }
        )

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/requests/{request_id}",
        P.ORG_READ,
        summary="One request of the org",
        tags=("usage",),
        responses={200: "RequestLog"},
    )
    async def get_request(self, request, call: Call) -> Reply:
        usage = self._need(self._usage, "request logs")
        entry = await usage.get_request(call.org_id, call.params["request_id"])
        return ok(record_view(entry, s.REQUEST_FIELDS))

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/usage",
        P.ORG_READ,
        summary="Request, token and cost totals by model, provider, key, day or hour",
        description=(
            "Read from the hourly rollups. The range is [since, until) in whole hours: since "
            "is rounded down and until up to the hour, and the answer gives the range "
            "covered; at most 366 days; default: the last 30 days."
        ),
        tags=("usage",),
        query=(*s.USAGE_RANGE, s.GROUP_BY),
        responses={200: "UsageReport"},
    )
    async def usage_totals(self, request, call: Call) -> Reply:
        usage = self._need(self._usage, "usage totals")
        q = call.query
        since, until = self._usage_range(q)
        report = await usage.usage_totals(
            call.org_id, since=since, until=until, group_by=q["group_by"]
        )
        return ok(
            {
                "since": report.since,
                "until": report.until,
                "group_by": report.group_by,
                "items": [record_view(t, s.USAGE_FIELDS) for t in report.items],
            }
        )

    # --- the provider catalogue ---------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/providers",
        P.AUTHENTICATED,
        summary="The provider catalogue: built-in and custom providers",
        tags=("providers",),
        responses={200: "ProviderList"},
    )
    async def list_catalogue(self, request, call: Call) -> Reply:
        registry = self._need(self._registry, "providers")
        custom = self._custom
        return ok(items(provider_view(p, custom.row(p.name) if custom else None) for p in registry))

    @api.route(
        "POST",
        "/admin/providers",
        P.GLOBAL_ADMIN,
        summary="Add a custom provider (vLLM, Ollama, a private endpoint)",
        description=(
            "It serves /<name>/v1/... on every node within a second. Only global admins "
            "choose where Lectr sends traffic. 409 when the name is taken."
        ),
        tags=("providers",),
        body=s.CUSTOM_PROVIDER,
        responses={201: "Provider"},
        errors=(409,),
    )
    async def create_custom_provider(self, request, call: Call) -> Reply:
        custom = self._need(self._custom, "custom providers")
        row, _ = await custom.put(call.body, replace=False)
        # (the row written, not the registry: a reload that is late, or a delete
        # committed just after, would leave the name out of it)
        return created(provider_view(CustomProvider.from_row(row), row))

    @api.route(
        "PUT",
        "/admin/providers/{name}",
        P.GLOBAL_ADMIN,
        summary="Create or replace a custom provider",
        tags=("providers",),
        body=s.CUSTOM_PROVIDER_UPDATE,
        responses={200: "Provider", 201: "Provider"},
        errors=(409,),
        path_params={"name": s.PROVIDER_NAME},  # (a new name is not in the catalogue yet)
    )
    async def put_custom_provider(self, request, call: Call) -> Reply:
        custom = self._need(self._custom, "custom providers")
        row, is_new = await custom.put({**call.body, "name": call.params["name"]})
        return Reply(201 if is_new else 200, provider_view(CustomProvider.from_row(row), row))

    @api.route(
        "DELETE",
        "/admin/providers/{name}",
        P.GLOBAL_ADMIN,
        summary="Delete a custom provider no key or route uses any more",
        tags=("providers",),
        responses={204: None},
        errors=(409,),
        path_params={"name": s.PROVIDER},
    )
    async def delete_custom_provider(self, request, call: Call) -> Reply:
        custom = self._need(self._custom, "custom providers")
        await custom.delete(call.params["name"])
        return no_content()

    # --- routes ------------------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/routes",
        P.ORG_READ,
        summary="The org's routes (virtual models)",
        tags=("routes",),
        responses={200: "RouteList"},
    )
    async def list_routes(self, request, call: Call) -> Reply:
        routes = self._need(self._routes, "routes")
        return ok(items(r.view() for r in await routes.list(call.org_id)))

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/routes/{name}",
        P.ORG_READ,
        summary="Read a route",
        tags=("routes",),
        responses={200: "Route"},
        path_params={"name": s.ROUTE_NAME},
    )
    async def get_route(self, request, call: Call) -> Reply:
        routes = self._need(self._routes, "routes")
        for r in await routes.list(call.org_id):
            if r.name == call.params["name"]:
                return ok(r.view())
        raise NotFound("route not found")

    @api.route(
        "PUT",
        "/admin/orgs/{org_id}/routes/{name}",
        P.ORG_WRITE,
        summary="Create or replace a route",
        description=(
            "A request whose model is the route's name goes to its targets (model rewritten "
            "per target), trying the next one on the failures listed in retry_on, before any "
            "byte reached the client. Effective on every node within a second."
        ),
        tags=("routes",),
        body=s.PUT_ROUTE,
        responses={200: "Route", 201: "Route"},
        path_params={"name": s.ROUTE_NAME},
    )
    async def put_route(self, request, call: Call) -> Reply:
        routes = self._need(self._routes, "routes")
        route, is_new = await routes.put(call.org_id, call.params["name"], call.body)
        return Reply(201 if is_new else 200, route.view())

    @api.route(
        "DELETE",
        "/admin/orgs/{org_id}/routes/{name}",
        P.ORG_WRITE,
        summary="Delete a route",
        tags=("routes",),
        responses={204: None},
        path_params={"name": s.ROUTE_NAME},
    )
    async def delete_route(self, request, call: Call) -> Reply:
        routes = self._need(self._routes, "routes")
        await routes.delete(call.org_id, call.params["name"])
        return no_content()

    @api.route(
        "POST",
        "/admin/orgs/{org_id}/routes/explain",
        P.ORG_READ,
        summary="The plan Lectr would follow now for a request (no call is made)",
        description=(
            "Runs the proxy's policy chain on the given path, headers and body, and lists the "
            "attempts it would make if each one failed, with the keys and their cool-downs."
        ),
        tags=("routes",),
        body=s.EXPLAIN,
        responses={200: "Explanation"},
    )
    async def explain_route(self, request, call: Call) -> Reply:
        explainer = self._need(self._explainer, "route explanations")
        return ok(await explainer.explain(call.org_id, call.body))

    @api.route(
        "GET",
        "/admin/usage",
        P.AUTHENTICATED,
        summary="Request and token totals per org over a time range",
        description=(
            "One total per org the caller can see (a global admin: every org). "
            "The range is [since, until), at most 366 days; default: the last 30 days."
        ),
        tags=("usage",),
        query=s.USAGE_RANGE,
        responses={200: "OrgUsageReport"},
    )
    async def org_usage(self, request, call: Call) -> Reply:
        usage = self._need(self._usage, "usage totals")
        since, until = self._usage_range(call.query)
        visible = await self._users.visible_orgs(call.principal)
        org_ids = None if visible is None else list(visible)
        report = await usage.org_totals(org_ids, since=since, until=until)
        return ok(
            {
                "since": report.since,
                "until": report.until,
                "items": [record_view(t, s.USAGE_FIELDS) for t in report.items],
            }
        )

    def _usage_range(self, query: dict) -> tuple[datetime, datetime]:
        """The range asked for; by default the 30 days up to the end of the
        current hour (whole hours, as the rollups are read)."""
        now = datetime.fromtimestamp(self._reactor.seconds(), UTC)
        until = query.get("until") or hour_floor(now) + timedelta(hours=1)
        since = query.get("since") or until - timedelta(days=30)
        return since, until

    @api.route(
        "GET",
        "/admin/requests/{request_id}",
        P.AUTHENTICATED,
        summary="One request with its cost explained: tokens, prices used and the arithmetic",
        description=(
            "Any member of the request's org may read it; for anyone else it does not exist (404)."
        ),
        tags=("usage",),
        responses={200: "CostExplanation"},
        errors=(404,),
    )
    async def explain_request(self, request, call: Call) -> Reply:
        usage = self._need(self._usage, "request logs")
        explanation = await usage.explain(call.params["request_id"])
        try:
            await self._users.authorize(call.principal, P.ORG_READ, explanation.org_id)
        except NotFound:
            # the same answer as for an unknown id: whoever holds the id of
            # another org's request must not learn that it exists
            raise NotFound("request not found") from None
        doc = explanation.to_json()
        doc["request"] = record_view(explanation.request, s.REQUEST_FIELDS)
        return ok(doc)

    # --- prices -------------------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/pricing",
        P.AUTHENTICATED,
        summary="The prices in effect: the shipped catalogue and the overrides",
        description=(
            "With provider and model: the one entry that prices that model (dated snapshots "
            "resolve to their model), or none."
        ),
        tags=("pricing",),
        query=(s.PRICE_PROVIDER, s.PRICE_MODEL),
        responses={200: "PriceList"},
    )
    async def list_prices(self, request, call: Call) -> Reply:
        pricing = self._need(self._pricing, "prices")
        views = pricing.list_prices(call.query.get("provider"), call.query.get("model"))
        return ok(items(v.to_json() for v in views))

    @api.route(
        "PUT",
        "/admin/pricing",
        P.GLOBAL_ADMIN,
        summary="Set the price of a model (an override, or a custom model)",
        description=(
            "Replaces the whole entry; every node prices with it within a second. Rates are "
            "USD per million tokens; a missing cache rate means the input rate."
        ),
        tags=("pricing",),
        body=s.SET_PRICE,
        responses={200: "Price"},
    )
    async def set_price(self, request, call: Call) -> Reply:
        pricing = self._need(self._pricing, "prices")
        body = dict(call.body)
        provider, model = body.pop("provider"), body.pop("model")
        view = await pricing.set_price(provider, model, body)
        return ok(view.to_json())

    @api.route(
        "DELETE",
        "/admin/pricing",
        P.GLOBAL_ADMIN,
        summary="Remove a price override (the shipped price, if any, applies again)",
        tags=("pricing",),
        query=(s.PRICE_PROVIDER_REQUIRED, s.PRICE_MODEL_REQUIRED),
        responses={204: None},
        errors=(404,),
    )
    async def unset_price(self, request, call: Call) -> Reply:
        pricing = self._need(self._pricing, "prices")
        provider, model = call.query.get("provider"), call.query.get("model")
        if not provider or not model:
            raise BadRequest("provider and model are required")
        await pricing.unset_price(provider, model)
        return no_content()

    # --- members ----------------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/members",
        P.ORG_OWNER,
        summary="List the org's members",
        tags=("members",),
        responses={200: "MemberList"},
    )
    async def list_members(self, request, call: Call) -> Reply:
        return ok(items(member_view(m) for m in await self._users.list_members(call.org_id)))

    @api.route(
        "POST",
        "/admin/orgs/{org_id}/members",
        P.ORG_OWNER,
        summary="Add a member, or change a member's role",
        description=(
            "Name the user with exactly one of user_id, email (of a user who has "
            "signed in with a token saying email_verified: true) or subject (an OIDC "
            "subject; the identity is created if it was never seen). 201 when the "
            "membership is new, 200 when a role changed. 409: demoting the last owner "
            "(last_owner), an email only unverified identities carry (email_not_verified), "
            "an email several verified identities carry (ambiguous_email)."
        ),
        tags=("members",),
        body=s.PUT_MEMBER,
        responses={200: "Member", 201: "Member"},
        errors=(409,),
    )
    async def put_member(self, request, call: Call) -> Reply:
        body = call.body
        user = await self._users.resolve_user(
            user_id=body.get("user_id"), email=body.get("email"), subject=body.get("subject")
        )
        member, is_new = await self._users.put_member(call.org_id, user, body["role"])
        return Reply(201 if is_new else 200, member_view(member))

    @api.route(
        "DELETE",
        "/admin/orgs/{org_id}/members/{user_id}",
        P.ORG_OWNER,
        summary="Remove a member (never the last owner)",
        tags=("members",),
        responses={204: None},
        errors=(409,),
    )
    async def remove_member(self, request, call: Call) -> Reply:
        await self._users.remove_member(call.org_id, call.params["user_id"])
        return no_content()

    # --- master-key rotation --------------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/vault/rotation",
        P.GLOBAL_ADMIN,
        summary="Progress of a master-key (ENCRYPTION_KEY_NEW) rotation",
        tags=("vault",),
        responses={200: "RotationStatus"},
    )
    async def rotation_status(self, request, call: Call) -> Reply:
        vault = self._need(self._vault, "provider keys")
        return ok(rotation_view(await vault.rotation_status()))
