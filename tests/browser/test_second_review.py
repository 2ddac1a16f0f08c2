"""The dashboard, second review: an address whose route does not decode
(a link cut short, a stray %) is a route like any unknown one, not a page
left loading forever."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser


@pytest.mark.parametrize(
    "route", ["/orgs/{org}/requests/%E0%A4%A", "/orgs/{org}/requests/%", "/orgs/%zz/usage"]
)
def test_an_address_that_does_not_decode_leads_to_the_organizations(dash, browser, route):
    org_id, _ = dash.new_org()
    route = route.format(org=org_id)
    browser.sign_in_with_token(ADMIN_TOKEN)
    # opened afresh: the page loads on it
    browser.open(route)
    browser.heading("Organizations")
    assert browser.js("return location.hash") == "#/orgs"
    # and from a running page (the one on screen is not left half stopped)
    browser.open(f"/orgs/{org_id}/usage")
    browser.heading("Usage")
    browser.go(route)
    browser.heading("Organizations")
    browser.wait(lambda: "Loading" not in browser.text(), what="the organizations listed")
