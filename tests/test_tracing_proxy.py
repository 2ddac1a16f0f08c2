"""Traces of proxied requests, end to end: the real service with tracing on
(``OTEL_EXPORTER_OTLP_ENDPOINT``), the real OpenAI SDK as the client, the
fake provider on loopback, and a real OTLP/HTTP receiver decoding what the
exporter sends. What the provider receives as ``traceparent`` is the span
the collector gets for that attempt."""

from __future__ import annotations

from decimal import Decimal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from lectr.tracing import format_traceparent, parse_traceparent
from tests.support.fake_provider import Script
from tests.support.lectr_service import proxy_url
from tests.support.otlp import start_receiver
from tests.test_routing_proxy import Env, close_env, make_env

CLIENT_TRACE, CLIENT_SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
CLIENT_TP = format_traceparent(CLIENT_TRACE, CLIENT_SPAN, True).decode()
SERVER, CLIENT = 2, 3  # span kinds


async def _env(db_url, tmp_path, monkeypatch, **settings):
    receiver = start_receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base_url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "lectr-proxy-test")
    return await make_env(db_url, tmp_path, **settings), receiver


async def _close(env: Env, receiver) -> None:
    await close_env(env)
    await receiver.stop()


@pytest_twisted.async_yield_fixture
async def traced(db_url, tmp_path, monkeypatch):
    env, receiver = await _env(db_url, tmp_path, monkeypatch)
    try:
        yield env, receiver
    finally:
        await _close(env, receiver)


def sdk_chat(env: Env, model: str, *, stream: bool, traceparent: str | None = None):
    from openai import OpenAI

    client = OpenAI(
        base_url=proxy_url(env.service, "/v1"),
        api_key=env.key,
        max_retries=0,
        default_headers={"traceparent": traceparent} if traceparent else None,
    )

    def call():
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )
        parsed = raw.parse()
        if stream:
            chunks = list(parsed)
            usage = chunks[-1].usage
        else:
            usage = parsed.usage
        return raw.headers["x-lectr-request-id"], usage

    return deferToThread(call)


async def spans_of(receiver, request_id: str, attempts: int):
    """The request's SERVER span and its attempts' spans (waiting for them:
    the admin API's own spans may arrive first)."""
    for _ in range(200):
        found = [s for s in receiver.spans if s.attributes.get("lectr.request_id") == request_id]
        if found and len([s for s in receiver.spans if s.parent_span_id == found[0].span_id]) >= (
            attempts
        ):
            break
        await deferLater(reactor, 0.05, lambda: None)
    (server,) = found
    attempts = sorted(
        (s for s in receiver.spans if s.parent_span_id == server.span_id),
        key=lambda s: s.attributes["lectr.attempt"],
    )
    return server, attempts


@pytest_twisted.ensureDeferred
async def test_a_streamed_chat_joins_the_clients_trace(traced):
    env, receiver = traced
    rid, usage = await sdk_chat(env, "gpt-4o-mini", stream=True, traceparent=CLIENT_TP)
    server, (attempt,) = await spans_of(receiver, rid, 1)

    # the request's span hangs under the client's; the attempt under it
    assert (server.trace_id, server.parent_span_id, server.kind) == (
        CLIENT_TRACE,
        CLIENT_SPAN,
        SERVER,
    )
    assert server.name == "chat gpt-4o-mini" and server.resource["service.name"] == (
        "lectr-proxy-test"
    )
    a = server.attributes
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gen_ai.request.model"] == "gpt-4o-mini" and a["lectr.streamed"] is True
    # the fake provider names no tier unless asked; the row's cost, exactly (the price table's
    # gpt-4o-mini: 0.15 and 0.60 USD per million input and output tokens)
    assert "lectr.service_tier" not in a
    expected = (
        Decimal("0.15") * usage.prompt_tokens + Decimal("0.60") * usage.completion_tokens
    ) / (10**6)
    assert Decimal(a["lectr.cost_usd"]) == expected
    assert a["http.response.status_code"] == 200 and a["lectr.org_id"] == env.org.id
    assert 0 < a["lectr.time_to_first_token"] < (server.end_ns - server.start_ns) / 1e9
    assert (attempt.kind, attempt.trace_id, attempt.attributes["lectr.outcome"]) == (
        CLIENT,
        CLIENT_TRACE,
        "ok",
    )
    assert server.start_ns <= attempt.start_ns <= attempt.end_ns <= server.end_ns

    # the provider got one traceparent: the attempt's span, not the client's
    (call,) = env.provider.calls("openai")
    (sent,) = call.headers["traceparent"]
    assert parse_traceparent(sent.encode()) == (CLIENT_TRACE, attempt.span_id, True)


@pytest_twisted.ensureDeferred
async def test_a_fallback_has_one_span_per_attempt(traced):
    env, receiver = traced
    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "gpt-4o"}, {"provider": "groq", "model": "b"}],
    )
    env.provider.next(Script(status=503, body=b'{"error":{"message":"overloaded"}}'))
    rid, _ = await sdk_chat(env, "smart", stream=False)
    server, attempts = await spans_of(receiver, rid, 2)
    assert server.parent_span_id is None  # no traceparent from the client: a new trace
    assert server.attributes["lectr.route"] == "smart"
    assert server.attributes["lectr.attempts"] == 2
    assert [
        (
            s.attributes["lectr.attempt"],
            s.attributes["gen_ai.system"],
            s.attributes["lectr.outcome"],
        )
        for s in attempts
    ] == [(1, "openai", "5xx"), (2, "groq", "ok")]
    assert attempts[0].status_code == 2 and attempts[0].end_ns <= attempts[1].start_ns
    sent = [c.headers["traceparent"][0] for c in env.provider.calls()]
    assert [parse_traceparent(v.encode())[1] for v in sent] == [s.span_id for s in attempts]

    # and the metrics count both attempts and the fallback
    metrics = env.service.components.metrics.render()
    assert 'lectr_upstream_attempts_total{outcome="5xx",provider="openai"} 1.0' in metrics
    assert 'lectr_fallbacks_total{provider="openai",reason="5xx"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_a_refused_request_is_traced_without_attempts(traced):
    from openai import PermissionDeniedError

    env, receiver = traced
    status, _ = await env.admin(
        "PUT", f"/admin/orgs/{env.org.id}/providers/openai", {"blocked_models": ["gpt-secret"]}
    )
    assert status == 200

    def call():
        from openai import OpenAI

        client = OpenAI(base_url=proxy_url(env.service, "/v1"), api_key=env.key, max_retries=0)
        with pytest.raises(PermissionDeniedError) as e:
            client.chat.completions.create(
                model="gpt-secret", messages=[{"role": "user", "content": "x"}]
            )
        return e.value.response.headers["x-lectr-request-id"]

    rid = await deferToThread(call)
    server, attempts = await spans_of(receiver, rid, 0)
    assert attempts == [] and env.provider.calls() == []
    assert server.status_code == 0  # a 4xx leaves a SERVER span's status unset (semconv)
    assert server.attributes["error.type"] == "permission"
    assert server.attributes["http.response.status_code"] == 403


@pytest_twisted.ensureDeferred
async def test_propagation_none_sends_no_trace_context(db_url, tmp_path, monkeypatch):
    env, receiver = await _env(db_url, tmp_path, monkeypatch, LECTR_TRACE_PROPAGATION="none")
    try:
        from openai import OpenAI

        client = OpenAI(
            base_url=proxy_url(env.service, "/v1"),
            api_key=env.key,
            max_retries=0,
            default_headers={"traceparent": CLIENT_TP, "tracestate": "vendor=secret"},
        )
        await deferToThread(
            client.chat.completions.create,
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
        )
        (call,) = env.provider.calls("openai")
        assert "traceparent" not in call.headers and "tracestate" not in call.headers
        spans = await receiver.wait_for(2)
        assert {s.trace_id for s in spans} == {CLIENT_TRACE}  # Lectr's own spans still join it
    finally:
        await _close(env, receiver)


@pytest_twisted.ensureDeferred
async def test_tracestate_goes_upstream_only_with_the_trace_it_belongs_to(traced):
    """W3C: ``tracestate`` belongs to the client's trace. With a valid
    ``traceparent`` Lectr continues that trace and forwards it; without one
    (or with a malformed one) Lectr starts a new trace, and the client's
    ``tracestate`` must not go upstream with it."""
    from openai import OpenAI

    env, _ = traced
    for traceparent, forwarded in (
        (CLIENT_TP, True),
        (None, False),
        ("00-zz-not-a-traceparent-01", False),
    ):
        extra = {"tracestate": "vendor=abc"}
        if traceparent is not None:
            extra["traceparent"] = traceparent
        client = OpenAI(
            base_url=proxy_url(env.service, "/v1"),
            api_key=env.key,
            max_retries=0,
            default_headers=extra,
        )
        await deferToThread(
            client.chat.completions.create,
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
        )
        call = env.provider.calls("openai")[-1]
        assert "traceparent" in call.headers, traceparent
        assert ("tracestate" in call.headers) is forwarded, traceparent
