"""The header swap: what goes upstream and what comes back.

Upstream: every client header except the Lectr credential (``Authorization``
and ``x-api-key``, always both), hop-by-hop headers (``Connection`` and the
headers it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade``), client-sent ``X-Forwarded-*``, ``Host``
and ``Content-Length`` (the Agent sets both); then the provider's own auth.

Downstream: every provider header except hop-by-hop ones; the body's length
is passed on when Lectr does not change the body (else it is chunked).
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NEVER_UPSTREAM = HOP_BY_HOP | {b"authorization", b"x-api-key", b"host", b"content-length"}


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def upstream_headers(
    client: Headers,
    auth: tuple[tuple[bytes, bytes], ...],
    *,
    host: bytes | None = None,
    accept_encoding: bytes | None = None,
) -> Headers:
    """``host``: the provider's Host header (set here so that Agent does not
    copy the headers to add it). ``accept_encoding`` replaces the client's
    Accept-Encoding when Lectr must read the response (it injected a usage
    request); None keeps it."""
    named = _connection_tokens(client)
    out = Headers()
    for name, values in client.getAllRawHeaders():
        lower = name.lower()
        if (
            lower in _NEVER_UPSTREAM
            or lower in named
            or lower.startswith(b"x-forwarded-")
            or lower.startswith(b"proxy-")
        ):
            continue
        if accept_encoding is not None and lower == b"accept-encoding":
            continue
        out.setRawHeaders(name, values)
    if accept_encoding is not None:
        out.setRawHeaders(b"Accept-Encoding", [accept_encoding])
    for name, value in auth:
        out.setRawHeaders(name, [value])
    if host is not None:
        out.setRawHeaders(b"Host", [host])
    return out


def copy_response_headers(upstream: Headers, client: Headers) -> None:
    """Provider headers onto the client response, minus hop-by-hop ones.
    (Agent hands ``Content-Length`` over separately, as ``response.length``;
    the handler sets it when the body passes unchanged.)"""
    named = _connection_tokens(upstream)
    for name, values in upstream.getAllRawHeaders():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower.startswith(b"proxy-"):
            continue
        if lower == b"content-length":
            continue
        client.setRawHeaders(name, values)
