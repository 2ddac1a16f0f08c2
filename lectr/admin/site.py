"""The admin port's twisted.web Site: request bodies are kept in memory and
capped (twisted.web would spool any size to a temporary file); a declared
``Content-Length`` over the cap is answered 413 before the body is read; a
request line or header line longer than twisted.web reads (16 KiB: it would
close the connection without a word) is answered 414 or 431.

Its root sends the dashboard's paths (``/`` and ``/ui/…``) to the dashboard
and everything else to the admin API (Klein)."""

from __future__ import annotations

import json

from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from lectr.admin.api import MAX_BODY_BYTES, error_payload
from lectr.util.web import CappedBodyRequest, answer_and_close, raw_response


def _error(code: str, message: str) -> bytes:
    return json.dumps(error_payload(code, message)).encode()


class AdminRequest(CappedBodyRequest, Request):
    def refuse_too_large(self, path: bytes) -> bytes:
        limit = self.channel.site.max_body_bytes
        body = _error("payload_too_large", f"the request body is larger than {limit} bytes")
        return raw_response(b"413 Request Entity Too Large", body)

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


class AdminChannel(HTTPChannel):
    """twisted.web's channel, except that a line longer than it reads
    (``MAX_LENGTH``) is answered rather than met with a silent close: 414
    for the request line (a target that long is no admin API path), 431 for
    a header line."""

    def lineLengthExceeded(self, line: bytes) -> None:
        # (twisted.web sets _command once the request line is read, and
        # deletes it when the request is complete)
        if getattr(self, "_command", None) is None:
            status, body = (
                b"414 URI Too Long",
                _error("uri_too_long", "the request target is too long"),
            )
        else:
            status, body = (
                b"431 Request Header Fields Too Large",
                _error("headers_too_large", "a request header line is too long"),
            )
        answer_and_close(self, raw_response(status, body))


class AdminSite(Site):
    noisy = False
    displayTracebacks = False
    requestFactory = AdminRequest
    protocol = AdminChannel

    def __init__(self, resource, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(resource, timeout=120)
        self.max_body_bytes = max_body_bytes
