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

from lectr.admin import schemas as s
from lectr.admin.api import Api, Call, Dispatcher, Reply, created, no_content, ok, text
from lectr.admin.api import write_error as _write_error
from lectr.admin.openapi import build_openapi
from lectr.db.database import Database, DatabaseUnavailable
from lectr.errors import ServiceUnavailable
from lectr.managers.orgs import IssuedKey
from lectr.managers.users import Permission, Principal, UserManager
from lectr.metrics import Registry
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


def provider_key_view(k) -> dict:
    return {
        "id": k.id,
        "org_id": k.org_id,
        "provider": k.provider,
        "name": k.name,
        "last4": k.last4,
        "enabled": k.enabled,
        "created_at": k.created_at,
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


def rotation_view(r) -> dict:
    return {
        "current_kek": r.current_kek,
        "next_kek": r.next_kek,
        "rows_by_kek": dict(r.rows_by_kek),
        "done": r.done,
    }


def record_view(record: Any, fields: tuple[str, ...]) -> dict:
    """A dataclass as JSON, limited to the documented fields."""
    values = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)
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
        self.dispatcher = Dispatcher(
            authenticator=authenticator,
            users=users,
            metrics=metrics,
            clock=reactor,
            tracing=tracing,
        )
        self._openapi = json.dumps(self.openapi(), separators=(",", ":")).encode()

    def resource(self):
        return self.app.resource()

    @classmethod
    def openapi(cls) -> dict:
        return build_openapi(cls.api.operations, s.COMPONENTS)

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
        return Reply(200, self._openapi, b"application/json; charset=utf-8")

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
        description="The answer carries the org's first Lectr key, shown this once.",
        body=s.CREATE_ORG,
        responses={201: "CreatedOrg"},
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
        tags=("orgs",),
        body=s.RENAME_ORG,
        responses={200: "Org"},
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
        return ok(items(provider_key_view(k) for k in await vault.list_keys(call.org_id)))

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
        info = await vault.add_key(
            call.org_id, call.body["provider"], Secret(call.body["key"]), call.body.get("name")
        )
        return created(provider_key_view(info))

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
        path_params={"provider": {"type": "string", "enum": list(s.PROVIDERS)}},
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

    # --- request logs and usage ----------------------------------------------------------------

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/requests",
        P.ORG_READ,
        summary="Recent requests, newest first (keyset pagination)",
        description=(
            "Pass next_cursor back as cursor (with the same filters) for the next, older "
            "page. limit is clamped to 1..200."
        ),
        tags=("usage",),
        query=(
            s.LIMIT,
            s.CURSOR,
            s.PROVIDER_FILTER,
            s.MODEL_FILTER,
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
            provider=q.get("provider"),
            model=q.get("model"),
            status=q.get("status"),
            since=q.get("since"),
            until=q.get("until"),
        )
        return ok(
            {
                "items": [record_view(r, s.REQUEST_FIELDS) for r in page.items],
                "next_cursor": page.next_cursor,
            }
        )

    @api.route(
        "GET",
        "/admin/orgs/{org_id}/usage",
        P.ORG_READ,
        summary="Request and token totals by model, provider or day over a time range",
        description="The range is [since, until), at most 366 days; default: the last 30 days.",
        tags=("usage",),
        query=(s.USAGE_SINCE, s.USAGE_UNTIL, s.GROUP_BY),
        responses={200: "UsageReport"},
    )
    async def usage_totals(self, request, call: Call) -> Reply:
        usage = self._need(self._usage, "usage totals")
        q = call.query
        until = q.get("until") or datetime.fromtimestamp(self._reactor.seconds(), UTC)
        since = q.get("since") or until - timedelta(days=30)
        totals = await usage.usage_totals(
            call.org_id, since=since, until=until, group_by=q["group_by"]
        )
        return ok(
            {
                "since": since,
                "until": until,
                "group_by": q["group_by"],
                "items": [record_view(t, s.USAGE_FIELDS) for t in totals],
            }
        )

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
            "signed in) or subject (an OIDC subject; the identity is created if it was "
            "never seen). 201 when the membership is new, 200 when a role changed. "
            "Demoting the last owner is refused (409)."
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
