"""Reference for the benchmark: a bare twisted.web + Agent passthrough.

No authentication, no policy, no vault, no usage parsing, no logging: it
swaps the Authorization header for the upstream key, forwards the request
with a persistent Agent pool, and streams the answer back. Lectr must be at
least as fast as this while doing all of its work.

    python bench/bare_passthrough.py --port 18090 --upstream http://127.0.0.1:18091/openai --key sk-x
"""

import argparse

from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.web import server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"upgrade",
    b"host",
    b"content-length",
    b"authorization",
    b"proxy-connection",
}


class Relay(Protocol):
    def __init__(self, request):
        self.request = request

    def dataReceived(self, data):
        self.request.write(data)

    def connectionLost(self, reason):
        self.request.finish()


class Passthrough(Resource):
    isLeaf = True

    def __init__(self, agent, upstream, key):
        super().__init__()
        self.agent, self.upstream, self.key = agent, upstream, key

    def render(self, request):
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in HOP:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"authorization", [b"Bearer " + self.key])
        path = request.uri[len(b"/v1") :] if request.uri.startswith(b"/v1") else request.uri
        body = FileBodyProducer(request.content) if request.method == b"POST" else None
        d = self.agent.request(request.method, self.upstream + b"/v1" + path, headers, body)

        def respond(response):
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(Relay(request))

        def failed(failure):
            request.setResponseCode(502)
            request.finish()

        d.addCallbacks(respond, failed)
        return server.NOT_DONE_YET


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--key", default="sk-bench")
    a = p.parse_args()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 512
    site = server.Site(Passthrough(Agent(reactor, pool=pool), a.upstream.encode(), a.key.encode()))
    site.log = lambda request: None
    reactor.listenTCP(a.port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
