"""OIDC JWT verification: a JWKS served on 127.0.0.1 with keys generated
here, tokens minted here, fetched with treq over real HTTP. The refetch
rate limit runs on a task.Clock so the tests never wait a minute."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock

from lectr.admin.auth import (
    JWKSCache,
    JWTVerifier,
    parse_jwks,
    treq_http_get,
)
from lectr.errors import ServiceUnavailable, Unauthorized
from tests.support.oidc import LocalIssuer


@pytest_twisted.async_yield_fixture
async def issuer():
    iss = await LocalIssuer.start()
    yield iss
    await iss.stop()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(issuer, clock) -> JWTVerifier:
    jwks = JWKSCache(issuer.jwks_url, http_get=treq_http_get(reactor), clock=clock)
    return JWTVerifier(issuer=issuer.issuer, audience=issuer.audience, jwks=jwks)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


async def rejected(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await verifier.verify(token)
    assert info.value.status == 401
    assert token not in info.value.message
    return info.value.message


# --- accepted --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_valid_rs256_token(issuer, verifier):
    token = issuer.token("auth0|alice", email="alice@example.com")
    verified = await verifier.verify(token)
    assert (verified.subject, verified.email) == ("auth0|alice", "alice@example.com")
    assert issuer.hits == 1


@pytest_twisted.ensureDeferred
async def test_valid_es256_token(issuer, verifier):
    verified = await verifier.verify(issuer.token("okta|bob", kid="ec-1"))
    assert verified.subject == "okta|bob" and verified.email is None


@pytest_twisted.ensureDeferred
async def test_namespaced_email_claim_and_audience_list(issuer, verifier):
    token = issuer.token(
        "auth0|carol",
        aud=[issuer.audience, "https://tenant.auth0.com/userinfo"],
        **{"https://lectr.example/email": "carol@example.com"},
    )
    verified = await verifier.verify(token)
    assert verified.email == "carol@example.com"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "claims, verified",
    [
        ({"email": "a@example.com", "email_verified": True}, True),
        ({"email": "a@example.com", "email_verified": False}, False),
        ({"email": "a@example.com", "email_verified": "true"}, False),  # only JSON true
        ({"email": "a@example.com", "email_verified": 1}, False),
        ({"email": "a@example.com"}, False),
        # the flag must sit beside the email it vouches for
        ({"https://x/email": "a@example.com", "https://x/email_verified": True}, True),
        ({"https://x/email": "a@example.com", "email_verified": True}, False),
        ({"email_verified": True}, False),  # no email at all
    ],
)
async def test_email_verified_is_taken_from_the_claim_beside_the_email(
    issuer, verifier, claims, verified
):
    result = await verifier.verify(issuer.token("auth0|dora", **claims))
    assert result.email_verified is verified
    assert result.email == claims.get("email", claims.get("https://x/email"))


@pytest_twisted.ensureDeferred
async def test_leeway_of_sixty_seconds(issuer, verifier):
    now = int(time.time())
    await verifier.verify(issuer.token(exp=now - 30))  # expired 30 s ago: within leeway
    await verifier.verify(issuer.token(nbf=now + 30))  # valid in 30 s: within leeway
    assert "expired" in await rejected(verifier, issuer.token(exp=now - 90))
    assert "not valid yet" in await rejected(verifier, issuer.token(nbf=now + 90))


def test_leeway_above_sixty_seconds_is_refused(issuer):
    jwks = JWKSCache("http://127.0.0.1:1/", http_get=None, clock=Clock())
    with pytest.raises(ValueError):
        JWTVerifier(issuer="x", audience="y", jwks=jwks, leeway=120)


# --- refused -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_expired_token(issuer, verifier):
    now = int(time.time())
    message = await rejected(verifier, issuer.token(iat=now - 7200, exp=now - 3600))
    assert "expired" in message


@pytest_twisted.ensureDeferred
async def test_wrong_audience_and_wrong_issuer(issuer, verifier):
    assert "audience" in await rejected(verifier, issuer.token(aud="https://other.api/"))
    assert "issuer" in await rejected(verifier, issuer.token(iss="https://evil.example/"))


@pytest_twisted.ensureDeferred
async def test_required_claims(issuer, verifier):
    assert "'exp'" in await rejected(verifier, issuer.token(exp=None))
    assert "'sub'" in await rejected(verifier, issuer.token(sub=None))
    assert "'aud'" in await rejected(verifier, issuer.token(aud=None))


@pytest_twisted.ensureDeferred
async def test_malformed_subjects(issuer, verifier):
    for sub in ("", "   ", "a\x00b", "x" * 256):
        assert "subject" in await rejected(verifier, issuer.token(sub))
    await rejected(verifier, issuer.token(42))  # not a string


@pytest_twisted.ensureDeferred
async def test_alg_none_is_refused(issuer, verifier):
    claims = issuer.claims("auth0|mallory")
    for alg in ("none", "None", "NONE"):
        message = await rejected(verifier, forge({"alg": alg, "kid": "rsa-1"}, claims))
        assert "algorithm" in message
    # PyJWT's own unsigned token
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "rsa-1"})
    await rejected(verifier, unsigned)
    assert issuer.hits == 0  # refused before any key is looked up


@pytest_twisted.ensureDeferred
async def test_hs256_signed_with_the_public_key_is_refused(issuer, verifier):
    """The classic algorithm-confusion attack: HMAC keyed with the issuer's
    public key, which anybody can download."""
    public_pem = (
        issuer.key("rsa-1")
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    claims = issuer.claims("auth0|mallory")
    for header in ({"alg": "HS256", "kid": "rsa-1"}, {"alg": "HS256"}):
        head = b64(json.dumps(header).encode())
        body = b64(json.dumps(claims).encode())
        signing_input = f"{head}.{body}".encode()
        sig = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
        message = await rejected(verifier, f"{head}.{body}.{b64(sig)}")
        assert "algorithm" in message


@pytest_twisted.ensureDeferred
async def test_algorithm_must_match_the_key(issuer, verifier):
    """An ES256 header naming the RSA key (or the reverse) is refused."""
    ec_key = issuer.key("ec-1").private
    token = jwt.encode(issuer.claims("x"), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    assert "does not match" in await rejected(verifier, token)
    rsa_key = issuer.key("rsa-1").private
    token = jwt.encode(issuer.claims("x"), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    assert "does not match" in await rejected(verifier, token)


@pytest_twisted.ensureDeferred
async def test_other_rsa_algorithms_are_refused(issuer, verifier):
    rsa_key = issuer.key("rsa-1").private
    for alg in ("RS512", "PS256"):
        token = jwt.encode(issuer.claims("x"), rsa_key, algorithm=alg, headers={"kid": "rsa-1"})
        assert "algorithm" in await rejected(verifier, token)


@pytest_twisted.ensureDeferred
async def test_forged_signature_with_a_known_kid(issuer, verifier):
    impostor = issuer.add_key("impostor", published=False)
    token = jwt.encode(
        issuer.claims("auth0|mallory"),
        impostor.private,
        algorithm="RS256",
        headers={"kid": "rsa-1"},
    )
    assert "signature" in await rejected(verifier, token)


@pytest_twisted.ensureDeferred
async def test_malformed_tokens(verifier):
    for token in ("a.b.c", "not-a-jwt", "..", "eyJhbGciOiJSUzI1NiJ9..", "a" * 50):
        await rejected(verifier, token)


# --- the JWKS cache ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keys_are_cached(issuer, verifier):
    for _ in range(5):
        await verifier.verify(issuer.token())
        await verifier.verify(issuer.token(kid="ec-1"))
    assert issuer.hits == 1


@pytest_twisted.ensureDeferred
async def test_unknown_kid_triggers_one_refetch_then_rate_limited(issuer, verifier, clock):
    await verifier.verify(issuer.token())
    assert issuer.hits == 1

    clock.advance(300)  # some time later, the issuer rotates in a new key
    issuer.add_key("rsa-2")
    verified = await verifier.verify(issuer.token("auth0|dave", kid="rsa-2"))
    assert verified.subject == "auth0|dave"
    assert issuer.hits == 2  # exactly one refetch

    issuer.add_key("rsa-3", published=False)  # a kid the issuer never published
    assert "unknown key" in await rejected(verifier, issuer.token(kid="rsa-3"))
    assert issuer.hits == 2  # within a minute of the last fetch: no refetch
    for _ in range(10):
        await rejected(verifier, issuer.token(kid="rsa-3"))
    assert issuer.hits == 2  # a flood of unknown kids cannot flood the issuer

    clock.advance(61)
    await rejected(verifier, issuer.token(kid="rsa-3"))
    assert issuer.hits == 3  # a minute later: one more try


@pytest_twisted.ensureDeferred
async def test_concurrent_unknown_kids_share_one_fetch(issuer, verifier):
    tokens = [issuer.token(f"auth0|u{i}", kid=("rsa-1" if i % 2 else "ec-1")) for i in range(8)]
    results = await gatherResults([ensureDeferred(verifier.verify(t)) for t in tokens])
    assert sorted(r.subject for r in results) == sorted(f"auth0|u{i}" for i in range(8))
    assert issuer.hits == 1


@pytest_twisted.ensureDeferred
async def test_jwks_down_keeps_the_cached_keys(issuer, verifier, clock):
    await verifier.verify(issuer.token())
    issuer.down = True

    # an unknown kid while the endpoint is down: refused, cached keys kept
    clock.advance(61)
    issuer.add_key("rsa-2")
    await rejected(verifier, issuer.token(kid="rsa-2"))
    assert issuer.hits == 2
    assert (await verifier.verify(issuer.token("auth0|still"))).subject == "auth0|still"

    # the keys grow old: a background refresh fails, the cached keys still serve
    clock.advance(3601)
    assert (await verifier.verify(issuer.token("auth0|later"))).subject == "auth0|later"
    await _settle()
    assert issuer.hits == 3
    assert (await verifier.verify(issuer.token(kid="ec-1"))).subject == "auth0|alice"

    # the endpoint recovers: the next allowed refetch finds the new key
    issuer.down = False
    clock.advance(61)
    assert (await verifier.verify(issuer.token("auth0|new", kid="rsa-2"))).subject == "auth0|new"


@pytest_twisted.ensureDeferred
async def test_jwks_endpoint_gone_keeps_the_cached_keys(issuer, verifier, clock):
    await verifier.verify(issuer.token())
    await issuer.stop()  # connection refused from now on
    clock.advance(3601)
    assert (await verifier.verify(issuer.token("auth0|x"))).subject == "auth0|x"
    await _settle()
    issuer.add_key("rsa-9")
    await rejected(verifier, issuer.token(kid="rsa-9"))
    assert (await verifier.verify(issuer.token("auth0|y"))).subject == "auth0|y"


@pytest_twisted.ensureDeferred
async def test_no_keys_ever_is_a_503_and_retried_soon(issuer, verifier, clock):
    issuer.down = True
    with pytest.raises(ServiceUnavailable):
        await verifier.verify(issuer.token())
    assert issuer.hits == 1
    with pytest.raises(ServiceUnavailable):
        await verifier.verify(issuer.token())
    assert issuer.hits == 1  # not retried at once
    issuer.down = False
    clock.advance(6)  # without any key, retried after a few seconds, not a minute
    assert (await verifier.verify(issuer.token())).subject == "auth0|alice"
    assert issuer.hits == 2


async def _settle() -> None:
    """Let a background fetch over loopback finish."""
    from twisted.internet.task import deferLater

    for _ in range(50):
        await deferLater(reactor, 0.01)


# --- parsing a JWKS ------------------------------------------------------------------


def test_parse_jwks_keeps_only_usable_signing_keys():
    from tests.support.oidc import LocalIssuer

    issuer = LocalIssuer()
    rsa_key = issuer.add_key("r", "RS256").jwk()
    ec_key = issuer.add_key("e", "ES256").jwk()
    enc_key = {**rsa_key, "kid": "enc", "use": "enc"}
    rs512 = {**rsa_key, "kid": "r512", "alg": "RS512"}
    symmetric = {"kty": "oct", "kid": "hmac", "k": b64(b"secret")}
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.key("r").private))
    private.update(kid="priv")
    keys = parse_jwks(
        json.dumps(
            {"keys": [rsa_key, ec_key, enc_key, rs512, symmetric, private, "junk", {"kty": "RSA"}]}
        ).encode()
    )
    assert sorted(keys) == ["e", "r"]
    with pytest.raises(ValueError):
        parse_jwks(b"not json")
    with pytest.raises(ValueError):
        parse_jwks(b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(ValueError):
        parse_jwks(b'{"nokeys": 1}')


def test_auth0_settings_configure_issuer_audience_and_jwks():
    from types import SimpleNamespace

    from lectr.admin.wiring import build_admin
    from lectr.config import load_config

    config = load_config(
        {},
        {
            "DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
            "ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode(),
            "AUTH0_DOMAIN": "tenant.eu.auth0.com",
            "AUTH0_AUDIENCE": "https://lectr.example/api",
        },
    )
    c = SimpleNamespace(
        database=None,
        metrics=None,
        orgs=None,
        vault=None,
        settings=None,
        usage=object(),
        providers=None,
        routes=None,
        custom_providers=None,
        health=None,
        proxy=None,
    )
    from lectr.metrics import Registry

    c.metrics = Registry()
    parts = build_admin(c, config, reactor=Clock(), http_get=lambda url, timeout: None)
    verifier = parts.authenticator.verifier
    assert verifier.issuer == "https://tenant.eu.auth0.com/"
    assert verifier.audience == "https://lectr.example/api"
    assert parts.jwks.url == "https://tenant.eu.auth0.com/.well-known/jwks.json"


def test_without_oidc_settings_only_the_admin_token_works():
    from types import SimpleNamespace

    from lectr.admin.wiring import build_admin
    from lectr.config import load_config
    from lectr.metrics import Registry

    config = load_config(
        {},
        {
            "DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
            "ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode(),
            "LECTR_ADMIN_TOKEN": "only-the-token-0123456789",
        },
    )
    c = SimpleNamespace(
        database=None,
        metrics=Registry(),
        orgs=None,
        vault=None,
        settings=None,
        usage=object(),
        providers=None,
        routes=None,
        custom_providers=None,
        health=None,
        proxy=None,
    )
    parts = build_admin(c, config, reactor=Clock())
    assert parts.jwks is None and parts.authenticator.verifier is None
