"""The upstream HTTP client: twisted.web.client.Agent, tuned for a proxy.

- one endpoint object per (scheme, host, port), reused for every request:
  Agent's default factory builds a new HostnameEndpoint per request, which
  re-encodes the host name with IDNA each time (a measurable share of the
  hot path); DNS is still resolved on every new connection;
- a persistent connection pool sized for hundreds of concurrent streams;
- no redirect following, no cookies, no content decoding (Agent does none
  of these; treq's client would add all three).
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from lectr.util.http import quiet_pool


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    def __init__(self, reactor, *, connect_timeout: float, tls_policy=None) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls_policy or BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], object] = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
            self._cache[key] = endpoint
        return endpoint


def make_agent(reactor, *, connect_timeout: float) -> tuple[Agent, HTTPConnectionPool]:
    pool = quiet_pool(reactor, persistent=True)  # no "Starting factory" line per connection
    # Hundreds of concurrent streams to one provider; idle connections are
    # dropped after 20 s, before providers' own idle timeouts close them
    # under a request.
    pool.maxPersistentPerHost = 512
    pool.cachedConnectionTimeout = 20
    agent = Agent.usingEndpointFactory(
        reactor, CachedEndpoints(reactor, connect_timeout=connect_timeout), pool=pool
    )
    return agent, pool
