"""Review of limits, budgets and cost: each test names a defect found in
review (it failed before the fix next to it). Reuses the in-memory limiter
of tests/test_limits_limiter.py (time from a task.Clock, lease rounds
answered by hand) and the two-node setup on a real PostgreSQL of
tests/test_limits_manager.py."""

from __future__ import annotations

import json
from decimal import Decimal
from types import SimpleNamespace
from typing import NamedTuple

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.limits import Admission, Refusal
from lectr.limits.model import Limits
from lectr.metrics import Registry
from lectr.policy.limits import Limits as LimitsStep
from lectr.pricing.cost import cost_of, estimate_prompt_tokens
from lectr.pricing.manager import PricingManager
from lectr.providers.body import read_body
from lectr.usage.model import Usage
from tests.support.limits import admitted, usd
from tests.test_limits_limiter import answer, limiter
from tests.test_limits_manager import env as limits_env

env = limits_env  # (test_limits_manager's: limits over a real database)


# --- a cap lowered while leases drawn under the old one are held ---------------------------


def test_a_lowered_max_concurrent_stops_admissions_at_once_from_slots_held_under_the_old_cap():
    """docs/limits.md: a limit lowered within its window stops admissions at
    once on every node that has heard of it, whatever leases the nodes drew
    under the old cap; max_concurrent is at most cap + N x L at any moment
    (L the new cap's lease). The node held 51 slots under a cap of 1000 and
    kept admitting from them under a cap of 2 until its next slot round."""
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(max_concurrent=1000))])  # lease 50
    first = lim.admit("org", "key", reserve_usd=None)
    assert isinstance(first, Admission)
    answer(lim, clock.seconds())
    assert lim.slots["org"].held == 51
    lim.set_org("org", [("org", None, Limits(max_concurrent=2))])  # lease 1
    in_flight = 1
    for _ in range(100):
        if isinstance(lim.admit("org", "key", reserve_usd=None), Admission):
            in_flight += 1
    assert in_flight <= 2 + 1, f"{in_flight} requests in flight under max_concurrent 2"
    # and it still admits up to the cap from what it holds
    assert in_flight == 2
    answer(lim, clock.seconds())  # the next round gives the rest back
    assert lim.slots["org"].held == 2
    first.settle(tokens=None, cost_usd=None)
    assert isinstance(lim.admit("org", "key", reserve_usd=None), Admission)
    assert isinstance(lim.admit("org", "key", reserve_usd=None), Refusal)


def test_a_raised_max_concurrent_keeps_admitting_from_the_slots_held():
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(max_concurrent=100))])  # lease 5
    assert isinstance(lim.admit("org", "key", reserve_usd=None), Admission)
    answer(lim, clock.seconds())  # held 6
    lim.set_org("org", [("org", None, Limits(max_concurrent=1000))])
    n = sum(isinstance(lim.admit("org", "key", reserve_usd=None), Admission) for _ in range(5))
    assert n == 5


@pytest_twisted.ensureDeferred
async def test_a_lowered_budget_does_not_starve_the_other_nodes_while_one_stays_busy(env):
    """A node that drew a $50 lease under a $1000 daily budget kept it after
    the budget was lowered to $20 for as long as it stayed busy: the other
    node saw the cap allocated and refused every request with "daily budget
    of the organization reached" although $4 of $20 had been spent."""
    a = await env.manager()
    b = await env.manager()
    await a.update(env.org_id, None, {"usd_per_day": "1000"})  # lease $50
    await b._reloader.refresh(env.org_id)  # (no listener in this test)
    await env.advance(31)  # T0 is 30 s before midnight: a fresh UTC day
    for _ in range(3):
        admitted(a.admit(env.org_id, env.key_id, reserve_usd=usd("1"))).settle(
            tokens=1, cost_usd=usd("1")
        )
        await a.sync()
    assert a.limiter.scopes[env.org_id].day.held > 40_000_000
    await a.update(env.org_id, None, {"usd_per_day": "20"})  # lease $1
    await b._reloader.refresh(env.org_id)
    refused_by_b = []
    for _ in range(10):
        # a stays busy: a request every half second
        admitted(a.admit(env.org_id, env.key_id, reserve_usd=usd("0.05"))).settle(
            tokens=1, cost_usd=usd("0.05")
        )
        r = b.admit(env.org_id, env.key_id, reserve_usd=usd("0.05"))
        if isinstance(r, Refusal):
            refused_by_b.append(r.message)
        else:
            r.settle(tokens=1, cost_usd=usd("0.05"))
        await env.advance(0.5)
    spent = env.counter(env.org_id, "usd_day")[-1][2]
    assert spent <= 20_000_000
    # b may be refused for a moment (no allowance yet), never for the whole time
    assert len(refused_by_b) <= 2, (spent, refused_by_b)


# --- the worst case of a request that asks for several completions --------------------------


class _Target(NamedTuple):
    provider: str
    model: str | None


_PRICING = PricingManager(None, reactor=None, metrics=Registry())


def _reserved_by_the_step(doc: dict) -> int:
    """What the proxy's limits step reserves against a daily budget for a
    chat request ``doc`` routed to gpt-4o (micro-dollars)."""
    lim, _, _ = limiter()
    lim.set_org("org", [("org", None, Limits(usd_per_day=Decimal("1000000")))])
    step = LimitsStep(SimpleNamespace(admit=lim.admit, limiter=lim), _PRICING.dearest_micro)
    body = json.dumps(doc).encode()
    call = SimpleNamespace(
        ident=SimpleNamespace(org_id="org", key_id="key"),
        dry_run=False,
        read=read_body([b"application/json"], body),
        plan=SimpleNamespace(targets=[_Target("openai", "gpt-4o")]),
        admission=None,
    )
    assert step(call) is None and call.admission is not None
    return lim.scopes["org"].day.reserved


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=128),
    max_tokens=st.none() | st.integers(min_value=1, max_value=16_384),
    field=st.sampled_from(["n", "best_of"]),
)
def test_a_reservation_covers_every_completion_a_request_asks_for(n, max_tokens, field):
    """OpenAI bills the output tokens of every choice (``n``; ``best_of`` for
    the legacy completions): the worst case of a request asking for n
    completions is n x its output limit. The reservation covered one, so a
    burst of n=128 requests could spend 128 times what docs/limits.md bounds."""
    doc = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], field: n}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    reserved = _reserved_by_the_step(doc)
    entry = _PRICING.resolve("openai", "gpt-4o")
    each = max_tokens if max_tokens is not None else entry.max_output_tokens
    prompt = estimate_prompt_tokens(len(json.dumps(doc).encode()))
    # the dearest response the request allows: n completions of the limit
    worst = cost_of(entry, Usage(prompt, n * each, prompt + n * each, source="provider"))
    assert reserved >= worst.cost_micro


def test_a_single_completion_reserves_as_before():
    doc = {"model": "gpt-4o", "messages": [], "max_tokens": 100}
    one = _reserved_by_the_step(doc)
    for same in ({"n": 1}, {"n": None}, {"n": True}, {"n": "3"}, {"n": 0}, {"best_of": 1}):
        assert _reserved_by_the_step({**doc, **same}) <= one + 20  # (a longer body)


# --- the x-ratelimit headers of a refusal -----------------------------------------------------


def test_a_refusal_at_the_start_of_a_minute_gives_that_minutes_token_headers():
    """A request refused by the first limit checked (fail-closed while
    PostgreSQL is unreachable) in a new minute carried the token headers of
    the minute before: tokens remaining as they were then, and a reset of
    0ms, while the request headers were the new minute's."""
    lim, clock, _ = limiter(fail_closed=True)
    lim.set_org("org", [("key", "key", Limits(rpm=100, tpm=1000))])
    a = lim.admit("org", "key", reserve_usd=None)
    assert isinstance(a, Admission)
    a.settle(tokens=900, cost_usd=None)
    answer(lim, clock.seconds())
    lim.set_offline(True)
    clock.advance(30.25)  # 59.75 s left in the next minute
    r = lim.admit("org", "key", reserve_usd=None)
    assert isinstance(r, Refusal) and r.status == 503
    h = dict(r.headers)
    assert h[b"x-ratelimit-reset-requests"] == b"1m0s"
    assert h[b"x-ratelimit-remaining-requests"] == b"100"
    assert (h[b"x-ratelimit-remaining-tokens"], h[b"x-ratelimit-reset-tokens"]) == (
        b"1000",
        b"1m0s",
    )


@pytest_twisted.ensureDeferred
async def test_a_removed_limit_reads_no_usage(env):
    """docs/limits.md: "the usage of a limit that is not set reads 0". After
    `lectr limits clear`, the view still showed the requests the node had
    counted this minute under the cap just removed."""
    m = await env.manager()
    await m.update(env.org_id, env.key_id, {"rpm": 10, "tpm": 1000})
    await m.sync()
    for _ in range(2):
        admitted(m.admit(env.org_id, env.key_id, reserve_usd=None)).settle(tokens=7, cost_usd=None)
        await m.sync()
    view = await m.get(env.org_id, env.key_id)
    assert (view.usage["requests_this_minute"], view.usage["tokens_this_minute"]) == (2, 14)
    view = await m.update(env.org_id, env.key_id, {"rpm": None})
    assert (view.usage["requests_this_minute"], view.usage["tokens_this_minute"]) == (0, 14)
    view = await m.get(env.org_id, env.key_id)
    assert view.usage["requests_this_minute"] == 0
