"""The Usage page's "this month" in the first second of a UTC month: the
range was cut to whole seconds, so since (the month's start) equalled until,
the API refused it (since must be earlier than until) and the page showed
an error for that second."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tests.e2e.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser

# 2026-12-01T00:00:00.400Z: inside the month's first second
MONTH_START_MS = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000)

# Date frozen at a moment before any of the page's scripts run (timers do
# not use Date, so the page runs as usual)
_FROZEN_DATE = """
(() => {
  const Real = Date;
  const fixed = %d;
  class Frozen extends Real {
    constructor(...args) { if (args.length === 0) { super(fixed); } else { super(...args); } }
    static now() { return fixed; }
  }
  globalThis.Date = Frozen;
})();
"""


@pytest.mark.parametrize("offset_ms", [0, 400, 999])
def test_this_month_in_its_first_second(dash, browser, offset_ms):
    org_id, _ = dash.new_org()
    browser.sign_in_with_token(ADMIN_TOKEN)
    frozen = browser.driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": _FROZEN_DATE % (MONTH_START_MS + offset_ms)},
    )
    try:
        browser.open(f"/orgs/{org_id}/usage?range=month&bucket=hour")
        assert browser.js("return Date.now()") == MONTH_START_MS + offset_ms
        browser.heading("Usage")
        rng = browser.find("#usage-range")
        assert rng.get_attribute("data-since") == "2026-12-01T00:00:00Z"
        assert rng.get_attribute("data-until") == "2026-12-01T01:00:00Z"
        assert "earlier than" not in browser.text(), json.dumps(browser.text())
    finally:
        browser.driver.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": frozen["identifier"]}
        )
