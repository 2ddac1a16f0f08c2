"""Routing review: cool-downs across a route's targets, cool-downs that must
not end early, and the explainer against the proxy's own choices
(lectr/policy/plan.py, lectr/policy/health.py, lectr/managers/explain.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from lectr.managers.routes import Route, Target
from lectr.policy.health import MAX_COOLDOWN, RATE_LIMITED_COOLDOWN, REFUSED_COOLDOWN, KeyHealth
from lectr.policy.keys import KeyAvailability
from lectr.policy.org import OrgEnabled
from lectr.policy.plan import RoutingPlan, Selector
from lectr.policy.providers import ProviderPolicy
from lectr.policy.route import ResolveRoute
from lectr.providers.registry import ProviderRegistry, discover
from tests.test_policy_select import FakeRegistry, FakeVault
from tests.test_routing_proxy import env as routing_env

REGISTRY = ProviderRegistry([c(c.default_base_url or "https://x") for c in discover()])
PROVIDERS = ("openai", "azure", "groq", "mistral")


@dataclass(frozen=True)
class K:
    id: str
    weight: int = 1
    name: str = "k"


def _route(targets, strategy="fallback", retry_on=("429", "5xx", "timeout", "connect"), n=10):
    return Route("org", "r", tuple(targets), strategy, frozenset(retry_on), n, None)


def _walk(plan, sel, failure="5xx", status=503):
    """Every attempt the plan makes when each one fails with ``failure``."""
    out = [plan.first(sel, "org")]
    while out[-1] is not None:
        out.append(plan.next(sel, "org", status, failure))
    return out[:-1]


# --- a target whose keys are all cooling down goes last ---------------------------------


def test_a_cooling_target_is_not_called_first_while_another_target_has_a_healthy_key():
    """OpenAI rate-limited the org's only OpenAI key for 30 s: a route
    "openai, then azure" sends to Azure during those 30 s (the key is set
    aside, as its Retry-After asked), and comes back to OpenAI after."""
    clock = Clock()
    health = KeyHealth(clock)
    sel = Selector(FakeVault({"openai": (K("o"),), "azure": (K("z"),)}), health, FakeRegistry())
    route = _route([Target("openai", "gpt-4o"), Target("azure", "gpt-4o")])
    health.cool("o", "openai", 429, 30)
    for _ in range(3):
        plan = RoutingPlan(route, list(route.targets), lambda: None)
        # the cooling key is still tried, last, when the healthy target fails
        assert [(a.target.provider, a.key.id) for a in _walk(plan, sel)] == [
            ("azure", "z"),
            ("openai", "o"),
        ]
    clock.advance(30)
    assert not health.cooling()  # (the fast path is back)
    plan = RoutingPlan(route, list(route.targets), lambda: None)
    assert plan.first(sel, "org").target.provider == "openai"


pools = st.lists(
    st.lists(st.booleans(), min_size=1, max_size=3),  # one flag per key: cooling?
    min_size=2,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(cooling=pools, weighted=st.booleans(), session=st.booleans(), seed=st.integers(0, 50))
def test_cooling_is_a_preference_across_targets(cooling, weighted, session, seed):
    """For any route and any set of cooling keys: the first attempt uses a
    healthy key when any target has one; every target is still reachable
    (a cool-down is a preference, not a ban); and when every key cools,
    the route's own order is kept."""
    clock = Clock()
    health = KeyHealth(clock)
    providers = PROVIDERS[: len(cooling)]
    vault = FakeVault(
        {
            p: tuple(K(f"{p}-{i}", 1 + i) for i in range(len(flags)))
            for p, flags in zip(providers, cooling, strict=True)
        }
    )
    for p, flags in zip(providers, cooling, strict=True):
        for i, cool in enumerate(flags):
            if cool:
                health.cool(f"{p}-{i}", p, 429, 10 + i)
    sel = Selector(vault, health, FakeRegistry())
    for _ in range(seed % 5):  # some round-robin history
        plan = RoutingPlan(
            _route([Target(p, "m") for p in providers], "weighted" if weighted else "fallback"),
            [Target(p, "m") for p in providers],
            lambda: None,
        )
        plan.first(sel, "org")
    route = _route(
        [Target(p, "m", 1 + i) for i, p in enumerate(providers)],
        "weighted" if weighted else "fallback",
    )
    affinity = (lambda: b"s:conversation-%d" % seed) if session else (lambda: None)
    plan = RoutingPlan(route, list(route.targets), affinity)
    walked = _walk(plan, sel)
    any_healthy = any(not all(flags) for flags in cooling)
    assert health.healthy(walked[0].key.id) == any_healthy
    assert {a.target.provider for a in walked} == set(providers)
    if not any_healthy and not weighted:
        assert [a.target.provider for a in walked] == list(providers)
    # targets with a healthy key all come before the ones whose keys all cool
    ranks = [all(cooling[providers.index(a.target.provider)]) for a in walked]
    assert ranks == sorted(ranks)


def test_weighted_split_holds_while_nothing_cools():
    """The reordering costs nothing to the weighted split: 3:1 exactly."""
    sel = Selector(
        FakeVault({"openai": (K("o"),), "azure": (K("z"),)}), KeyHealth(Clock()), FakeRegistry()
    )
    route = _route([Target("openai", "a", 3), Target("azure", "b", 1)], "weighted")
    firsts = Counter(
        RoutingPlan(route, list(route.targets), lambda: None).first(sel, "org").target.provider
        for _ in range(400)
    )
    assert firsts == {"openai": 300, "azure": 100}


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(1, 20), min_size=3, max_size=4),
    cooled=st.integers(0, 3),
    history=st.integers(0, 30),
)
def test_a_weighted_route_splits_in_proportion_among_the_targets_that_can_serve(
    weights, cooled, history
):
    """While one target's keys all cool down, the weighted route's first
    attempts go to the others in proportion to their weights (within a bound
    that does not grow with the number of requests: the round-robin's state
    from before the cool-down), not the cooling one's share all to one."""
    providers = PROVIDERS[: len(weights)]
    cooled %= len(weights)
    clock = Clock()
    health = KeyHealth(clock)
    sel = Selector(FakeVault({p: (K(f"{p}-key"),) for p in providers}), health, FakeRegistry())
    route = _route([Target(p, "m", w) for p, w in zip(providers, weights, strict=True)], "weighted")

    def first():
        return RoutingPlan(route, list(route.targets), lambda: None).first(sel, "org")

    for _ in range(history):
        first()
    health.cool(f"{providers[cooled]}-key", providers[cooled], 429, 3600)
    serving = {p: w for i, (p, w) in enumerate(zip(providers, weights, strict=True)) if i != cooled}
    rounds = 60
    got = Counter(first().target.provider for _ in range(rounds * sum(serving.values())))
    assert set(got) == set(serving)
    for p, w in serving.items():
        assert abs(got[p] - rounds * w) <= sum(weights), (got, serving)


# --- a cool-down never ends before the longest wait asked for ------------------------------


@settings(max_examples=200, deadline=None)
@given(
    answers=st.lists(
        st.tuples(
            st.sampled_from([401, 403, 429]),
            st.one_of(st.none(), st.floats(min_value=0, max_value=2 * MAX_COOLDOWN)),
            st.floats(min_value=0, max_value=100),  # seconds after the previous answer
        ),
        min_size=1,
        max_size=6,
    )
)
def test_a_cooldown_lasts_until_the_longest_wait_asked_for(answers):
    """Concurrent requests on one key come back with their own answers: a
    later, shorter one (a 429 without retry-after, 30 s, after one that asked
    for an hour; a 429 after a refusal's 5 minutes) must not end the
    cool-down before what an earlier answer asked for."""
    clock = Clock()
    health = KeyHealth(clock)
    until = 0.0
    for status, retry_after, gap in answers:
        clock.advance(gap)
        health.cool("k", "openai", status, retry_after)
        if status == 429:
            wait = RATE_LIMITED_COOLDOWN if retry_after is None else retry_after
        else:
            wait = REFUSED_COOLDOWN
        until = max(until, clock.seconds() + min(wait, MAX_COOLDOWN))
    if until > clock.seconds():
        assert not health.healthy("k")
        assert health.remaining("k") == pytest.approx(until - clock.seconds())
        clock.advance(until - clock.seconds() - 1e-3)
        assert not health.healthy("k")
    clock.advance(until - clock.seconds() + 1e-3 if until > clock.seconds() else 0)
    assert health.healthy("k") and health.remaining("k") == 0.0


def test_a_later_429_without_retry_after_does_not_cut_an_hour_to_30_seconds():
    clock = Clock()
    health = KeyHealth(clock)
    health.cool("k", "openai", 429, 3600)  # e.g. a quota: retry-after: 3600
    clock.advance(1)
    health.cool("k", "openai", 429, None)  # an in-flight request's 429, no header
    clock.advance(60)
    assert not health.healthy("k")
    health.cool("r", "openai", 401, None)  # refused: 5 minutes
    health.cool("r", "openai", 429, 1)
    clock.advance(2)
    assert not health.healthy("r")
    clock.advance(REFUSED_COOLDOWN)
    assert health.healthy("r")


# --- the explainer predicts what the proxy does ------------------------------------------


class _Org:
    def __init__(self, org_id):
        self.id = org_id
        self.enabled = True


class _Orgs:
    async def get_org(self, org_id):
        return _Org(org_id)


class _Routes:
    def __init__(self, routes):
        self.routes = routes

    def has_routes(self, org_id):
        return True

    def get(self, org_id, name):
        return self.routes.get(name)


class _Settings:
    def stored(self, org_id, provider):
        return None


ORG = "6b1f7a0e-2f7c-4a4e-9d55-2c1f0f3d7a11"


def _explainer_and_proxy(pools, routes=None):
    from lectr.managers.explain import RouteExplainer

    clock = Clock()
    health = KeyHealth(clock)
    vault = FakeVault(pools)
    selector = Selector(vault, health, REGISTRY)  # the proxy's
    steps = [
        OrgEnabled(),
        ResolveRoute(_Routes(routes or {}), REGISTRY),
        ProviderPolicy(_Settings(), REGISTRY),
        KeyAvailability(selector),
    ]
    explainer = RouteExplainer(
        orgs=_Orgs(), registry=REGISTRY, steps=steps, vault=vault, health=health, selector=selector
    )
    return explainer, selector, health, clock


def _proxy_first(selector, route, model="gpt-4o"):
    targets = list(route.targets) if route is not None else [Target("openai", model)]
    return RoutingPlan(route, targets, lambda: None).first(selector, ORG)


@pytest_twisted.ensureDeferred
async def test_explain_agrees_with_the_proxy_about_a_cooling_target():
    route = Route(
        ORG,
        "smart",
        (Target("openai", "gpt-4o"), Target("azure", "gpt-4o-eu")),
        "fallback",
        frozenset({"429", "5xx", "timeout", "connect"}),
        3,
        None,
    )
    explainer, selector, health, _ = _explainer_and_proxy(
        {"openai": (K("o", name="main"),), "azure": (K("z", name="eu"),)}, {"smart": route}
    )
    health.cool("o", "openai", 429, 30)
    doc = await explainer.explain(ORG, {"body": {"model": "smart"}})
    first = _proxy_first(selector, route)
    assert doc["attempts"][0]["provider"] == first.target.provider == "azure"
    assert [a["provider"] for a in doc["attempts"]] == ["azure", "openai"]


@pytest_twisted.ensureDeferred
async def test_explain_names_the_key_the_proxy_picks_next_without_a_session():
    """Explain plans from a fork of the proxy's selector: without a session
    it names the key the proxy's round-robin gives the next request, and
    asking changes nothing."""
    explainer, selector, _, _ = _explainer_and_proxy(
        {"openai": (K("a", name="first"), K("b", name="second"))}
    )
    for _ in range(3):
        doc = await explainer.explain(ORG, {"body": {"model": "gpt-4o"}})
        predicted = doc["attempts"][0]["key"]["id"]
        assert predicted == _proxy_first(selector, None).key.id


# --- end to end (real LectrService, PostgreSQL, a fake provider) --------------------------


env = routing_env  # (test_routing_proxy's: a Lectr, an org with keys, the fake provider)


@pytest_twisted.ensureDeferred
async def test_the_proxy_sends_nothing_to_a_cooling_target_while_another_can_serve(env):
    from tests.test_routing_proxy import CHAT, route_header

    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "gpt-4o"}, {"provider": "groq", "model": "l"}],
    )
    [main] = env.c.vault.pool(env.org.id, "openai")
    env.c.health.cool(main.id, "openai", 429, 600)
    for _ in range(3):
        resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart"})
        assert resp.code == 200
        await resp.content()
        assert (route_header(resp)["provider"], route_header(resp)["attempt"]) == ("groq", "1")
    assert env.provider.calls("openai") == []
    # explain says the same
    status, doc = await env.admin(
        "POST", f"/admin/orgs/{env.org.id}/routes/explain", {"body": {"model": "smart"}}
    )
    assert status == 200, doc
    assert [a["provider"] for a in doc["attempts"]] == ["groq", "openai"]
    # a plain request to OpenAI still uses its only key (a preference, not a ban)
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 200
    await resp.content()
    assert len(env.provider.calls("openai")) == 1


@pytest_twisted.ensureDeferred
async def test_the_last_answer_after_a_fallback_says_do_not_retry_once(env):
    """After a fallback, the client must read x-should-retry: false (docs:
    the SDKs' retries must not run the route again) even when the provider's
    answer carried its own x-should-retry: true."""
    from tests.support.fake_provider import Script
    from tests.test_routing_proxy import CHAT

    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "a"}, {"provider": "groq", "model": "b"}],
    )
    for _ in range(2):
        env.provider.next(
            Script(
                status=503,
                headers={"x-should-retry": "true"},
                body=b'{"error":{"message":"overloaded"}}',
            )
        )
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart"})
    await resp.content()
    assert resp.code == 503 and len(env.provider.calls()) == 2
    assert resp.headers.getRawHeaders(b"x-should-retry") == [b"false"]


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    history=st.integers(0, 40),
    route_too=st.booleans(),
)
def test_a_forked_selector_predicts_the_proxys_next_picks_and_changes_nothing(
    weights, history, route_too
):
    """What explain needs to agree with the proxy without a session: a fork
    of the proxy's selector picks what the proxy picks next (keys and a
    weighted route's first target), and leaves the proxy's state as it was."""
    keys = tuple(K(f"k{i}", w) for i, w in enumerate(weights))
    vault = FakeVault({"openai": keys, "azure": (K("z", 2),)})
    proxy = Selector(vault, KeyHealth(Clock()), FakeRegistry())
    route = _route([Target("openai", "a", 2), Target("azure", "b", 1)], "weighted")
    targets = list(route.targets) if route_too else [Target("openai", "a")]

    def first(sel):
        a = RoutingPlan(route if route_too else None, targets, lambda: None).first(sel, "org")
        return a.target.provider, a.key.id

    for _ in range(history):
        first(proxy)
    fork = proxy.fork()
    predicted = [first(fork) for _ in range(sum(weights) + 3)]
    assert predicted == [first(proxy) for _ in range(sum(weights) + 3)]


@pytest_twisted.ensureDeferred
async def test_explain_names_the_weighted_keys_the_proxy_picks_next():
    explainer, selector, _, _ = _explainer_and_proxy(
        {"openai": (K("a", name="first"), K("b", 3, name="second"))}
    )
    for _ in range(8):
        doc = await explainer.explain(ORG, {"body": {"model": "gpt-4o"}})
        assert doc["attempts"][0]["key"]["id"] == _proxy_first(selector, None).key.id
