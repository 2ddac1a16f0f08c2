"""Who is calling the admin API: OIDC JWTs and the static admin token.

- ``LECTR_ADMIN_TOKEN`` is compared in constant time and acts as a global
  admin (automation, the ``lectr`` CLI).
- A JWT is verified against the issuer's JWKS: RS256 or ES256 only (the
  algorithm is pinned by the key, never taken on trust from the token),
  ``iss``, ``aud``, ``exp`` and ``nbf`` checked with at most 60 s leeway.
  Its subject and email are upserted into ``user_identities``.

The JWKS is fetched with Twisted's Agent (PyJWT's ``PyJWKClient`` uses urllib
and would block the reactor; see :mod:`lectr.providers.http`), cached, refetched when a token names an unknown ``kid``
(at most once a minute), refreshed in the background once it is an hour old,
and the last good keys are kept when the endpoint fails.

How old the keys are (and how long ago the last fetch was tried) is measured
on two clocks, never on the wall clock alone: the reactor's clock is the wall
clock (``time.time``), which NTP or a resumed VM can step. See :class:`Moment`.
A token's ``exp``, ``nbf`` and ``iat`` are wall-clock claims and stay checked
against the wall clock (by PyJWT).

Tokens never reach a log line or an error message.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr.admin.validation import text_problem
from lectr.errors import ServiceUnavailable, Unauthorized
from lectr.managers.users import MAX_EMAIL_LEN, MAX_SUBJECT_LEN, Principal, UserManager
from lectr.util.secret import Secret

#: token ``alg`` → (JWK key type, curve or None). Nothing else is accepted.
ALGORITHMS: dict[str, tuple[str, str | None]] = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}
MAX_LEEWAY = 60.0
MAX_TOKEN_BYTES = 8192
MAX_JWKS_KEYS = 100

# (status, body) of one GET; raises on network errors
HttpGet = Callable[[str, float], Awaitable[tuple[int, bytes]]]


def treq_http_get(reactor) -> HttpGet:
    """GET without following redirects or keeping cookies, with the body
    and the whole exchange bounded (the client that validates provider
    keys)."""
    from lectr.providers.http import make_http_request

    request = make_http_request(reactor)

    async def get(url: str, timeout: float) -> tuple[int, bytes]:
        return await request(b"GET", url.encode("ascii"), {b"accept": b"application/json"}, timeout)

    return get


def _steady_clock() -> Callable[[], float]:
    """Seconds that never go back: ``CLOCK_BOOTTIME`` where there is one
    (Linux: it counts time suspended too), else ``time.monotonic``."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    return functools.partial(time.clock_gettime, boottime)


#: the default steady clock of the JWKS cache and OIDC discovery
STEADY_CLOCK = _steady_clock()


@dataclass(frozen=True, slots=True)
class Moment:
    """When something happened (a fetch, an attempt), read on the wall clock
    (the reactor's, injectable: ``task.Clock`` in tests) and on a steady
    clock (:data:`STEADY_CLOCK`, injectable too). Neither alone will do:

    - the wall clock stepped back (NTP, a VM resumed from a snapshot) makes
      every earlier moment look recent, or lie in the future: signing keys
      fetched a day ago would pass for fresh for as long as the step, and a
      rotated-out key would keep being accepted;
    - a monotonic clock may stand still while the machine is suspended
      (``time.monotonic`` does on Linux): after a day asleep, keys fetched a
      day ago would pass for minutes old; and a test's ``task.Clock`` moves
      only the wall clock.

    So an age is the longer of the two, and taken as infinite when the wall
    clock reads before the moment (stepped back since: the reading tells
    nothing). A step of the wall clock, either way, can then only make
    something look older than it is, never younger (with ``CLOCK_BOOTTIME``,
    suspended or not); the price, one refetch too early per step, is
    bounded by the refetch hold-offs, which are measured the same way. The
    wall clock is still read so that a ``task.Clock`` drives the tests."""

    wall: float
    steady: float

    @classmethod
    def now(cls, clock, steady_clock: Callable[[], float]) -> Moment:
        return cls(clock.seconds(), steady_clock())

    def age(self, now: Moment) -> float:
        """Seconds from this moment to ``now``, as defined above."""
        wall = now.wall - self.wall
        if wall < 0:
            return math.inf
        return max(wall, now.steady - self.steady)


class JWKSUnavailable(Exception):
    """No signing keys could ever be fetched."""


class JWKSCache:
    """The issuer's signing keys, by ``kid``."""

    _log = Logger()

    def __init__(
        self,
        url: str,
        *,
        http_get: HttpGet,
        clock,
        refetch_interval: float = 60.0,
        retry_interval_without_keys: float = 5.0,
        max_age: float = 3600.0,
        timeout: float = 10.0,
        steady_clock: Callable[[], float] = STEADY_CLOCK,
    ) -> None:
        self.url = url
        self._http_get = http_get
        self._clock = clock  # the wall clock (the reactor)
        self._steady_clock = steady_clock
        self._refetch_interval = refetch_interval
        self._retry_without_keys = retry_interval_without_keys
        self._max_age = max_age
        self._timeout = timeout
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: Moment | None = None  # last successful fetch
        self._attempted_at: Moment | None = None  # last attempt, successful or not
        self._fetching: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self.fetches = 0  # attempts, for metrics and tests

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Fetch the keys in the background (start-up must not wait for the
        issuer, nor fail when it is down)."""
        self._begin_fetch()

    def stop(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()

    # --- lookups ---------------------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return bool(self._keys)

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        """The key with this ``kid``. An unknown kid triggers one refetch
        (unless one happened within ``refetch_interval``); raises
        Unauthorized when the kid stays unknown, JWKSUnavailable when no
        keys were ever fetched."""
        key = self._lookup(kid)
        now = self._now()
        if key is not None:
            if self._fetched_at is not None and self._fetched_at.age(now) > self._max_age:
                if self._may_fetch(now):
                    self._begin_fetch()  # in the background; the cached key serves
            return key
        if self._fetching is not None or self._may_fetch(now):
            await self._wait_for_fetch()
            key = self._lookup(kid)
        if key is not None:
            return key
        if not self._keys:
            raise JWKSUnavailable()
        raise Unauthorized("the token is signed by an unknown key", code="invalid_token")

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # No kid in the token: acceptable only when the issuer has one key.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _may_fetch(self, now: Moment) -> bool:
        if self._attempted_at is None:
            return True
        interval = self._refetch_interval if self._keys else self._retry_without_keys
        return self._attempted_at.age(now) >= interval

    def _now(self) -> Moment:
        return Moment.now(self._clock, self._steady_clock)

    # --- fetching --------------------------------------------------------------

    def _begin_fetch(self) -> None:
        if self._fetching is not None:
            return
        self._attempted_at = self._now()
        self.fetches += 1
        d = ensureDeferred(self._fetch())
        self._fetching = d
        d.addBoth(self._fetch_done)

    def _wait_for_fetch(self) -> Deferred[None]:
        """Fires (never fails) when the current fetch ends; cancelling it
        stops waiting without stopping the fetch others may wait for."""
        self._begin_fetch()
        if self._fetching is None:  # it finished at once
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def _fetch_done(self, result: Any) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if isinstance(result, Failure) and not result.check(CancelledError):
            self._log.failure("JWKS fetch failed unexpectedly", result)

    async def _fetch(self) -> None:
        try:
            status, body = await self._http_get(self.url, self._timeout)
        except CancelledError:
            raise
        except Exception as e:
            self._failed(f"{type(e).__name__}: {e}".splitlines()[0][:200])
            return
        if status != 200:
            self._failed(f"HTTP {status}")
            return
        try:
            keys = parse_jwks(body)
        except ValueError as e:
            self._failed(str(e))
            return
        added = set(keys) - set(self._keys)
        self._keys = keys
        self._fetched_at = self._now()
        self._log.info(
            "fetched {n} signing keys from {url} ({added} new)",
            n=len(keys),
            url=self.url,
            added=len(added),
        )

    def _failed(self, reason: str) -> None:
        kept = f"keeping the {len(self._keys)} cached keys" if self._keys else "no keys cached"
        self._log.warn(
            "cannot fetch signing keys from {url}: {reason}; {kept}",
            url=self.url,
            reason=reason,
            kept=kept,
        )


def parse_jwks(body: bytes) -> dict[str | None, jwt.PyJWK]:
    """The usable signing keys of a JWKS document (RSA and EC P-256 keys
    meant for signatures); raises ValueError when there are none."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the JWKS is not JSON") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError("the JWKS has no 'keys' list")
    keys: dict[str | None, jwt.PyJWK] = {}
    for entry in entries[:MAX_JWKS_KEYS]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if any(private in entry for private in ("d", "p", "q", "dp", "dq", "qi", "k")):
            continue  # a published private (or symmetric) key is never trusted
        kty = entry.get("kty")
        if kty == "RSA":
            alg = "RS256"
        elif kty == "EC" and entry.get("crv") == "P-256":
            alg = "ES256"
        else:
            continue
        if entry.get("alg", alg) != alg:
            continue  # e.g. an RSA key published for RS512 only
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            keys[kid] = jwt.PyJWK(entry, algorithm=alg)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
    if not keys:
        raise ValueError("the JWKS holds no usable RS256/ES256 signing key")
    return keys


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    subject: str
    email: str | None
    #: the issuer vouched for ``email`` (``email_verified: true``)
    email_verified: bool = False


def _email_claim(claims: dict) -> tuple[str | None, bool]:
    """``(email, verified)``: the ``email`` claim, or a namespaced
    ``…/email`` claim (Auth0 access tokens carry custom claims under a URL
    namespace), and whether the ``email_verified`` claim beside it (same
    namespace) is the JSON value ``true``. Anything else (absent, false,
    the string "true") is unverified: an address a user merely typed into
    their profile must not let them be found, and added, by email."""
    names = ["email"]
    names += [k for k in claims if isinstance(k, str) and k.endswith("/email")]
    for name in names:
        value = claims.get(name)
        if isinstance(value, str) and 0 < len(value) <= MAX_EMAIL_LEN:
            return value, claims.get(name + "_verified") is True
    return None, False


class JWTVerifier:
    """Verifies an OIDC access token's signature and claims."""

    def __init__(
        self, *, issuer: str, audience: str, jwks: JWKSCache, leeway: float = MAX_LEEWAY
    ) -> None:
        if not 0 <= leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be 0 to {MAX_LEEWAY:g} seconds")
        self.issuer = issuer
        self.audience = audience
        self.jwks = jwks
        self._leeway = leeway

    async def verify(self, token: str) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("the token is malformed") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise _invalid("the token's algorithm is not accepted (RS256 or ES256 only)")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise _invalid("the token's key id is malformed")
        try:
            jwk = await self.jwks.key_for(kid)
        except JWKSUnavailable:
            raise ServiceUnavailable(
                "the identity provider's signing keys cannot be fetched; try again shortly",
                code="jwks_unavailable",
            ) from None
        kty, crv = ALGORITHMS[alg]
        if jwk.key_type != kty or jwk.algorithm_name != alg or (crv and _crv(jwk) != crv):
            raise _invalid("the token's algorithm does not match its signing key")
        try:
            claims = jwt.decode(
                token,
                key=jwk.key,
                algorithms=[alg],  # pinned: the key's own algorithm
                audience=self.audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise _invalid("the token is not meant for this API (audience)") from None
        except jwt.InvalidIssuerError:
            raise _invalid("the token comes from another issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise _invalid(f"the token lacks the {e.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise _invalid("the token's signature is invalid") from None
        except jwt.InvalidTokenError:
            raise _invalid("the token is invalid") from None
        subject = claims.get("sub")
        if (
            not isinstance(subject, str)
            or not 0 < len(subject) <= MAX_SUBJECT_LEN
            # (identities are found by their subject stripped: " x" would sign in as "x")
            or subject != subject.strip()
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in subject)
            or text_problem(subject) is not None  # (an unpaired surrogate: not storable)
        ):
            raise _invalid("the token's subject is malformed")
        email, email_verified = _email_claim(claims)
        return VerifiedToken(subject=subject, email=email, email_verified=email_verified)


def _crv(jwk: jwt.PyJWK) -> str | None:
    curve = getattr(getattr(jwk.key, "curve", None), "name", None)
    return {"secp256r1": "P-256"}.get(curve, curve)


def _invalid(message: str) -> Unauthorized:
    return Unauthorized(message, code="invalid_token")


class AdminAuthenticator:
    """``authenticate(request)`` → the calling :class:`Principal`."""

    _log = Logger()

    def __init__(
        self,
        *,
        users: UserManager,
        admin_token: Secret[str] | None = None,
        verifier: JWTVerifier | None = None,
    ) -> None:
        self._users = users
        self._admin_token = admin_token
        self.verifier = verifier

    async def authenticate(self, request) -> Principal:
        token = bearer_token(request)
        if token is None:
            raise Unauthorized("send 'Authorization: Bearer <token>'", code="missing_token")
        if self._admin_token is not None and self._admin_token.equals(token.reveal()):
            return Principal.admin_token()
        if self.verifier is None or token.reveal().count(".") != 2:
            raise _invalid("the token is not valid here")
        verified = await self.verifier.verify(token.reveal())
        return await self._users.identify(
            verified.subject, verified.email, email_verified=verified.email_verified
        )


def bearer_token(request) -> Secret[str] | None:
    """The bearer token of a request, or None when there is none. Raises
    Unauthorized for a header that is present but unusable."""
    raw = request.getHeader(b"authorization")
    if raw is None:
        return None
    if len(raw) > MAX_TOKEN_BYTES:
        raise _invalid("the Authorization header is too long")
    scheme, _, value = raw.partition(b" ")
    if scheme.lower() != b"bearer" or not value.strip():
        raise Unauthorized("send 'Authorization: Bearer <token>'", code="missing_token")
    try:
        return Secret(value.strip().decode("ascii"))
    except UnicodeDecodeError:
        raise _invalid("the token is malformed") from None
