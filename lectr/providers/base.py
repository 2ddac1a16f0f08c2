"""The provider interface and the registry.

A provider knows its origin (``base_url``, which may carry a path prefix),
how a request authenticates upstream, how to check that a key works, and
the shape of its error bodies, so that Lectr's own errors on a provider's
routes are raised by that provider's SDK as its usual exception types.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import ClassVar
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from lectr.providers.http import ExchangeTimedOut
from lectr.util.secret import Secret

# What a provider's error text may contain that must never be echoed:
# key-like tokens (OpenAI's "Incorrect API key provided: sk-abc*****xyz").
_KEYLIKE = re.compile(r"\b(?:sk|lc|key|pk|rk)[-_][A-Za-z0-9_\-*.]{4,}")


def scrub_body(body: bytes) -> bytes:
    """A provider's error body with key-like tokens masked, every other byte
    kept (OpenAI's 401 quotes part of the key it was sent: the org's own
    provider key must not reach the org's clients even in part)."""
    text = body.decode("utf-8", "surrogateescape")
    cleaned = _KEYLIKE.sub("***", text)
    return body if cleaned == text else cleaned.encode("utf-8", "surrogateescape")


def scrub(text: str, secret: str | None = None, limit: int = 300) -> str:
    """Provider-supplied text made safe to show: no key-like tokens, one
    line, bounded length."""
    if secret:
        text = text.replace(secret, "***")
    text = _KEYLIKE.sub("***", text)
    text = " ".join(text.split())
    return text[:limit]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _network_error(e: Exception) -> str:
    """One short clause for a failed exchange (no URL, no header: the
    request carried the key)."""
    if isinstance(e, ExchangeTimedOut):
        return str(e)
    return type(e).__name__


def host_header(url: str) -> bytes:
    """The Host header for a provider origin (the port only when it is not
    the scheme's default), as Agent would compute it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    if parts.port and parts.port != default:
        return f"{host}:{parts.port}".encode("ascii")
    return host.encode("ascii")


@dataclass(frozen=True, slots=True)
class KeyValidation:
    """The outcome of checking a key with its provider.

    ``valid`` True: the provider accepted it. False with ``reachable`` True:
    the provider refused it (``reason`` says why). ``reachable`` False: the
    provider could not be asked (network error, timeout, 5xx).
    """

    valid: bool
    reachable: bool
    status: int | None
    reason: str


# error kinds Lectr raises, mapped per dialect
ERROR_KINDS = (
    "invalid_request",  # 400
    "authentication",  # 401
    "permission",  # 403
    "not_found",  # 404
    "too_large",  # 413
    "upstream_unavailable",  # 502
    "upstream_timeout",  # 504
    "internal",  # 500
)


class Provider:
    """Base class; subclasses set the class variables and ``auth_headers``."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    default_base_url: ClassVar[str]
    #: model-name prefixes this provider serves (for hints and validation)
    model_prefixes: ClassVar[tuple[str, ...]] = ()
    #: headers (lower-case) that carry the key upstream
    auth_header_names: ClassVar[tuple[bytes, ...]]
    #: headers every key-validation request needs besides auth
    validation_headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()

    _log = Logger()

    def __init__(self, base_url: str | None = None) -> None:
        url = (base_url or self.default_base_url).rstrip("/")
        self.base_url = url
        self._base_bytes = url.encode("ascii")
        self.host = host_header(url)  # the Host header upstream

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.base_url}>"

    # --- upstream -------------------------------------------------------------

    def upstream_url(self, path: bytes) -> bytes:
        """``path`` is the provider path with its query string (``/v1/…?…``)."""
        return self._base_bytes + path

    def auth_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        raise NotImplementedError

    # --- errors ---------------------------------------------------------------

    def error_body(self, kind: str, message: str, request_id: str | None = None) -> bytes:
        raise NotImplementedError

    # --- key validation -------------------------------------------------------

    async def validate_key(
        self, key: Secret[str], http_request, *, timeout: float = 10.0
    ) -> KeyValidation:
        """``GET /v1/models`` with the key. ``http_request(method, url,
        headers, timeout)`` performs one request without following redirects
        and returns ``(status, body bytes)``; it raises on network errors."""
        headers = dict(self.auth_headers(key.reveal()))
        headers.update(self.validation_headers)
        url = self.upstream_url(b"/v1/models")
        asked = f"GET {url.decode('ascii')}"
        try:
            status, body = await http_request(b"GET", url, headers, timeout)
        except CancelledError:
            raise
        except Exception as e:  # network errors of every kind: the provider was not reached
            return KeyValidation(
                valid=False,
                reachable=False,
                status=None,
                reason=f"{self.display_name} could not be reached ({_network_error(e)}; {asked})",
            )
        reason = scrub(self.error_message(body), key.reveal())
        if 200 <= status < 300:
            return KeyValidation(True, True, status, "accepted")
        if status == 429:
            # Rate limited, but authenticated: the key works.
            return KeyValidation(True, True, status, "accepted (provider is rate limiting)")
        if status in (401, 403):
            return KeyValidation(
                False, True, status, reason or f"{self.display_name} refused the key ({status})"
            )
        # Answered, but not about the key: say what happened and what was asked.
        what = f"{self.display_name} answered {status} {_phrase(status)} to {asked}"
        if 300 <= status < 400:
            what += " (a redirect, not followed)"
        elif status == 404:
            what += " (is the provider's base URL right? It must not end in /v1)"
        return KeyValidation(False, False, status, what + (f": {reason}" if reason else ""))

    def error_message(self, body: bytes) -> str:
        """The human message inside one of this provider's error bodies."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return ""
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        return ""


class ProviderRegistry:
    """The providers Lectr serves, by name, with their configured origins."""

    def __init__(self, providers: list[Provider]) -> None:
        self._by_name = {p.name: p for p in providers}

    @classmethod
    def from_config(cls, config) -> ProviderRegistry:
        from lectr.providers.anthropic import Anthropic
        from lectr.providers.openai import OpenAI

        return cls([OpenAI(config.openai_base_url), Anthropic(config.anthropic_base_url)])

    def get(self, name: str) -> Provider | None:
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> Provider:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def __iter__(self):
        return iter(self._by_name.values())
