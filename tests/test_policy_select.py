"""Choosing keys and targets (lectr/policy/select.py, lectr/policy/plan.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from twisted.internet.task import Clock

from lectr.managers.routes import Route, Target
from lectr.policy.health import KeyHealth
from lectr.policy.plan import RoutingPlan, Selector, failure_class
from lectr.policy.select import RoundRobin, rendezvous_order


@dataclass(frozen=True)
class K:
    id: str
    weight: int
    name: str = "k"


def test_round_robin_spread_is_exact():
    rr = RoundRobin()
    keys = [K("a", 1), K("b", 2), K("c", 7)]
    picks = Counter(
        rr.pick("pool", keys, lambda k: k.id, lambda k: k.weight).id for _ in range(1000)
    )
    assert picks == {"a": 100, "b": 200, "c": 700}


def test_round_robin_interleaves():
    rr = RoundRobin()
    keys = [K("a", 1), K("b", 1)]
    seq = [rr.pick("p", keys, lambda k: k.id, lambda k: k.weight).id for _ in range(6)]
    assert seq in (["a", "b"] * 3, ["b", "a"] * 3)


def test_rendezvous_moves_only_the_share_of_a_removed_candidate():
    keys = [K("a", 1), K("b", 2), K("c", 1)]
    sessions = [f"conversation-{i}".encode() for i in range(2000)]
    before = {
        s: rendezvous_order(s, keys, lambda k: k.id, lambda k: k.weight)[0].id for s in sessions
    }
    share = Counter(before.values())
    # proportional to the weights (1:2:1) within a few percentage points
    assert abs(share["b"] / 2000 - 0.5) < 0.05
    assert abs(share["a"] / 2000 - 0.25) < 0.05
    remaining = [k for k in keys if k.id != "b"]
    after = {
        s: rendezvous_order(s, remaining, lambda k: k.id, lambda k: k.weight)[0].id
        for s in sessions
    }
    for s in sessions:
        if before[s] != "b":
            assert after[s] == before[s]  # nobody else moved


class FakeVault:
    def __init__(self, pools):
        self.pools = pools

    def pool(self, org_id, provider):
        return self.pools.get(provider, ())

    def usable(self, key):
        return True


class FakeRegistry:
    def get(self, name):
        return name


def _route(*targets, retry_on=("429", "5xx", "timeout", "connect"), max_attempts=5):
    return Route("org", "r", tuple(targets), "fallback", frozenset(retry_on), max_attempts, None)


def test_plain_request_retries_key_failures_within_its_pool_only():
    clock = Clock()
    vault = FakeVault({"openai": (K("k1", 1), K("k2", 1))})
    health = KeyHealth(clock)
    sel = Selector(vault, health, FakeRegistry())
    plan = RoutingPlan(None, [Target("openai", "gpt")], lambda: None)
    first = plan.first(sel, "org")
    health.cool(first.key.id, "openai", 429, 10)
    second = plan.next(sel, "org", 429, "429")
    assert second.key.id != first.key.id and second.n == 2
    # a 5xx on a plain request is final
    assert plan.next(sel, "org", 500, "5xx") is None


def test_route_falls_back_across_targets_by_retry_class():
    sel = Selector(
        FakeVault({"openai": (K("o", 1),), "azure": (K("z", 1),)}),
        KeyHealth(Clock()),
        FakeRegistry(),
    )
    route = _route(Target("openai", "gpt-4o"), Target("azure", "gpt-4o"), retry_on=("5xx",))
    plan = RoutingPlan(route, list(route.targets), lambda: None)
    assert plan.first(sel, "org").target.provider == "openai"
    assert plan.next(sel, "org", None, "timeout") is None  # not in retry_on
    plan = RoutingPlan(route, list(route.targets), lambda: None)
    plan.first(sel, "org")
    nxt = plan.next(sel, "org", 503, "5xx")
    assert (nxt.target.provider, nxt.n) == ("azure", 2)
    assert plan.next(sel, "org", 503, "5xx") is None  # no target left


def test_max_attempts_holds():
    sel = Selector(
        FakeVault({"openai": tuple(K(f"k{i}", 1) for i in range(9))}),
        KeyHealth(Clock()),
        FakeRegistry(),
    )
    route = _route(Target("openai", "a"), max_attempts=3)
    plan = RoutingPlan(route, list(route.targets), lambda: None)
    attempts = [plan.first(sel, "org")]
    while (nxt := plan.next(sel, "org", 429, "429")) is not None:
        attempts.append(nxt)
    assert len(attempts) == 3


def test_cooling_keys_are_tried_last_and_come_back():
    clock = Clock()
    health = KeyHealth(clock)
    sel = Selector(FakeVault({"openai": (K("a", 1), K("b", 1))}), health, FakeRegistry())
    health.cool("a", "openai", 429, 30)
    for _ in range(5):
        plan = RoutingPlan(None, [Target("openai", "m")], lambda: None)
        assert plan.first(sel, "org").key.id == "b"
    clock.advance(31)
    seen = {
        RoutingPlan(None, [Target("openai", "m")], lambda: None).first(sel, "org").key.id
        for _ in range(4)
    }
    assert seen == {"a", "b"}


def test_failure_classes():
    assert [failure_class(s) for s in (200, 400, 401, 403, 404, 429, 500, 503)] == [
        None,
        None,
        "refused",
        "refused",
        None,
        "429",
        "5xx",
        "5xx",
    ]


def test_targets_of_one_provider_each_get_its_single_key():
    """A route from one model to another of the same provider, with a single
    key: a 5xx on the first target still falls back to the second (the key
    was not at fault), while a refused key is not tried again anywhere."""
    sel = Selector(FakeVault({"openai": (K("only", 1),)}), KeyHealth(Clock()), FakeRegistry())
    route = _route(Target("openai", "gpt-4o-mini"), Target("openai", "gpt-4o"))
    plan = RoutingPlan(route, list(route.targets), lambda: None)
    assert plan.first(sel, "org").target.model == "gpt-4o-mini"
    second = plan.next(sel, "org", 503, "5xx")
    assert (second.target.model, second.key.id, second.n) == ("gpt-4o", "only", 2)
    plan = RoutingPlan(route, list(route.targets), lambda: None)
    plan.first(sel, "org")
    assert plan.next(sel, "org", 401, "refused") is None
