"""A local OIDC issuer for the tests: signing keys generated in the test
(RSA and EC P-256), a JWKS served on 127.0.0.1 by twisted.web, and tokens
minted on demand — valid, expired, for another audience, unsigned…

The JWKS endpoint counts its hits and can be taken down (it answers 503, or
stops listening) to test the cache."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor as default_reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server
from twisted.web.resource import Resource

AUDIENCE = "https://lectr.test/admin"


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


class _JWKSResource(Resource):
    isLeaf = True

    def __init__(self, issuer: LocalIssuer) -> None:
        super().__init__()
        self._issuer = issuer

    def render_GET(self, request):
        issuer = self._issuer
        issuer.hits += 1
        if request.path != b"/.well-known/jwks.json":
            request.setResponseCode(404)
            return b"{}"
        if issuer.down:
            request.setResponseCode(503)
            return b"unavailable"
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": [k.jwk() for k in issuer.keys if k.published]}).encode()


@dataclass
class LocalIssuer:
    port: object = None
    keys: list[SigningKey] = field(default_factory=list)
    hits: int = 0
    down: bool = False
    audience: str = AUDIENCE
    origin: str = "http://127.0.0.1:1"  # set once listening; kept after stop()

    @classmethod
    async def start(cls, reactor=default_reactor) -> LocalIssuer:
        issuer = cls()
        issuer.add_key("rsa-1", "RS256")
        issuer.add_key("ec-1", "ES256")
        site = server.Site(_JWKSResource(issuer))
        site.noisy = False
        site.log = lambda request: None
        issuer.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
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
