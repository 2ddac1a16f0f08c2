"""How the dashboard signs in: with the admin token, and/or with the OIDC
issuer (authorization code + PKCE in the browser), for which it needs the
issuer's authorization and token endpoints, read from its discovery document
(``<issuer>/.well-known/openid-configuration``).

The document is fetched server-side with treq (never a blocking client), in
the background at start-up, cached for ``max_age`` and refetched on demand
at most every ``retry_interval`` while it is missing; the last good answer
is kept when the issuer fails. A document is used only when it names the
configured issuer and endpoints the browser may reach (https, or http on a
loopback host for development). Ages are measured as the JWKS cache measures
them (:class:`lectr.admin.auth.Moment`): a wall clock stepped back neither
keeps an old document fresh nor holds off a retry.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr import __version__
from lectr.admin.auth import STEADY_CLOCK, HttpGet, Moment
from lectr.config import OIDCConfig
from lectr.util.deferred import OperationTimedOut, timeout_without_cancel

#: what the dashboard asks the issuer for
SCOPE = "openid profile email"


@dataclass(frozen=True, slots=True)
class Endpoints:
    authorization_endpoint: str
    token_endpoint: str


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoint(doc: dict, name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or len(value) > 2048:
        raise ValueError(f"the discovery document has no {name}")
    parts = urlsplit(value)
    host = parts.hostname or ""
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(host)):
        if host and not parts.username and not parts.password and not parts.fragment:
            return value
    raise ValueError(f"the discovery document's {name} is not an https URL")


def parse_discovery(body: bytes, issuer: str) -> Endpoints:
    """The endpoints of a discovery document; ValueError when it is unusable."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the discovery document is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("the discovery document is not a JSON object")
    if doc.get("issuer") != issuer:
        raise ValueError("the discovery document names another issuer")
    methods = doc.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        raise ValueError("the issuer does not support PKCE with S256")
    return Endpoints(_endpoint(doc, "authorization_endpoint"), _endpoint(doc, "token_endpoint"))


class DiscoveryUnavailable(Exception):
    """No usable discovery document could be fetched (the message says why)."""


class OIDCDiscovery:
    _log = Logger()

    def __init__(
        self,
        issuer: str,
        *,
        http_get: HttpGet,
        clock,
        retry_interval: float = 30.0,
        max_age: float = 3600.0,
        timeout: float = 10.0,
        steady_clock: Callable[[], float] = STEADY_CLOCK,
    ) -> None:
        self.issuer = issuer
        self.url = discovery_url(issuer)
        self._http_get = http_get
        self._clock = clock  # the wall clock (the reactor)
        self._steady_clock = steady_clock
        self._retry_interval = retry_interval
        self._max_age = max_age
        self._timeout = timeout
        self._endpoints: Endpoints | None = None
        self._problem = "the issuer's discovery document has not been fetched yet"
        self._fetched_at: Moment | None = None
        self._attempted_at: Moment | None = None
        self._fetching: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self.fetches = 0

    def start(self) -> None:
        self._begin_fetch()

    def stop(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()

    @property
    def cached(self) -> Endpoints | None:
        return self._endpoints

    async def endpoints(self) -> Endpoints:
        """The endpoints (fetching them first when there are none and the
        last attempt is old enough); DiscoveryUnavailable otherwise."""
        now = self._now()
        if self._endpoints is not None:
            stale = self._fetched_at is not None and self._fetched_at.age(now) > self._max_age
            if stale and self._may_fetch(now):
                self._begin_fetch()  # in the background: the cached answer serves
            return self._endpoints
        if self._fetching is not None or self._may_fetch(now):
            await self._wait_for_fetch()
        if self._endpoints is None:
            raise DiscoveryUnavailable(self._problem)
        return self._endpoints

    def _may_fetch(self, now: Moment) -> bool:
        return self._attempted_at is None or self._attempted_at.age(now) >= self._retry_interval

    def _now(self) -> Moment:
        return Moment.now(self._clock, self._steady_clock)

    def _begin_fetch(self) -> None:
        if self._fetching is not None:
            return
        self._attempted_at = self._now()
        self.fetches += 1
        d = ensureDeferred(self._fetch())
        self._fetching = d
        d.addBoth(self._fetch_done)

    def _wait_for_fetch(self) -> Deferred[None]:
        self._begin_fetch()
        if self._fetching is None:
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
            self._log.failure("OIDC discovery failed unexpectedly", result)

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
            endpoints = parse_discovery(body, self.issuer)
        except ValueError as e:
            self._failed(str(e))
            return
        self._endpoints = endpoints
        self._fetched_at = self._now()
        self._log.info("read the OIDC endpoints of {issuer}", issuer=self.issuer)

    def _failed(self, reason: str) -> None:
        # the details go to the log only: /admin/ui-config is public
        self._problem = "the identity provider's configuration cannot be read; try again shortly"
        kept = "keeping the cached endpoints" if self._endpoints else "no endpoints cached"
        self._log.warn(
            "cannot read {url}: {reason}; {kept}", url=self.url, reason=reason, kept=kept
        )


class SignInOptions:
    """What ``GET /admin/ui-config`` tells the dashboard, and which origins
    its Content-Security-Policy lets it call (``connect-src``)."""

    def __init__(
        self,
        *,
        admin_token: bool,
        oidc: OIDCConfig | None,
        discovery: OIDCDiscovery | None,
        reactor,
        wait: float = 5.0,
    ) -> None:
        self.admin_token = admin_token
        # the dashboard needs a client id to start a sign-in
        self.oidc = oidc if oidc is not None and oidc.client_id else None
        self.discovery = discovery if self.oidc is not None else None
        self._reactor = reactor
        self._wait = wait

    async def _endpoints(self) -> tuple[Endpoints | None, str | None]:
        """The endpoints, waiting at most ``wait`` seconds for a fetch."""
        if self.discovery is None:
            return None, "OIDC discovery is not configured"
        try:
            found = await timeout_without_cancel(
                ensureDeferred(self.discovery.endpoints()), self._wait, self._reactor
            )
        except DiscoveryUnavailable as e:
            return None, str(e)
        except OperationTimedOut:
            return None, "the identity provider does not answer; try again shortly"
        return found, None

    async def describe(self) -> dict:
        oidc = None
        if self.oidc is not None:
            endpoints, problem = await self._endpoints()
            oidc = {
                "issuer": self.oidc.issuer,
                "client_id": self.oidc.client_id,
                "audience": self.oidc.audience,
                "scope": SCOPE,
                "authorization_endpoint": endpoints and endpoints.authorization_endpoint,
                "token_endpoint": endpoints and endpoints.token_endpoint,
                "problem": problem,
            }
        return {"version": __version__, "admin_token": self.admin_token, "oidc": oidc}

    async def connect_sources(self) -> list[str]:
        """Origins besides the dashboard's own that the browser may call:
        the issuer's token endpoint (the code exchange)."""
        if self.oidc is None:
            return []
        endpoints, _ = await self._endpoints()
        if endpoints is None:
            return []
        return [origin_of(endpoints.token_endpoint)]
