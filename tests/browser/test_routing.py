"""Routing and limits in the dashboard: a route made in the page serves the
OpenAI SDK (and its fallback shows on the request's page), explain shows the
plan or the refusal, a limit set in the page refuses the SDK, provider key
pools (weight, enabled, cool-down, a base URL's check), and the provider
catalogue of a global admin."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter

import openai
import pytest

from tests.browser.test_orgs import chat, sdk
from tests.e2e.conftest import ADMIN_TOKEN
from tests.support.fake_provider import OPENAI_KEY

pytestmark = pytest.mark.browser

MESSAGES = [{"role": "user", "content": "Hello from the routing test"}]


def eventually(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def routed(client: openai.OpenAI, model: str) -> dict[str, str]:
    """One chat completion; the x-lectr-route fields and the request id."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    fields = dict(part.strip().split("=", 1) for part in raw.headers["x-lectr-route"].split(";"))
    return {**fields, "request_id": raw.headers["x-lectr-request-id"]}


def pool(dash, org_id: str) -> dict[str, int]:
    """The proxy's OpenAI pool of the org as it is in memory now (explain
    reads it): key name -> weight, enabled keys only."""
    plan = dash.stack.cli_json("routes", "explain", org_id, "--model", "gpt-4o-mini")
    return {k["name"]: k["weight"] for k in plan["keys"]}


def not_near_a_minute_boundary() -> None:
    """Sleep past the end of the UTC minute when less than 15 s are left,
    so a per-minute count is not reset in the middle of a test."""
    left = 60 - time.time() % 60
    if left < 15:
        time.sleep(left + 0.5)


def row_cells(browser, css: str) -> list[str]:
    return browser.js(
        "const r = document.querySelector(arguments[0]);"
        "return r ? [...r.cells].map(c => c.textContent) : null",
        css,
    )


def test_a_route_made_in_the_page_serves_the_sdk_and_explain_shows_its_plan(dash, browser):
    org_id, key = dash.new_org()
    backup = dash.custom_provider()
    dash.add_provider_key(org_id, backup)
    client = sdk(dash, key)
    browser.expected_statuses.add(400)
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.go(f"/orgs/{org_id}/routes")
    browser.heading("Routes")
    browser.wait_text("No route yet.")

    # the API's refusal is shown in the form: targets of two dialects
    new_route = "form[aria-label='Create a route']"
    browser.fill("Route name", "smart", within=new_route)
    browser.select("Provider", "openai", within="fieldset[data-target='1']")
    browser.fill("Model", "gpt-4o-mini", within="fieldset[data-target='1']")
    browser.button("Add a target").click()
    browser.select("Provider", "anthropic", within="fieldset[data-target='2']")
    browser.fill("Model", "claude-3-5-haiku-latest", within="fieldset[data-target='2']")
    browser.button("Create route").click()
    alert = browser.find(f"{new_route} [role=alert]").text
    assert "every target of a route must speak one API dialect" in alert, alert

    # fixed: the second target is the custom provider
    browser.select("Provider", backup, within="fieldset[data-target='2']")
    browser.fill("Model", "gpt-4o", within="fieldset[data-target='2']")
    browser.control("timeout (no response headers in time)", within=new_route).click()  # off
    browser.fill("Attempt timeout, seconds (optional)", "20", within=new_route)
    browser.button("Create route").click()
    browser.wait_text("Saved the route smart")
    browser.find("tr[data-route='smart']")
    (stored,) = dash.stack.cli_json("routes", "list", org_id)["items"]
    assert stored["targets"] == [
        {"provider": "openai", "model": "gpt-4o-mini", "weight": 1},
        {"provider": backup, "model": "gpt-4o", "weight": 1},
    ]
    assert stored["strategy"] == "fallback" and stored["attempt_timeout"] == 20
    assert stored["retry_on"] == ["429", "5xx", "connect"]
    assert browser.control("Route name", within=new_route).get_attribute("value") == ""

    # the SDK uses it (live within a second), then falls back on a 503
    first = eventually(
        lambda: (r := routed(client, "smart"))["route"] == "smart" and r, "the route"
    )
    assert (first["provider"], first["model"], first["attempt"]) == ("openai", "gpt-4o-mini", "1")
    dash.stack.fake.next(status=503, body='{"error": {"message": "overloaded"}}')
    second = routed(client, "smart")
    assert (second["route"], second["provider"], second["model"], second["attempt"]) == (
        "smart",
        backup,
        "gpt-4o",
        "2",
    )

    # the Requests page has a Route column; the request's page its attempts
    browser.go(f"/orgs/{org_id}/requests")
    browser.heading("Requests")
    row = f"tr[data-request='{second['request_id']}']"
    browser.find(row)
    assert browser.find("#requests").get_attribute("class") == ""  # the Route column shows
    headers = browser.texts("#requests thead th")
    cells = row_cells(browser, row)
    assert cells[headers.index("Route")] == "smart" and cells[headers.index("Provider")] == backup
    browser.find(f"{row} td a").click()
    browser.heading("Request")
    browser.find("#attempts")
    text = browser.text()
    assert "Route\nsmart" in text and "Attempts\n2 (1 abandoned)" in text, text
    assert f"Provider key\ndefault ({backup} …{OPENAI_KEY[-4:]})" in text, text
    assert row_cells(browser, "#attempts tr[data-attempt='1']") == [
        "1",
        "openai",
        "gpt-4o-mini",
        "default",
        "abandoned",
        "5xx",
        "503",
    ]
    assert row_cells(browser, "#attempts tr[data-attempt='2']") == [
        "2",
        backup,
        "gpt-4o",
        "default",
        "answered",
        "—",
        "200",
    ]

    # explain, from the route's row: both attempts, in order, and the keys
    browser.go(f"/orgs/{org_id}/routes")
    browser.heading("Routes")
    browser.find("button[aria-label='Explain smart']").click()
    browser.find("[data-explain='plan']")
    attempts = browser.texts("#explain-result tr[data-attempt]")
    assert attempts == ["1\topenai\tgpt-4o-mini\tdefault", f"2\t{backup}\tgpt-4o\tdefault"]
    assert len(browser.all("#explain-result tr[data-explain-key]")) == 2
    assert "smart (fallback; retry on 429, 5xx, connect" in browser.text()

    # a cool-down shows in the plan: the openai key is rate-limited for 120 s
    dash.stack.fake.next(
        status=429, headers={"retry-after": "120"}, body='{"error": {"message": "slow down"}}'
    )
    assert routed(client, "smart")["provider"] == backup
    browser.fill("Session (x-lectr-session, optional)", "conversation-1")
    browser.find("form[aria-label='Explain a request'] button[type=submit]").click()
    browser.wait(
        lambda: re.search(
            r"rate limited \(429\) set aside for 1[12]\d s more \(until \d\d:\d\d:\d\d UTC\)",
            browser.text(),
        ),
        what="the cool-down",
    )

    # a refusal: no Anthropic key
    browser.fill("Model", "claude-3-5-haiku-latest", within="form[aria-label='Explain a request']")
    browser.fill("Proxy path", "/v1/messages")
    browser.find("form[aria-label='Explain a request'] button[type=submit]").click()
    refused = browser.find("[data-explain='refused']").text
    assert "Refused: 403" in refused and "No Anthropic key" in refused, refused

    # replace it (one target), then delete it
    browser.find("button[aria-label='Edit smart']").click()
    replace_form = "form[aria-label='Replace the route smart']"
    browser.find(replace_form)
    assert browser.control("Route name", within=replace_form).get_attribute("readonly")
    browser.find(f"{replace_form} fieldset[data-target='2'] .remove-target").click()
    browser.fill("Model", "gpt-4.1-mini", within=f"{replace_form} fieldset[data-target='1']")
    browser.button("Save smart").click()
    browser.wait_text("Saved the route smart")
    (stored,) = dash.stack.cli_json("routes", "list", org_id)["items"]
    assert stored["targets"] == [{"provider": "openai", "model": "gpt-4.1-mini", "weight": 1}]
    eventually(lambda: routed(client, "smart")["model"] == "gpt-4.1-mini", "the new target")

    browser.find("button[aria-label='Delete smart']").click()
    assert browser.confirm_dialog("Delete") == "Delete the route smart?"
    browser.wait_text("Deleted the route smart.")
    browser.wait_text("No route yet.")
    assert dash.stack.cli_json("routes", "list", org_id)["items"] == []
    eventually(lambda: routed(client, "smart")["route"] == "-", "the route gone")


def test_an_rpm_limit_set_in_the_page_refuses_the_sdk(dash, browser):
    org_id, key = dash.new_org()
    key_id = dash.stack.cli_json("keys", "list", org_id)["items"][0]["id"]
    client = sdk(dash, key)
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.go(f"/orgs/{org_id}/limits")
    browser.heading("Limits")
    org_form = "form[aria-label='Organization']"
    assert browser.control("Requests per minute", within=org_form).get_attribute("value") == ""
    browser.fill("Requests per minute", "2", within=org_form)
    browser.button("Save limits").click()
    browser.wait_text("Saved: effective on every node within a second.")
    shown = dash.stack.cli_json("limits", "show", org_id)
    assert (shown["rpm"], shown["tpm"], shown["usd_per_day"]) == (2, None, None)
    not_near_a_minute_boundary()

    # the SDK is refused once the minute's requests are spent
    refused = None
    for _ in range(20):
        try:
            chat(client)
        except openai.RateLimitError as e:
            refused = e
            break
    assert refused is not None, "the SDK was never refused"
    # "... reached (2/min)", or while this node waits for its next lease: "... (2/min): no
    # allowance on this node for a moment"
    assert "requests per minute limit of the organization" in str(refused), str(refused)
    assert "(2/min)" in str(refused)

    # the page shows the minute's count next to the cap, as the API reports it (the page
    # refreshes it by itself)
    used = "section[aria-labelledby='org-limits'] tr[data-limit='rpm'] .usage-cell"

    def same_as_the_api():
        n = dash.stack.cli_json("limits", "show", org_id)["usage"]["requests_this_minute"]
        return n >= 1 and browser.find(used).text.startswith(
            f"{n} this minute (UTC) ({min(100, n * 50)} %)"
        )

    browser.wait(same_as_the_api, what="the usage of the minute", timeout=15)

    # a key's own limits, from the keys' table
    browser.find("a[aria-label='Edit the limits of default']").click()
    key_form = "form[aria-label^='Key default']"
    browser.find(key_form)
    browser.fill("USD per day", "12.5", within=key_form)
    browser.fill("Concurrent requests", "3", within=key_form)
    browser.find(f"{key_form} button[type=submit]").click()
    browser.wait(lambda: "Saved" in browser.find(f"{key_form} .form-result").text, what="saved")
    key_limits = dash.stack.cli_json("limits", "show", org_id, "--key", key_id)
    assert (key_limits["usd_per_day"], key_limits["max_concurrent"], key_limits["rpm"]) == (
        "12.50",
        3,
        None,
    )
    assert browser.control("USD per day", within=key_form).get_attribute("value") == "12.50"
    # the keys' table follows
    browser.wait(
        lambda: "$12.50" in " ".join(browser.texts(f"tr[data-key-limits='{key_id}']")),
        what="the keys' table",
    )

    # clearing the org's cap lets the SDK through again
    browser.fill("Requests per minute", "", within=org_form)
    browser.find(f"{org_form} button[type=submit]").click()
    browser.wait(lambda: "Saved" in browser.find(f"{org_form} .form-result").text, what="saved")
    assert dash.stack.cli_json("limits", "show", org_id)["rpm"] is None

    def passes():
        try:
            chat(client)
            return True
        except openai.RateLimitError:
            return False

    eventually(passes, "the SDK admitted again")


def test_provider_key_pool_weight_enabled_and_cooldown(dash, browser):
    org_id, key = dash.new_org()
    client = sdk(dash, key)
    browser.expected_statuses.add(400)
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.go(f"/orgs/{org_id}/provider-keys")
    browser.heading("Provider keys")

    # a second OpenAI key, weight 3, added in the page
    add_form = "form[aria-label='Add a provider key']"
    browser.select("Provider", "openai", within=add_form)
    assert not browser.control("Base URL", within=add_form).is_displayed()
    browser.fill("API key", OPENAI_KEY, within=add_form)
    browser.fill("Name (optional)", "team-b", within=add_form)
    browser.fill("Weight", "3", within=add_form)
    browser.button("Check and add").click()
    browser.wait_text(f"Added the openai key …{OPENAI_KEY[-4:]}.")
    browser.wait(lambda: len(browser.all("tr[data-provider-key]")) == 2, what="two keys")
    keys = {k["name"]: k for k in dash.stack.cli_json("provider-keys", "list", org_id)["items"]}
    assert keys["team-b"]["weight"] == 3 and keys["default"]["weight"] == 1

    # the default key's weight: 1 -> 2, in its row
    default_row = f"tr[data-provider-key='{keys['default']['id']}']"
    weight = browser.find(f"{default_row} input[name=weight]")
    weight.clear()
    weight.send_keys("2")
    browser.find(f"{default_row} button[type=submit]").click()
    browser.wait_text(f"The openai key …{OPENAI_KEY[-4:]} has weight 2.")
    weights = {
        k["name"]: k["weight"]
        for k in dash.stack.cli_json("provider-keys", "list", org_id)["items"]
    }
    assert weights == {"default": 2, "team-b": 3}
    # the focus stays on the redrawn row's control
    assert browser.js("return document.activeElement.getAttribute('aria-label')") == (
        f"Save the weight of the openai key …{OPENAI_KEY[-4:]}"
    )

    # the proxy spreads requests 2:3 (smooth weighted round-robin)
    eventually(lambda: pool(dash, org_id) == {"default": 2, "team-b": 3}, "the new weight")
    spread = Counter(routed(client, "gpt-4o-mini")["key"] for _ in range(50))
    assert abs(spread["default"] - 20) <= 2 and abs(spread["team-b"] - 30) <= 2, spread

    # disable team-b (with a confirmation): every request goes to the default key
    team_b = f"tr[data-provider-key='{keys['team-b']['id']}']"
    browser.find(f"{team_b} .key-switch").click()
    browser.confirm_dialog("Disable")
    browser.wait_text(f"The openai key …{OPENAI_KEY[-4:]} is disabled.")
    assert browser.find(f"{team_b} .key-switch").get_attribute("aria-checked") == "false"
    listed = {
        k["name"]: k["enabled"]
        for k in dash.stack.cli_json("provider-keys", "list", org_id)["items"]
    }
    assert listed == {"default": True, "team-b": False}
    eventually(lambda: pool(dash, org_id) == {"default": 2}, "team-b out of the pool")
    assert {routed(client, "gpt-4o-mini")["key"] for _ in range(5)} == {"default"}

    # a 429 sets the default key aside: its cool-down shows after a reload
    browser.find(f"{team_b} .key-switch").click()  # enabling asks nothing
    browser.wait_text(f"The openai key …{OPENAI_KEY[-4:]} is enabled.")
    eventually(lambda: len(pool(dash, org_id)) == 2, "team-b back in the pool")
    dash.stack.fake.next(
        status=429, headers={"retry-after": "90"}, body='{"error": {"message": "slow"}}'
    )
    first = routed(client, "gpt-4o-mini")
    assert first["attempt"] == "2"  # the other key answered
    browser.open(f"/orgs/{org_id}/provider-keys")
    browser.heading("Provider keys")
    cooling = browser.wait(
        lambda: [t for t in browser.texts("tr[data-provider-key]") if "rate limited (429)" in t],
        what="the cool-down",
    )
    assert len(cooling) == 1 and " until " in cooling[0] and " UTC" in cooling[0], cooling

    # Azure keys name their endpoint: the field appears, and the API's check is shown
    browser.select("Provider", "azure", within=add_form)
    assert browser.control("Base URL", within=add_form).is_displayed()
    browser.fill("API key", OPENAI_KEY, within=add_form)
    browser.fill("Base URL", "https://example.com", within=add_form)
    browser.button("Check and add").click()
    message = browser.find(f"{add_form} [role=alert]").text
    assert message.startswith("The key was not added: base_url must name a") and "azure" in message
    assert OPENAI_KEY not in browser.text()


def test_the_provider_catalogue(dash, browser):
    name = f"vllm-{uuid.uuid4().hex[:6]}"
    base = dash.stack.fake.origin + "/openai"
    org_id, key = dash.new_org()
    browser.expected_statuses.update({400, 409})
    browser.sign_in_with_token(ADMIN_TOKEN)
    next(a for a in browser.all("header nav a") if a.text == "Providers").click()
    browser.heading("Providers")
    browser.find("tr[data-catalogue='openai']")
    assert not browser.all("tr[data-catalogue='openai'] button")  # built-ins are read-only

    add_form = "form[aria-label='Add a custom provider']"
    browser.fill("Name", name, within=add_form)
    browser.fill("Display name (optional)", "Team vLLM", within=add_form)
    browser.fill("Base URL", base + "/v1", within=add_form)
    browser.button("Add provider").click()
    alert = browser.find(f"{add_form} [role=alert]").text
    assert "base_url must not end with /v1" in alert, alert
    browser.fill("Base URL", base, within=add_form)
    browser.button("Add provider").click()
    browser.wait_text(f"Added {name}: served on /{name}/v1/…")
    row = f"tr[data-catalogue='{name}']"
    assert "custom" in browser.find(row).text and "Team vLLM" in browser.find(row).text
    listed = {p["name"]: p for p in dash.stack.cli_json("catalogue", "list")["items"]}
    assert listed[name]["base_url"] == base and listed[name]["custom"] is True

    # it is live: an org adds a key for it and the SDK calls it on /<name>/v1
    dash.add_provider_key(org_id, name)
    client = openai.OpenAI(base_url=f"{dash.stack.proxy}/{name}/v1", api_key=key, max_retries=0)
    assert chat(client).choices[0].message.content

    # edit: the display name
    browser.find(f"button[aria-label='Edit {name}']").click()
    edit_form = f"form[aria-label='Replace {name}']"
    browser.find(edit_form)
    browser.fill("Display name (optional)", "Team vLLM (GPU)", within=edit_form)
    browser.button(f"Save {name}").click()
    browser.wait_text(f"Saved {name}")
    browser.wait(lambda: "Team vLLM (GPU)" in browser.find(row).text, what="the new name")

    # delete: refused while a key uses it (the API's message), then done
    browser.find(f"button[aria-label='Delete {name}']").click()
    browser.confirm_dialog("Delete")
    alert = browser.find("main > div[aria-live] [role=alert]").text
    assert "still used by 1 provider key" in alert, alert
    key_id = next(
        k["id"]
        for k in dash.stack.cli_json("provider-keys", "list", org_id)["items"]
        if k["provider"] == name
    )
    dash.stack.cli("provider-keys", "delete", org_id, key_id)
    browser.find(f"button[aria-label='Delete {name}']").click()
    browser.confirm_dialog("Delete")
    browser.wait_text(f"Deleted {name}.")
    browser.wait(lambda: not browser.all(row), what="the row gone")
    assert name not in {p["name"] for p in dash.stack.cli_json("catalogue", "list")["items"]}


def test_routes_and_pool_keys_by_keyboard(dash, browser):
    from selenium.webdriver.common.keys import Keys

    org_id, _ = dash.new_org()
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.go(f"/orgs/{org_id}/routes")
    browser.heading("Routes")
    new_route = "form[aria-label='Create a route']"
    browser.find(new_route)

    def active():
        return browser.driver.switch_to.active_element

    def tab_to(element, limit: int = 80) -> None:
        for _ in range(limit):
            if active() == element:
                break
            active().send_keys(Keys.TAB)
        assert active() == element, element.get_attribute("outerHTML")[:120]
        outline = browser.js("return getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none", "no visible focus"

    browser.find("body").send_keys(Keys.TAB)
    tab_to(browser.control("Route name", within=new_route))
    active().send_keys("by-keyboard")
    tab_to(browser.control("Model", within="fieldset[data-target='1']"))
    active().send_keys("gpt-4o-mini")
    tab_to(browser.button("Add a target"))
    active().send_keys(Keys.ENTER)
    # the new target's first control has the focus
    assert active() == browser.control("Provider", within="fieldset[data-target='2']")
    active().send_keys(Keys.TAB, "gpt-4o", Keys.ENTER)  # its model; Enter sends the form
    browser.wait_text("Saved the route by-keyboard")
    (stored,) = dash.stack.cli_json("routes", "list", org_id)["items"]
    assert [t["model"] for t in stored["targets"]] == ["gpt-4o-mini", "gpt-4o"]

    # a pool key's switch: Space asks, Escape cancels, Enter and the dialog's button disable
    browser.go(f"/orgs/{org_id}/provider-keys")
    browser.heading("Provider keys")
    switch = browser.find(".key-switch")
    label = switch.get_attribute("aria-label")
    tab_to(switch)
    switch.send_keys(Keys.SPACE)
    browser.find("dialog[open]")
    assert active().text == "Cancel"
    active().send_keys(Keys.ESCAPE)
    browser.wait(lambda: not browser.all("dialog[open]"), what="the dialog to close")
    assert active() == switch and switch.get_attribute("aria-checked") == "true"
    switch.send_keys(Keys.ENTER)
    browser.find("dialog[open]")
    active().send_keys(Keys.TAB)
    assert active().text == "Disable"
    active().send_keys(Keys.ENTER)
    browser.wait_text("is disabled.")
    # the list was redrawn; the keyboard is still on the key's switch
    browser.wait(
        lambda: browser.js("return document.activeElement.getAttribute('aria-label')") == label,
        what="the focus back on the switch",
    )
    assert browser.find(".key-switch").get_attribute("aria-checked") == "false"
    assert dash.stack.cli_json("provider-keys", "list", org_id)["items"][0]["enabled"] is False
