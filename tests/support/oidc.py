"""A local OIDC issuer for the tests: signing keys generated in the test
(RSA and EC P-256), a JWKS served on 127.0.0.1 by twisted.web, and tokens
minted on demand — valid, expired, for another audience, unsigned…

The JWKS endpoint counts its hits and can be taken down (it answers 503, or
stops listening) to test the cache.

For the dashboard it is also a small authorization server: a discovery
document, an authorization endpoint that shows a sign-in form (type a
subject, get a code), and a token endpoint (with CORS, for the browser) that
exchanges the code for an RS256 access token only with the right PKCE
verifier, once, for the same client and redirect URI. Run it in its own
process with ``python -m tests.support.oidc --port N`` (the browser tests
do); ``/_control/token`` mints a token there, ``/_control/exchanges`` lists
the code exchanges."""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor as default_reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server
from twisted.web.resource import Resource

AUDIENCE = "https://lectr.test/admin"
CLIENT_ID = "lectr-dashboard"


@dataclass
class SigningKey:
    kid: str
    alg: str  # RS256 or ES256
    private: object
    published: bool = True

    def jwk(self) -> dict:
        algorithm = (
            jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        )
        doc = json.loads(algorithm.to_jwk(self.private.public_key()))
        doc.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return doc


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    subject: str
    email: str | None
    audience: str
    expires: float
    used: bool = False


def _loopback_uri(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost")


class _IssuerResource(Resource):
    isLeaf = True

    def __init__(self, issuer: LocalIssuer) -> None:
        super().__init__()
        self._issuer = issuer

    def render(self, request):
        issuer = self._issuer
        path = request.path
        if path == b"/.well-known/jwks.json":
            issuer.hits += 1
        if issuer.down:
            request.setResponseCode(503)
            return b"unavailable"
        routes = {
            (b"GET", b"/.well-known/jwks.json"): self._jwks,
            (b"GET", b"/.well-known/openid-configuration"): self._discovery,
            (b"GET", b"/authorize"): self._authorize_form,
            (b"POST", b"/authorize"): self._authorize,
            (b"POST", b"/oauth/token"): self._token,
            (b"OPTIONS", b"/oauth/token"): self._preflight,
            (b"POST", b"/_control/token"): self._control_token,
            (b"GET", b"/_control/exchanges"): self._control_exchanges,
        }
        handler = routes.get((request.method, path))
        if handler is None:
            request.setResponseCode(404)
            return b"{}"
        return handler(request)

    # --- documents ------------------------------------------------------------------

    def _json(self, request, status: int, doc) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode()

    def _jwks(self, request):
        issuer = self._issuer
        return self._json(request, 200, {"keys": [k.jwk() for k in issuer.keys if k.published]})

    def _discovery(self, request):
        issuer = self._issuer
        issuer.discovery_hits += 1
        return self._json(
            request,
            200,
            {
                "issuer": issuer.issuer,
                "authorization_endpoint": issuer.origin + "/authorize",
                "token_endpoint": issuer.origin + "/oauth/token",
                "jwks_uri": issuer.jwks_url,
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none"],
            },
        )

    # --- authorization endpoint: a sign-in form, then a redirect with a code -----

    def _params(self, request) -> dict[str, str]:
        if request.method == b"GET":
            raw = parse_qs(request.uri.partition(b"?")[2].decode(), keep_blank_values=True)
        else:
            request.content.seek(0)
            raw = parse_qs(request.content.read().decode(), keep_blank_values=True)
        return {k: v[0] for k, v in raw.items()}

    def _check(self, p: dict[str, str]) -> str | None:
        """Why this authorization request is refused, or None."""
        if p.get("client_id") != self._issuer.client_id:
            return "unknown client_id"
        if not _loopback_uri(p.get("redirect_uri", "")):
            return "redirect_uri not registered"
        if p.get("response_type") != "code":
            return "response_type must be code"
        if p.get("code_challenge_method") != "S256" or len(p.get("code_challenge", "")) != 43:
            return "PKCE with S256 is required"
        if not p.get("state"):
            return "state is required"
        return None

    def _authorize_form(self, request):
        p = self._params(request)
        problem = self._check(p)
        if problem:
            request.setResponseCode(400)
            return problem.encode()
        self._issuer.authorize_requests.append(dict(p))
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in p.items()
        )
        page = (
            "<!doctype html><html><head><title>Test issuer sign-in</title>"
            '<link rel="icon" href="data:,"></head><body>'
            "<h1>Test issuer</h1>"
            f'<form method="post" action="/authorize">{hidden}'
            '<label>Subject <input name="sub" id="issuer-sub"></label> '
            '<label>Email <input name="email" id="issuer-email"></label> '
            '<button type="submit" id="issuer-submit">Sign in</button></form></body></html>'
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page.encode()

    def _authorize(self, request):
        issuer = self._issuer
        p = self._params(request)
        problem = self._check(p)
        if problem:
            request.setResponseCode(400)
            return problem.encode()
        code = secrets.token_urlsafe(24)
        issuer.grants[code] = _Grant(
            client_id=p["client_id"],
            redirect_uri=p["redirect_uri"],
            challenge=p["code_challenge"],
            subject=p.get("sub") or "auth0|alice",
            email=p.get("email") or None,
            audience=p.get("audience") or issuer.audience,
            expires=time.time() + 60,
        )
        target = p["redirect_uri"] + "?" + urlencode({"code": code, "state": p["state"]})
        request.redirect(target.encode())
        return b""

    # --- token endpoint (CORS: the browser calls it) ----------------------------------

    def _cors(self, request) -> None:
        origin = request.getHeader(b"origin")
        if origin is not None:
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"vary", b"origin")

    def _preflight(self, request):
        self._cors(request)
        request.setHeader(b"access-control-allow-methods", b"POST")
        request.setHeader(b"access-control-allow-headers", b"content-type")
        request.setResponseCode(204)
        return b""

    def _token(self, request):
        issuer = self._issuer
        self._cors(request)
        p = self._params(request)
        grant = issuer.grants.get(p.get("code", ""))
        exchange = {"client_id": p.get("client_id"), "pkce_verified": False}
        issuer.exchanges.append(exchange)

        def refuse(description: str):
            exchange["refused"] = description
            return self._json(
                request, 400, {"error": "invalid_grant", "error_description": description}
            )

        if p.get("grant_type") != "authorization_code":
            return refuse("grant_type must be authorization_code")
        if grant is None or grant.used or grant.expires < time.time():
            return refuse("unknown, used or expired code")
        grant.used = True
        if p.get("client_id") != grant.client_id or p.get("redirect_uri") != grant.redirect_uri:
            return refuse("client_id or redirect_uri differ from the authorization request")
        if _s256(p.get("code_verifier", "")) != grant.challenge:
            return refuse("the code_verifier does not match the code_challenge")
        exchange["pkce_verified"] = True
        token = issuer.token(
            grant.subject,
            email=grant.email,
            aud=grant.audience,
            exp=int(time.time()) + issuer.token_ttl,
        )
        return self._json(
            request,
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": issuer.token_ttl},
        )

    # --- control (tests only) ------------------------------------------------------------

    def _control_token(self, request):
        request.content.seek(0)
        doc = json.loads(request.content.read() or b"{}")
        claims = {k: v for k, v in doc.items() if k != "sub"}
        return self._json(
            request, 200, {"token": self._issuer.token(doc.get("sub", "auth0|alice"), **claims)}
        )

    def _control_exchanges(self, request):
        return self._json(request, 200, self._issuer.exchanges)


@dataclass
class LocalIssuer:
    port: object = None
    keys: list[SigningKey] = field(default_factory=list)
    hits: int = 0
    down: bool = False
    audience: str = AUDIENCE
    origin: str = "http://127.0.0.1:1"  # set once listening; kept after stop()
    client_id: str = CLIENT_ID
    token_ttl: int = 300
    discovery_hits: int = 0
    grants: dict[str, _Grant] = field(default_factory=dict)
    authorize_requests: list[dict] = field(default_factory=list)
    exchanges: list[dict] = field(default_factory=list)

    @classmethod
    async def start(cls, reactor=default_reactor, port: int = 0) -> LocalIssuer:
        issuer = cls()
        issuer.add_key("rsa-1", "RS256")
        issuer.add_key("ec-1", "ES256")
        site = server.Site(_IssuerResource(issuer))
        site.noisy = False
        site.log = lambda request: None
        issuer.port = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)
        issuer.origin = f"http://127.0.0.1:{issuer.port.getHost().port}"
        return issuer

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
            self.port = None

    # --- settings Lectr needs ------------------------------------------------------

    @property
    def issuer(self) -> str:
        return self.origin + "/"

    @property
    def jwks_url(self) -> str:
        return self.origin + "/.well-known/jwks.json"

    def env(self) -> dict[str, str]:
        return {
            "LECTR_OIDC_ISSUER": self.issuer,
            "LECTR_OIDC_AUDIENCE": self.audience,
            "LECTR_OIDC_JWKS_URL": self.jwks_url,
        }

    def dashboard_env(self) -> dict[str, str]:
        """env() and the dashboard's client id (Lectr then reads discovery)."""
        return {**self.env(), "LECTR_OIDC_CLIENT_ID": self.client_id}

    # --- keys and tokens -------------------------------------------------------------

    def add_key(self, kid: str, alg: str = "RS256", *, published: bool = True) -> SigningKey:
        private = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if alg == "RS256"
            else ec.generate_private_key(ec.SECP256R1())
        )
        key = SigningKey(kid, alg, private, published)
        self.keys.append(key)
        return key

    def key(self, kid: str) -> SigningKey:
        return next(k for k in self.keys if k.kid == kid)

    def claims(self, sub: str, **overrides) -> dict:
        now = int(time.time())
        doc = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        doc.update(overrides)
        return {k: v for k, v in doc.items() if v is not None}

    def token(
        self, sub: str = "auth0|alice", *, kid: str = "rsa-1", headers: dict | None = None, **claims
    ) -> str:
        key = self.key(kid)
        return jwt.encode(
            self.claims(sub, **claims),
            key.private,
            algorithm=key.alg,
            headers={"kid": kid, **(headers or {})},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    def started(issuer: LocalIssuer) -> None:
        print(f"oidc issuer on {issuer.origin}", flush=True)

    d = ensureDeferred(LocalIssuer.start(reactor, args.port))
    d.addCallback(started)
    d.addErrback(lambda f: (print(f"oidc issuer failed: {f.value}", flush=True), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
