"""Third review of limits, budgets and pricing: each test names a defect
found in review (it failed before the fix next to it). Reuses the in-memory
limiter of tests/test_limits_limiter.py (time from a task.Clock, lease
rounds answered by hand) and the limits step set-up of
tests/test_limits_review.py."""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.limits import Admission, Refusal
from lectr.limits.limiter import BUDGET_EXCEEDED, RATE_LIMITED
from lectr.limits.model import Limits
from lectr.pricing.cost import cost_of, estimate_prompt_tokens
from lectr.storage.limits import SlotsHeld
from lectr.usage.model import Usage
from tests.test_limits_limiter import answer, limiter, ts
from tests.test_limits_review import _PRICING, _reserved_by_the_step

# --- which refusal wins within one scope ---------------------------------------------------


def test_a_spent_monthly_budget_wins_over_the_spent_daily_one_of_the_same_scope():
    """docs/limits.md: "When several limits refuse at once, the refusal is
    the one with the longest wait". A scope whose daily and monthly budgets
    are both spent was refused with the daily budget and a retry-after to
    midnight; at midnight the monthly budget refused again."""
    lim, clock, _ = limiter()
    clock.advance(ts(2027, 1, 15, 12, 0, 20) - clock.seconds())
    lim.set_org(
        "org", [("org", None, Limits(usd_per_day=Decimal("1"), usd_per_month=Decimal("1")))]
    )
    first = lim.admit("org", "key", reserve_usd=Decimal("0.5"))
    assert isinstance(first, Admission)
    first.settle(tokens=5, cost_usd=Decimal("1"))
    answer(lim, clock.seconds())
    r = lim.admit("org", "key", reserve_usd=Decimal("0.1"))
    assert isinstance(r, Refusal)
    assert (r.kind, r.limit) == (BUDGET_EXCEEDED, "usd_per_month")
    assert r.retry_after == int(ts(2027, 2, 1) - clock.seconds())
    assert dict(r.headers)[b"retry-after"] == b"%d" % r.retry_after


def test_a_full_token_minute_wins_over_a_request_counter_waiting_for_its_lease():
    """The rpm counter out of credit for a moment (retry-after 1) was the
    refusal although the minute's tokens were spent: the client retried
    after a second and was refused again, by tpm, until the minute's end."""
    lim, clock, _ = limiter()
    clock.advance(ts(2027, 1, 15, 12, 0, 20) - clock.seconds())
    lim.set_org("org", [("org", None, Limits(rpm=1000, tpm=10))])  # rpm lease 50
    open_ = []
    for _ in range(50):  # the rpm credit (no lease round has answered yet)
        a = lim.admit("org", "key", reserve_usd=None)
        assert isinstance(a, Admission)
        open_.append(a)
    open_[0].settle(tokens=100, cost_usd=None)  # the minute's tokens are spent
    r = lim.admit("org", "key", reserve_usd=None)
    assert isinstance(r, Refusal)
    assert (r.kind, r.limit) == (RATE_LIMITED, "tpm")
    assert r.retry_after == 40


# --- a cap lowered while a slot round is on its way ----------------------------------------


def test_a_max_concurrent_lowered_during_a_slot_round_is_not_exceeded_from_its_answer():
    """The slot round planned under max_concurrent 100 answered after the
    cap was lowered to 1: its answer (slots granted under the old cap) made
    the node not exhausted again, and it admitted from them until its next
    round: 5 requests in flight under a cap of 1 (bound: 1 + 1 x 1)."""
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(max_concurrent=100))])  # lease 5
    first = lim.admit("org", "key", reserve_usd=None)
    assert isinstance(first, Admission)
    first.settle(tokens=None, cost_usd=None)
    draws, slots = lim.plan(clock.seconds())  # the round starts...
    assert slots and slots[0].want == 5
    lim.set_org("org", [("org", None, Limits(max_concurrent=1))])  # ...the cap is lowered...
    # ...and PostgreSQL answers as it computed under the old cap
    lim.apply_draws(draws, [], clock.seconds())
    lim.apply_slots(slots, [SlotsHeld("org", 5, 0)], clock.seconds())
    in_flight = sum(
        isinstance(lim.admit("org", "key", reserve_usd=None), Admission) for _ in range(10)
    )
    assert in_flight <= 1 + 1, f"{in_flight} requests in flight under max_concurrent 1"
    assert in_flight >= 1
    answer(lim, clock.seconds())  # the next round gives the rest back
    assert lim.slots["org"].held <= 2


# --- the worst case of a legacy completions request with several prompts ------------------


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.integers(min_value=2, max_value=20),
    n=st.integers(min_value=1, max_value=4),
    tokenized=st.booleans(),
    max_tokens=st.integers(min_value=1, max_value=4_096),
)
def test_a_reservation_covers_every_prompt_of_a_legacy_completions_batch(
    prompts, n, tokenized, max_tokens
):
    """OpenAI's legacy completions take a list of prompts (strings, or lists
    of token ids) and answer n completions for each, each up to max_tokens:
    the reservation counted n completions in all, so a batch of 20 prompts
    could spend 20 times what it reserved."""
    prompt = [[1, 2, 3]] * prompts if tokenized else ["Say hi"] * prompts
    doc = {"model": "gpt-4o", "prompt": prompt, "n": n, "max_tokens": max_tokens}
    reserved = _reserved_by_the_step(doc)
    entry = _PRICING.resolve("openai", "gpt-4o")
    tokens = estimate_prompt_tokens(len(json.dumps(doc).encode()))
    out = prompts * n * max_tokens
    worst = cost_of(entry, Usage(tokens, out, tokens + out, source="provider"))
    assert reserved >= worst.cost_micro


def test_one_prompt_as_token_ids_or_a_one_element_list_reserves_one_completion():
    base = {"model": "gpt-4o", "max_tokens": 100}
    one = _reserved_by_the_step({**base, "prompt": "Say hi"})
    for same in ([1, 2, 3], ["Say hi"], [[1, 2, 3]], [], "Say hi, say hi"):
        assert _reserved_by_the_step({**base, "prompt": same}) <= one + 20  # (a longer body)
