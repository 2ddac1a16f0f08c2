"""The proxy port's handler: builds a :class:`~lectr.proxy.call.Call` per
request and holds what every call shares (caches, the upstream client, the
policy chain, metrics). Built by :mod:`lectr.service`.

The HTTP server (:mod:`lectr.http.server`) calls :meth:`headers_received`
as soon as a request's head is parsed - before any byte of its body is
read, so that a request without a valid key never makes Lectr hold its body
- then :meth:`body_received` once the body is in memory, and
:meth:`request_error` when the body itself is refused (413, 408).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lectr.gateway_metrics import UpstreamMetrics
from lectr.proxy.call import Call, protocol_error_kind
from lectr.proxy.ids import new_request_id
from lectr.proxy.target import error_provider, route
from lectr.tracing import Tracing

# the server's names for body problems, as Lectr's error kinds
_HEALTH_BODY = b'{"status":"ok"}'
_STOPPING_BODY = b'{"status":"stopping"}'
_HEALTH_HEADERS = [(b"content-type", b"application/json")]


class ProxyHandler:
    log = Logger()

    def __init__(
        self,
        *,
        reactor,
        registry,
        authenticator,
        vault,
        selector,
        health,
        steps,
        header_policy,
        client,
        recorder,
        metrics,
        headers_timeout: float,
        idle_timeout: float,
        origin_factory,
        price=None,
        tracing=None,
        judge=None,
    ) -> None:
        self.reactor = reactor
        self.registry = registry
        self.auth = authenticator
        self.vault = vault
        self.selector = selector
        self.health = health
        self.steps = tuple(steps)
        self.header_policy = header_policy
        self.client = client
        self.recorder = recorder
        self.headers_timeout = headers_timeout
        self.idle_timeout = idle_timeout
        self._origin_factory = origin_factory
        self._origins: dict[str, object] = {}
        #: price(provider, model, usage, request_bytes=) -> lectr.pricing.cost.Priced
        self.price = price
        #: lectr.tracing.Tracing (a disabled one when traces are off)
        self.tracing = tracing if tracing is not None else Tracing.disabled(reactor=reactor)
        #: lectr.proxy.judge.BodyJudge: large bodies are read in its process
        #: (None: every body is read here, on the reactor)
        self.judge = judge
        self.upstream_metrics = UpstreamMetrics(metrics)
        self.active: set[Call] = set()
        self._draining: Deferred | None = None
        #: shutting down: requests still arriving on open connections get a 503 and a close
        self.stopping = False
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
        self.m_too_large = metrics.counter(
            "lectr_proxy_body_too_large_total", "Requests refused with 413"
        )
        metrics.callback_gauge(
            "lectr_proxy_active_requests", "Requests in flight", lambda: len(self.active)
        )

    # --- the server's interface ------------------------------------------------------

    def headers_received(self, req) -> None:
        if req.path == b"/healthz":
            if self.stopping:
                # a load balancer must stop sending: it fails, and the connection goes
                req.close_after()
                req.respond(503, _HEALTH_HEADERS, _STOPPING_BODY)
                return
            req.respond(200, _HEALTH_HEADERS, _HEALTH_BODY)
            return
        if self.stopping:
            self._refuse_stopping(req)
            return
        call = Call(self, req)
        req.context = call
        call.start()

    def _refuse_stopping(self, req) -> None:
        """A request on a connection still open once draining began: 503 in
        the route's dialect, ``Connection: close``; nothing is proxied (the
        usage recorder may already be stopped: nothing would record it)."""
        req.close_after()
        provider = error_provider(req.path, self.registry)
        rid = new_request_id()
        self._count(req, 503)
        req.respond(
            503,
            [
                (b"content-type", b"application/json"),
                (b"x-lectr-request-id", rid.encode()),
                (b"retry-after", b"1"),
            ],
            provider.error_body("unavailable", "The gateway is shutting down; retry.", rid),
        )

    def body_received(self, req) -> None:
        call = req.context
        if call is not None:
            call.body_received()

    def request_error(self, req, status: int, kind: str, message: str) -> None:
        """The server refused the body (413 from a declared length, before the
        head reached :meth:`headers_received`; 413 or 408 while reading it)."""
        call = req.context
        if call is not None:
            call.protocol_error(status, kind, message)
            return
        if status == 413:
            self.m_too_large.inc()
        self._count(req, status)
        provider = error_provider(req.path, self.registry)
        rid = new_request_id()
        req.respond(
            status,
            [(b"content-type", b"application/json"), (b"x-lectr-request-id", rid.encode())],
            provider.error_body(protocol_error_kind(kind, status), message, rid),
        )

    def _count(self, req, status: int) -> None:
        """A request answered here, without a call (a call counts its own
        when it ends): by the provider its path names, as a call would."""
        entry = route(req.path, b"anthropic-version" in req.headers, self.registry)
        provider = entry.provider if entry is not None else None
        self.m_requests.inc(1, provider.name if provider is not None else "unknown", str(status))

    # --- what calls share ------------------------------------------------------------

    def origin(self, base_url: str):
        """The connection pool's origin for a base URL: scheme, host and port
        only (the provider's request target already starts with the base
        URL's path prefix)."""
        origin = self._origins.get(base_url)
        if origin is None:
            parts = urlsplit(base_url)
            origin = self._origins[base_url] = self._origin_factory(
                f"{parts.scheme}://{parts.netloc}"
            )
        return origin

    # --- shutdown --------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for in-flight requests, then abort
        what is left (the port has already stopped accepting; requests on
        connections still open are refused from now on)."""
        self.stopping = True
        if self.active:
            self.log.info(
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

    def call_done(self, call: Call) -> None:
        self.active.discard(call)
        if not self.active and self._draining is not None and not self._draining.called:
            self._draining.callback(None)
