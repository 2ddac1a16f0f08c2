"""The header swap: what goes upstream and what comes back.

Upstream: the client's headers minus
- every credential header (``Authorization``, ``x-api-key``, ``api-key``,
  ``Cookie``…: the registry's :attr:`credential_headers`), always;
- hop-by-hop headers (``Connection`` and the headers it names,
  ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``,
  ``Upgrade``), ``Host``, ``Content-Length`` and ``Expect`` (the client
  sets them);
- headers that identify the client or its network (``Forwarded``,
  ``X-Forwarded-*``, ``X-Real-IP``, ``Via``, ``True-Client-IP``,
  ``CF-Connecting-IP``, ``X-Client-IP``, ``X-Cluster-Client-IP``) unless the
  operator lists them in ``LECTR_FORWARD_HEADERS``;
- Lectr's own request headers (``x-lectr-*``);
- while tracing is on, the client's ``traceparent`` (each attempt sends its
  own, see :mod:`lectr.tracing`), and ``tracestate`` too when
  ``LECTR_TRACE_PROPAGATION=none``;
- ``Accept-Encoding``, replaced by ``identity``: Lectr reads every response
  (usage, error masking) and never relays bytes it could not check;
then the provider's own credential (added by the provider's ``sign``).

Downstream: the provider's headers minus hop-by-hop ones, its
``Content-Length`` (set again when the body passes unchanged) and
``Set-Cookie`` (state of Lectr's own connection to the provider, not the
client's).
"""

from __future__ import annotations

from lectr.providers.base import quotes_secret

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

#: headers that identify the client or the networks it came through
CLIENT_IDENTITY = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"via",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
    }
)

_NEVER_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"accept-encoding"}
_NEVER_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"set-cookie"}
IDENTITY = (b"Accept-Encoding", b"identity")


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


class HeaderPolicy:
    """Which client headers go upstream (one per process). Follows the
    registry's credential headers (a custom provider may add one)."""

    def __init__(
        self,
        registry,
        forward: frozenset[bytes] = frozenset(),
        trace_propagation: str | None = None,
    ) -> None:
        """``trace_propagation``: None when tracing is off (trace headers
        pass as any other), else ``LECTR_TRACE_PROPAGATION``."""
        self.forward = frozenset(h.lower() for h in forward)
        self._trace = (
            frozenset()
            if trace_propagation is None
            else frozenset({b"traceparent", b"tracestate"})
            if trace_propagation == "none"
            else frozenset({b"traceparent"})
        )
        self._registry = registry
        self._refresh()

    def _refresh(self) -> None:
        credentials = self._source = self._registry.credential_headers
        self._never = _NEVER_UPSTREAM | credentials | (CLIENT_IDENTITY - self.forward) | self._trace
        self._cache: dict[bytes, bool] = {}

    def _allowed(self, lower: bytes) -> bool:
        if lower in self._never or lower.startswith(b"x-lectr-"):
            return False
        if lower.startswith(b"x-forwarded-"):
            return lower in self.forward
        return not lower.startswith(b"proxy-")

    def upstream(self, client) -> list[tuple[bytes, bytes]]:
        """``client``: the request's headers as (name, value) pairs. Returns
        the list to send, ending with ``Accept-Encoding: identity``."""
        if self._source is not self._registry.credential_headers:
            self._refresh()
        named = connection_tokens(client.get(b"connection")) if b"connection" in client else ()
        cache = self._cache
        out = []
        for name, value in client:
            lower = name.lower()
            ok = cache.get(lower)
            if ok is None:
                ok = self._allowed(lower)
                if len(cache) < 4096:
                    cache[lower] = ok
            if ok and (not named or lower not in named):
                out.append((name, value))
        out.append(IDENTITY)
        return out


def downstream(upstream, core: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """The provider's headers to pass on to the client. ``core``: the org's
    provider key (:func:`lectr.providers.base.secret_core`): a header that
    quotes it (a 401's WWW-Authenticate, a redirect's Location carrying a
    query-string key, a debug header) has its value replaced by ``***``."""
    named = connection_tokens(upstream.get(b"connection")) if b"connection" in upstream else ()
    out = []
    for name, value in upstream:
        lower = name.lower()
        if lower in _NEVER_DOWNSTREAM or lower.startswith(b"proxy-"):
            continue
        if named and lower in named:
            continue
        out.append((name, value))
    if core is not None and quotes_secret(b"\n".join([v for _, v in out]), core):
        out = [(n, b"***" if quotes_secret(v, core) else v) for n, v in out]
    return out
