"""The proxy: authenticate, apply policy, swap credentials, relay.

Per request (a :class:`_Call`), all on the reactor thread and, on the hot
path, without touching the database:

1. route the path to a provider (DESIGN §3);
2. authenticate the Lectr key from the in-memory cache (the database only on
   a miss);
3. policy, before any upstream call: org enabled, provider enabled for the
   org, model allowed, a provider key stored — else 403 and the provider
   receives nothing;
4. plan the request (model, stream flag, usage injection), decrypt the org's
   provider key in memory, build the upstream headers;
5. send it with twisted.web.client.Agent (persistent pool, no redirects
   followed, no cookies, no content decoding);
6. relay status, headers and body as they arrive, with backpressure (a slow
   client pauses the upstream read), metering usage on the way;
7. hand one usage record to the recorder (never awaited).

Disconnects and timeouts: a client that goes away cancels the upstream at
once; a provider that drops mid-stream makes Lectr abort the client
connection (never a clean-looking end of a truncated stream); no response
headers within the headers timeout → 504; silence mid-body longer than the
idle timeout → both connections aborted.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from lectr.managers.auth import RATE_LIMITED, UNKNOWN
from lectr.managers.orgs import looks_like_key
from lectr.providers.base import scrub_body
from lectr.proxy.director import copy_response_headers, upstream_headers
from lectr.proxy.ids import new_request_id
from lectr.proxy.routing import dialect_for, route
from lectr.usage.meters import MalformedBody, meter_for, plan_request
from lectr.usage.model import NO_USAGE, UsageRecord

_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
_NO_LENGTH_CODES = frozenset({204, 304})
_SCRUB_MAX = 256 * 1024


_CONNECT_ERRORS = (
    net_error.ConnectError,
    net_error.DNSLookupError,
    ResponseNeverReceived,
    ResponseFailed,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
)


@implementer(IBodyProducer)
class _BytesProducer:
    """An in-memory body, written in one go (FileBodyProducer would take a
    Cooperator round trip per 64 kB)."""

    __slots__ = ("_body", "length")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def presented_key(headers) -> str | None:
    """The Lectr key from ``Authorization: Bearer lc_…`` or ``x-api-key``,
    format-checked; None when absent or malformed."""
    auth = headers.getRawHeaders(b"authorization")
    if auth:
        value = auth[0]
        if value[:7].lower() == b"bearer ":
            candidate = value[7:].strip().decode("latin-1")
            if looks_like_key(candidate):
                return candidate
    api_key = headers.getRawHeaders(b"x-api-key")
    if api_key:
        candidate = api_key[0].strip().decode("latin-1")
        if looks_like_key(candidate):
            return candidate
    return None


class _Relay(Protocol):
    """Receives the provider's body; the call writes it to the client."""

    __slots__ = ("_call",)

    def __init__(self, call: _Call) -> None:
        self._call = call

    def connectionMade(self) -> None:
        self._call.body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._call.body_data(data)

    def connectionLost(self, reason) -> None:
        self._call.body_ended(reason)


class ProxyHandler:
    """Serves the proxy port; one per process. Built by lectr.service."""

    _log = Logger()

    def __init__(
        self,
        *,
        reactor,
        registry,
        authenticator,
        settings,
        vault,
        recorder,
        agent,
        metrics,
        headers_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.reactor = reactor
        self.registry = registry
        self.auth = authenticator
        self.settings = settings
        self.vault = vault
        self.recorder = recorder
        self.agent = agent
        self.headers_timeout = headers_timeout
        self.idle_timeout = idle_timeout
        self.active: set[_Call] = set()
        self._draining: Deferred | None = None
        self.m_requests = metrics.counter(
            "lectr_proxy_requests_total",
            "Proxied requests by provider and status",
            ["provider", "status"],
        )
        self.m_latency = metrics.histogram(
            "lectr_proxy_request_seconds",
            "Proxied request duration by provider",
            ["provider"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        metrics.callback_gauge(
            "lectr_proxy_active_requests", "Requests in flight", lambda: len(self.active)
        )

    def handle(self, request) -> None:
        if request.path == b"/healthz":
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            request.responseHeaders.setRawHeaders(b"content-length", [b"15"])
            request.write(b'{"status":"ok"}')
            request.finish()
            return
        _Call(self, request).start()

    # --- shutdown -------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for in-flight requests, then abort
        what is left (the port has already stopped accepting)."""
        if self.active:
            self._log.info(
                "waiting up to {grace:g}s for {n} requests in flight",
                grace=grace,
                n=len(self.active),
            )
            self._draining = Deferred()
            timer = self.reactor.callLater(grace, self._draining.callback, None)
            await self._draining
            if timer.active():
                timer.cancel()
        for call in list(self.active):
            call.abort("shutdown")

    def call_done(self, call: _Call) -> None:
        self.active.discard(call)
        if not self.active and self._draining is not None and not self._draining.called:
            self._draining.callback(None)


class _Call:
    """One proxied request."""

    __slots__ = (
        "h",
        "request",
        "rid",
        "t0",
        "created_at",
        "provider",
        "path",
        "path_text",
        "ident",
        "plan",
        "status",
        "error_type",
        "ttfb",
        "meter",
        "pending",
        "headers_timer",
        "idle_timer",
        "body_transport",
        "closed",
        "recorded",
        "timed_out",
        "scrubbing",
        "__weakref__",
    )

    def __init__(self, handler: ProxyHandler, request) -> None:
        self.h = handler
        self.request = request
        self.rid = new_request_id()
        self.t0 = time.perf_counter()
        self.created_at = datetime.now(UTC)
        self.provider = None
        self.path = b""
        self.path_text = ""  # the provider path, decoded once (planning, metering, logging)
        self.ident = None
        self.plan = None
        self.status = 0
        self.error_type: str | None = None
        self.ttfb: float | None = None
        self.meter = None
        self.pending: Deferred | None = None
        self.headers_timer = None
        self.idle_timer = None
        self.body_transport = None
        self.closed = False  # the client response is finished or aborted
        self.recorded = False
        self.timed_out = False
        self.scrubbing: bytearray | None = None  # a provider auth error, held to be masked

    # --- steps 1-2: route, authenticate ----------------------------------------------

    def start(self) -> None:
        req = self.request
        h = self.h
        h.active.add(self)
        req.responseHeaders.setRawHeaders(b"x-lectr-request-id", [self.rid.encode()])
        req.on_lost = self.client_gone
        headers = req.requestHeaders
        r = route(req.path, headers.hasHeader(b"anthropic-version"))
        if r is None:
            self.provider = h.registry.get(dialect_for(req.path))
            self.fail(
                404, "not_found", "Unknown route: use /openai/v1/…, /anthropic/v1/… or /v1/…."
            )
            return
        self.provider = h.registry.get(r.provider)
        self.path = r.path
        self.path_text = r.path.decode("utf-8", "replace")
        key = presented_key(headers)
        if key is None:
            self.fail(
                401,
                "authentication",
                "Missing or malformed Lectr key: send 'Authorization: Bearer lc_…' or "
                "'x-api-key: lc_…'.",
            )
            return
        key_hash = hashlib.sha256(key.encode("ascii")).hexdigest()
        ident = h.auth.cached(key_hash)
        if ident is None:
            self.pending = h.auth.lookup(key_hash)
            self.pending.addCallbacks(self.authenticated, self.lookup_failed)
            return
        self.authenticated(ident)

    def lookup_failed(self, failure) -> None:
        self.pending = None
        if self.closed:
            return
        self.h._log.warn("key lookup failed: {error}", error=failure.getErrorMessage())
        self.fail(
            503, "upstream_unavailable", "The gateway cannot verify keys right now; retry shortly."
        )

    # --- step 3-5: policy, plan, send ----------------------------------------------------

    def authenticated(self, ident) -> None:
        self.pending = None
        if self.closed:
            return
        if ident is None or ident is UNKNOWN:
            self.fail(401, "authentication", "Invalid or revoked Lectr key.")
            return
        if ident is RATE_LIMITED:
            self.request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
            self.fail(
                503,
                "upstream_unavailable",
                "Too many unknown keys are being tried; this key could not be "
                "checked. Retry shortly.",
            )
            return
        self.ident = ident
        h = self.h
        provider = self.provider
        if not ident.org_enabled:
            self.fail(403, "permission", "This organization is disabled.")
            return
        settings = h.settings.get(ident.org_id, provider.name)
        if not settings.enabled:
            self.fail(
                403, "permission", f"{provider.display_name} is disabled for this organization."
            )
            return
        req = self.request
        headers = req.requestHeaders
        content_type = headers.getRawHeaders(b"content-type")
        try:
            plan = plan_request(
                provider.name,
                req.method,
                self.path_text,
                content_type[0] if content_type else None,
                req.content.getvalue(),
            )
        except MalformedBody as e:
            self.fail(400, "invalid_request", f"Malformed request body: {e}")
            return
        self.plan = plan
        if not settings.allows_model(plan.model):
            shown = plan.model if len(plan.model) <= 200 else plan.model[:200] + "…"
            self.fail(403, "permission", f"Model '{shown}' is not allowed for this organization.")
            return
        secret = h.vault.provider_key(ident.org_id, provider.name)
        if secret is None:
            self.fail(
                403,
                "permission",
                f"No {provider.display_name} key is configured for this organization.",
            )
            return
        upstream = upstream_headers(
            headers,
            provider.auth_headers(secret.reveal()),
            host=provider.host,
            accept_encoding=b"identity" if plan.strip_usage_chunk else None,
        )
        del secret
        uri = req.uri
        query = uri[uri.index(b"?") :] if b"?" in uri else b""
        body = plan.body
        producer = _BytesProducer(body) if body or req.method not in _NO_BODY_METHODS else None
        self.pending = h.agent.request(
            req.method, provider.upstream_url(self.path + query), upstream, producer
        )
        self.headers_timer = h.reactor.callLater(h.headers_timeout, self.headers_timeout)
        self.pending.addCallbacks(self.got_response, self.upstream_failed)

    def headers_timeout(self) -> None:
        self.headers_timer = None
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()

    def upstream_failed(self, failure) -> None:
        self.pending = None
        self._cancel_headers_timer()
        if self.closed:
            return
        if self.timed_out or failure.check(net_error.TimeoutError):
            self.fail(
                504, "upstream_timeout", f"{self.provider.display_name} did not answer in time."
            )
        elif failure.check(CancelledError):
            self.fail(
                502,
                "upstream_unavailable",
                f"The request to {self.provider.display_name} was cancelled.",
            )
        elif failure.check(*_CONNECT_ERRORS):
            self.fail(
                502, "upstream_unavailable", f"{self.provider.display_name} could not be reached."
            )
        else:
            self.h._log.failure("upstream request failed", failure)
            self.fail(
                502, "upstream_unavailable", f"The request to {self.provider.display_name} failed."
            )

    # --- step 6: relay -----------------------------------------------------------------------

    def got_response(self, response) -> None:
        self.pending = None
        self._cancel_headers_timer()
        if self.closed:
            response.deliverBody(_Discarding())
            return
        req = self.request
        plan = self.plan
        code = response.code
        self.status = code
        req.setResponseCode(code, response.phrase)
        rheaders = response.headers
        copy_response_headers(rheaders, req.responseHeaders)
        if code in (401, 403):
            # The provider refused the org's key: its answer may quote part
            # of that key. Hold it (small) and mask key-like tokens.
            self.scrubbing = bytearray()
        # Agent keeps the provider's Content-Length out of response.headers;
        # pass it on when the body goes through unchanged (else: chunked).
        length = response.length
        if (
            length is not UNKNOWN_LENGTH
            and self.scrubbing is None
            and not plan.strip_usage_chunk
            and code not in _NO_LENGTH_CODES
            and req.method != b"HEAD"
        ):
            req.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        ctype = rheaders.getRawHeaders(b"content-type")
        encoding = rheaders.getRawHeaders(b"content-encoding")
        self.meter = meter_for(
            plan,
            self.provider.name,
            self.path_text,
            code,
            ctype[0] if ctype else None,
            encoding[0] if encoding else None,
        )
        # Send the headers now: a streaming client gets its stream object
        # before the first event.
        self.ttfb = time.perf_counter()
        req.write(b"")
        response.deliverBody(_Relay(self))

    def body_started(self, transport) -> None:
        self.body_transport = transport
        if self.closed:
            transport.stopProducing()
            return
        # Backpressure: when the client's socket buffer fills, Twisted
        # pauses this producer, which stops reading from the provider.
        self.request.registerProducer(transport, True)
        self.idle_timer = self.h.reactor.callLater(self.h.idle_timeout, self.idle_timeout)

    def body_data(self, data: bytes) -> None:
        if self.closed:
            return
        timer = self.idle_timer
        if timer is not None:
            timer.reset(self.h.idle_timeout)
        held = self.scrubbing
        if held is not None:
            held += data
            if len(held) > _SCRUB_MAX:  # not a small error document: let it pass
                self.scrubbing = None
                self.request.write(scrub_body(bytes(held)))
            return
        out = self.meter.feed(data)
        if out:
            self.request.write(out)

    def idle_timeout(self) -> None:
        self.idle_timer = None
        self.error_type = "upstream_idle_timeout"
        self.h._log.info(
            "{provider} went silent mid-response; aborting", provider=self.provider.name
        )
        self.abort("upstream_idle_timeout")

    def body_ended(self, reason) -> None:
        transport, self.body_transport = self.body_transport, None
        self._cancel_idle_timer()
        if self.closed:
            self.record()
            return
        req = self.request
        if transport is not None and req.producer is not None:
            req.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            held, self.scrubbing = self.scrubbing, None
            if held:
                req.write(scrub_body(bytes(held)))
            self.closed = True
            req.finish()
            self.record()
            return
        # The provider dropped the connection mid-body: make sure the
        # client can tell (an abort, not a clean end of the response).
        self.error_type = "upstream_dropped"
        self.closed = True
        if req.channel is not None:
            req.channel.transport.abortConnection()
        self.record()

    # --- endings -----------------------------------------------------------------------------

    def client_gone(self, failure) -> None:
        if self.closed:
            return
        self.closed = True
        self.error_type = self.error_type or "client_disconnected"
        self.status = 499
        self._stop_upstream()
        self.record()

    def abort(self, why: str) -> None:
        """Stop both sides (shutdown, idle timeout). A request that has not
        started its answer gets a 503 during shutdown; one mid-answer has
        its connection aborted, so the client can tell it is truncated."""
        if self.closed:
            self._stop_upstream()
            return
        req = self.request
        if why == "shutdown" and not req.startedWriting:
            self.fail(503, "upstream_unavailable", "The gateway is shutting down; retry.")
            self._stop_upstream()
            return
        self.closed = True
        self.error_type = self.error_type or why
        if req.channel is not None:
            req.channel.transport.abortConnection()
        self._stop_upstream()
        self.record()

    def _stop_upstream(self) -> None:
        self._cancel_headers_timer()
        self._cancel_idle_timer()
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        transport = self.body_transport
        if transport is not None:
            transport.stopProducing()

    def fail(self, status: int, kind: str, message: str) -> None:
        """Answer with a Lectr error in the route's provider dialect."""
        if self.closed:
            return
        self.closed = True
        self.status = status
        self.error_type = kind
        req = self.request
        body = self.provider.error_body(kind, message, self.rid)
        req.setResponseCode(status)
        req.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        req.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.ttfb = time.perf_counter()
        req.write(body)
        req.finish()
        self.record()

    def _cancel_headers_timer(self) -> None:
        timer, self.headers_timer = self.headers_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_idle_timer(self) -> None:
        timer, self.idle_timer = self.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def record(self) -> None:
        """One usage record per request, handed off without waiting."""
        if self.recorded:
            return
        self.recorded = True
        h = self.h
        h.call_done(self)
        elapsed = time.perf_counter() - self.t0
        provider = self.provider.name if self.provider is not None else "unknown"
        h.m_requests.inc(1, provider, str(self.status))
        h.m_latency.observe(elapsed, provider)
        ident = self.ident
        if ident is None:
            return  # not authenticated: no org to account to
        plan = self.plan
        h.recorder.record(
            UsageRecord(
                request_id=self.rid,
                created_at=self.created_at,
                org_id=ident.org_id,
                key_id=ident.key_id,
                provider=provider,
                model=plan.model if plan is not None else None,
                method=self.request.method.decode("ascii", "replace"),
                path=self.path_text,
                status=self.status,
                latency_ms=elapsed * 1000.0,
                ttfb_ms=(self.ttfb - self.t0) * 1000.0 if self.ttfb is not None else None,
                streamed=plan.stream if plan is not None else False,
                usage=self.meter.finish() if self.meter is not None else NO_USAGE,
                error_type=self.error_type,
            )
        )


class _Discarding(Protocol):
    """Reads nothing: closes a response nobody wants any more."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        pass
