"""A lectr.http echo server in its own process (for property tests that
drive it with blocking sockets): every request is answered 200 with what the
handler saw, as JSON (bytes as latin-1 text).

    python -m tests.support.http_echo   # prints the port, then serves
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from twisted.internet import reactor

    from lectr.http.server import ProxyServerFactory

    class Echo:
        def headers_received(self, req):
            req.admit()
            req.continue_body()

        def body_received(self, req):
            doc = {
                "method": req.method.decode("latin-1"),
                "target": req.target.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in req.headers],
                "body": req.body.decode("latin-1"),
            }
            req.respond(200, [(b"Content-Type", b"application/json")], json.dumps(doc).encode())

        def request_error(self, req, status, kind, message):
            req.respond(
                status, [(b"Content-Type", b"application/json")], b'{"kind":"%s"}' % kind.encode()
            )

    factory = ProxyServerFactory(
        Echo(),
        reactor=reactor,
        max_body_bytes=1_000_000,
        body_timeout=5,
        header_timeout=5,
        keepalive_timeout=5,
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    sys.stdin.close()
    reactor.run()


if __name__ == "__main__":
    main()
