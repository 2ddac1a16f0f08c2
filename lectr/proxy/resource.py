"""Proxy port resources."""

from __future__ import annotations

from twisted.web.resource import Resource


class HealthResource(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return b'{"status":"ok"}'


class ProxyRoot(Resource):
    def __init__(self) -> None:
        super().__init__()
        self.putChild(b"healthz", HealthResource())
