"""One-off HTTP requests to providers (key validation) with treq.

Never follows redirects, keeps no cookies between calls, bounds the body it
reads. Not the proxy's hot path: that uses twisted.web.client.Agent directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

MAX_BODY = 1 << 20

HttpRequest = Callable[[bytes, bytes, dict, float], Awaitable[tuple[int, bytes]]]


class BodyTooLarge(Exception):
    pass


def make_http_request(reactor, *, connect_timeout: float = 10.0) -> HttpRequest:
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool)

    async def http_request(
        method: bytes, url: bytes, headers: dict, timeout: float
    ) -> tuple[int, bytes]:
        client = HTTPClient(agent)  # a fresh cookie jar for every call
        response = await client.request(
            method.decode("ascii"),
            url.decode("ascii"),
            headers={k: [v] for k, v in headers.items()},
            allow_redirects=False,
            timeout=timeout,
            unbuffered=True,
            reactor=reactor,
        )
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_BODY:
                raise BodyTooLarge()
            chunks.append(data)

        done: Deferred = treq.collect(response, collect)
        try:
            await done
        except BodyTooLarge:
            pass  # enough to judge the answer
        return response.code, b"".join(chunks)

    return http_request
