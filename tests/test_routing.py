"""The header swap and key presentation, as pure functions (routes: see
tests/test_target.py)."""

from __future__ import annotations

import uuid

from lectr.http.headers import HeaderList
from lectr.providers.registry import ProviderRegistry, discover
from lectr.proxy.call import presented_key
from lectr.proxy.headers import HeaderPolicy, downstream
from lectr.proxy.ids import new_request_id

KEY = "lc_0b5c3a51-1c1e-4a7b-9a52-5f2a8e8c0d11"
REGISTRY = ProviderRegistry([c(c.default_base_url or "https://x") for c in discover()])


def headers(pairs: dict) -> HeaderList:
    h = HeaderList()
    for name, values in pairs.items():
        for value in values if isinstance(values, list) else [values]:
            h.raw.append((name.encode(), value.encode()))
    return h


def test_presented_key():
    assert presented_key(headers({"authorization": f"Bearer {KEY}"})) == KEY
    assert presented_key(headers({"authorization": f"bearer  {KEY}"})) == KEY
    assert presented_key(headers({"x-api-key": KEY})) == KEY
    # a non-Lectr Authorization does not hide a Lectr x-api-key
    assert presented_key(headers({"authorization": "Bearer sk-x", "x-api-key": KEY})) == KEY
    for h in (
        {},
        {"authorization": "Basic abc"},
        {"x-api-key": "sk-ant-123"},
        {"authorization": f"Bearer {KEY}x"},
        {"x-api-key": KEY.upper()},
    ):
        assert presented_key(headers(h)) is None


CLIENT = {
    "authorization": f"Bearer {KEY}",
    "x-api-key": KEY,
    "api-key": "az-key",
    "x-goog-api-key": "AIza-x",
    "cookie": "session=1",
    "host": "gw:8080",
    "content-length": "10",
    "expect": "100-continue",
    "connection": "keep-alive, x-secret-hop",
    "x-secret-hop": "1",
    "keep-alive": "timeout=5",
    "te": "trailers",
    "trailer": "x",
    "transfer-encoding": "chunked",
    "upgrade": "h2c",
    "proxy-authorization": "Basic x",
    "proxy-connection": "keep-alive",
    "x-forwarded-for": "1.2.3.4",
    "X-Forwarded-Host": "a",
    "forwarded": "for=1.2.3.4",
    "x-real-ip": "1.2.3.4",
    "via": "1.1 lb",
    "true-client-ip": "1.2.3.4",
    "cf-connecting-ip": "1.2.3.4",
    "x-lectr-session": "conv-1",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "a,b",
    "openai-organization": "org-1",
    "x-stainless-os": "Linux",
    "user-agent": "sdk/1",
    "accept-encoding": "gzip, deflate, br",
    "content-type": "application/json",
}


def test_upstream_headers_keep_only_what_the_provider_needs():
    out = HeaderPolicy(REGISTRY).upstream(headers(CLIENT))
    assert {n.lower() for n, _ in out} == {
        b"anthropic-version",
        b"anthropic-beta",
        b"openai-organization",
        b"x-stainless-os",
        b"user-agent",
        b"accept-encoding",
        b"content-type",
    }
    assert dict(out)[b"Accept-Encoding"] == b"identity"  # Lectr reads every response


def test_operators_may_forward_client_identity_but_never_credentials():
    policy = HeaderPolicy(REGISTRY, forward=frozenset({b"x-forwarded-for", b"x-real-ip"}))
    names = {n.lower() for n, _ in policy.upstream(headers(CLIENT))}
    assert {b"x-forwarded-for", b"x-real-ip"} <= names
    assert not names & {b"authorization", b"x-api-key", b"api-key", b"cookie", b"forwarded"}


def test_response_headers():
    upstream = headers(
        {
            "content-type": "text/event-stream",
            "content-length": "5",
            "transfer-encoding": "chunked",
            "connection": "close, x-h",
            "x-h": "1",
            "x-request-id": "r1",
            "set-cookie": "__cf_bm=a",
        }
    )
    out = dict(downstream(upstream))
    assert out == {b"content-type": b"text/event-stream", b"x-request-id": b"r1"}


def test_request_ids_are_unique_unpredictable_valid_uuids():
    ids = [new_request_id() for _ in range(3000)]
    assert len(set(ids)) == 3000
    for rid in ids[:5] + ids[-5:]:
        u = uuid.UUID(rid)
        assert str(u) == rid and u.version == 4 and u.variant == uuid.RFC_4122
    # no counter: consecutive ids share no long prefix, unlike a sequence
    shared = sum(a[:8] == b[:8] for a, b in zip(ids, ids[1:], strict=False))
    assert shared < 5
