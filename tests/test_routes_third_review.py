"""Routes, third review: the per-org route cap under concurrent writes
(lectr/managers/routes.py, lectr/storage/routes.py) and provider keys that
do not decrypt on this node, which must not use up a route's attempts
(lectr/proxy/call.py, lectr/policy/plan.py).

Real PostgreSQL, real loopback HTTP (the fake provider of
tests/test_routing_proxy.py)."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import Clock

import lectr.managers.routes as routes_module
from lectr.db.database import Database
from lectr.errors import BadRequest
from lectr.managers.orgs import OrgManager
from lectr.managers.routes import Route, RouteManager, Target
from lectr.policy.health import KeyHealth
from lectr.policy.plan import RoutingPlan, Selector
from lectr.providers.registry import ProviderRegistry, discover
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from lectr.storage.provider_keys import NewProviderKey
from lectr.storage.routes import RouteStore
from lectr.util.secret import Secret
from lectr.vault.crypto import Binding, Keyring
from tests.support.lectr_service import admin_url, start_lectr
from tests.test_policy_select import FakeRegistry
from tests.test_routing_proxy import CHAT, GROQ_KEY, OPENAI_KEY, route_header
from tests.test_routing_proxy import env as env

ADMIN = {"authorization": ["Bearer test-admin-token-0123456789"]}
REGISTRY = ProviderRegistry([c(c.default_base_url or "https://x") for c in discover()])
CAP = 3


def _spec(model: str = "gpt-4o") -> dict:
    return {"targets": [{"provider": "openai", "model": model}], "max_attempts": 1}


async def _count(db: Database, org_id: str) -> int:
    [(n,)] = await db.runQuery("t", "SELECT count(*) FROM org_routes WHERE org_id = %s", (org_id,))
    return n


# --- 1. the route cap holds under concurrent creates ------------------------------------


@pytest.mark.parametrize(("writers", "per_writer"), [(2, 6), (3, 4)])
@pytest_twisted.ensureDeferred
async def test_concurrent_creates_on_separate_pools_never_exceed_the_cap(
    db_url, monkeypatch, writers, per_writer
):
    """Admin processes (each its own connection pool and stale cache) create
    routes for one org at once: exactly CAP are stored, every other create
    gets the usual 400."""
    monkeypatch.setattr(routes_module, "MAX_ROUTES_PER_ORG", CAP)
    dbs = [Database(db_url, reactor=reactor, min_size=1, max_size=5) for _ in range(writers)]
    for db in dbs:
        await db.start()
    try:
        org, _ = await OrgManager(OrgStore(dbs[0]), ApiKeyStore(dbs[0])).create_org("Acme")
        managers = [RouteManager(RouteStore(db), REGISTRY, None, reactor) for db in dbs]
        for m in managers:
            await m.start()
        calls = [
            ensureDeferred(m.put(org.id, f"r-{w}-{i}", _spec()))
            for i in range(per_writer)
            for w, m in enumerate(managers)
        ]
        results = await DeferredList(calls, consumeErrors=True)
        created = [r for ok, r in results if ok]
        refused = [r for ok, r in results if not ok]
        assert len(created) == CAP and all(new for _, new in created)
        assert len(refused) == writers * per_writer - CAP
        for failure in refused:
            assert failure.check(BadRequest), failure
            assert str(failure.value) == f"an org may have at most {CAP} routes"
        assert await _count(dbs[0], org.id) == CAP
        # at the cap, an existing route is still replaced (on any writer)
        for m in managers:
            name = created[0][0].name
            route, new = await m.put(org.id, name, _spec("gpt-4o-mini"))
            assert not new and route.targets[0].model == "gpt-4o-mini"
        assert await _count(dbs[0], org.id) == CAP
        # and a deleted one frees a place for another writer
        await managers[0].delete(org.id, created[0][0].name)
        _, new = await managers[-1].put(org.id, "late", _spec())
        assert new and await _count(dbs[0], org.id) == CAP
        for m in managers:
            await m.stop()
    finally:
        for db in dbs:
            await db.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_admin_api_creates_never_exceed_the_cap(db_url, tmp_path, monkeypatch):
    """Many PUTs at once over the admin API: CAP are created (201), the
    rest get the same 400 as a create over the cap always did."""
    monkeypatch.setattr(routes_module, "MAX_ROUTES_PER_ORG", CAP)
    service = await start_lectr(db_url, tmp_path)
    try:
        c = service.components
        org, _ = await c.orgs.create_org("Acme")

        async def put(name: str):
            resp = await treq.put(
                admin_url(service, f"/admin/orgs/{org.id}/routes/{name}"),
                data=json.dumps(_spec()).encode(),
                headers={**ADMIN, "content-type": ["application/json"]},
                persistent=False,
            )
            return resp.code, json.loads(await resp.text())

        answers = await DeferredList(
            [ensureDeferred(put(f"r{i}")) for i in range(12)], fireOnOneErrback=True
        )
        codes = sorted(code for _, (code, _) in answers)
        assert codes == [201] * CAP + [400] * (12 - CAP), answers
        for _, (code, doc) in answers:
            if code == 400:
                assert f"an org may have at most {CAP} routes" in json.dumps(doc)
        assert await _count(c.database, org.id) == CAP
    finally:
        await service.stopService()


# --- 2. a key that does not decrypt is not an attempt ---------------------------------------


async def _bad_key(env, provider: str, how: str, name: str = "bad", weight: int = 1000) -> str:
    """A pool key this node cannot decrypt: its ciphertext damaged, or its
    data key wrapped by a master key this node does not hold. A high weight
    makes the key the pool's first pick."""
    vault = env.c.vault
    record = str(uuid.uuid4())
    binding = Binding(env.org.id, provider, record)
    ring = vault._keyring if how == "corrupt" else Keyring(Secret(os.urandom(32)))
    sealed = ring.seal(binding, b"sk-undecryptable-0123456789")
    ciphertext = sealed.ciphertext
    if how == "corrupt":
        ciphertext = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    await vault._store.insert(
        NewProviderKey(
            id=record,
            org_id=env.org.id,
            provider=provider,
            name=name,
            last4="6789",
            ciphertext=ciphertext,
            nonce=sealed.nonce,
            wrapped_dek=sealed.wrapped_dek,
            dek_nonce=sealed.dek_nonce,
            kek_id=sealed.kek_id,
            weight=weight,
        )
    )
    await vault._refresh(env.org.id)
    return record


@pytest.mark.parametrize("how", ["corrupt", "unknown_kek"])
@pytest_twisted.ensureDeferred
async def test_an_undecryptable_key_does_not_use_up_the_routes_only_attempt(env, how):
    """Pool [bad key, good key], max_attempts=1: the good key answers."""
    await _bad_key(env, "openai", how)
    await env.route("one", targets=[{"provider": "openai", "model": "gpt-4o"}], max_attempts=1)
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "one"})
    doc = json.loads(await resp.content())
    assert resp.code == 200, doc
    assert route_header(resp)["key"] == "main"
    assert route_header(resp)["attempt"] == "1"
    assert env.keys_used("openai") == [OPENAI_KEY]  # the bad key never went out
    [row] = await env.rows()
    assert row["attempts"] == 1  # upstream calls
    [skipped] = row["fallbacks"]
    assert (skipped["key"], skipped["reason"], skipped["status"]) == ("bad", "refused", None)


@pytest_twisted.ensureDeferred
async def test_an_undecryptable_key_does_not_keep_a_route_from_its_fallback_target(env):
    """Route [openai (5xx), lab (only an undecryptable key), groq],
    max_attempts=2: the 5xx is one attempt, the lab key none, groq the
    second."""
    from tests.support.fake_provider import Script

    status, doc = await env.admin(
        "POST",
        "/admin/providers",
        {"name": "lab", "dialect": "openai", "base_url": env.fake.origin + "/lab"},
    )
    assert status == 201, doc
    await _bad_key(env, "lab", "unknown_kek", name="lab-bad")
    await env.route(
        "smart",
        targets=[
            {"provider": "openai", "model": "gpt-4o"},
            {"provider": "lab", "model": "m"},
            {"provider": "groq", "model": "llama-3.3-70b"},
        ],
        max_attempts=2,
    )
    env.provider.next(Script(status=500, body=b'{"error":{"message":"boom"}}'))
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart"})
    doc = json.loads(await resp.content())
    assert resp.code == 200, doc
    assert route_header(resp)["provider"] == "groq"
    assert route_header(resp)["attempt"] == "2"
    assert env.keys_used("groq") == [GROQ_KEY]
    [row] = await env.rows()
    assert row["attempts"] == 2
    assert [(f["provider"], f["reason"], f["status"]) for f in row["fallbacks"]] == [
        ("openai", "5xx", 500),
        ("lab", "refused", None),
    ]


@pytest_twisted.ensureDeferred
async def test_a_pool_of_only_undecryptable_keys_ends_with_a_502_and_no_upstream_call(env):
    """More bad keys than a plain request's 3 attempts: each is skipped once,
    then the 502; nothing is sent, and the loop ends."""
    status, doc = await env.admin(
        "POST",
        "/admin/providers",
        {"name": "lab", "dialect": "openai", "base_url": env.fake.origin + "/lab"},
    )
    assert status == 201, doc
    for i in range(5):
        await _bad_key(env, "lab", "corrupt" if i % 2 else "unknown_kek", name=f"b{i}", weight=1)
    resp = await env.post("/lab/v1/chat/completions", CHAT)
    doc = json.loads(await resp.content())
    assert resp.code == 502, doc
    assert "cannot be used" in doc["error"]["message"]
    assert env.provider.calls() == []
    [row] = await env.rows()
    assert row["attempts"] == 0
    assert len(row["fallbacks"]) == 4  # the fifth ends the request
    assert len({f["key"] for f in row["fallbacks"]}) == 4
    # the vault now skips them before any attempt: the keys step refuses
    again = await env.post("/lab/v1/chat/completions", CHAT)
    await again.content()
    assert again.code == 503
    assert env.provider.calls() == []


# --- the attempt loop, as the proxy runs it, for any pools ----------------------------------


@dataclass(frozen=True)
class K:
    id: str
    weight: int = 1
    name: str = "k"


class BreakingVault:
    """Pools whose ``bad`` keys do not decrypt; like the real vault, a key
    found not to decrypt is unusable from then on."""

    def __init__(self, pools, bad) -> None:
        self.pools = pools
        self.bad = bad
        self.broken: set[str] = set()

    def pool(self, org_id, provider):
        return self.pools.get(provider, ())

    def usable(self, key) -> bool:
        return key.id not in self.broken

    def reveal(self, key) -> bool:
        if key.id in self.bad:
            self.broken.add(key.id)
            return False
        return True


def _run(plan: RoutingPlan, sel: Selector, vault: BreakingVault) -> tuple[list, int]:
    """The proxy's loop (Call.send / retry_or_fail) when every call that
    goes out fails with a 503: (keys sent upstream, keys skipped)."""
    sent, skipped = [], 0
    attempt = plan.first(sel, "org")
    steps = 0
    while attempt is not None:
        steps += 1
        assert steps <= 100, "the loop does not end"
        if not vault.reveal(attempt.key):
            skipped += 1
            plan.not_sent()
            attempt = plan.next(sel, "org", None, "refused")
        else:
            sent.append((attempt.target.provider, attempt.key.id))
            assert attempt.n == len(sent)
            attempt = plan.next(sel, "org", 503, "5xx")
    return sent, skipped


POOL = st.lists(st.booleans(), min_size=1, max_size=4)  # True: a key that decrypts


@settings(max_examples=300, deadline=None)
@given(
    pools=st.lists(POOL, min_size=1, max_size=4),
    max_attempts=st.integers(1, 10),
    routed=st.booleans(),
)
def test_undecryptable_keys_never_use_up_attempts_and_the_loop_ends(pools, max_attempts, routed):
    providers = [f"p{i}" for i in range(len(pools))]
    keys = {
        p: tuple(K(f"{p}-{j}", weight=1 + j) for j in range(len(pool)))
        for p, pool in zip(providers, pools, strict=True)
    }
    bad = {
        key.id
        for p, pool in zip(providers, pools, strict=True)
        for key, good in zip(keys[p], pool, strict=True)
        if not good
    }
    vault = BreakingVault(keys, bad)
    sel = Selector(vault, KeyHealth(Clock()), FakeRegistry())
    targets = [Target(p, "m") for p in providers]
    if not routed:
        targets = targets[:1]
    route = (
        Route("org", "r", tuple(targets), "fallback", frozenset({"5xx"}), max_attempts, None)
        if routed
        else None
    )
    plan = RoutingPlan(route, targets, lambda: None)
    sent, skipped = _run(plan, sel, vault)
    serving = [t.provider for t in targets if any(k.id not in bad for k in keys[t.provider])]
    limit = max_attempts if routed else 1  # a plain request's 5xx is final
    # every target with a key that decrypts is called, up to max_attempts
    assert [p for p, _ in sent] == serving[:limit]
    assert all(key not in bad for _, key in sent)
    assert plan.n == len(sent)  # attempts = upstream calls
    assert skipped <= len(bad)  # each bad key skipped at most once
