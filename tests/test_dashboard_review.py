"""The Usage page in a real Chromium (the fixtures of tests/browser/): the
range it names is the one its totals are for, and a custom range that the
API widens to whole hours is not refused for hourly totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.browser.conftest import browser, chromium_available, dash  # noqa: F401 (fixtures)
from tests.e2e.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser


def _minute(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M")


def _shown_range(browser) -> tuple[datetime, datetime]:  # noqa: F811
    text = browser.find("#usage-range").text  # "2026-12-05 18:00:00 → 2026-12-05 21:00:00 UTC"
    start, _, end = text.removesuffix(" UTC").partition(" → ")
    return (
        datetime.fromisoformat(start).replace(tzinfo=UTC),
        datetime.fromisoformat(end).replace(tzinfo=UTC),
    )


def test_the_range_shown_is_the_range_the_totals_cover(dash, browser):  # noqa: F811
    """The API counts whole hours (since rounded down, until up): the page
    names that range, not the one asked for, so that the request count it
    shows is the count of requests in the range it shows."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    org_id, _ = dash.new_org()
    dash.seed_requests(org_id, 360, spacing_s=60)  # one a minute over the last 6 hours
    asked_since, asked_until = hour - timedelta(hours=4, minutes=30), hour - timedelta(minutes=30)
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.open(
        f"/orgs/{org_id}/usage?range=custom&since={_minute(asked_since)}"
        f"&until={_minute(asked_until)}&bucket=hour&by=model"
    )
    browser.heading("Usage")
    since, until = _shown_range(browser)
    requests = int(browser.find("[data-total=requests]").text.replace(",", ""))
    in_range = dash.sql(
        "SELECT count(*) FROM request_logs WHERE org_id = %s AND created_at >= %s "
        "AND created_at < %s",
        (org_id, since, until),
    )[0][0]
    assert (since, until) == (hour - timedelta(hours=5), hour)
    assert requests == in_range > 0
    # the command the page shows names the same range
    rng = browser.find("#usage-range")
    assert (rng.get_attribute("data-since"), rng.get_attribute("data-until")) == (
        since.strftime("%Y-%m-%dT%H:%M:%SZ"),
        until.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    assert (
        f"lectr usage {org_id} --since {since:%Y-%m-%dT%H:%M:%SZ} "
        f"--until {until:%Y-%m-%dT%H:%M:%SZ} --by hour" in browser.text()
    )


def test_an_hourly_range_of_31_days_off_the_hour_is_shown_by_day(dash, browser):  # noqa: F811
    """31 days from 00:30 to 00:30 is 31 days and an hour once widened to
    whole hours: more than hourly totals cover. The page asks by day (and
    says so) instead of showing the API's refusal."""
    org_id, _ = dash.new_org()
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.open(
        f"/orgs/{org_id}/usage?range=custom&since=2025-01-01T00:30&until=2025-02-01T00:30"
        "&bucket=hour"
    )
    browser.heading("Usage")
    browser.find("#usage-range")
    assert browser.all(".state.error") == []
    assert "Hourly totals cover at most 31 days: shown by day." in browser.text()
    assert browser.find("[data-total=requests]").text == "0"
    assert _shown_range(browser) == (
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 2, 1, 1, tzinfo=UTC),
    )
