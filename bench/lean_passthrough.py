"""The lean-transport ceiling: the bare passthrough's work (key check by dict,
key swap, body streamed back) on Lectr's own transport, ``lectr.http``
(llhttp server protocol + keep-alive upstream client), one reactor.

Same command line as ../shared/bench/twisted_passthrough.py; ``bench/run.py
--only lean`` runs both side by side.

    python bench/lean_passthrough.py --port 18600 --upstream http://127.0.0.1:18000 \\
        --client-key sk-client --upstream-key sk-provider
"""

import argparse
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402

from lectr.http.client import Origin, UpstreamClient  # noqa: E402
from lectr.http.server import ProxyServerFactory  # noqa: E402

# Upstream response headers passed back (as the shared passthrough does).
PASS_HEADERS = (
    b"content-type",
    b"cache-control",
    b"x-request-id",
    b"openai-processing-ms",
    b"request-id",
    b"anthropic-ratelimit-requests-remaining",
)
JSON = [(b"Content-Type", b"application/json")]
UNAUTHORIZED = b'{"error":{"message":"invalid key","type":"invalid_request_error"}}'
BAD_GATEWAY = b'{"error":{"message":"upstream error","type":"api_error"}}'


class Relay:
    """The sink of one upstream exchange: writes the answer to the client."""

    __slots__ = ("req", "handle")

    def __init__(self, req):
        self.req = req
        self.handle = None

    def response_started(self, status, reason, headers, length):
        out = []
        for name in PASS_HEADERS:
            value = headers.first(name)
            if value is not None:
                out.append((name, value))
        self.req.start_response(status, reason, out, length)
        self.req.set_producer(self.handle)

    def response_data(self, data):
        self.req.write(data)

    def response_done(self):
        req = self.req
        req.clear_producer()
        req.finish()

    def response_failed(self, error):
        req = self.req
        if req.finished:
            return
        if error.started:
            req.abort()  # a truncated body must never look complete
        else:
            req.respond(502, JSON, BAD_GATEWAY)

    def lost(self, reason):
        self.handle.cancel()


class Passthrough:
    def __init__(self, client, origin, client_keys, upstream_key):
        self.client = client
        self.origin = origin
        self.keys = {b"Bearer " + k.encode() for k in client_keys}
        self.auth = b"Bearer " + upstream_key.encode()
        self.x_api_key = upstream_key.encode()

    def headers_received(self, req):
        if req.headers.first(b"authorization") not in self.keys:
            req.respond(401, JSON, UNAUTHORIZED)
            return
        req.admit()
        req.continue_body()

    def body_received(self, req):
        headers = req.headers
        out = [
            (b"Content-Type", headers.first(b"content-type") or b"application/json"),
            (b"Authorization", self.auth),
            (b"x-api-key", self.x_api_key),
        ]
        version = headers.first(b"anthropic-version")
        if version:
            out.append((b"anthropic-version", version))
        relay = Relay(req)
        relay.handle = self.client.request(
            self.origin, req.method, req.target, out, req.body or None, relay
        )
        req.on_lost = relay.lost

    def request_error(self, req, status, kind, message):
        req.respond(status, JSON, b'{"error":{"message":"%s"}}' % message.encode())


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:18000")
    ap.add_argument("--client-key", action="append", required=True)
    ap.add_argument("--upstream-key", required=True)
    args = ap.parse_args(argv)
    client = UpstreamClient(reactor, connect_timeout=10)
    handler = Passthrough(
        client, Origin.from_url(args.upstream), args.client_key, args.upstream_key
    )
    factory = ProxyServerFactory(
        handler,
        reactor=reactor,
        max_body_bytes=32 * 1024 * 1024,
        body_timeout=60,
        header_timeout=30,
        keepalive_timeout=120,
    )
    reactor.listenTCP(args.port, factory, interface=args.host, backlog=4096)
    print(f"lean passthrough on {args.host}:{args.port} -> {args.upstream}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
