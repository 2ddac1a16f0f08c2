"""One proxied request: the state machine between the client and the
provider.

All on the reactor thread, and on the hot path without touching the
database:

1. check the request target and route it (:mod:`lectr.proxy.target`);
2. authenticate the Lectr key from the headers, *before* reading the body
   (in-memory cache; the database only on a miss, with the body unread);
3. read the body once, strictly (:mod:`lectr.providers.body`);
4. run the policy chain (:mod:`lectr.policy.chain`): org, route, provider
   settings, keys, limits - any step may refuse, none calls upstream;
5. the attempt loop: choose a target and a key, sign and send the request,
   and on a failure that may be retried (before any byte reached the
   client) try the next one (:mod:`lectr.policy.plan`);
6. relay status, headers and body as they arrive, with backpressure (a
   slow client pauses the provider's socket), metering usage on the way and
   masking the org's key in error bodies;
7. hand one usage record to the recorder (never awaited).

**Every entry point is guarded** (:func:`guarded`): whatever raises in a
callback from the server, the key cache, a policy step, a timer or the
upstream client ends the call through :meth:`Call.crash` - an answer in the
route's dialect (or an aborted connection once the answer has started), a
request-log row, metrics, and removal from the active set - exactly once
(:meth:`Call._end`). A new step or callback cannot leave a request
unanswered or leak its body.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
import zlib
from datetime import UTC, datetime
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from lectr.managers.auth import RATE_LIMITED, UNKNOWN
from lectr.managers.orgs import looks_like_key
from lectr.policy.chain import Refusal, run_chain
from lectr.policy.health import parse_retry_after
from lectr.policy.plan import failure_class
from lectr.pricing.cost import format_usd
from lectr.providers.base import (
    echo_core,
    echo_tail_end,
    mask_echoes,
    quotes_secret,
    scrub_body,
    secret_core,
)
from lectr.providers.body import BodyRefused, parses, read_body
from lectr.providers.dialects import ERROR_STATUS
from lectr.proxy.headers import downstream
from lectr.proxy.ids import new_request_id
from lectr.proxy.judge import JUDGE_MIN, JudgeUnavailable
from lectr.proxy.target import error_provider, route, target_problem
from lectr.tracing import Attempt as TracedAttempt
from lectr.tracing import RequestSummary
from lectr.usage.model import NO_USAGE, NOTHING_RELAYED, UsageRecord

_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
_NO_LENGTH_CODES = frozenset({204, 304})
#: the largest provider error body held to be masked; a larger one is cut
SCRUB_MAX = 1 << 20
_JSON = (b"content-type", b"application/json")
_SHOULD_NOT_RETRY = (b"x-should-retry", b"false")
_CONNECT_KINDS = frozenset({"connect", "dns", "tls"})
#: the server's protocol error kinds (lectr.http.server) → Lectr's error kinds
_SERVER_KINDS = {"body_timeout": "timeout", "bad_request": "invalid_request"}


#: the codings a held answer is decoded from
_INFLATABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})


def _inflate(body: bytes, wbits: int) -> bytes:
    """A compressed error body decoded (``wbits``, else raw deflate, as some
    servers send), at most SCRUB_MAX bytes of it: b"" when it does not decode
    or is larger (a 1 MiB gzip body may inflate to a GiB: never on the
    reactor)."""
    for bits in (wbits, -15):
        d = zlib.decompressobj(bits)
        try:
            out = d.decompress(body, SCRUB_MAX + 1)
        except zlib.error:
            continue
        if d.eof:
            return out
        if len(out) > SCRUB_MAX:
            return b""
    return b""


def _content_coding(values: list[bytes]) -> bytes | None:
    """The one coding an answer was sent in, from every Content-Encoding
    field (a list, possibly over several fields): None for none or
    ``identity``; several codings, stacked or repeated, come back as they
    are, which no decoder takes, so a held body is withheld rather than
    relayed half decoded (security.md)."""
    codings = [c for c in (part.strip().lower() for v in values for part in v.split(b",")) if c]
    codings = [c for c in codings if c != b"identity"]
    if not codings:
        return None
    return b", ".join(codings)


def _decoded(body: bytes, encoding: bytes | None) -> bytes | None:
    """A held body decoded from its coding (:func:`_content_coding`; at
    most SCRUB_MAX bytes): as it is when it has none; None when the coding
    is not one Lectr decodes, or several, or the body does not decode."""
    if encoding is None:
        return body
    if encoding not in _INFLATABLE:
        return None
    return _inflate(body, 47 if encoding != b"deflate" else 15) or None


_ORIGIN_HOST = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,300}")
#: what URL parsers drop from a URL before reading it (WHATWG: tab, LF, CR)
_URL_IGNORED = re.compile(r"[\t\n\r]")
_C0_AND_SPACE = "".join(map(chr, range(0x21)))
#: a scheme (RFC 3986: a letter, then letters, digits, +, -, .) and its colon
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


def redirect_origin(location: bytes | None) -> str | None:
    """Where a redirect's ``Location`` sends the client when it leaves
    Lectr: an absolute URL (``https://host/...``, ``http:host``) or a
    network-path reference (``//host/...``, and what URL parsers read as one:
    backslashes for slashes, tabs and line breaks dropped), on any origin,
    the provider's own included (from the client's side, every such address
    is around Lectr). Returned as ``scheme://host[:port]`` to name in an
    error (never the path, the query or user information, which may carry a
    key), or ``"another address"`` when it does not parse as one; None for
    a relative reference (``/v1/...``, ``x``: resolved against Lectr's
    address, it comes back through Lectr) or no Location."""
    if not location:
        return None
    text = _URL_IGNORED.sub("", location.decode("latin-1")).strip(_C0_AND_SPACE)
    if not text:
        return None
    slashed = text.replace("\\", "/")
    if _SCHEME.match(slashed) is None and not slashed.startswith("//"):
        return None
    try:
        parts = urlsplit(slashed)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "another address"
    if (parts.scheme and not parts.scheme.isalpha()) or _ORIGIN_HOST.fullmatch(host) is None:
        return "another address"
    scheme = f"{parts.scheme.lower()}:" if parts.scheme else ""
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}//{host}" + (f":{port}" if port is not None else "")


def protocol_error_kind(kind: str, status: int) -> str:
    """The Lectr error kind (a key of ERROR_STATUS, which every dialect
    renders) of a protocol error the server reported."""
    kind = _SERVER_KINDS.get(kind, kind)
    if kind in ERROR_STATUS:
        return kind
    return "invalid_request" if 400 <= status < 500 else "internal"


#: an attempt is not worth sending with less time than this left for its headers
_MIN_ATTEMPT_WINDOW = 0.05
#: an answer's retry class (lectr.policy.plan.failure_class) → the outcome
#: and fallback reason in metrics and traces
_OUTCOME = {None: "ok", "429": "429", "5xx": "5xx", "refused": "auth", "redirect": "error"}
#: what stopped a call whose attempt had no answer yet
_CANCELLED = frozenset({"client_disconnected", "shutdown"})
#: the provider's answer started and then broke
_UPSTREAM_BROKE = frozenset(
    {
        "upstream_dropped",
        "upstream_idle_timeout",
        "upstream_error_too_large",
        "upstream_undecodable",
    }
)
#: seconds an asynchronous policy step may take before the request gets 503
STEP_TIMEOUT = 10.0


def guarded(method):
    """Make ``method`` an entry point of the call: anything it raises ends
    the call (:meth:`Call.crash`) instead of escaping into the reactor."""

    @functools.wraps(method)
    def entry(self, *args):
        try:
            return method(self, *args)
        except BaseException as e:
            self.crash(Failure())
            if not isinstance(e, Exception):
                raise
            return None

    return entry


def presented_key(headers) -> str | None:
    """The Lectr key from ``Authorization: Bearer lc_…`` or ``x-api-key``,
    format-checked; None when absent or malformed."""
    value = headers.first(b"authorization")
    if value is not None and value[:7].lower() == b"bearer ":
        candidate = value[7:].strip().decode("latin-1")
        if looks_like_key(candidate):
            return candidate
    value = headers.first(b"x-api-key")
    if value is not None:
        candidate = value.strip().decode("latin-1")
        if looks_like_key(candidate):
            return candidate
    return None


# visible ASCII but ; = % , (what _header_text leaves as it is)
_SAFE_HEADER_TEXT = re.compile(r"[\x21-\x24\x26-\x2b\x2d-\x3a\x3c\x3e-\x7e]{1,200}")


def _header_text(value: str | None, limit: int = 200) -> str:
    """A value safe inside a response header: visible ASCII, ';' and '='
    escaped, bounded."""
    if not value:
        return "-"
    if _SAFE_HEADER_TEXT.fullmatch(value) is not None:
        return value  # (the common case: nothing to escape)
    out = []
    for c in value[:limit]:
        o = ord(c)
        if 0x21 <= o <= 0x7E and c not in ";=%,":
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
    return "".join(out)


_LECTR_KEY_IN_QUERY = re.compile(rb"lc_[0-9a-fA-F]{8}-", re.IGNORECASE)


def _without_lectr_keys(query: bytes) -> bytes:
    """The query string (``b""`` or ``b"?…"``) without a parameter whose value
    is a Lectr key (clients built for query-string keys - ``?key=``,
    ``?api_key=`` - put it there): the provider must never receive it."""
    if not query or _LECTR_KEY_IN_QUERY.search(unquote_to_bytes(query)) is None:
        return query
    kept = [
        p
        for p in query[1:].split(b"&")
        if _LECTR_KEY_IN_QUERY.search(unquote_to_bytes(p.replace(b"+", b" "))) is None
    ]
    return b"?" + b"&".join(kept) if kept else b""


class Call:
    """One proxied request. Attributes the policy steps may read or set:
    ``ident`` (the Lectr key's identity), ``entry`` (route entry: provider,
    API path, whether it is the bare ``/v1``), ``dialect``, ``api_path_text``,
    ``read`` (the judged body), ``headers`` (the request's), ``plan`` (set by
    the route step), ``admission`` (set by the limits step),
    ``requested_model``; ``dry_run`` is False (True on the route
    explainer's calls: nothing is reserved or counted)."""

    dry_run = False

    __slots__ = (
        "h",
        "req",
        "rid",
        "t0",
        "created_at",
        "entry",
        "dialect",
        "error_provider",
        "api_path_text",
        "headers",
        "ident",
        "read",
        "requested_model",
        "plan",
        "admission",
        "attempt",
        "rplan",
        "secret",
        "handle",
        "pending",
        "upstream_headers",
        "fallbacks",
        "status",
        "error_type",
        "ttfb",
        "meter",
        "held",
        "held_encoding",
        "rewrite",
        "echo_core",
        "echo_tail",
        "headers_timer",
        "idle_timer",
        "step_timer",
        "deadline",
        "closed",
        "ended",
        "attempt_t0",
        "attempt_status",
        "answered",
        "done_at",
        "trace",
        "traced_attempts",
        "__weakref__",
    )

    def __repr__(self) -> str:
        return f"<Call {self.rid}>"

    def __init__(self, handler, req) -> None:
        self.h = handler
        self.req = req
        self.rid = new_request_id()
        self.t0 = time.perf_counter()
        self.created_at = datetime.now(UTC)
        self.entry = None
        self.dialect = None
        self.error_provider = None
        self.api_path_text = ""
        self.headers = req.headers
        self.ident = None
        self.read = None
        self.requested_model = None
        self.plan = None
        self.admission = None
        self.attempt = None
        self.rplan = None
        self.secret = None
        self.handle = None
        self.pending = None
        self.upstream_headers = None
        self.fallbacks: list[dict] = []
        self.status = 0
        self.error_type: str | None = None
        self.ttfb: float | None = None
        self.meter = None
        self.held: bytearray | None = None
        self.held_encoding: bytes | None = None
        self.rewrite = None  # a held 2xx answer's rewrite (Dialect.answer_rewrite)
        self.echo_core: bytes | None = None  # a 2xx answer's: what must not be echoed
        self.echo_tail = b""  # (held: it may be the start of an echo)
        self.headers_timer = None
        self.idle_timer = None
        self.step_timer = None
        self.deadline = 0.0
        self.closed = False  # the client's answer is complete, aborted or being aborted
        self.ended = False  # recorded and out of the active set
        self.attempt_t0: float | None = None  # the current attempt is under way since
        self.attempt_status: int | None = None  # its answer's status, once relayed
        self.answered = False  # the provider's answer ended as its framing said, all relayed
        # its answer complete, or the call ended: the request's latency and
        # end (an answer is recorded a little later, once sent)
        self.done_at: float | None = None
        tracing = handler.tracing
        self.trace = tracing.begin(req.headers) if tracing.enabled else None
        self.traced_attempts: list[TracedAttempt] | None = [] if self.trace is not None else None

    # --- 1-2: target, route, key ------------------------------------------------

    @guarded
    def start(self) -> None:
        h = self.h
        req = self.req
        h.active.add(self)
        req.on_lost = self.client_gone
        path = req.path
        # (lectr.http.server has already refused targets that are not visible
        # ASCII with well-formed escapes: the path rules are left)
        problem = target_problem(req.target, syntax_checked=True)
        if problem is not None:
            self.error_provider = error_provider(path, h.registry)
            self.refuse(400, "invalid_request", problem)
            return
        entry = route(path, b"anthropic-version" in self.headers, h.registry)
        if entry is None:
            self.error_provider = error_provider(path, h.registry)
            self.refuse(
                404,
                "not_found",
                "Unknown route: use /<provider>/v1/… (e.g. /openai/v1/…, /anthropic/v1/…) "
                "or /v1/….",
            )
            return
        self.entry = entry
        self.error_provider = entry.provider
        self.dialect = entry.provider.dialect
        self.api_path_text = entry.api_path.decode("ascii")
        key = presented_key(self.headers)
        if key is None:
            self.refuse(
                401,
                "authentication",
                "Missing or malformed Lectr key: send 'Authorization: Bearer lc_…' or "
                "'x-api-key: lc_…'.",
            )
            return
        key_hash = hashlib.sha256(key.encode("ascii")).hexdigest()
        ident = h.auth.cached(key_hash)
        if ident is None:
            self.pending = d = h.auth.lookup(key_hash)
            d.addCallbacks(self.authenticated, self.lookup_failed)
            return
        self.authenticated(ident)

    @guarded
    def lookup_failed(self, failure) -> None:
        self.pending = None
        if self.closed:
            return
        self.h.log.warn("key lookup failed: {error}", error=failure.getErrorMessage())
        self.refuse(503, "unavailable", "The gateway cannot verify keys right now; retry shortly.")

    @guarded
    def authenticated(self, ident) -> None:
        self.pending = None
        if self.closed:
            return
        if ident is None or ident is UNKNOWN:
            self.refuse(401, "authentication", "Invalid or revoked Lectr key.")
            return
        if ident is RATE_LIMITED:
            self.refuse(
                503,
                "unavailable",
                "Too many unknown keys are being tried; this key could not be checked. "
                "Retry shortly.",
                ((b"retry-after", b"1"),),
            )
            return
        self.ident = ident
        req = self.req
        req.admit()
        req.continue_body()  # the body is read now (may call body_received at once)

    # --- 3-4: body, policy ------------------------------------------------------------

    @guarded
    def body_received(self) -> None:
        if self.closed:
            return
        req = self.req
        judge = self.h.judge
        content_types = req.headers.get(b"content-type")
        if judge is not None and len(req.body) >= JUDGE_MIN and parses(content_types, req.body):
            # read in the judge process, off the reactor (lectr.proxy.judge)
            # (the org's bodies take their turn with the other orgs')
            self.pending = d = judge.judge(
                content_types, req.body, self.dialect.name, self.ident.org_id
            )
            d.addCallbacks(self.body_read, self.body_unread)
            return
        try:
            read = read_body(content_types, req.body)
        except BodyRefused as e:
            self.refuse(400, "invalid_request", f"Malformed request body: {e}")
            return
        self.body_read(read)

    @guarded
    def body_read(self, read) -> None:
        self.pending = None
        if self.closed:
            return
        self.read = read
        run_chain(self.h.steps, self, self.chain_done, self.chain_failed, waiting=self._waiting)

    @guarded
    def body_unread(self, failure) -> None:
        self.pending = None
        if self.closed:
            return  # (the call ended first, and cancelled the judgment)
        if failure.check(BodyRefused):
            self.refuse(400, "invalid_request", f"Malformed request body: {failure.value}")
        elif failure.check(JudgeUnavailable):
            self.refuse(503, "unavailable", str(failure.value), ((b"retry-after", b"1"),))
        else:
            self.crash(failure)

    def _waiting(self, d) -> None:
        """An asynchronous step is running (``d``), or has answered (None);
        it has STEP_TIMEOUT seconds."""
        self.pending = d
        timer, self.step_timer = self.step_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if d is not None:
            self.step_timer = self.h.reactor.callLater(STEP_TIMEOUT, self.step_timed_out)

    @guarded
    def step_timed_out(self) -> None:
        self.step_timer = None
        pending, self.pending = self.pending, None
        self.refuse(503, "unavailable", "A policy check did not answer in time; retry shortly.")
        if pending is not None:
            pending.cancel()

    def chain_failed(self, failure) -> None:
        if self.closed and failure.check(CancelledError):
            return  # the call ended first (the client left, a step timed out)
        self.crash(failure)

    @guarded
    def chain_done(self, refusal: Refusal | None) -> None:
        if self.closed:
            return
        if refusal is not None:
            self.refuse(refusal.status, refusal.kind, refusal.message, refusal.headers)
            return
        self.deadline = time.monotonic() + self.h.headers_timeout
        attempt = self.plan.first(self.h.selector, self.ident.org_id)
        if attempt is None:
            self.refuse(
                503,
                "unavailable",
                "No provider key of this organization can be used right now.",
            )
            return
        self.send(attempt)

    # --- 5: attempts ------------------------------------------------------------------

    def send(self, attempt) -> None:
        h = self.h
        req = self.req
        self.attempt = attempt
        provider = attempt.provider
        key = attempt.key
        secret = h.vault.reveal(key)
        if secret is None:
            # the key does not decrypt (logged and counted by the vault, which
            # skips it from now on): a fault of this node, not an upstream
            # call, so it does not use up one of max_attempts; still a
            # fallback ("refused"), to the next key or target
            self.plan.not_sent()
            self.retry_or_fail(
                None,
                "refused",
                502,
                "upstream_unavailable",
                f"The {provider.display_name} key of this organization cannot be used "
                "(see the gateway's log).",
            )
            return
        target = attempt.target
        read = self.read
        model = target.model if target.model != read.model else None
        try:
            self.rplan = rplan = provider.plan(req.method, self.api_path_text, read, model, key)
        except BodyRefused as e:  # (the route step drops the targets it can tell)
            self.refuse(400, "invalid_request", f"Malformed request body: {e}")
            return
        headers = self.upstream_headers
        if headers is None:
            headers = self.upstream_headers = h.header_policy.upstream(req.headers)
        body = rplan.body
        upstream = provider.request(
            req.method,
            self.entry.api_path,
            _without_lectr_keys(req.query),
            target.model,
            key,
            list(headers),
            body if body or req.method not in _NO_BODY_METHODS else None,
        )
        trace = self.trace
        if trace is not None:
            # the client's traceparent never goes upstream while tracing is on
            # (HeaderPolicy): the attempt's own span, or the client's as is,
            # or none (LECTR_TRACE_PROPAGATION)
            traceparent = trace.attempt_traceparent(attempt.n)
            if traceparent is not None:
                if trace.parent_span_id is None and h.tracing.propagation == "lectr":
                    # a new trace (the client sent no valid traceparent): the
                    # client's tracestate belongs to no trace it continues (W3C)
                    upstream.headers[:] = [
                        (n, v) for n, v in upstream.headers if n.lower() != b"tracestate"
                    ]
                upstream.headers.append((b"traceparent", traceparent))
        provider.sign(upstream, secret, key)
        self.secret = secret
        self.attempt_t0 = time.perf_counter()
        self.attempt_status = None
        self.handle = h.client.request(
            h.origin(upstream.base_url),
            upstream.method,
            upstream.target,
            upstream.headers,
            upstream.body,
            self,
        )
        timeout = self.deadline - time.monotonic()
        per_try = self.plan.attempt_timeout
        if per_try is not None and per_try < timeout:
            timeout = per_try
        self.headers_timer = h.reactor.callLater(max(timeout, 0.0), self.headers_timed_out)

    def retry_or_fail(
        self, status: int | None, failure: str, answer: int, kind: str, message: str
    ) -> bool:
        """After attempt n failed before answering the client: the next
        attempt if the plan allows one (True), else the error answer (False)."""
        attempt = self.attempt
        h = self.h
        # LECTR_UPSTREAM_HEADERS_TIMEOUT bounds the whole wait, fallbacks
        # included: past it, no other attempt goes out (a provider would
        # process, and bill, a request Lectr could not wait for)
        if time.monotonic() < self.deadline - _MIN_ATTEMPT_WINDOW:
            nxt = self.plan.next(h.selector, self.ident.org_id, status, failure)
        else:
            nxt = None
        reason = _OUTCOME.get(failure, failure)
        self._attempt_over(reason, status)
        if nxt is not None:
            self.fallbacks.append(
                {
                    "attempt": attempt.n,
                    "provider": attempt.provider.name,
                    "model": attempt.target.model,
                    "key": attempt.key.name,
                    "reason": failure,
                    "status": status,
                }
            )
            h.upstream_metrics.fallback(attempt.provider.name, reason)
            self.secret = None
            self.send(nxt)
            return True
        if message:
            headers = self._route_headers()
            if self.plan.n > 1:
                headers.append(_SHOULD_NOT_RETRY)
            self.refuse(answer, kind, message, headers)
        return False

    @guarded
    def headers_timed_out(self) -> None:
        self.headers_timer = None
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()
        if self.closed:
            return
        provider = self.attempt.provider
        self.retry_or_fail(
            None,
            "timeout",
            504,
            "upstream_timeout",
            f"{provider.display_name} did not answer in time.",
        )

    # --- upstream sink -------------------------------------------------------------------

    @guarded
    def response_started(self, status: int, reason: bytes, headers, length) -> None:
        self._cancel_headers_timer()
        h = self.h
        attempt = self.attempt
        provider = attempt.provider
        if self.closed:
            self._stop_upstream()
            return
        failure = failure_class(status)
        self.attempt_status = status
        if 300 <= status < 400:
            elsewhere = redirect_origin(headers.first(b"location"))
            if elsewhere is not None:
                # the client's SDK would follow it with its Lectr key (the
                # Anthropic SDK's x-api-key crosses origins), around Lectr
                handle, self.handle = self.handle, None
                if handle is not None:
                    handle.cancel()
                self.retry_or_fail(
                    status,
                    "redirect",
                    502,
                    "upstream_unavailable",
                    f"{provider.display_name} redirected the request ({status}) to "
                    f"{elsewhere}; Lectr does not follow redirects, nor lets clients "
                    "follow them around it: check the provider's base URL.",
                )
                return
        if failure is not None:
            if failure != "5xx":
                retry_after = parse_retry_after(headers)
                h.health.cool(attempt.key.id, provider.name, status, retry_after)
            if self.plan.n < self.plan.max_attempts:
                handle, self.handle = self.handle, None
                # a failure that another attempt replaces: its body is not wanted
                if self.retry_or_fail(status, failure, 0, "", ""):
                    handle.cancel()
                    return
                self.handle = handle
        self.relay_head(status, reason, headers, length)

    def relay_head(self, status: int, reason: bytes, headers, length) -> None:
        h = self.h
        req = self.req
        rplan = self.rplan
        self.status = status
        secret = self.secret
        raw = secret.reveal().encode("ascii") if secret is not None else None
        core = secret_core(raw) if raw is not None else None
        out = downstream(headers, core)
        if reason and core is not None and quotes_secret(reason, core):
            reason = b""
        out.append((b"x-lectr-request-id", self.rid.encode()))
        out.extend(self._route_headers())
        encodings = headers.get(b"content-encoding")
        coding = _content_coding(encodings) if encodings else None
        if status >= 300:
            # a provider error or redirect page may quote the org's key: held, then masked
            out = self._hold(out, coding)
            if status >= 400 and self.plan.n > 1:
                # (in place of the provider's own: "true, false" reads as neither)
                out = [(n, v) for n, v in out if n.lower() != b"x-should-retry"]
                out.append(_SHOULD_NOT_RETRY)
            length = None
        else:
            # a successful answer is relayed as it comes, checked for an echo
            # of the key on the way (security.md)
            self.echo_core = echo_core(raw) if raw is not None else None
            rewrite = self.dialect.answer_rewrite(self.api_path_text)
            if rewrite is not None:
                # one of the few answers that must be rewritten: held whole,
                # and read whatever its coding (identity, or compressed
                # although Lectr asked for identity: the client would still
                # read what it must not), relayed decoded
                out = self._hold(out, coding)
                self.rewrite = rewrite
                length = None
            elif length is not None and (
                rplan.strip_usage_chunk or status in _NO_LENGTH_CODES or req.method == b"HEAD"
            ):
                length = None
        self.meter = self.dialect.meter(
            rplan,
            self.api_path_text,
            status,
            headers.first(b"content-type"),
            coding,
        )
        self.ttfb = time.perf_counter()
        admission = self.admission  # (its x-ratelimit-* headers, rendered already)
        block = b"" if admission is None else admission.block
        req.start_response(status, reason or None, out, length, block)
        handle = self.handle
        if handle is not None:
            req.set_producer(handle)
        self.idle_timer = h.reactor.callLater(h.idle_timeout, self.idle_timed_out)

    def _hold(self, out: list[tuple[bytes, bytes]], coding: bytes | None) -> list:
        """Hold the answer whole, to be decoded (:func:`_decoded`) and sent
        at its end: the client's headers, without Content-Encoding."""
        self.held = bytearray()
        self.held_encoding = coding
        return [(n, v) for n, v in out if n.lower() != b"content-encoding"]

    def _route_headers(self) -> list[tuple[bytes, bytes]]:
        attempt = self.attempt
        if attempt is None:
            return []
        value = (
            f"route={_header_text(self.plan.route_name)}; "
            f"provider={attempt.provider.name}; "
            f"model={_header_text(attempt.target.model)}; "
            f"key={_header_text(attempt.key.name)}; attempt={attempt.n}"
        )
        return [(b"x-lectr-route", value.encode("ascii"))]

    @guarded
    def response_data(self, data: bytes) -> None:
        if self.closed:
            return
        timer = self.idle_timer
        if timer is not None:
            timer.reset(self.h.idle_timeout)
        held = self.held
        if held is not None:
            held += data
            if len(held) > SCRUB_MAX:
                self.h.log.warn(
                    "{provider} answer to hold over {n} bytes; cut",
                    provider=self.attempt.provider.name,
                    n=SCRUB_MAX,
                )
                self.abort("upstream_error_too_large")
            return
        out = self.meter.feed(data)
        core = self.echo_core
        if core is not None and out:
            tail = self.echo_tail
            if tail or out.find(core) >= 0 or out[-1] in core:
                out, self.echo_tail = mask_echoes(tail + out, core)
        if out:
            self.req.write(out)

    @guarded
    def response_done(self) -> None:
        self.handle = None
        self._cancel_idle_timer()
        if self.closed:
            self._end()
            return
        req = self.req
        req.clear_producer()
        held, self.held = self.held, None
        if held is not None:
            if self.rewrite is None:
                req.write(self._masked(bytes(held)))
            else:
                body = self._rewritten(held)
                if body is None:
                    self.h.log.warn(
                        "{provider} answer to rewrite could not be decoded; cut",
                        provider=self.attempt.provider.name,
                    )
                    self.abort("upstream_undecodable")
                    return
                req.write(body)
        else:
            rest = self.meter.flush()  # (a stream being stripped may hold an event's start)
            core = self.echo_core
            if core is not None and (rest or self.echo_tail):
                rest, tail = mask_echoes(self.echo_tail + rest, core)
                rest += echo_tail_end(tail)
            if rest:
                req.write(rest)
        self.closed = True
        self.answered = True
        if self.admission is not None:
            self.admission.free()  # (no longer in flight: see Admission.free)
        req.finish()
        # recorded once the turn's answers are sent: the usage read, the
        # price, the row and the metrics never hold this answer back (its
        # latency is taken now: not the turn's other answers and records)
        self.done_at = time.perf_counter()
        req.after_sent(self._end)

    def _rewritten(self, held: bytearray) -> bytes | None:
        """A held successful answer, decoded, rewritten, then checked for an
        echo of the key as every successful answer is; None when it is in a
        coding Lectr does not decode (or several), or does not decode: not
        to be relayed, as what it says cannot be rewritten."""
        body = bytes(held)
        if body:
            body = _decoded(body, self.held_encoding)
            if body is None:
                return None
        out = self.rewrite(body)
        core = self.echo_core
        if core is not None and out:
            out, tail = mask_echoes(out, core)
            out += echo_tail_end(tail)
        return out

    def _masked(self, body: bytes) -> bytes:
        body = _decoded(body, self.held_encoding)
        if body is None:
            return self.error_provider.error_body(
                "upstream_unavailable",
                f"{self.attempt.provider.display_name} answered {self.status} "
                "(its error body could not be checked and was withheld).",
                self.rid,
            )
        secret = self.secret.reveal().encode("ascii") if self.secret is not None else None
        return scrub_body(body, secret)

    @guarded
    def response_failed(self, error) -> None:
        self.handle = None
        self._cancel_headers_timer()
        self._cancel_idle_timer()
        if self.closed:
            self._end()
            return
        attempt = self.attempt
        provider = attempt.provider
        if not error.started:
            timeout = error.kind == "connect_timeout"
            connect = timeout or error.kind in _CONNECT_KINDS
            if not connect:
                self._attempt_over("error", None)  # (the fallback's reason: 5xx)
            self.retry_or_fail(
                None,
                "timeout" if timeout else "connect" if connect else "5xx",
                504 if timeout else 502,
                "upstream_timeout" if timeout else "upstream_unavailable",
                f"{provider.display_name} did not answer in time."
                if timeout
                else f"{provider.display_name} could not be reached."
                if connect
                else f"The request to {provider.display_name} failed.",
            )
            return
        # The provider dropped the connection mid-body: make sure the client
        # can tell (an abort, not a clean end of the response).
        self.error_type = "upstream_dropped"
        self.abort("upstream_dropped")

    @guarded
    def idle_timed_out(self) -> None:
        self.idle_timer = None
        handle = self.handle
        if handle is not None and handle.paused:
            # Lectr stopped reading the provider: the client reads slowly
            # (backpressure), the provider is not silent - wait on
            self.idle_timer = self.h.reactor.callLater(self.h.idle_timeout, self.idle_timed_out)
            return
        self.error_type = "upstream_idle_timeout"
        self.h.log.info(
            "{provider} went silent mid-response; aborting", provider=self.attempt.provider.name
        )
        self.abort("upstream_idle_timeout")

    # --- endings -------------------------------------------------------------------------

    @guarded
    def protocol_error(self, status: int, kind: str, message: str) -> None:
        """The server refused the body (413: too large, 408: too slow)."""
        if status == 413:
            self.h.m_too_large.inc()
        self.refuse(status, protocol_error_kind(kind, status), message)

    @guarded
    def client_gone(self, reason=None) -> None:
        if self.closed:
            return
        self.closed = True
        self.error_type = self.error_type or "client_disconnected"
        self.status = 499
        self._stop_upstream()
        self._end()

    def abort(self, why: str) -> None:
        """Stop both sides (shutdown, idle timeout). A request that has not
        started its answer gets a 503 during shutdown; one mid-answer has its
        connection aborted, so the client can tell it is truncated."""
        if self.closed:
            self._stop_upstream()
            return
        req = self.req
        if why == "shutdown" and not req.started:
            # (an attempt in flight was cancelled by Lectr, not failed by the
            # provider: the 503 below is no upstream error)
            self._attempt_over("cancelled", None)
            self.refuse(503, "unavailable", "The gateway is shutting down; retry.")
            self._stop_upstream()  # (after: a step cancelled here finds the call ended)
            return
        self.closed = True
        self.error_type = self.error_type or why
        self._stop_upstream()
        req.abort()
        self._end()

    def crash(self, failure: Failure) -> None:
        """A bug in a step or a callback: end the call anyway, exactly once."""
        try:
            self.h.log.failure("proxied request {rid} failed", failure, rid=self.rid)
            self.error_type = "internal"
            self._stop_upstream()
            if not self.closed:
                if self.req.started:
                    self.closed = True
                    self.req.abort()
                else:
                    self.refuse(500, "internal", "Internal error in the gateway.")
        finally:
            self.closed = True
            self._end()

    def refuse(self, status: int, kind: str, message: str, headers: tuple | list = ()) -> None:
        """Answer with a Lectr error in the route's dialect (nothing else has
        been sent to the client)."""
        if self.closed:
            return
        self.closed = True
        self.status = status
        self.error_type = kind
        req = self.req
        provider = self.error_provider or self.h.registry.get("openai")
        body = provider.error_body(kind, message, self.rid)
        out = [_JSON, (b"x-lectr-request-id", self.rid.encode()), *headers]
        if self.admission is not None and status != ERROR_STATUS["rate_limited"]:
            out.extend(self.admission.headers)
        self.ttfb = time.perf_counter()
        if not req.started and not req.finished:
            if self.admission is not None:
                self.admission.free()
            req.respond(status, out, body)
            self.done_at = self.ttfb
            req.after_sent(self._end)  # (as an answer relayed in full: response_done)
            return
        self._end()

    def _stop_upstream(self) -> None:
        self._cancel_headers_timer()
        self._cancel_idle_timer()
        timer, self.step_timer = self.step_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()

    def _attempt_over(self, outcome: str, status: int | None) -> None:
        """The current upstream attempt is over: counted by outcome, and
        kept for the request's trace (each attempt once)."""
        t0, self.attempt_t0 = self.attempt_t0, None
        if t0 is None:
            return
        attempt = self.attempt
        self.h.upstream_metrics.attempt(attempt.provider.name, outcome)
        traced = self.traced_attempts
        if traced is not None:
            # epoch seconds: the trace's start (reactor time) plus the offset
            epoch = self.trace.started - self.t0
            traced.append(
                TracedAttempt(
                    attempt.n,
                    attempt.provider.name,
                    attempt.target.model,
                    t0 + epoch,
                    # (an answer complete is over then, though recorded later)
                    (self.done_at if self.done_at is not None else time.perf_counter()) + epoch,
                    outcome,
                    status,
                )
            )

    def _cancel_headers_timer(self) -> None:
        timer, self.headers_timer = self.headers_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_idle_timer(self) -> None:
        timer, self.idle_timer = self.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _end(self) -> None:
        """Record the request once and leave the active set (last: a drain
        waiting for the active set waits for the row too)."""
        if self.ended:
            return
        self.ended = True
        self.secret = None
        if self.done_at is None:  # (ended now: not relayed in full, nor refused)
            self.done_at = time.perf_counter()
        try:
            self._account()
        finally:
            self.h.call_done(self)

    def _account(self) -> None:
        """The attempt's outcome, the row, the trace and the limits'
        settlement, each whatever happened to the others."""
        h = self.h
        if self.attempt_t0 is not None:  # the attempt whose answer was relayed, or cut
            try:
                status = self.attempt_status
                if status is None:
                    outcome = "cancelled" if self.error_type in _CANCELLED else "error"
                elif self.error_type in _UPSTREAM_BROKE:
                    outcome = "error"
                else:
                    outcome = _OUTCOME.get(failure_class(status), "ok")
                self._attempt_over(outcome, status)
            except Exception:
                h.log.failure("counting the attempt of {rid} failed", Failure(), rid=self.rid)
        record = None
        try:
            record = self._record()
        except Exception:
            h.log.failure("recording request {rid} failed", Failure(), rid=self.rid)
        if self.trace is not None:
            try:
                self._traced(record)
            except Exception:
                h.log.failure("tracing request {rid} failed", Failure(), rid=self.rid)
        admission = self.admission
        if admission is not None:  # exactly once, whatever happened above
            try:
                if record is None:
                    admission.settle(tokens=None, cost_usd=None)
                else:
                    priced = getattr(record, "pricing", None)
                    usage = record.usage
                    tokens = usage.total_tokens
                    if tokens is None:
                        # a cut answer: its estimate, input and output (a
                        # prompt not reported is estimated from the request's
                        # size, as with_estimates writes it into the row)
                        prompt = usage.prompt_tokens
                        if prompt is None and priced is not None:
                            prompt = priced.prompt_estimate
                        if prompt is not None or usage.completion_tokens is not None:
                            tokens = (prompt or 0) + (usage.completion_tokens or 0)
                    admission.settle(
                        tokens=tokens,
                        # (whole micro-dollars when priced here: no Decimal on the way)
                        cost_usd=priced.cost_micro
                        if priced is not None and priced.cost_micro is not None
                        else getattr(record, "cost_usd", None),
                    )
            except Exception:
                h.log.failure("settling the limits of {rid} failed", Failure(), rid=self.rid)

    def _traced(self, record: UsageRecord | None) -> None:
        """Hand the finished request to the tracer (spans are built and
        exported off the reactor)."""
        trace = self.trace
        epoch = trace.started - self.t0
        read = self.read
        usage = record.usage if record is not None else None
        attempt = self.attempt
        provider = (
            attempt.provider if attempt is not None else self.entry.provider if self.entry else None
        )
        self.h.tracing.finish(
            trace,
            RequestSummary(
                ended=self.done_at + epoch,
                status=self.status,
                method=self.req.method.decode("ascii", "replace"),
                path=self.api_path_text,
                provider=provider.name if provider is not None else None,
                request_model=self.requested_model
                if self.requested_model is not None
                else read.model
                if read is not None
                else None,
                response_model=usage.model if usage is not None else None,
                streamed=read.stream if read is not None else False,
                input_tokens=usage.prompt_tokens if usage is not None else None,
                output_tokens=usage.completion_tokens if usage is not None else None,
                time_to_first_token=self.ttfb - self.t0 if self.ttfb is not None else None,
                org_id=self.ident.org_id if self.ident is not None else None,
                request_id=self.rid,
                route=self.plan.route_name if self.plan is not None else None,
                error_type=self.error_type,
                attempts=tuple(self.traced_attempts),
                service_tier=usage.service_tier if usage is not None else None,
                cost_usd=format_usd(record.cost_usd) if record is not None else None,
            ),
        )

    def _record(self) -> UsageRecord | None:
        """Metrics and the request's row (priced, traced); the row, or None
        for a request no org accounts for."""
        h = self.h
        elapsed = self.done_at - self.t0
        attempt = self.attempt
        provider = (
            attempt.provider if attempt is not None else self.entry.provider if self.entry else None
        )
        name = provider.name if provider is not None else "unknown"
        h.m_requests.inc(1, name, str(self.status))
        h.m_latency.observe(elapsed, name)
        meter = self.meter
        if meter is not None:
            usage = meter.finish(self.answered)
        elif self.attempt is not None and self.error_type == "client_disconnected":
            usage = NOTHING_RELAYED  # sent, and cut before any answer: estimated, never nothing
        else:
            usage = NO_USAGE
        ident = self.ident
        if ident is None:
            return None  # not authenticated: no org to account to
        read = self.read
        plan = self.plan
        model = (
            attempt.target.model
            if attempt is not None
            else self.requested_model
            if self.requested_model is not None
            else read.model
            if read is not None
            else None
        )
        request_bytes = len(self.req.body)
        # the cost (exact; estimated for a cut answer; None for an unpriced
        # model), computed once, in memory: the recorder writes it, the
        # limits settle it
        priced = (
            h.price(name, model, usage, request_bytes=request_bytes)
            if h.price is not None
            else None
        )
        record = UsageRecord(
            request_id=self.rid,
            created_at=self.created_at,
            org_id=ident.org_id,
            key_id=ident.key_id,
            provider=name,
            model=model,
            method=self.req.method.decode("ascii", "replace"),
            path=self.api_path_text,
            status=self.status,
            latency_ms=elapsed * 1000.0,
            ttfb_ms=(self.ttfb - self.t0) * 1000.0 if self.ttfb is not None else None,
            streamed=read.stream if read is not None else False,
            usage=usage,
            error_type=self.error_type,
            route=plan.route_name if plan is not None else None,
            provider_key_id=attempt.key.id if attempt is not None else None,
            attempts=plan.n if plan is not None else 0,
            fallbacks=tuple(self.fallbacks),
            request_bytes=request_bytes,
            cost_usd=priced.cost_usd if priced is not None else None,
            pricing=priced,
        )
        h.recorder.record(record)
        return record
