"""The authorization matrix: every admin route × {own org, other org,
nonexistent org} × {owner, admin, member, non-member, global admin} against
the expected 2xx / 403 / 404, over real HTTP with real JWTs.

The expectations are written out here, independently of the implementation's
role table: owners may do everything in their org, admins everything but
members and deletion, members read only; an org the caller does not belong
to answers 404 exactly like one that does not exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest_twisted

from lectr.admin.app import AdminApp
from lectr.storage.request_logs import RequestLogStore
from lectr.usage.model import Usage, UsageRecord
from tests.support.admin import AdminClient, start_admin_env
from tests.support.fake_provider import OPENAI_KEY

ROLES_GRANT = {
    "owner": {"read", "write", "owner"},
    "admin": {"read", "write"},
    "member": {"read"},
}
PRINCIPALS = ("owner", "admin", "member", "outsider", "global")
TARGETS = ("own", "other", "missing")


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    needs: str  # read | write | owner
    body: object = None  # dict, or a callable(world, org) -> dict
    ok: int = 200
    query: str = ""  # appended to the path


ORG_ROUTES = [
    Route("GET", "/admin/orgs/{org_id}", "read"),
    Route("PUT", "/admin/orgs/{org_id}", "write", {"name": "Renamed"}),
    Route("DELETE", "/admin/orgs/{org_id}", "owner", ok=204),
    Route("PUT", "/admin/orgs/{org_id}/enabled", "write", {"enabled": False}),
    Route("POST", "/admin/orgs/{org_id}/rotate-key", "write", ok=201),
    Route("GET", "/admin/orgs/{org_id}/keys", "read"),
    Route("POST", "/admin/orgs/{org_id}/keys", "write", {"name": "ci"}, ok=201),
    Route("DELETE", "/admin/orgs/{org_id}/keys/{key_id}", "write", ok=204),
    Route("GET", "/admin/orgs/{org_id}/provider-keys", "read"),
    Route(
        "POST",
        "/admin/orgs/{org_id}/provider-keys",
        "write",
        {"provider": "openai", "key": OPENAI_KEY},
        ok=201,
    ),
    Route("DELETE", "/admin/orgs/{org_id}/provider-keys/{key_id}", "write", ok=204),
    Route("PATCH", "/admin/orgs/{org_id}/provider-keys/{key_id}", "write", {"weight": 3}),
    Route("GET", "/admin/orgs/{org_id}/routes", "read"),
    Route("GET", "/admin/orgs/{org_id}/routes/{name}", "read"),
    Route(
        "PUT",
        "/admin/orgs/{org_id}/routes/{name}",
        "write",
        {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
    ),
    Route("DELETE", "/admin/orgs/{org_id}/routes/{name}", "write", ok=204),
    Route("POST", "/admin/orgs/{org_id}/routes/explain", "read", {"body": {"model": "fast"}}),
    Route("GET", "/admin/orgs/{org_id}/providers", "read"),
    Route(
        "PUT", "/admin/orgs/{org_id}/providers/{provider}", "write", {"allowed_models": ["gpt-4o"]}
    ),
    Route("GET", "/admin/orgs/{org_id}/limits", "read"),
    Route("PUT", "/admin/orgs/{org_id}/limits", "write", {"rpm": 100, "usd_per_day": "5.00"}),
    Route("GET", "/admin/orgs/{org_id}/keys/{key_id}/limits", "read"),
    Route("PUT", "/admin/orgs/{org_id}/keys/{key_id}/limits", "write", {"max_concurrent": 4}),
    Route("GET", "/admin/orgs/{org_id}/requests", "read"),
    Route("GET", "/admin/orgs/{org_id}/requests/{request_id}", "read"),
    Route("GET", "/admin/orgs/{org_id}/usage", "read"),
    # (no org in the path: the request's org decides)
    Route("GET", "/admin/requests/{request_id}", "read"),
    Route("GET", "/admin/orgs/{org_id}/members", "owner"),
    Route(
        "POST",
        "/admin/orgs/{org_id}/members",
        "owner",
        {"subject": "auth0|newcomer", "role": "member"},
        ok=201,
    ),
    Route("DELETE", "/admin/orgs/{org_id}/members/{user_id}", "owner", ok=204),
]

# Routes outside any org: who may call them.
GLOBAL_ROUTES = [
    (Route("GET", "/admin/me", "any"), set(PRINCIPALS)),
    (Route("GET", "/admin/orgs", "any"), set(PRINCIPALS)),
    (Route("POST", "/admin/orgs", "any", {"name": "Fresh"}, ok=201), set(PRINCIPALS)),
    (Route("GET", "/admin/usage", "any"), set(PRINCIPALS)),
    (Route("GET", "/admin/users", "global"), {"global"}),
    (Route("PUT", "/admin/users/{user_id}", "global", {"is_admin": False}), {"global"}),
    (Route("GET", "/admin/vault/rotation", "global"), {"global"}),
    (Route("GET", "/admin/providers", "any"), set(PRINCIPALS)),
    (
        Route(
            "POST",
            "/admin/providers",
            "global",
            {"name": "vllm", "dialect": "openai", "base_url": "http://10.0.0.7:8000"},
            ok=201,
        ),
        {"global"},
    ),
    (
        Route(
            "PUT",
            "/admin/providers/{name}",
            "global",
            {"dialect": "openai", "base_url": "http://10.0.0.8:8000"},
        ),
        {"global"},
    ),
    (Route("DELETE", "/admin/providers/{name}", "global", ok=204), {"global"}),
    (Route("GET", "/admin/pricing", "any"), set(PRINCIPALS)),
    (
        Route(
            "PUT",
            "/admin/pricing",
            "global",
            {
                "provider": "openai",
                "model": "gpt-matrix",
                "input": 1,
                "output": 2,
                "checked": "2025-01-01",
            },  # fmt: skip
        ),
        {"global"},
    ),
    (
        Route(
            "DELETE", "/admin/pricing", "global", ok=204, query="?provider=openai&model=gpt-matrix"
        ),
        {"global"},
    ),
]
PUBLIC = {"/healthz", "/readyz", "/metrics", "/admin/openapi.json", "/admin/ui-config"}


def expected(route: Route, principal: str, target: str) -> int:
    if target == "missing":
        return 404
    if principal == "global":
        return route.ok
    if target == "other" or principal == "outsider":
        return 404
    return route.ok if route.needs in ROLES_GRANT[principal] else 403


@dataclass
class Org:
    id: str
    key_id: str  # an extra Lectr key
    provider_key_id: str
    victim_id: str  # a member that may be removed
    request_id: str  # a logged request


class World:
    """The users (made once) and fresh orgs for each case."""

    def __init__(self, env) -> None:
        self.env = env
        self.clients: dict[str, AdminClient] = {}
        self.ids: dict[str, str] = {}
        self._serial = 0

    def unique(self, body: dict | None) -> dict | None:
        """Org names are unique per deployment: each call that names an org
        gets a name of its own."""
        if body is None or "name" not in body or "dialect" in body:  # (a provider's name)
            return body
        self._serial += 1
        return {**body, "name": f"{body['name']} {self._serial}"}

    async def make_users(self) -> None:
        for name in (*PRINCIPALS, "stranger", "victim"):
            client = self.env.user(f"auth0|{name}", f"{name}@example.com")
            me = await client.get("/admin/me")
            assert me.status == 200
            self.clients[name] = client
            self.ids[name] = me.json["user"]["id"]
        granted = await self.env.admin.put(f"/admin/users/{self.ids['global']}", {"is_admin": True})
        assert granted.status == 200

    async def make_org(self, name: str, members: dict[str, str]) -> Org:
        c = self.env.components
        owner = next(u for u, role in members.items() if role == "owner")
        org, _ = await c.orgs.create_org(
            self.unique({"name": name})["name"], owner_id=self.ids[owner]
        )
        for user, role in members.items():
            if user != owner:
                member_user = await c.users.resolve_user(user_id=self.ids[user])
                await c.users.put_member(org.id, member_user, role)
        key = await c.orgs.create_key(org.id, "extra")
        pkey = await c.vault.add_key(org.id, "openai", OPENAI_KEY)
        await c.routes.put(org.id, "fast", {"targets": [{"provider": "openai", "model": "m"}]})
        logged = logged_request(org.id)
        assert await RequestLogStore(c.database).insert([logged]) == 1
        return Org(org.id, key.key.id, pkey.id, self.ids["victim"], logged.request_id)

    async def make_orgs(self) -> dict[str, Org | None]:
        own = await self.make_org(
            "Own", {"owner": "owner", "admin": "admin", "member": "member", "victim": "member"}
        )
        other = await self.make_org("Other", {"stranger": "owner", "victim": "member"})
        return {"own": own, "other": other, "missing": None}


def concrete(route: Route, orgs: dict[str, Org | None], target: str, world: World) -> str:
    org = orgs[target] or orgs["own"]
    org_id = orgs[target].id if orgs[target] else str(uuid.uuid4())
    key_id = org.provider_key_id if "provider-keys" in route.template else org.key_id
    user_id = org.victim_id if "members" in route.template else world.ids["victim"]
    return route.template.format(
        org_id=org_id,
        key_id=key_id,
        user_id=user_id,
        provider="openai",
        name="fast",
        # (a request of a missing org: an id that names none)
        request_id=orgs[target].request_id if orgs[target] else str(uuid.uuid4()),
    )


def logged_request(org_id: str) -> UsageRecord:
    return UsageRecord(
        request_id=str(uuid.uuid4()),
        created_at=datetime.now(UTC),
        org_id=org_id,
        key_id=None,
        provider="openai",
        model="gpt-4o-mini",
        method="POST",
        path="/v1/chat/completions",
        status=200,
        latency_ms=10.0,
        ttfb_ms=2.0,
        streamed=False,
        usage=Usage(1, 1, 2, 0, None, "provider"),
        error_type=None,
    )


@pytest_twisted.ensureDeferred
async def test_authorization_matrix(db_url, tmp_path):
    env = await start_admin_env(db_url, tmp_path)
    try:
        world = World(env)
        await world.make_users()
        failures = []
        count = 0
        for route in ORG_ROUTES:
            for principal in PRINCIPALS:
                orgs = await world.make_orgs()  # fresh orgs: destructive routes succeed once
                for target in TARGETS:
                    path = concrete(route, orgs, target, world)
                    answer = await world.clients[principal].call(
                        route.method, path, world.unique(route.body)
                    )
                    want = expected(route, principal, target)
                    count += 1
                    if answer.status != want:
                        failures.append(
                            f"{route.method} {route.template} as {principal} on {target} org: "
                            f"{answer.status} (expected {want}) {answer.body[:120]!r}"
                        )
        for route, allowed in GLOBAL_ROUTES:
            for principal in PRINCIPALS:
                path = route.template.format(user_id=world.ids["victim"], name="vllm") + route.query
                answer = await world.clients[principal].call(
                    route.method, path, world.unique(route.body)
                )
                want = route.ok if principal in allowed else 403
                count += 1
                if answer.status != want:
                    failures.append(
                        f"{route.method} {route.template} as {principal}: {answer.status} "
                        f"(expected {want})"
                    )
            anonymous = await env.client(None).call(
                route.method,
                route.template.format(user_id=world.ids["victim"], name="vllm") + route.query,
                world.unique(route.body),
            )
            if anonymous.status != 401:
                failures.append(f"{route.method} {route.template} anonymous: {anonymous.status}")
        assert not failures, "\n".join(failures)
        assert count == len(ORG_ROUTES) * 15 + len(GLOBAL_ROUTES) * 5
    finally:
        await env.stop()


def test_the_matrix_covers_every_route():
    declared = {(op.method, op.path) for op in AdminApp.api.operations}
    covered = {(r.method, r.template) for r in ORG_ROUTES}
    covered |= {(r.method, r.template) for r, _ in GLOBAL_ROUTES}
    public = {(op.method, op.path) for op in AdminApp.api.operations if op.path in PUBLIC}
    assert declared - public == covered


def test_org_routes_declare_the_permission_the_matrix_expects():
    by_route = {(op.method, op.path): op.permission.value for op in AdminApp.api.operations}
    for route in ORG_ROUTES:
        if "{org_id}" not in route.template:
            # the handler checks the org it finds (the matrix above proves it)
            assert by_route[(route.method, route.template)] == "authenticated", route
            continue
        assert by_route[(route.method, route.template)] == f"org_{route.needs}", route
