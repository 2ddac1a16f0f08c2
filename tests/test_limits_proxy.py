"""Limits through the proxy: each kind refuses at the right request, in the
route's dialect, with the rate-limit headers, and no upstream call; the
official SDKs raise their RateLimitError and honour retry-after."""

from __future__ import annotations

import json
import re

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss

from tests.support.fake_provider import Script, openai_chat_stream
from tests.support.lectr_service import proxy_url
from tests.test_routing_proxy import CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # the fixture: a Lectr, an org with keys, the fake provider

# A node draws its allowance from PostgreSQL in the background and may run one
# lease ahead of it; a request past that is refused "for a moment" (docs/limits.md).
# The tests let each round finish (limits.sync()) so that every refusal they see is
# the cap's, at the exact request.


async def limits(env, body: dict, key_id: str | None = None) -> None:
    path = f"/admin/orgs/{env.org.id}/limits"
    if key_id:
        path = f"/admin/orgs/{env.org.id}/keys/{key_id}/limits"
    status, doc = await env.admin("PUT", path, body)
    assert status == 200, doc
    await env.c.limits.sync()


async def key_id(env) -> str:
    status, doc = await env.admin("GET", f"/admin/orgs/{env.org.id}/keys")
    assert status == 200
    return doc["items"][0]["id"]


async def post(env, path: str, body: dict):
    resp = await env.post(path, body)
    await env.c.limits.sync()
    return resp


@pytest_twisted.ensureDeferred
async def test_rpm_refuses_the_request_after_the_cap_in_both_dialects(env):
    await limits(env, {"rpm": 3})
    for _ in range(3):
        resp = await post(env, "/v1/chat/completions", CHAT)
        assert resp.code == 200
        assert resp.headers.getRawHeaders(b"x-ratelimit-limit-requests") == [b"3"]
        await resp.content()
    remaining = resp.headers.getRawHeaders(b"x-ratelimit-remaining-requests")
    assert remaining == [b"0"]
    calls = len(env.provider.calls())
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 429
    doc = json.loads(await resp.content())
    assert (
        doc["error"]["code"] == "rate_limit_exceeded"
        and "requests per minute" in doc["error"]["message"]
    )
    assert int(resp.headers.getRawHeaders(b"retry-after")[0]) >= 1
    assert resp.headers.getRawHeaders(b"x-ratelimit-reset-requests")
    resp = await env.post(
        "/anthropic/v1/messages",
        {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.code == 429
    doc = json.loads(await resp.content())
    assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
    assert len(env.provider.calls()) == calls  # no upstream call for a refused request
    [row] = [r for r in await env.rows() if r["status"] == 429][:1]
    assert row["attempts"] == 0 and row["error_type"] == "rate_limited"


@pytest_twisted.ensureDeferred
async def test_tpm_charges_real_usage_on_completion_and_refuses_the_next(env):
    await limits(env, {"tpm": 30})
    for _ in range(2):  # 17 tokens each: the second crosses the cap, and is not cut
        resp = await post(env, "/v1/chat/completions", CHAT)
        assert resp.code == 200
        await resp.content()
    await env.c.limits.sync()
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 429
    doc = json.loads(await resp.content())
    assert "tokens per minute" in doc["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_max_concurrent_counts_requests_in_flight(env):
    await limits(env, {"max_concurrent": 1}, key_id=await key_id(env))
    env.provider.stream_interval = 0.3
    first = treq.post(
        proxy_url(env.service, "/v1/chat/completions"),
        data=json.dumps({**CHAT, "stream": True}).encode(),
        headers={"authorization": [f"Bearer {env.key}"], "content-type": ["application/json"]},
        persistent=False,
    )
    await deferLater(reactor, 0.3)
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 429
    assert "concurrent" in json.loads(await resp.content())["error"]["message"]
    await (await first).content()
    env.provider.stream_interval = 0.0
    resp = await env.post("/v1/chat/completions", CHAT)  # the slot came back
    assert resp.code == 200
    await resp.content()


def _pipelined(port: int, key: str, n: int) -> list[int]:
    """``n`` requests written at once on one connection (the last one
    closing it); the status of each answer, in order."""
    import socket

    body = json.dumps(CHAT).encode()
    reqs = b"".join(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        + (b"Connection: close\r\n" if i == n - 1 else b"")
        + b"\r\n"
        + body
        for i in range(n)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(reqs)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", got)]


@pytest_twisted.ensureDeferred
async def test_max_concurrent_frees_the_slot_when_the_answer_is_complete_so_pipelined_requests_pass(
    env,
):
    # one at a time on a connection: the next pipelined request starts when the
    # answer before it is complete, and must find its slot free, as a client
    # sending each request after the last answer does
    await limits(env, {"max_concurrent": 1}, key_id=await key_id(env))
    port = env.service.components.proxy_port.port.getHost().port
    statuses = await deferToThread(_pipelined, port, env.key, 4)
    assert statuses == [200, 200, 200, 200]
    await env.c.limits.sync()
    rows = await env.rows()
    assert sorted(r["status"] for r in rows)[-4:] == [200, 200, 200, 200]


@pytest_twisted.ensureDeferred
async def test_limits_apply_on_every_route(env):
    await limits(env, {"rpm": 1})
    resp = await post(env, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
    assert resp.code == 200
    await resp.content()
    for path in ("/v1/responses", "/openai/v1/files", "/v1/batches", "/openai/v1/anything/else"):
        resp = await env.post(path, {"model": "gpt-4o-mini", "input": "x"})
        assert resp.code == 429, path
        await resp.content()


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_raises_rate_limit_error_and_honours_retry_after(env):
    from openai import OpenAI, RateLimitError

    await limits(env, {"rpm": 1})
    client = OpenAI(base_url=proxy_url(env.service, "/v1"), api_key=env.key, max_retries=0)

    def call():
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        except RateLimitError as e:
            return int(e.response.headers["retry-after"]), e.code
        return None

    retry_after, code = await deferToThread(call)
    assert 1 <= retry_after <= 60 and code == "rate_limit_exceeded"


@pytest_twisted.ensureDeferred
async def test_the_anthropic_sdk_raises_rate_limit_error(env):
    from anthropic import Anthropic, RateLimitError

    await limits(env, {"rpm": 1})
    client = Anthropic(base_url=proxy_url(env.service, ""), api_key=env.key, max_retries=0)

    def call():
        args = {
            "model": "claude-x",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        }
        client.messages.create(**args)
        try:
            client.messages.create(**args)
        except RateLimitError as e:
            return int(e.response.headers["retry-after"])
        return None

    assert 1 <= await deferToThread(call) <= 60


@pytest_twisted.ensureDeferred
async def test_a_refused_request_never_reaches_the_provider_even_when_it_would_fail(env):
    await limits(env, {"rpm": 1})
    env.provider.next(Script(status=500, body=b"{}"))
    resp = await post(env, "/v1/chat/completions", CHAT)  # admitted: counts, fails upstream
    assert resp.code == 500
    await resp.content()
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 429
    await resp.content()
    assert len(env.provider.calls()) == 1


@pytest_twisted.ensureDeferred
async def test_tpm_charges_the_estimate_of_a_stream_cut_short(env):
    """A stream the provider cut before its usage report: the row holds the
    estimate (the prompt from the request's size, a token per text delta),
    and tokens per minute are charged the same count, not nothing."""
    await limits(env, {"tpm": 100_000})
    path = f"/admin/orgs/{env.org.id}/limits"
    status, before = await env.admin("GET", path)
    assert status == 200 and before["usage"]["tokens_this_minute"] == 0
    events = openai_chat_stream("gpt-4o-mini", ["one", " two", " three", " four"], True)
    env.provider.next(Script(events=events, interval=0.05, drop_after=3))  # cut before the usage
    resp = await env.post("/v1/chat/completions", {**CHAT, "stream": True})
    assert resp.code == 200
    try:
        await resp.content()
    except (ResponseFailed, PotentialDataLoss):
        pass  # (the client sees the cut)
    rows: list[dict] = []
    for _ in range(100):  # (the row is written when the call ends)
        rows = await env.rows()
        if rows:
            break
        await deferLater(reactor, 0.05)
    [row] = rows
    assert row["usage_source"] == "estimated" and row["total_tokens"] > 0
    await env.c.limits.sync()
    status, after = await env.admin("GET", path)
    assert after["usage"]["tokens_this_minute"] == row["total_tokens"]
