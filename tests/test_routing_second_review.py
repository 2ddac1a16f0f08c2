"""Routing, second review: the explainer lists the attempts the proxy makes
(lectr/managers/explain.py, lectr/policy/plan.py)."""

from __future__ import annotations

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.managers.routes import Route, Target
from lectr.policy.plan import RoutingPlan
from tests.test_routing_review import ORG, PROVIDERS, K, _explainer_and_proxy

TARGET_FAILURES = ("5xx", "timeout", "connect")


def _route(targets, retry_on=("429", "5xx", "timeout", "connect"), max_attempts=10):
    return Route(ORG, "smart", tuple(targets), "fallback", frozenset(retry_on), max_attempts, None)


def _proxy_walk(selector, route, failure, status=None):
    """The attempts the proxy makes when each one fails with ``failure``."""
    plan = RoutingPlan(route, list(route.targets), lambda: None)
    out = []
    attempt = plan.first(selector, ORG)
    while attempt is not None:
        out.append((attempt.target.provider, attempt.target.model, attempt.key.id))
        attempt = plan.next(selector, ORG, status, failure)
    return out


def _explained(doc):
    return [(a["provider"], a["model"], a["key"]["id"]) for a in doc["attempts"]]


@pytest_twisted.ensureDeferred
async def test_explain_lists_a_later_target_that_shares_the_first_ones_key():
    """A route "OpenAI gpt-4o, then Azure, then OpenAI gpt-4o-mini" with one
    OpenAI key: when OpenAI and Azure fail with a 5xx, the proxy's third
    attempt is gpt-4o-mini with that key. Explain listed two attempts: it
    walked the first failure as a 429, which sets the key aside for the rest
    of the request, so the third target had no key left."""
    route = _route(
        [Target("openai", "gpt-4o"), Target("azure", "gpt-4o-eu"), Target("openai", "gpt-4o-mini")]
    )
    explainer, selector, _, _ = _explainer_and_proxy(
        {"openai": (K("o"),), "azure": (K("z"),)}, {"smart": route}
    )
    doc = await explainer.explain(ORG, {"body": {"model": "smart"}})
    expected = [
        ("openai", "gpt-4o", "o"),
        ("azure", "gpt-4o-eu", "z"),
        ("openai", "gpt-4o-mini", "o"),
    ]
    assert _proxy_walk(selector, route, "5xx", 503) == expected
    assert _explained(doc) == expected


@pytest_twisted.ensureDeferred
async def test_explain_follows_a_route_that_retries_on_timeouts_only():
    """``retry_on: ["timeout"]``: the proxy moves to Azure when OpenAI does
    not answer in time; explain only tried 429 and 5xx (neither retried) and
    listed OpenAI alone."""
    route = _route([Target("openai", "gpt-4o"), Target("azure", "gpt-4o-eu")], ("timeout",))
    explainer, selector, _, _ = _explainer_and_proxy(
        {"openai": (K("o"),), "azure": (K("z"),)}, {"smart": route}
    )
    doc = await explainer.explain(ORG, {"body": {"model": "smart"}})
    expected = [("openai", "gpt-4o", "o"), ("azure", "gpt-4o-eu", "z")]
    assert _proxy_walk(selector, route, "timeout") == expected
    assert _explained(doc) == expected


@pytest_twisted.ensureDeferred
async def test_explain_still_lists_every_key_of_a_pool_before_the_next_target():
    route = _route([Target("openai", "gpt-4o"), Target("azure", "gpt-4o-eu")])
    explainer, _, _, _ = _explainer_and_proxy(
        {"openai": (K("a"), K("b", 2)), "azure": (K("z"),)}, {"smart": route}
    )
    doc = await explainer.explain(ORG, {"body": {"model": "smart"}})
    listed = _explained(doc)
    assert [p for p, _, _ in listed] == ["openai", "openai", "azure"]
    assert {k for _, _, k in listed[:2]} == {"a", "b"}


@settings(max_examples=150, deadline=None)
@given(
    targets=st.lists(
        st.tuples(st.sampled_from(PROVIDERS), st.sampled_from(["m1", "m2"])),
        min_size=1,
        max_size=5,
    ),
    retry_on=st.sets(st.sampled_from(["429", *TARGET_FAILURES]), min_size=1),
    max_attempts=st.integers(1, 10),
)
def test_explain_lists_what_the_proxy_tries_when_every_attempt_fails(
    targets, retry_on, max_attempts
):
    """One key per provider: the proxy's attempts when each fails with a
    class the route retries on (a target failure when it has one) are the
    attempts explain lists, whatever the route."""
    route = _route([Target(p, m) for p, m in targets], tuple(retry_on), max_attempts)
    explainer, selector, _, _ = _explainer_and_proxy(
        {p: (K(f"key-{p}"),) for p in PROVIDERS}, {"smart": route}
    )
    failure = next((f for f in TARGET_FAILURES if f in retry_on), "429")
    expected = _proxy_walk(selector, route, failure, 429 if failure == "429" else None)
    d = explainer.explain(ORG, {"body": {"model": "smart"}})
    doc = _run(d)
    assert _explained(doc) == expected
    assert len(expected) <= max_attempts


def _run(coro):
    """Run a coroutine that never waits (the explainer, on in-memory fakes)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the explanation waited")


@pytest_twisted.ensureDeferred
async def test_a_route_is_refused_on_another_dialect_even_when_its_first_provider_is_unknown():
    """The route step checks the route's dialect against the client's on
    its first target's provider; when this node does not know that provider
    (a custom provider not loaded here yet), it checked nothing, and an
    OpenAI-style body went to the Anthropic target behind it."""
    route = _route([Target("not-loaded-yet", "m"), Target("anthropic", "claude-sonnet-4-5")])
    explainer, _, _, _ = _explainer_and_proxy({"anthropic": (K("a"),)}, {"smart": route})
    doc = await explainer.explain(
        ORG, {"path": "/v1/chat/completions", "body": {"model": "smart", "messages": []}}
    )
    assert doc["attempts"] == []
    assert doc["refusal"]["status"] == 400
    assert "Anthropic-style" in doc["refusal"]["message"]
