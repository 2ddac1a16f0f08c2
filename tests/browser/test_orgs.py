"""The operator's daily work in the dashboard: create an org and copy its
key, watch its requests arrive live, flip the kill switch, add provider
keys (and see a refusal), and what a read-only member sees."""

from __future__ import annotations

import re
import time
import uuid

import openai
import pytest

from tests.browser.conftest import allow_issuer
from tests.e2e.conftest import ADMIN_TOKEN
from tests.support.fake_provider import OPENAI_KEY

pytestmark = pytest.mark.browser


def sdk(dash, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=dash.stack.proxy + "/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI, model: str = "gpt-4o-mini"):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello from the dashboard test"}]
    )


def test_create_an_org_copy_its_key_and_see_requests_live(dash, browser):
    name = f"live-{uuid.uuid4().hex[:6]}"
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.fill("Name", name, within="form[aria-label='Create an organization']")
    browser.button("Create").click()
    browser.wait_text(f"Created {name}.")
    shown = browser.find("input[data-secret]").get_attribute("value")
    assert shown.startswith("lc_") and len(shown) == 39
    browser.button("Copy").click()
    browser.wait_text("Copied.")
    key = browser.driver.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], e => arguments[0]('error: ' + e))"
    )
    assert key == shown
    # the new org is in the list with no request this month
    org_id = next(
        o["id"] for o in dash.stack.cli_json("orgs", "list")["items"] if o["name"] == name
    )
    browser.find(f"tr[data-org='{org_id}']")  # the list, reloaded
    cells = browser.js(
        "return [...document.querySelector(`tr[data-org='${arguments[0]}']`).cells]"
        ".map(c => c.textContent)",
        org_id,
    )
    assert cells[0] == name and cells[1] == "enabled" and cells[3] == "0" and cells[4] == "—"

    # its provider key, added in the page
    browser.go(f"/orgs/{org_id}/provider-keys")
    browser.heading("Provider keys")
    browser.select("Provider", "openai")
    browser.fill("API key", OPENAI_KEY)
    browser.button("Check and add").click()
    browser.wait_text(f"Added the openai key …{OPENAI_KEY[-4:]}.")
    assert OPENAI_KEY not in browser.text()
    assert browser.control("API key").get_attribute("value") == ""

    # the Requests page, empty, then live
    browser.go(f"/orgs/{org_id}/requests")
    browser.heading("Requests")
    browser.wait_text("No requests yet.")
    browser.js("window.__sameDocument = true")
    reply = chat(sdk(dash, key))
    assert reply.choices[0].message.content
    started = time.monotonic()
    browser.wait(lambda: len(browser.all("#requests tbody tr")) == 1, what="the live row")
    print(f"\nlive: the request showed up {time.monotonic() - started:.2f}s after the SDK returned")
    assert browser.js("return window.__sameDocument") is True  # no reload
    cells = browser.js(
        "return [...document.querySelector('#requests tbody tr').cells].map(c => c.textContent)"
    )
    assert cells[1:4] == ["200", "openai", "gpt-4o-mini"]
    assert cells[4] == "—"  # no route (the column is hidden while no row has one)
    assert browser.find("#requests").get_attribute("class") == "no-routes"
    assert cells[7:9] == ["12", "5"]  # the fake provider's token counts

    # a second request appears on top
    chat(sdk(dash, key), "gpt-4o")
    browser.wait(lambda: len(browser.all("#requests tbody tr")) == 2, what="the second row")
    assert (
        browser.js("return document.querySelector('#requests tbody tr').cells[3].textContent")
        == "gpt-4o"
    )

    # the detail view
    browser.find("#requests tbody tr:last-child td a").click()
    browser.heading("Request")
    browser.wait_text("Request id")
    text = browser.text()
    for expected in (
        "Request id",
        "gpt-4o-mini",
        "Time to first byte",
        "Input tokens",
        "default (",
    ):
        assert expected in text, expected
    # gpt-4o-mini is in the price catalogue: a few millionths of a dollar
    assert re.search(r"Cost[\n\t]\$0\.0000\d\d*\n", text), text
    browser.find("a[href*='/requests']").click()
    browser.heading("Requests")


def test_kill_switch(dash, browser):
    name = f"kill-{uuid.uuid4().hex[:6]}"
    org_id, key = dash.new_org(name)
    client = sdk(dash, key)
    chat(client)
    browser.sign_in_with_token(ADMIN_TOKEN)
    switch = f"tr[data-org='{org_id}'] .kill-switch"
    assert browser.find(switch).get_attribute("aria-checked") == "true"

    # cancelled: nothing changes
    browser.find(switch).click()
    assert browser.confirm_dialog("Cancel") == f"Disable {name}?"
    assert browser.find(switch).get_attribute("aria-checked") == "true"

    browser.find(switch).click()
    browser.confirm_dialog("Disable")
    browser.wait_text(f"{name} is disabled.")
    disabled_at = time.monotonic()
    browser.wait(
        lambda: browser.find(switch).get_attribute("aria-checked") == "false",
        what="the switch to show off",
    )
    refused = None
    while time.monotonic() - disabled_at < 10:
        try:
            chat(client)
        except openai.PermissionDeniedError as e:
            refused = e
            break
        time.sleep(0.05)
    assert refused is not None, "the SDK was not refused"
    print(f"\nkill switch: refused {time.monotonic() - disabled_at:.2f}s after the confirmation")
    assert "disabled" in str(refused)

    browser.find(switch).click()
    browser.confirm_dialog("Enable")
    browser.wait_text(f"{name} is enabled.")
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(client)
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline, "still refused after enabling"
            time.sleep(0.05)


def test_a_refused_provider_key_shows_the_providers_answer(dash, browser):
    org_id, _ = dash.new_org()
    browser.expected_statuses.add(422)
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.go(f"/orgs/{org_id}/provider-keys")
    browser.heading("Provider keys")
    wrong = "sk-wrong-" + uuid.uuid4().hex
    browser.select("Provider", "openai")
    browser.fill("API key", wrong)
    browser.button("Check and add").click()
    message = browser.find("form[aria-label='Add a provider key'] [role=alert]").text
    assert message.startswith("The key was not added: ")
    assert "refused" in message.lower(), message
    assert wrong not in browser.text() and wrong[-8:] not in browser.text()
    assert browser.control("API key").get_attribute("value") == ""
    # only the key added by the CLI is listed, by its last four characters
    rows = browser.all("tr[data-provider-key]")
    assert len(rows) == 1 and f"…{OPENAI_KEY[-4:]}" in rows[0].text


def test_keys_create_revoke_rotate(dash, browser):
    org_id, first_key = dash.new_org()
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.go(f"/orgs/{org_id}/keys")
    browser.heading("Lectr keys")
    browser.fill("Key name", "ci")
    browser.button("Create key").click()
    browser.wait_text("New key “ci”")
    ci_key = browser.find("input[data-secret]").get_attribute("value")
    chat(sdk(dash, ci_key))
    browser.wait(lambda: len(browser.all("tr[data-key]")) == 2, what="two keys")

    ci_row = next(r for r in browser.all("tr[data-key]") if r.text.startswith("ci"))
    ci_row.find_element("css selector", "button").click()
    browser.confirm_dialog("Revoke")
    browser.wait(
        lambda: any("ci" in t and "revoked" in t for t in browser.texts("tr[data-key]")),
        what="the key shown revoked",
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(sdk(dash, ci_key))
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)

    browser.button("Rotate all keys").click()
    browser.confirm_dialog("Rotate")
    browser.wait_text("New key “default”")
    rotated = browser.find("input[data-secret]").get_attribute("value")
    assert rotated != first_key
    browser.wait(
        lambda: (
            [("active" in t) for t in browser.texts("tr[data-key]")].count(True) == 1
            and len(browser.texts("tr[data-key]")) == 3
        ),
        what="three keys, one active",
    )
    chat(sdk(dash, rotated))


def test_providers_and_members(dash, browser):
    org_id, key = dash.new_org()
    browser.sign_in_with_token(ADMIN_TOKEN)
    browser.go(f"/orgs/{org_id}/providers")
    browser.heading("Providers & models")
    within = "section[data-provider='openai']"
    browser.fill("Allowed models", "gpt-4o-mini\ngpt-4.1*", within=within)
    browser.button("Save openai").click()
    browser.wait_text("Saved openai: effective within a second.")
    settings = dash.stack.cli_json("providers", "list", org_id)["items"]
    openai_settings = next(s for s in settings if s["provider"] == "openai")
    assert openai_settings["allowed_models"] == ["gpt-4o-mini", "gpt-4.1*"]
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(sdk(dash, key), "gpt-4o")
        except openai.PermissionDeniedError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # members (a global admin may manage them)
    browser.go(f"/orgs/{org_id}/members")
    browser.heading("Members")
    browser.select("Identify by", "subject")
    browser.fill("Email or subject", "oidc|newcomer")
    browser.select("Role", "admin")
    browser.button("Add").click()
    browser.wait_text("oidc|newcomer is admin.")
    members = dash.stack.cli_json("members", "list", org_id)["items"]
    assert [(m["subject"], m["role"]) for m in members] == [("oidc|newcomer", "admin")]


def test_a_member_sees_no_write_controls(dash, browser):
    allow_issuer(browser, dash)
    org_id, key = dash.new_org()
    chat(sdk(dash, key))
    dash.stack.cli("members", "add", org_id, "--subject", "oidc|mia", "--role", "member")
    dash.stack.cli("routes", "set", org_id, "smart", "--target", "openai:gpt-4o-mini")
    dash.stack.cli("limits", "set", org_id, "--rpm", "600", "--usd-per-day", "50")

    browser.open()
    host = dash.issuer.origin.removeprefix("http://")
    browser.button(f"Sign in with {host}").click()
    browser.find("#issuer-sub").send_keys("oidc|mia")
    browser.find("#issuer-submit").click()
    browser.heading("Organizations")
    browser.wait(lambda: browser.all(f"tr[data-org='{org_id}']"), what="the org")
    assert not browser.all(".kill-switch")
    # creating an org is open to every signed-in user; nothing else is
    assert browser.buttons() == ["Create"]
    assert [a.text for a in browser.all("header nav a")] == ["Organizations"]  # no catalogue

    tabs = [
        "Overview",
        "Requests",
        "Usage",
        "Lectr keys",
        "Provider keys",
        "Routes",
        "Limits",
        "Providers & models",
    ]
    browser.go(f"/orgs/{org_id}")
    browser.wait(lambda: browser.all("nav.tabs a"), what="the tabs")
    assert [a.text for a in browser.all("nav.tabs a")] == tabs  # no Members tab
    expected_buttons = {
        "": [],
        "/keys": [],
        "/provider-keys": [],
        "/providers": [],
        "/usage": ["Show"],
        "/requests": [],  # the filters are folded away until opened
        "/routes": ["Explain", "Explain"],  # the route's row, the explain form (a read)
        "/limits": [],
    }
    headings = {
        "": None,
        "/keys": "Lectr keys",
        "/provider-keys": "Provider keys",
        "/providers": "Providers & models",
        "/usage": "Usage",
        "/requests": "Requests",
        "/routes": "Routes",
        "/limits": "Limits",
    }
    for suffix, allowed in expected_buttons.items():
        browser.go(f"/orgs/{org_id}{suffix}")
        if headings[suffix]:
            browser.heading(headings[suffix])
        browser.wait(lambda: not browser.all("main .loading"), what="the page to load")
        assert browser.buttons() == allowed, (suffix, browser.buttons())
        assert not browser.all("main form textarea"), suffix
        assert not browser.all(".kill-switch, .switch, input[name=weight]"), suffix
        assert not browser.all("main [role=alert]"), (suffix, browser.text())
        if suffix not in ("/routes", "/usage", "/requests"):  # forms that only read
            assert not browser.all("main form"), (suffix, browser.text())

    # the routes, limits and pools are there to read; explain works
    browser.go(f"/orgs/{org_id}/routes")
    browser.heading("Routes")
    # (the heading comes before the page's data: wait for the form, then
    # check it is the only one)
    browser.wait(lambda: browser.all("main form"), what="the explain form")
    assert [f.get_attribute("aria-label") for f in browser.all("main form")] == [
        "Explain a request"
    ]
    browser.find("button[aria-label='Explain smart']").click()
    browser.wait(
        lambda: (
            browser.texts("#explain-result tr[data-attempt]") == ["1\topenai\tgpt-4o-mini\tdefault"]
        ),
        what="the plan",
    )
    browser.go(f"/orgs/{org_id}/limits")
    browser.heading("Limits")
    browser.wait(lambda: browser.all("tr[data-key-limits]"), what="the keys' limits")
    text = browser.text()
    assert "Requests per minute\t600" in text and "USD per day\t$50.00" in text, text
    assert not browser.all("main input")
    browser.find("tr[data-key-limits] a").click()  # "Show"
    browser.find("section[aria-labelledby='key-limits'] tr[data-limit='rpm']")
    assert "Requests per minute\tno limit" in browser.text()
    assert not browser.all("main input")
    browser.go(f"/orgs/{org_id}/provider-keys")
    browser.wait(lambda: browser.all("tr[data-provider-key]"), what="the pool")
    assert "enabled" in browser.find("tr[data-provider-key]").text

    # the catalogue, opened by its address: a list, nothing to change
    browser.go("/providers")
    browser.heading("Providers")
    browser.find("tr[data-catalogue='openai']")
    assert browser.buttons() == [] and not browser.all("main form")
    # what members are for: reading
    browser.go(f"/orgs/{org_id}/requests")
    browser.wait(lambda: browser.all("#requests tbody tr"), what="the member's requests")
    browser.go(f"/orgs/{org_id}/providers")
    browser.wait_text("Allowed models\nevery model")

    # the API refuses anyway: the members page, typed in, shows its message
    browser.expected_statuses.add(403)
    browser.go(f"/orgs/{org_id}/members")
    browser.wait(lambda: browser.all("main [role=alert]"), what="the refusal")
    assert "role" in browser.find("main [role=alert]").text.lower()
