"""The Requests page over 10,000 logged requests: how long the first render
takes (printed, not asserted: figures live in the output and in
docs/dashboard.md), keyset pagination through all of them, filters."""

from __future__ import annotations

import statistics
import time

import pytest

from tests.e2e.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser

ROWS = 10_000


@pytest.fixture(scope="module")
def busy_org(dash):
    org_id, _ = dash.new_org("busy")
    key_id = dash.stack.cli_json("keys", "list", org_id)["items"][0]["id"]
    dash.seed_requests(org_id, ROWS // 2, key_id=key_id, spacing_s=7)
    dash.seed_requests(org_id, ROWS - ROWS // 2, spacing_s=7.3)
    assert dash.sql("SELECT count(*) FROM request_logs WHERE org_id = %s", (org_id,)) == [(ROWS,)]
    return org_id, key_id


def test_first_render_with_10000_requests(dash, browser, busy_org):
    org_id, _ = busy_org
    browser.sign_in_with_token(ADMIN_TOKEN)
    timings = []
    for _ in range(5):
        browser.open(f"/orgs/{org_id}/requests")  # a fresh page load each time
        timings.append(browser.mark("lectr:requests:first-render"))
        assert len(browser.all("#requests tbody tr")) == 100
    navigation = browser.js(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {dom: n.domContentLoadedEventEnd, load: n.loadEventEnd}"
    )
    print(
        f"\nRequests page, {ROWS} requests in the table: first render (100 rows) "
        f"{statistics.median(timings):.0f} ms after navigation start "
        f"(median of {len(timings)}; runs: {', '.join(f'{t:.0f}' for t in timings)} ms; "
        f"DOMContentLoaded {navigation['dom']:.0f} ms)"
    )


def test_keyset_pagination_reaches_all_10000_rows(dash, browser, busy_org):
    org_id, _ = busy_org
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.open(f"/orgs/{org_id}/requests")
    browser.mark("lectr:requests:first-render")
    browser.find("#live").click()  # pause live updates while paging
    started = time.monotonic()
    clicks = browser.driver.execute_async_script(
        """
        const done = arguments[0];
        const more = document.getElementById('load-older');
        let clicks = 0;
        function step() {
          if (more.hidden) return done(clicks);
          if (more.disabled) return setTimeout(step, 5);
          clicks += 1;
          more.click();
          setTimeout(step, 5);
        }
        step();
        """
    )
    elapsed = time.monotonic() - started
    rows = browser.js(
        "const rows = [...document.querySelectorAll('#requests tbody tr')];"
        "return {n: rows.length, ids: new Set(rows.map(r => r.dataset.request)).size,"
        " sorted: rows.every((r, i) => i === 0 || rows[i - 1].dataset.created >= r.dataset.created)}"
    )
    assert rows == {"n": ROWS, "ids": ROWS, "sorted": True}
    assert browser.find("#row-count").text == f"{ROWS:,} requests shown."
    started_scroll = time.monotonic()
    browser.js("window.scrollTo(0, document.body.scrollHeight)")
    browser.js(
        "return document.querySelector('#requests tbody tr:last-child').getBoundingClientRect().top"
    )
    print(
        f"\nLoad older x{clicks} (200 rows each): all {ROWS} rows in the table after "
        f"{elapsed:.1f}s; scrolling to the last row {1000 * (time.monotonic() - started_scroll):.0f} ms"
    )


def test_filters_are_applied_and_kept_in_the_address(dash, browser, busy_org):
    org_id, key_id = busy_org
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.open(f"/orgs/{org_id}/requests")
    browser.mark("lectr:requests:first-render")
    browser.find("details.filters summary").click()
    browser.fill("Model", "o3-mini")
    browser.select("Status", "4xx")
    browser.select("Lectr key", key_id)
    renders = "return performance.getEntriesByName('lectr:requests:first-render').length"
    before = browser.js(renders)
    browser.button("Apply filters").click()
    browser.wait(lambda: browser.js(renders) > before, what="the filtered page")
    assert "model=o3-mini" in browser.js("return location.hash")
    cells = browser.js(
        "return [...document.querySelectorAll('#requests tbody tr')]"
        ".map(r => [r.cells[1].textContent, r.cells[3].textContent, r.cells[5].textContent])"
    )
    expected = dash.sql(
        "SELECT count(*) FROM request_logs WHERE org_id = %s AND model = 'o3-mini' "
        "AND status BETWEEN 400 AND 499 AND key_id = %s",
        (org_id, key_id),
    )[0][0]
    assert 0 < len(cells) == min(expected, 100)
    assert all(c[0] == "429" and c[1] == "o3-mini" and c[2] == "default" for c in cells)

    # a shared link opens the same view
    link = browser.js("return location.href")
    browser.driver.get(link)
    browser.mark("lectr:requests:first-render")
    assert browser.control("Model").get_attribute("value") == "o3-mini"
    assert len(browser.all("#requests tbody tr")) == len(cells)
