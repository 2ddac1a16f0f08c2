"""A limit lowered within its window (docs/limits.md): what a node already
holds under the old cap is spendable only as far as the new cap allows.
Reuses the limiter fixture and the hand-written lease round of
tests/test_limits_limiter.py."""

from __future__ import annotations

from decimal import Decimal

from lectr.limits import Admission
from lectr.limits.model import Limits
from tests.test_limits_limiter import answer, limiter


def test_a_lowered_daily_budget_is_not_overspent_from_the_lease_held_under_the_old_one():
    """An admin lowers usd_per_day from $1000 to $10 after $30 was spent
    today: docs/limits.md bounds a day at cap + N x (L + R) = 10 + 1 x
    (0.50 + 1) = $11.50, so nothing more may be admitted - not from the $50
    lease the node drew under the old cap either."""
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(usd_per_day=Decimal("1000")))])  # lease $50
    for _ in range(30):
        a = lim.admit("org", "key", reserve_usd=Decimal("1"))
        assert isinstance(a, Admission)
        a.settle(tokens=10, cost_usd=Decimal("1"))
        answer(lim, clock.seconds())
    day = lim.scopes["org"].day
    assert day.spent == 30_000_000 and day.held > 30_000_000
    # the admin lowers the budget below what was already spent today
    lim.set_org("org", [("org", None, Limits(usd_per_day=Decimal("10")))])
    answer(lim, clock.seconds())  # the node hears of the cluster (as every 0.5 s)
    admitted = 0
    for _ in range(100):
        a = lim.admit("org", "key", reserve_usd=Decimal("1"))
        if isinstance(a, Admission):
            admitted += 1
            a.settle(tokens=10, cost_usd=Decimal("1"))
        answer(lim, clock.seconds())
    assert admitted == 0, f"${admitted} more spent under a $10 budget already at $30"


def test_a_lowered_rpm_is_not_exceeded_from_the_lease_held_under_the_old_one():
    """rpm lowered from 1000 to 10 within a minute in which 5 requests were
    admitted: at most cap + N x L = 10 + 1 requests in the minute."""
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(rpm=1000))])  # lease 50
    total = 0
    for _ in range(5):
        total += isinstance(lim.admit("org", "key", reserve_usd=None), Admission)
        answer(lim, clock.seconds())
    lim.set_org("org", [("org", None, Limits(rpm=10))])  # lease 1
    answer(lim, clock.seconds())
    for _ in range(100):
        total += isinstance(lim.admit("org", "key", reserve_usd=None), Admission)
        answer(lim, clock.seconds())
    assert total <= 11, f"{total} requests admitted in a minute under rpm 10"
