"""Routing and the header swap, as pure functions."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from lectr.proxy.director import copy_response_headers, upstream_headers
from lectr.proxy.handler import presented_key
from lectr.proxy.routing import Route, route

KEY = "lc_0b5c3a51-1c1e-4a7b-9a52-5f2a8e8c0d11"


def test_routes():
    assert route(b"/openai/v1/chat/completions", False) == Route("openai", b"/v1/chat/completions")
    assert route(b"/anthropic/v1/messages", False) == Route("anthropic", b"/v1/messages")
    assert route(b"/v1/messages", False) == Route("anthropic", b"/v1/messages")
    assert route(b"/v1/messages/count_tokens", False).provider == "anthropic"
    assert route(b"/v1/chat/completions", False) == Route("openai", b"/v1/chat/completions")
    assert route(b"/v1/models", True) == Route("anthropic", b"/v1/models")
    assert route(b"/v1/models", False) == Route("openai", b"/v1/models")
    assert route(b"/v1", False) == Route("openai", b"/v1")
    assert route(b"/openai/v1", False) == Route("openai", b"/v1")
    assert route(b"/v1/threads/t/messages", False).provider == "openai"
    for bad in (
        b"/",
        b"/v2/x",
        b"/v1x/chat",
        b"/openai/v2/x",
        b"/openai/v1x",
        b"/healthz",
        b"/anthropic/messages",
    ):
        assert route(bad, False) is None, bad


def test_presented_key():
    assert presented_key(Headers({"authorization": [f"Bearer {KEY}"]})) == KEY
    assert presented_key(Headers({"authorization": [f"bearer  {KEY}"]})) == KEY
    assert presented_key(Headers({"x-api-key": [KEY]})) == KEY
    # a non-Lectr Authorization does not hide a Lectr x-api-key
    assert presented_key(Headers({"authorization": ["Bearer sk-x"], "x-api-key": [KEY]})) == KEY
    for headers in (
        {},
        {"authorization": ["Basic abc"]},
        {"x-api-key": ["sk-ant-123"]},
        {"authorization": [f"Bearer {KEY}x"]},
        {"x-api-key": [KEY.upper()]},
    ):
        assert presented_key(Headers(headers)) is None


def test_upstream_headers():
    client = Headers(
        {
            "authorization": [f"Bearer {KEY}"],
            "x-api-key": [KEY],
            "host": ["gw:8080"],
            "content-length": ["10"],
            "connection": ["keep-alive, x-secret-hop"],
            "x-secret-hop": ["1"],
            "keep-alive": ["timeout=5"],
            "te": ["trailers"],
            "trailer": ["x"],
            "transfer-encoding": ["chunked"],
            "upgrade": ["h2c"],
            "proxy-authorization": ["Basic x"],
            "proxy-connection": ["keep-alive"],
            "x-forwarded-for": ["1.2.3.4"],
            "X-Forwarded-Host": ["a"],
            "anthropic-version": ["2023-06-01"],
            "anthropic-beta": ["a,b"],
            "openai-organization": ["org-1"],
            "x-stainless-os": ["Linux"],
            "user-agent": ["sdk/1"],
            "accept-encoding": ["gzip, deflate"],
            "content-type": ["application/json"],
        }
    )
    out = upstream_headers(client, ((b"x-api-key", b"sk-ant"),))
    names = {k.lower() for k, _ in out.getAllRawHeaders()}
    assert names == {
        b"x-api-key",
        b"anthropic-version",
        b"anthropic-beta",
        b"openai-organization",
        b"x-stainless-os",
        b"user-agent",
        b"accept-encoding",
        b"content-type",
    }
    assert out.getRawHeaders(b"x-api-key") == [b"sk-ant"]
    assert out.getRawHeaders(b"anthropic-beta") == [b"a,b"]
    assert out.getRawHeaders(b"accept-encoding") == [b"gzip, deflate"]
    forced = upstream_headers(
        client, ((b"Authorization", b"Bearer sk"),), accept_encoding=b"identity"
    )
    assert forced.getRawHeaders(b"accept-encoding") == [b"identity"]
    assert forced.getRawHeaders(b"authorization") == [b"Bearer sk"]
    assert forced.getRawHeaders(b"x-api-key") is None


def test_response_headers():
    upstream = Headers(
        {
            "content-type": ["text/event-stream"],
            "content-length": ["5"],
            "transfer-encoding": ["chunked"],
            "connection": ["close, x-h"],
            "x-h": ["1"],
            "x-request-id": ["r1"],
            "set-cookie": ["a=b"],
        }
    )
    client = Headers()
    copy_response_headers(upstream, client)
    assert client.getRawHeaders(b"content-length") is None  # set from response.length
    assert client.getRawHeaders(b"x-request-id") == [b"r1"]
    assert client.getRawHeaders(b"set-cookie") == [b"a=b"]
    for hop in (b"transfer-encoding", b"connection", b"x-h"):
        assert client.getRawHeaders(hop) is None


def test_request_ids_are_unique_valid_uuids():
    import uuid

    from lectr.proxy.ids import new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for rid in ids[:5] + ids[-5:]:
        u = uuid.UUID(rid)
        assert str(u) == rid and u.version == 4 and u.variant == uuid.RFC_4122
