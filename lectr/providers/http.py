"""One-off HTTP requests to providers (key validation) and to OIDC issuers
(JWKS), with twisted.web's Agent.

Never follows redirects, keeps no cookies, reads at most ``MAX_BODY`` bytes
of the body, and bounds the **whole** exchange (connecting, the response
headers and the body) by one deadline: a server that sends its headers and
then stalls mid-body cannot hang the caller. (treq's ``timeout`` stops
counting once the headers arrive, and ``treq.collect`` waits for ever.) Not
the proxy's hot path: that has its own Agent and timeouts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from lectr.util.http import quiet_pool

MAX_BODY = 1 << 20

HttpRequest = Callable[[bytes, bytes, dict, float], Awaitable[tuple[int, bytes]]]


class ExchangeTimedOut(Exception):
    """The server did not send its whole answer before the deadline."""

    def __init__(self, timeout: float, stage: str) -> None:
        super().__init__(f"no complete answer within {timeout:g}s ({stage})")
        self.timeout = timeout
        self.stage = stage


class _Body(Protocol):
    """Collects up to ``limit`` bytes of a response body, then stops the
    transfer (what was read is enough to judge the answer)."""

    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        room = self._limit - self._size
        self._chunks.append(data[:room])
        self._size += min(len(data), room)
        if len(data) >= room:
            self._finish()
            self.stop()

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finish()
        else:
            self.done.errback(reason)

    def _finish(self) -> None:
        self.done.callback(b"".join(self._chunks))

    def stop(self) -> None:
        """Abandon the transfer: the connection is closed (it is never
        reused: the pool is not persistent)."""
        if self.transport is not None:
            self.transport.stopProducing()


def make_http_request(reactor, *, connect_timeout: float = 10.0) -> HttpRequest:
    pool: HTTPConnectionPool = quiet_pool(reactor, persistent=False)
    agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool)

    async def http_request(
        method: bytes, url: bytes, headers: dict, timeout: float
    ) -> tuple[int, bytes]:
        """``(status, body)``; raises :class:`ExchangeTimedOut` when the
        whole exchange takes longer than ``timeout`` seconds, and the
        network's own errors otherwise."""
        stage = "waiting for the response headers"
        pending: Deferred = agent.request(
            method, url, Headers({k: [v] for k, v in headers.items()}), None
        )
        body: _Body | None = None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if body is not None:
                body.stop()
            pending.cancel()

        timer = reactor.callLater(timeout, expire)
        try:
            response = await pending
            stage = "reading the response body"
            body = _Body(MAX_BODY)
            pending = body.done
            response.deliverBody(body)
            data = await pending
        except BaseException:
            if body is not None:
                body.stop()  # cancelled by the caller: do not leave the transfer running
            if expired:
                raise ExchangeTimedOut(timeout, stage) from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        return response.code, data

    return http_request
