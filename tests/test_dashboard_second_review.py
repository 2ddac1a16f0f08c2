"""The dashboard's server side, second review: the issuer's token endpoint
goes into the Content-Security-Policy only as a plain origin, so no
discovery document can add a directive or loosen one."""

from __future__ import annotations

import json

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.python.failure import Failure

from lectr.admin.signin import OIDCDiscovery, SignInOptions
from lectr.config import OIDCConfig
from lectr.dashboard.assets import Assets
from lectr.dashboard.resource import DashboardResource

ISSUER = "https://id.example.com/"
ASSETS = Assets.load()

EXPECTED = {
    "default-src": ["'none'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'"],
    "base-uri": ["'none'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
    "require-trusted-types-for": ["'script'"],
    "trusted-types": ["'none'"],
}


async def served_policy(token_endpoint: str) -> str:
    """The Content-Security-Policy of ``/`` when the issuer's discovery
    document names ``token_endpoint``."""

    async def get(url: str, timeout: float):
        doc = {
            "issuer": ISSUER,
            "authorization_endpoint": "https://id.example.com/authorize",
            "token_endpoint": token_endpoint,
            "code_challenge_methods_supported": ["S256"],
        }
        return 200, json.dumps(doc).encode()

    clock = task.Clock()
    oidc = OIDCConfig(issuer=ISSUER, audience="api", jwks_url=ISSUER + "jwks", client_id="dash")
    discovery = OIDCDiscovery(ISSUER, http_get=get, clock=clock)
    options = SignInOptions(admin_token=False, oidc=oidc, discovery=discovery, reactor=clock)
    client = StubTreq(DashboardResource(ASSETS, sign_in=options))
    response = await client.get("https://dash.example/")
    await response.content()
    assert response.code == 200
    return response.headers.getRawHeaders("content-security-policy")[0]


def now(coroutine):
    """The result of a coroutine that needs no reactor turn (StubTreq, a
    task.Clock): at once."""
    done: list = []
    ensureDeferred(coroutine).addBoth(done.append)
    assert done, "it waited"
    if isinstance(done[0], Failure):
        done[0].raiseException()
    return done[0]


def directives(policy: str) -> list[tuple[str, list[str]]]:
    return [(p.split()[0], p.split()[1:]) for p in policy.split(";") if p.split()]


@pytest_twisted.ensureDeferred
async def test_a_plain_token_endpoint_is_a_connect_source():
    policy = await served_policy("https://login.example.net:8443/oauth/token")
    assert dict(directives(policy))["connect-src"] == ["'self'", "https://login.example.net:8443"]


# what a discovery document's token endpoint can carry in its host part and
# urlsplit passes on: directive separators, spaces, quotes, keywords
_JUNK = (
    st.lists(
        st.sampled_from(list(";, '\"*\x0b\x0c") + ["frame-ancestors", "'unsafe-inline'"]),
        min_size=1,
        max_size=6,
    )
    .map("".join)
    .filter(lambda s: any(c in s for c in ";, '\"*\x0b\x0c"))
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=_JUNK, directive=st.sampled_from(sorted(EXPECTED)))
def test_a_token_endpoint_cannot_change_the_policy(junk, directive):
    endpoint = f"https://idp.example{junk};{directive} * 'unsafe-inline'/oauth/token"
    policy = now(served_policy(endpoint))
    found = directives(policy)
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), policy  # no directive given twice
    assert {k: v for k, v in found if k != "connect-src"} == EXPECTED, policy
    assert dict(found)["connect-src"] == ["'self'"], policy
    assert "unsafe-inline" not in policy
