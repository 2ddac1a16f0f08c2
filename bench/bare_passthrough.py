"""Fallback for the benchmark's "bare" baseline, used only when
``../shared/bench/twisted_passthrough.py`` is absent: the least any
twisted.web + Agent passthrough must do, done the cheap way.

Per request: one dict lookup for the client's key (401 otherwise), the
provider key swapped in, the body sent from memory over a persistent Agent
pool with one cached endpoint per origin, and the answer streamed back as it
arrives. No JSON, no usage logging, no metrics. (The earlier baseline here
paid costs no real proxy pays — a file body producer and a new endpoint per
request — and flattered Lectr.)

    python bench/bare_passthrough.py --port 18090 --upstream http://127.0.0.1:18091 \\
        --client-key sk-client --upstream-key sk-provider
"""

import argparse

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Protocol
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

RELAYED = (b"content-type", b"cache-control", b"x-request-id", b"request-id")


@implementer(IBodyProducer)
class Body:
    def __init__(self, data):
        self.data, self.length = data, len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IAgentEndpointFactory)
class OneEndpoint:
    def __init__(self, endpoint):
        self.endpoint = endpoint

    def endpointForURI(self, uri):
        return self.endpoint


class Relay(Protocol):
    def __init__(self, request):
        self.request = request

    def dataReceived(self, data):
        if not self.request._disconnected:
            self.request.write(data)

    def connectionLost(self, reason):
        if self.request._disconnected:
            return
        if reason.check(ResponseDone):
            self.request.finish()
        else:
            self.request.channel.transport.abortConnection()


class Passthrough(Resource):
    isLeaf = True

    def __init__(self, agent, upstream, client_keys, upstream_key):
        super().__init__()
        self.agent = agent
        self.upstream = upstream
        self.client_keys = {b"Bearer " + k for k in client_keys}
        self.auth = [b"Bearer " + upstream_key]

    def render(self, request):
        if request.getHeader(b"authorization") not in self.client_keys:
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error":{"message":"invalid key","type":"invalid_request_error"}}'
        headers = Headers(
            {
                b"content-type": [request.getHeader(b"content-type") or b"application/json"],
                b"authorization": self.auth,
            }
        )
        body = request.content.read()
        d = self.agent.request(
            request.method, self.upstream + request.uri, headers, Body(body) if body else None
        )

        def respond(response):
            request.setResponseCode(response.code)
            for name in RELAYED:
                values = response.headers.getRawHeaders(name)
                if values:
                    request.setHeader(name, values[0])
            if response.length is not UNKNOWN_LENGTH:
                request.setHeader(b"content-length", b"%d" % response.length)
            response.deliverBody(Relay(request))

        def failed(failure):
            if not request._disconnected and not request.finished:
                request.setResponseCode(502)
                request.finish()

        d.addCallbacks(respond, failed)
        return server.NOT_DONE_YET


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:18000")
    p.add_argument("--client-key", action="append", required=True)
    p.add_argument("--upstream-key", required=True)
    a = p.parse_args()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 512
    pool.retryAutomatically = False
    host, _, port = a.upstream.split("://", 1)[1].partition(":")
    endpoint = HostnameEndpoint(reactor, host, int(port or 80))
    agent = Agent.usingEndpointFactory(reactor, OneEndpoint(endpoint), pool=pool)
    site = server.Site(
        Passthrough(
            agent,
            a.upstream.rstrip("/").encode(),
            [k.encode() for k in a.client_key],
            a.upstream_key.encode(),
        )
    )
    site.log = lambda request: None
    site.noisy = False
    reactor.listenTCP(a.port, site, interface="127.0.0.1", backlog=4096)
    reactor.run()


if __name__ == "__main__":
    main()
