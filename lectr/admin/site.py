"""The admin port's twisted.web Site: request bodies are kept in memory and
capped (twisted.web would spool any size to a temporary file); a declared
``Content-Length`` over the cap is answered 413 before the body is read.

Its root sends the dashboard's paths (``/`` and ``/ui/…``) to the dashboard
and everything else to the admin API (Klein)."""

from __future__ import annotations

import json

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from lectr.admin.api import MAX_BODY_BYTES
from lectr.util.web import CappedBodyRequest, raw_413


class AdminRequest(CappedBodyRequest, Request):
    def refuse_too_large(self, path: bytes) -> bytes:
        limit = self.channel.site.max_body_bytes
        body = json.dumps(
            {
                "error": {
                    "code": "payload_too_large",
                    "message": f"the request body is larger than {limit} bytes",
                }
            }
        ).encode()
        return raw_413(body, b"Cache-Control: no-store")

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        Request.requestReceived(self, command, path, version)


class AdminRoot(Resource):
    """A leaf, so both children see the whole path, as a root would."""

    isLeaf = True

    def __init__(self, api: Resource, dashboard=None) -> None:
        super().__init__()
        self._api = api
        self._dashboard = dashboard  # lectr.dashboard.resource.DashboardResource

    def render(self, request):
        if self._dashboard is not None and self._dashboard.handles(request.path):
            return self._dashboard.render(request)
        return self._api.render(request)


class AdminSite(Site):
    noisy = False
    displayTracebacks = False
    requestFactory = AdminRequest

    def __init__(self, resource, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(resource, timeout=120)
        self.max_body_bytes = max_body_bytes
