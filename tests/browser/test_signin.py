"""Signing in to the dashboard: the admin token, the OIDC issuer
(authorization code + PKCE), an expired token; where the token lives."""

from __future__ import annotations

import time

import pytest

from tests.browser.conftest import allow_issuer
from tests.e2e.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser


def test_admin_token_sign_in_and_sign_out(dash, browser):
    browser.open()
    browser.heading("Sign in to Lectr")
    # a wrong token: the API's refusal, shown on the form
    browser.expected_statuses.add(401)
    browser.fill("Admin token", "not-the-admin-token-0000")
    browser.button("Sign in").click()
    browser.wait_text("The token was refused: the token is not valid here")
    assert browser.storage()["session"] == {}

    browser.fill("Admin token", ADMIN_TOKEN)
    browser.button("Sign in").click()
    browser.heading("Organizations")
    assert "admin token (global admin)" in browser.text()
    stored = browser.storage()
    assert ADMIN_TOKEN in stored["session"]["lectr.session"]
    assert stored["local"] == {} and stored["cookies"] == ""
    assert ADMIN_TOKEN not in stored["href"]
    # the field was emptied: the token is in sessionStorage only
    assert not browser.js("return [...document.querySelectorAll('input')].some(i => i.value)")

    browser.open("/orgs")  # a reload keeps the session of this tab
    browser.heading("Organizations")
    browser.button("Sign out").click()
    browser.heading("Sign in to Lectr")
    browser.wait_text("You are signed out.")
    assert browser.storage()["session"] == {}
    browser.open("/orgs")
    browser.heading("Sign in to Lectr")
    # the token never travelled in a URL
    assert not [u for u in browser.urls if ADMIN_TOKEN in u]


def test_oidc_sign_in_with_pkce(dash, browser):
    allow_issuer(browser, dash)
    before = len(dash.issuer.exchanges())
    browser.open("/orgs")
    browser.heading("Sign in to Lectr")
    host = dash.issuer.origin.removeprefix("http://")
    browser.button(f"Sign in with {host}").click()
    # the issuer's own sign-in page
    browser.wait(lambda: browser.driver.title == "Test issuer sign-in", what="the issuer's page")
    query = browser.js("return location.search")
    assert "code_challenge_method=S256" in query and "code_challenge=" in query
    assert "audience=" in query and "client_id=lectr-dashboard" in query
    browser.find("#issuer-sub").send_keys("oidc|dana")
    browser.find("#issuer-email").send_keys("dana@example.com")
    browser.find("#issuer-submit").click()

    browser.heading("Organizations")
    assert "dana@example.com" in browser.text()
    browser.wait_text("No organization yet")
    stored = browser.storage()
    assert '"kind":"oidc"' in stored["session"]["lectr.session"]
    assert "lectr.oidc" not in stored["session"]  # the PKCE verifier is gone
    assert stored["local"] == {}
    assert "code=" not in stored["href"] and "state=" not in stored["href"]
    exchanges = dash.issuer.exchanges()[before:]
    assert [e["pkce_verified"] for e in exchanges] == [True]
    # Lectr knows the user now (its subject was upserted on the first call)
    users = dash.stack.cli_json("users", "list")["items"]
    assert any(u["subject"] == "oidc|dana" for u in users)


def test_a_replayed_sign_in_callback_is_refused(dash, browser):
    """A code whose sign-in did not start in this tab (no PKCE verifier, or
    another state) gives a clear message, not a session."""
    browser.open()
    browser.heading("Sign in to Lectr")
    browser.driver.get(f"{dash.admin}/?code=stolen-code&state=forged")
    browser.heading("Sign in to Lectr")
    browser.wait_text("This sign-in was not started here (state mismatch). Try again.")
    assert browser.storage()["session"] == {}
    assert "code=" not in browser.js("return location.href")


def test_an_expired_token_returns_to_sign_in(dash, browser):
    expired = dash.issuer.token("oidc|erin", exp=int(time.time()) - 3600)
    browser.open()
    browser.heading("Sign in to Lectr")
    browser.js(
        "sessionStorage.setItem('lectr.session', JSON.stringify({token: arguments[0], kind: 'oidc'}))",
        expired,
    )
    browser.expected_statuses.add(401)
    browser.open("/orgs")
    browser.heading("Sign in to Lectr")
    browser.wait_text("Your session has ended (the token has expired). Sign in again.")
    assert browser.storage()["session"] == {}
