"""The provider interface.

A :class:`Provider` owns everything specific to one upstream, so that the
router, the policy chain, the attempt loop, the meters, the admin API and the
CLI never name a provider:

- ``name`` (its route prefix: ``/<name>/v1/…``), ``display_name``, and its
  ``dialect`` (:mod:`lectr.providers.dialects`: error bodies, request shape,
  stream format, usage fields);
- its default base URL, and whether a key may carry its own base URL
  (``key_base_url_hosts``: Azure resources), so org admins never point Lectr
  at an arbitrary host;
- :meth:`upstream_path`: how a Lectr API path (``/v1/chat/completions``)
  becomes the provider's path (a version prefix dropped, a deployment path);
- :meth:`model_in_path`: a model named by the path rather than the body;
- :meth:`sign`: how a request is authenticated (a header, a query
  parameter, or a signature computed over method, URL, headers and body -
  the whole :class:`UpstreamRequest` is passed for that);
- :meth:`validate_key`: how a key is checked before it is stored;
- :meth:`plan`: what the request asks for and the bytes to send (through
  the dialect, e.g. asking an OpenAI-style stream for its usage).

Built-in providers are modules of :mod:`lectr.providers.catalogue`; custom
ones (vLLM, Ollama, a private endpoint) are rows made by a global admin
(:mod:`lectr.providers.custom`). :mod:`lectr.providers.registry` holds both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from http import HTTPStatus
from typing import TYPE_CHECKING, ClassVar, Protocol
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from lectr.providers.http import ExchangeTimedOut
from lectr.usage.stream_usage import CHAT_STREAM_USAGE
from lectr.util.secret import Secret

if TYPE_CHECKING:
    from lectr.providers.body import ReadBody
    from lectr.providers.dialects import Dialect
    from lectr.usage.meters import RequestPlan

# What a provider's error text may contain that must never be echoed:
# key-like tokens (OpenAI's "Incorrect API key provided: sk-abc*****xyz").
_KEYLIKE_PATTERN = (
    r"\b(?:(?:sk|lc|key|pk|rk|gsk|xai|fw)[-_][A-Za-z0-9_\-*.]{4,}|AIza[A-Za-z0-9_\-]{20,})"
)
_KEYLIKE = re.compile(_KEYLIKE_PATTERN)
_KEYLIKE_BYTES = re.compile(_KEYLIKE_PATTERN.encode())


def secret_core(secret: bytes) -> bytes:
    """The part of a key that identifies it (past its first third: the
    ``sk-proj-`` prefix and a little more), lower-cased: an echo of the key
    without its prefix, or in another case, holds it."""
    return secret[len(secret) // 3 :].lower()


#: percent escapes a value (an error body, a header, a reason) is decoded
#: with to look for the key: urllib decodes them in a Python loop (1 MiB of
#: them, echoed by a provider from a client's request, took 0.5 s), so a
#: value with more is taken to quote the key (masked, or withheld)
ESCAPES_CHECKED_MAX = 4096
#: JSON values of an error body looked through for the key: a body with
#: more is withheld whole (each costs a Python call; 1 MiB of empty arrays
#: took 0.5 s)
SCRUB_VALUES_MAX = 50_000


def quotes_secret(data: bytes, core: bytes) -> bool:
    """Whether ``data`` holds the key whose :func:`secret_core` is ``core``,
    in any case, percent-escaped or not (or may: past
    ``ESCAPES_CHECKED_MAX`` escapes it is not decoded, and taken to)."""
    lower = data.lower()
    if core in lower:
        return True
    escapes = data.count(b"%")
    if not escapes:
        return False
    return escapes > ESCAPES_CHECKED_MAX or core in unquote_to_bytes(data).lower()


def scrub_body(body: bytes, secret: bytes | None = None) -> bytes:
    """An error body with the org's provider key (``secret``) and any
    key-like token masked: OpenAI's 401 quotes part of the key it was sent,
    and a 400 may quote a header; the org's provider key must not reach the
    org's clients even in part. The exact key and its core are masked in
    any case; in JSON every string is read unescaped (``sk\\u002d…`` is the
    key to a client's parser) and the body written again if one held it; a
    body still quoting the key some other way (percent-escaped) is withheld
    whole (``***``)."""
    cleaned = body
    if secret:
        core = secret_core(secret)
        cleaned = body.replace(secret, b"***")
        if cleaned.count(b"%") > ESCAPES_CHECKED_MAX:
            return b"***"  # (too many escapes to decode: it may quote the key)
        # (any body with a \u escape is read as JSON if it is: it may begin
        # with whitespace, a BOM, or be a bare string)
        if quotes_secret(cleaned, core) or b"\\u" in cleaned:
            try:
                cleaned = _scrub_json(cleaned, core)
            except _TooLarge:
                return b"***"
            if quotes_secret(cleaned, core):
                return b"***"
    return _KEYLIKE_BYTES.sub(b"***", cleaned)


class _TooLarge(Exception):
    """An error body with more JSON values than are looked through, or
    nested deeper than a walk goes: withheld whole."""


def _scrub_json(body: bytes, core: bytes) -> bytes:
    """``body`` with every JSON string holding ``core`` (any case) masked;
    byte for byte when none does or it is not JSON."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return _mask_core(body, core)
    pattern = re.compile(re.escape(core.decode("ascii", "replace")), re.IGNORECASE)
    changed = False
    budget = SCRUB_VALUES_MAX

    def clean(value):
        nonlocal changed, budget
        budget -= 1
        if budget < 0:
            raise _TooLarge
        if isinstance(value, str):
            masked = pattern.sub("***", value)
            if "%" in masked and pattern.search(unquote(masked)):
                masked = "***"
            changed |= masked != value
            return masked
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        return value

    try:
        doc = clean(doc)
    except RecursionError:  # (nested about as deep as json.loads allows)
        raise _TooLarge from None
    return json.dumps(doc, separators=(",", ":")).encode() if changed else body


def _mask_core(data: bytes, core: bytes) -> bytes:
    return re.sub(re.escape(core), b"***", data, flags=re.IGNORECASE)


#: the shortest key part a successful answer is checked for: a custom
#: provider's short token would match ordinary text and change answers
ECHO_CORE_MIN = 12
#: a held tail at least this long is masked at the end of an answer (a
#: shorter one is far likelier to be text than the start of the key)
ECHO_TAIL_MASKED = 8


def echo_core(secret: bytes) -> bytes | None:
    """What a successful (2xx) answer is checked for: the identifying part of
    the key sent (past its first third), exactly as it is - an upstream that
    echoes its request (a debug endpoint, a misconfigured self-hosted
    server) would write it as it came, and a JSON string or a URL writes a
    key's characters unchanged. None when the key is too short to look for
    without matching ordinary text, or holds the mask's ``*``."""
    core = secret[len(secret) // 3 :]
    if len(core) < ECHO_CORE_MIN or b"*" in core:
        return None
    return core


def mask_echoes(data: bytes, core: bytes) -> tuple[bytes, bytes]:
    """A piece of a successful answer (with the tail held from the piece
    before it first) with every copy of ``core`` masked, byte for byte
    (``*``: a ``Content-Length`` already sent stays true), split into what
    may be sent now and what is held: its longest tail that is the start of
    ``core``, which the next piece may complete. Whatever pieces an answer
    arrives in, no copy of ``core`` is sent (``test_echo_guard``)."""
    if data.find(core) >= 0:
        data = data.replace(core, b"*" * len(core))
    n = len(data)
    first = core[:1]
    i = data.find(first, max(0, n - len(core) + 1))
    while i >= 0:
        if core.startswith(data[i:]):
            return data[:i], data[i:]
        i = data.find(first, i + 1)
    return data, b""


def echo_tail_end(tail: bytes) -> bytes:
    """The tail still held when a successful answer ends: the start of the
    key (masked) when it is long enough to be more than chance."""
    return b"*" * len(tail) if len(tail) >= ECHO_TAIL_MASKED else tail


#: a run of this many characters of a key, in any case, is a quote of it
ECHO_RUN = 8


def _mask_runs(text: str, secret: str) -> str:
    """``text`` with every run of :data:`ECHO_RUN` or more characters of
    ``secret`` (any case) masked; withheld whole when it still quotes one
    once percent-escapes are read."""
    key = secret.lower()
    n = ECHO_RUN
    if len(key) < n:
        return text
    runs = {key[i : i + n] for i in range(len(key) - n + 1)}
    low = text.lower()
    if len(low) != len(text):
        # one character per character, so that a run found in ``low`` is
        # masked where it is in ``text`` ("İ" lowers to two)
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    hits = [i for i in range(len(low) - n + 1) if low[i : i + n] in runs]
    if hits:
        masked = bytearray(len(text))
        for i in hits:
            masked[i : i + n] = b"\x01" * n
        out, i = [], 0
        while i < len(text):
            if masked[i]:
                out.append("***")
                while i < len(text) and masked[i]:
                    i += 1
            else:
                out.append(text[i])
                i += 1
        text = "".join(out)
    if "%" in text:
        plain = unquote(text).lower()
        if any(plain[i : i + n] in runs for i in range(len(plain) - n + 1)):
            return "(the provider's message quoted the key; withheld)"
    return text


def scrub(text: str, secret: str | None = None, limit: int = 300) -> str:
    """Provider-supplied text made safe to show: no key-like tokens, no run
    of the key's characters (cut short, masked at one end, in another case,
    percent-escaped: a key check's message may quote the key it was sent),
    one line, bounded length. Only the first ``3 * limit`` characters of
    the one-line text are read (a message may be a MiB): a run of the key
    cut there is masked as anywhere else when 8 of its characters remain."""
    text = " ".join(text.split())[: 3 * limit]
    if secret:
        text = _mask_runs(text.replace(secret, "***"), secret)
    text = _KEYLIKE.sub("***", text)
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
    """The Host header for a base URL (the port only when it is not the
    scheme's default)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    if parts.port and parts.port != default:
        return f"{host}:{parts.port}".encode("ascii")
    return host.encode("ascii")


def url_path(url: str) -> bytes:
    """The path prefix of a base URL, without a trailing slash."""
    return urlsplit(url).path.rstrip("/").encode("ascii")


@dataclass(frozen=True, slots=True)
class KeyValidation:
    """The outcome of checking a key with its provider.

    ``valid`` True: the provider accepted it. False with ``reachable`` True:
    the provider refused it (``reason`` says why). ``reachable`` False: the
    provider could not be asked or gave no usable answer (network error,
    timeout, redirect, 404, 5xx); ``reason`` says what happened and the URL
    asked.
    """

    valid: bool
    reachable: bool
    status: int | None
    reason: str


class KeyOptions(Protocol):
    """What a stored provider key carries besides its secret (a pool key)."""

    base_url: str | None  # only for providers with key_base_url_hosts
    api_version: str | None  # Azure


@dataclass(frozen=True, slots=True)
class NoOptions:
    base_url: str | None = None
    api_version: str | None = None


NO_OPTIONS = NoOptions()


@dataclass(slots=True)
class UpstreamRequest:
    """One upstream call as it is being built, then signed.

    ``base_url`` names the origin (scheme, host, port, path prefix);
    ``target`` is the full request-target sent to it (the base URL's path
    prefix included, with the query string)."""

    method: bytes
    base_url: str
    target: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes | None = None


# --- signing ------------------------------------------------------------------------


class HeaderAuth:
    """The key in one header (``Authorization: Bearer``, ``x-api-key``,
    Azure's ``api-key``)."""

    __slots__ = ("name", "prefix")

    def __init__(self, name: bytes, prefix: bytes = b"") -> None:
        self.name = name
        self.prefix = prefix

    def sign(self, request: UpstreamRequest, key: str) -> None:
        request.headers.append((self.name, self.prefix + key.encode("ascii")))

    @property
    def header_names(self) -> tuple[bytes, ...]:
        return (self.name.lower(),)


BEARER = HeaderAuth(b"Authorization", b"Bearer ")
X_API_KEY = HeaderAuth(b"x-api-key")
API_KEY = HeaderAuth(b"api-key")

#: every header a client could use to carry a credential to a provider:
#: never forwarded (the org's own key is injected instead)
CREDENTIAL_HEADERS = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"x-api-key",
        b"api-key",
        b"x-goog-api-key",
        b"cookie",
        b"ocp-apim-subscription-key",
    }
)


# --- providers ----------------------------------------------------------------------

# Lower values come first in listings (openai, anthropic, then the rest by name).
DEFAULT_ORDER = 100


class Provider:
    """Base class of every provider. Subclasses set the class variables and
    override what differs."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    dialect: ClassVar[Dialect]
    #: where requests go unless configured otherwise (``LECTR_<NAME>_BASE_URL``);
    #: None: every key carries its own base URL
    default_base_url: ClassVar[str | None]
    #: host patterns (fnmatch) a key's own base URL may name; empty: keys
    #: cannot carry a base URL
    key_base_url_hosts: ClassVar[tuple[str, ...]] = ()
    #: keys may carry an API version (Azure's ``api-version``)
    accepts_api_version: ClassVar[bool] = False
    #: the API path that lists models: key validation asks it
    models_path: ClassVar[bytes] = b"/v1/models"
    #: headers every key-validation request needs besides auth
    validation_headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()
    #: model-name prefixes this provider serves (hints in help texts)
    model_prefixes: ClassVar[tuple[str, ...]] = ()
    #: the OpenAI-dialect streams to ask for their usage (``stream_options``):
    #: chat by default; none for upstreams that may refuse the member
    stream_usage_paths: ClassVar[frozenset[str]] = CHAT_STREAM_USAGE
    auth: ClassVar[HeaderAuth] = BEARER
    order: ClassVar[int] = DEFAULT_ORDER
    custom: ClassVar[bool] = False

    _log = Logger()

    def __init__(self, base_url: str | None = None) -> None:
        url = base_url or self.default_base_url
        self.base_url: str | None = url.rstrip("/") if url else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.base_url}>"

    # --- the request --------------------------------------------------------------

    def plan(
        self,
        method: bytes,
        api_path: str,
        read: ReadBody,
        model: str | None,
        options: KeyOptions = NO_OPTIONS,
    ) -> RequestPlan:
        """What the request asks for and the bytes to send for ``model``
        (the body's own model, or the one a route or ``provider/model``
        chose) with the key ``options`` (its API version)."""
        return self.dialect.plan(method, api_path, read, model, self.stream_usage(options))

    def stream_usage(self, options: KeyOptions) -> frozenset[str]:
        """The paths whose streams, sent with a key of these options, may be
        asked for their usage (``stream_options.include_usage``)."""
        return self.stream_usage_paths

    def model_in_path(self, api_path: str) -> str | None:
        """The model a path names (Gemini's native ``/models/{m}:…``), or None
        when the model is in the body."""
        return None

    def base_url_for(self, options: KeyOptions) -> str | None:
        return options.base_url or self.base_url

    def upstream_path(self, api_path: bytes, model: str | None, options: KeyOptions) -> bytes:
        """The path to request, before the base URL's own prefix: by default
        the API path as it is (``/v1/chat/completions``)."""
        return api_path

    def query(self, query: bytes, options: KeyOptions) -> bytes:
        """The query string to send (``b""`` or ``b"?…"``)."""
        return query

    def request(
        self,
        method: bytes,
        api_path: bytes,
        query: bytes,
        model: str | None,
        options: KeyOptions,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> UpstreamRequest:
        """The upstream request, before signing. Raises ValueError when this
        provider cannot be reached with these options (no base URL)."""
        base = self.base_url_for(options)
        if base is None:
            raise ValueError(f"{self.display_name} keys need a base URL")
        target = url_path(base) + self.upstream_path(api_path, model, options)
        return UpstreamRequest(method, base, target + self.query(query, options), headers, body)

    def sign(self, request: UpstreamRequest, key: Secret[str], options: KeyOptions) -> None:
        """Add the credential. Header schemes append one header; a scheme that
        signs the whole request (AWS SigV4) would read method, base URL,
        target, headers and body here and add its headers last."""
        self.auth.sign(request, key.reveal())

    @property
    def credential_headers(self) -> tuple[bytes, ...]:
        return self.auth.header_names

    # --- key options ------------------------------------------------------------------

    def check_key_base_url(self, url: str) -> bool:
        """May a key of this provider carry ``url`` as its base URL?"""
        if not self.key_base_url_hosts:
            return False
        host = (urlsplit(url).hostname or "").lower()
        return any(fnmatchcase(host, pattern) for pattern in self.key_base_url_hosts)

    # --- errors -------------------------------------------------------------------------

    def error_body(self, kind: str, message: str, request_id: str | None = None) -> bytes:
        return self.dialect.error_body(kind, message, request_id)

    # --- key validation -----------------------------------------------------------------

    async def validate_key(
        self, key: Secret[str], http_request, *, timeout: float = 10.0, options=NO_OPTIONS
    ) -> KeyValidation:
        """Ask the provider to list models with the key. ``http_request(method,
        url, headers, timeout)`` performs one request without following
        redirects, bounded by ``timeout`` as a whole, and returns ``(status,
        body bytes)``; it raises on network errors and timeouts."""
        try:
            upstream = self.request(b"GET", self.models_path, b"", None, options, [], None)
        except ValueError as e:
            return KeyValidation(False, False, None, str(e))
        upstream.headers.extend(self.validation_headers)
        self.sign(upstream, key, options)
        base = upstream.base_url
        parts = urlsplit(base)
        url = f"{parts.scheme}://{parts.netloc}".encode("ascii") + upstream.target
        asked = "GET " + scrub(url.decode("ascii", "replace"), key.reveal())
        try:
            status, body = await http_request(b"GET", url, dict(upstream.headers), timeout)
        except CancelledError:
            raise
        except Exception as e:  # network errors of every kind: the provider was not reached
            return KeyValidation(
                valid=False,
                reachable=False,
                status=None,
                reason=f"{self.display_name} could not be reached ({_network_error(e)}; {asked})",
            )
        reason = scrub(self.dialect.error_message(body), key.reveal())
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
