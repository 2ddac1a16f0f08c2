"""Serving the dashboard: ``/`` (index.html, never cached) and
``/ui/<version>/<file>`` (cached for a year: the version is a content hash),
each with the security headers below. Everything else on the admin port is
the admin API.

The Content-Security-Policy allows scripts, styles and images from this
origin only (no inline script or style, no eval), API calls to this origin
plus the OIDC issuer's token endpoint when one is configured, no framing,
and Trusted Types (the code never turns a string into HTML).
"""

from __future__ import annotations

import re

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from lectr.dashboard.assets import Asset, Assets

IMMUTABLE = b"public, max-age=31536000, immutable"


#: an origin as a CSP source: scheme, host (or [IPv6]) and port, nothing else
_ORIGIN_SOURCE = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def content_security_policy(connect: list[str]) -> str:
    """The policy, with ``connect`` (origins from the issuer's discovery
    document) among the sources of connect-src: one that is not a plain
    origin (a ``;``, a space, a quote) is left out, so that it cannot add
    or end a directive."""
    sources = " ".join(["'self'", *(c for c in connect if _ORIGIN_SOURCE.fullmatch(c))])
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            f"connect-src {sources}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        )
    )


SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    b"permissions-policy": b"camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}


class DashboardResource(Resource):
    """A leaf: the admin port's root resource hands it ``/`` and ``/ui/…``."""

    isLeaf = True
    _log = Logger()

    def __init__(self, assets: Assets, sign_in=None) -> None:
        super().__init__()
        self.assets = assets
        self._sign_in = sign_in  # lectr.admin.signin.SignInOptions

    @staticmethod
    def handles(path: bytes) -> bool:
        return path == b"/" or path.startswith(b"/ui/")

    def render(self, request):
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._plain(request, 405, b"use GET on the dashboard's paths\n")
        if request.path == b"/":
            d = ensureDeferred(self._index(request))
            request.notifyFinish().addErrback(lambda _: d.cancel())
            d.addErrback(self._index_failed, request)
            return NOT_DONE_YET
        asset = self._asset(request.path)
        if asset is None:
            return self._plain(request, 404, b"not found\n")
        self._csp(request, [])
        request.setHeader(b"cache-control", IMMUTABLE)
        return self._body(request, asset)

    def _asset(self, path: bytes) -> Asset | None:
        # /ui/<version>/<name>: a lookup in memory, never a file-system path
        parts = path.split(b"/", 3)
        if len(parts) != 4:
            return None
        try:
            version, name = parts[2].decode("ascii"), parts[3].decode("ascii")
        except UnicodeDecodeError:
            return None
        return self.assets.get(version, name)

    async def _index(self, request) -> None:
        connect = await self._sign_in.connect_sources() if self._sign_in else []
        self._csp(request, connect)
        request.setHeader(b"cache-control", b"no-cache")
        body = self._body(request, self.assets.index)
        if not request.finished:
            request.write(body)
            request.finish()

    def _index_failed(self, failure, request) -> None:
        if failure.check(CancelledError):
            return None  # the browser went away
        self._log.failure("serving the dashboard failed", failure)
        if not request.finished:
            request.write(self._plain(request, 500, b"internal error\n"))
            request.finish()
        return None

    @staticmethod
    def _csp(request, connect: list[str]) -> None:
        request.setHeader(b"content-security-policy", content_security_policy(connect).encode())

    @staticmethod
    def _body(request, asset: Asset) -> bytes:
        request.setHeader(b"content-type", asset.content_type)
        request.setHeader(b"content-length", str(len(asset.body)).encode())
        return asset.body

    @classmethod
    def _plain(cls, request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        cls._csp(request, [])  # (an error is a dashboard response too)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return body
