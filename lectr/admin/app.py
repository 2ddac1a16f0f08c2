"""The admin API (Klein) on the admin port.

State lives on the instance (``app = Klein()`` is a class attribute with
routed methods), so tests can build as many apps as they like.
"""

from __future__ import annotations

import json

from klein import Klein
from twisted.logger import Logger

from lectr.db.database import Database, DatabaseUnavailable
from lectr.metrics import Registry
from lectr.util.deferred import OperationTimedOut, timeout_without_cancel


def json_body(request, status: int, payload: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


class AdminApp:
    app = Klein()
    _log = Logger()

    def __init__(self, *, reactor, database: Database, metrics: Registry) -> None:
        self._reactor = reactor
        self._db = database
        self._metrics = metrics

    def resource(self):
        return self.app.resource()

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        return json_body(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request):
        try:
            await timeout_without_cancel(self._db.ping(), 2.0, self._reactor)
        except (DatabaseUnavailable, OperationTimedOut) as e:
            reason = "timed out" if isinstance(e, OperationTimedOut) else "unreachable"
            return json_body(request, 503, {"status": "unavailable", "database": reason})
        return json_body(request, 200, {"status": "ready", "database": "ok"})

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics.render().encode()
