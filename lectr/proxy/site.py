"""The proxy port's twisted.web Site and Request.

Two Twisted defaults are replaced because they are wrong for a proxy:

- request bodies: twisted.web spools bodies over 100 kB to a temporary file
  and parses form bodies; here a body is kept in memory, capped at
  ``LECTR_MAX_BODY_BYTES`` — a declared ``Content-Length`` over the cap is
  answered 413 before a byte of the body is read, and a chunked body is
  refused as soon as it passes the cap;
- request processing: no resource traversal, no per-segment unquoting, no
  default ``Server``/``Content-Type`` headers, no access log (every request
  becomes a usage row instead): the request goes straight to the handler.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from lectr.proxy.ids import new_request_id
from lectr.proxy.routing import dialect_for
from lectr.util.web import CappedBodyRequest, raw_413


class ProxyRequest(CappedBodyRequest, Request):
    _log = Logger()
    _body_size = 0
    _refused = False
    #: called with the reason when the client goes away before the end (a
    #: cheaper notifyFinish(): no Deferred per request)
    on_lost = None

    def __init__(self, channel, queued=None) -> None:
        """twisted.web's Request.__init__ minus two system calls per request
        (``getpeername``/``getsockname`` for ``client``/``host``, computed
        here only when asked for) and minus form-body parsing."""
        self.notifications = []
        self.channel = channel
        self.requestHeaders = Headers()
        self.received_cookies = {}
        self.responseHeaders = Headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = False
        Componentized.__init__(self)

    @property
    def client(self):
        return self.channel.getPeer()

    @property
    def host(self):
        return self.channel.getHost()

    # --- body (CappedBodyRequest) ---------------------------------------------

    def refuse_too_large(self, path: bytes) -> bytes:
        site = self.channel.site
        provider = site.registry.get(dialect_for(path))
        request_id = new_request_id()
        body = provider.error_body(
            "too_large",
            f"Request body is larger than the {site.max_body_bytes} bytes this gateway accepts.",
            request_id,
        )
        site.refused_too_large()
        return raw_413(body, b"x-lectr-request-id: " + request_id.encode())

    def connectionLost(self, reason) -> None:
        Request.connectionLost(self, reason)
        hook, self.on_lost = self.on_lost, None
        if hook is not None:
            hook(reason)

    # --- processing --------------------------------------------------------------

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Lean replacement: no query-string or form parsing (the body goes
        upstream as it came), no resource traversal."""
        if self._refused:
            return  # already answered; the connection is closing
        self.content.seek(0, 0)
        self.args = {}
        self.method, self.uri = command, path
        self.clientproto = version
        self.path, _, _ = path.partition(b"?")
        self.process()

    def process(self) -> None:
        self.site = self.channel.site
        try:
            self.site.handler.handle(self)
        except BaseException:
            self.processingFailed(Failure())

    def processingFailed(self, reason: Failure) -> None:
        self._log.failure("proxy request failed", reason)
        if self._disconnected or self.finished:
            return reason
        if self.startedWriting:
            # Mid-response: a truncated body must never look complete.
            self.channel.transport.abortConnection()
            return reason
        provider = self.site.registry.get(dialect_for(self.path))
        body = provider.error_body("internal", "Internal error in the gateway.")
        self.setResponseCode(500)
        self.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()
        return reason


class ProxySite(Site):
    """No access log (usage rows are Lectr's request log), no tracebacks in
    responses, no factory start/stop noise."""

    noisy = False
    displayTracebacks = False
    requestFactory = ProxyRequest

    def __init__(self, handler, *, registry, max_body_bytes: int, metrics=None) -> None:
        super().__init__(resource=None, timeout=300)
        self.handler = handler
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self._m_too_large = (
            metrics.counter("lectr_proxy_body_too_large_total", "Requests refused with 413")
            if metrics is not None
            else None
        )

    def refused_too_large(self) -> None:
        if self._m_too_large is not None:
            self._m_too_large.inc()

    def log(self, request) -> None:
        pass
