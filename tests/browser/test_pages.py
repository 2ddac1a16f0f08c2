"""Every page at 390 px and 1280 px: no sideways scrolling, a label on every
control, no console error; a screenshot of each into artifacts/screenshots/.
And the keyboard: every action reachable, with a visible focus."""

from __future__ import annotations

import time

import openai
import pytest
from selenium.webdriver.common.keys import Keys

from tests.e2e.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser

WIDTHS = (390, 1280)


@pytest.fixture(scope="module")
def showcase(dash):
    """An org with some history: requests (one real, through the SDK), keys,
    a member."""
    org_id, key = dash.new_org("acme")
    key_id = dash.stack.cli_json("keys", "list", org_id)["items"][0]["id"]
    dash.seed_requests(org_id, 2000, key_id=key_id, spacing_s=300)
    client = openai.OpenAI(base_url=dash.stack.proxy + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    dash.stack.cli("keys", "create", org_id, "--name", "ci")
    dash.stack.cli("members", "add", org_id, "--subject", "oidc|owner", "--role", "owner")
    dash.stack.cli("members", "add", org_id, "--subject", "oidc|reader", "--role", "member")
    # routing and limits: a pool of two keys, a route with a fallback, caps
    backup = dash.custom_provider()
    dash.add_provider_key(org_id, backup, "--name", "vllm")
    dash.add_provider_key(org_id, "openai", "--name", "team-b", "--weight", "3")
    dash.stack.cli(
        "routes",
        "set",
        org_id,
        "smart",
        "--target",
        "openai:gpt-4o-mini",
        "--target",
        f"{backup}:gpt-4o",
        "--attempt-timeout",
        "20",
    )
    dash.stack.cli("limits", "set", org_id, "--rpm", "600", "--tpm", "200000")
    dash.stack.cli("limits", "set", org_id, "--usd-per-day", "50", "--usd-per-month", "1000")
    dash.stack.cli(
        "limits", "set", org_id, "--key", "ci", "--concurrent", "4", "--usd-per-day", "5"
    )
    for _ in range(3):
        client.chat.completions.create(model="smart", messages=[{"role": "user", "content": "hi"}])
    # the last request falls back: the request page shows its attempts
    dash.stack.fake.next(status=503, body='{"error": {"message": "overloaded"}}')
    client.chat.completions.create(model="smart", messages=[{"role": "user", "content": "hi"}])
    return org_id


def settle(browser, heading: str) -> None:
    browser.heading(heading)
    browser.wait(
        lambda: not browser.all("main .loading") and not browser.all("[aria-busy=true]"),
        what="the page to load",
    )


def check_page(browser, name: str) -> None:
    assert browser.overflow() == 0, f"{name} at {browser.width}px scrolls sideways"
    assert browser.unlabelled_controls() == [], name
    browser.screenshot(name)


def test_every_page_at_both_widths(dash, browser, showcase):
    org_id = showcase
    # the request that fell back (its row is written by the flusher within
    # about a second of the answer)
    deadline = time.monotonic() + 15
    while True:
        found = dash.sql(
            "SELECT request_id FROM request_logs WHERE org_id = %s AND attempts > 1 "
            "ORDER BY created_at DESC LIMIT 1",
            (org_id,),
        )
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found, "the fallen-back request was never logged"
    request_id = found[0][0]
    ci_key = next(
        k["id"] for k in dash.stack.cli_json("keys", "list", org_id)["items"] if k["name"] == "ci"
    )
    pages = [
        ("orgs", "/orgs", "Organizations"),
        ("overview", f"/orgs/{org_id}", "acme"),
        ("requests", f"/orgs/{org_id}/requests", "Requests"),
        ("request", f"/orgs/{org_id}/requests/{request_id}", "Request"),
        ("usage", f"/orgs/{org_id}/usage?range=7d&bucket=hour&by=model", "Usage"),
        ("keys", f"/orgs/{org_id}/keys", "Lectr keys"),
        ("provider-keys", f"/orgs/{org_id}/provider-keys", "Provider keys"),
        ("providers", f"/orgs/{org_id}/providers", "Providers & models"),
        ("members", f"/orgs/{org_id}/members", "Members"),
        ("routes", f"/orgs/{org_id}/routes", "Routes"),
        ("limits", f"/orgs/{org_id}/limits?key={ci_key}", "Limits"),
        ("catalogue", "/providers", "Providers"),
    ]
    for width in WIDTHS:
        browser.viewport(width)
        browser.open()
        settle(browser, "Sign in to Lectr")
        check_page(browser, "signin")
    browser.sign_in_with_token(ADMIN_TOKEN)
    for width in WIDTHS:
        browser.viewport(width)
        for name, route, heading in pages:
            browser.open(route)
            settle(browser, heading)
            if name == "request":
                browser.wait_text("Request id")
                browser.find("#attempts tr[data-outcome='abandoned']")
            if name == "routes":
                browser.find("button[aria-label='Explain smart']").click()
                browser.find("[data-explain='plan'] tr[data-attempt='2']")
            if name == "limits":
                browser.find("section[aria-labelledby='key-limits'] input[name=rpm]")
                browser.find("tr[data-key-limits]")
            if name == "usage":
                browser.wait(lambda: browser.all("figure.chart svg rect"), what="the charts")
            check_page(browser, name)


def test_keyboard_only(dash, browser, showcase):
    org_id = showcase
    browser.sign_in_with_token(ADMIN_TOKEN)
    switch = browser.find(f"tr[data-org='{org_id}'] .kill-switch")
    body = browser.find("body")

    def active():
        return browser.driver.switch_to.active_element

    def focus_ring() -> tuple[str, float]:
        return tuple(
            browser.js(
                "const s = getComputedStyle(document.activeElement);"
                "return [s.outlineStyle, parseFloat(s.outlineWidth)]"
            )
        )

    # Tab reaches the kill switch, with a visible focus ring
    body.send_keys(Keys.TAB)
    for _ in range(60):
        if active() == switch:
            break
        active().send_keys(Keys.TAB)
    assert active() == switch, "the kill switch cannot be reached with Tab"
    style, width = focus_ring()
    assert style != "none" and width >= 2

    # Enter opens the confirmation with the focus on Cancel; Escape closes it
    switch.send_keys(Keys.ENTER)
    browser.find("dialog[open]")
    assert active().text == "Cancel"
    active().send_keys(Keys.ESCAPE)
    browser.wait(lambda: not browser.all("dialog[open]"), what="the dialog to close")
    assert active() == switch and switch.get_attribute("aria-checked") == "true"

    # a form, filled and sent with the keyboard
    name_field = browser.control("Name", within="form[aria-label='Create an organization']")
    for _ in range(60):
        if active() == name_field:
            break
        active().send_keys(Keys.TAB)
    assert active() == name_field
    assert focus_ring()[0] != "none"
    name_field.send_keys("typed-by-keyboard", Keys.ENTER)
    browser.wait_text("Created typed-by-keyboard.")

    # the org's tabs are links in the tab order
    browser.go(f"/orgs/{org_id}")
    settle(browser, "acme")
    usage_tab = next(a for a in browser.all("nav.tabs a") if a.text == "Usage")
    body.send_keys(Keys.TAB)
    for _ in range(40):
        if active() == usage_tab:
            break
        active().send_keys(Keys.TAB)
    assert active() == usage_tab
    usage_tab.send_keys(Keys.ENTER)
    settle(browser, "Usage")
