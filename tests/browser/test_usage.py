"""The Usage page: its totals are `lectr usage`'s for the same range, its
charts are drawn, and its breakdown names Lectr keys."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser


def cli_totals(dash, org_id: str, since: str, until: str, by: str) -> dict[str, int]:
    doc = dash.stack.cli_json("usage", org_id, "--since", since, "--until", until, "--by", by)
    fields = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
    return {f: sum(item[f] for item in doc["items"]) for f in fields}


@pytest.mark.parametrize(("range_", "bucket"), [("7d", "hour"), ("30d", "day")])
def test_usage_totals_match_the_cli(dash, browser, range_, bucket):
    org_id, _ = dash.new_org()
    key_id = dash.stack.cli_json("keys", "list", org_id)["items"][0]["id"]
    dash.seed_requests(org_id, 600, key_id=key_id, spacing_s=600)  # ~4 days
    dash.seed_requests(org_id, 300, spacing_s=3000)  # ~10 days, no key
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.open(f"/orgs/{org_id}/usage?range={range_}&bucket={bucket}&by=key")
    browser.heading("Usage")
    rng = browser.find("#usage-range")
    since, until = rng.get_attribute("data-since"), rng.get_attribute("data-until")
    shown = browser.js(
        "return Object.fromEntries([...document.querySelectorAll('[data-total]')]"
        ".map(e => [e.dataset.total, e.textContent]))"
    )
    for by in (bucket, "model", "key"):  # every grouping has the same totals
        cli = cli_totals(dash, org_id, since, until, by)
        assert {k: int(v.replace(",", "")) for k, v in shown.items() if k != "cost_usd"} == cli
    # the seeded rows carry no cost: $0.00, and the page says how many are unpriced
    assert shown["cost_usd"] == "$0.00"
    note = browser.find("[data-note=cost_usd]").text
    assert note == f"{int(shown['requests'].replace(',', '')):,} requests without a price"
    expected = (
        900
        if range_ == "30d"
        else dash.sql(
            # totals cover whole hours: the range widened to them
            "SELECT count(*) FROM request_logs WHERE org_id = %s "
            "AND created_at >= date_trunc('hour', %s::timestamptz) "
            "AND created_at < date_trunc('hour', %s::timestamptz - interval '1 microsecond') "
            "+ interval '1 hour'",
            (org_id, since, until),
        )[0][0]
    )
    assert int(shown["requests"].replace(",", "")) == expected
    # the CLI command the page shows gives these totals
    assert f"lectr usage {org_id} --since {since} --until {until} --by {bucket}" in browser.text()

    # charts: requests and tokens, drawn
    captions = [c.text for c in browser.all("figure.chart figcaption .chart-title")]
    assert captions == ["Requests", "Tokens"]
    assert len(browser.all("figure.chart svg rect.c0")) > 10
    # the breakdown by Lectr key names the key
    rows = browser.js(
        "return [...document.querySelectorAll('main table tbody tr')].map(r => r.cells[0].textContent)"
    )
    assert sorted(rows) == ["(no key recorded)", "default"]


def test_a_long_hourly_range_is_shown_by_day(dash, browser):
    org_id, _ = dash.new_org()
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.open(
        f"/orgs/{org_id}/usage?range=custom&since=2025-01-01T00:00&until=2025-03-01T00:00&bucket=hour"
    )
    browser.wait_text("Hourly totals cover at most 31 days: shown by day.")
    assert browser.find("[data-total=requests]").text == "0"
    assert len(browser.all("figure.chart")) == 2
