"""OpenTelemetry tracing: the W3C trace context, the proxy-side API, and
export to a real OTLP/HTTP receiver on loopback (the collector protocol's
protobuf, decoded here)."""

from __future__ import annotations

import socket
import time

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.web.http_headers import Headers

from lectr.metrics import Registry
from lectr.tracing import (
    Attempt,
    RequestSummary,
    Sampler,
    Tracing,
    format_traceparent,
    parse_traceparent,
    synchronous,
)
from tests.support.otlp import start_receiver

SERVER, CLIENT = 2, 3
ERROR, UNSET = 2, 0
CLIENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7
CLIENT_TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def headers(**values: bytes) -> Headers:
    return Headers({k.replace("_", "-").encode(): [v] for k, v in values.items()})


class NullExporter:
    def __init__(self) -> None:
        self.batches: list = []

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make(exporter=None, **kw) -> Tracing:
    kw.setdefault("reactor", Clock())
    kw.setdefault("metrics", Registry())
    return Tracing(exporter or NullExporter(), **kw)


# --- the W3C trace context ----------------------------------------------------------------


def test_traceparent_parsing():
    assert parse_traceparent(CLIENT_TP) == (CLIENT_TRACE, CLIENT_SPAN, True)
    assert parse_traceparent(CLIENT_TP[:-2] + b"00") == (CLIENT_TRACE, CLIENT_SPAN, False)
    # a later version may append fields after a dash
    assert parse_traceparent(b"01" + CLIENT_TP[2:] + b"-what-ever") is not None
    for bad in (
        CLIENT_TP.upper(),  # hex is lower case
        b"00-" + b"0" * 32 + CLIENT_TP[35:],  # all-zero trace id
        CLIENT_TP[:36] + b"0" * 16 + CLIENT_TP[52:],  # all-zero span id
        b"ff" + CLIENT_TP[2:],  # version ff is invalid
        CLIENT_TP + b"-x",  # version 00 has exactly four fields
        CLIENT_TP.replace(b"-", b"_"),
        CLIENT_TP[:-1],
        b"",
    ):
        assert parse_traceparent(bad) is None, bad
    tp = format_traceparent(CLIENT_TRACE, 7, True)
    assert parse_traceparent(tp) == (CLIENT_TRACE, 7, True)


@given(st.binary(max_size=120))
def test_any_client_traceparent_is_parsed_or_ignored(raw):
    """Hostile headers are a class: whatever the bytes, parsing never raises,
    and begin() either joins a valid trace or starts a new one."""
    parsed = parse_traceparent(raw)
    if parsed is not None:
        trace_id, span_id, _ = parsed
        assert 0 < trace_id < 2**128 and 0 < span_id < 2**64
    t = make()
    ctx = t.begin(headers(traceparent=raw))
    assert 0 < ctx.trace_id < 2**128 and 0 < ctx.span_id < 2**64
    if parsed is None:
        assert ctx.parent_span_id is None
    else:
        assert (ctx.trace_id, ctx.parent_span_id) == parsed[:2]
    out = ctx.attempt_traceparent(1)
    assert parse_traceparent(out) is not None and len(out) == 55


def test_two_traceparent_headers_are_invalid():
    t = make()
    ctx = t.begin(Headers({b"traceparent": [CLIENT_TP, CLIENT_TP]}))
    assert ctx.parent_span_id is None and ctx.trace_id != CLIENT_TRACE


def test_propagation_modes():
    for mode, expect in (("lectr", "own"), ("client", CLIENT_TP), ("none", None)):
        ctx = make(propagation=mode).begin(headers(traceparent=CLIENT_TP))
        value = ctx.attempt_traceparent(1)
        if expect == "own":
            trace_id, span_id, sampled = parse_traceparent(value)
            assert trace_id == CLIENT_TRACE and sampled
            assert span_id == ctx.attempt_span_id(1) != ctx.span_id
            assert ctx.attempt_traceparent(1) == value  # stable per attempt
            assert parse_traceparent(ctx.attempt_traceparent(2))[1] != span_id
        else:
            assert value == expect
    # no client header: "client" sends none either
    assert make(propagation="client").begin(Headers()).attempt_traceparent(1) is None
    with pytest.raises(ValueError):
        make(propagation="sometimes")


def test_sampling():
    unsampled = CLIENT_TP[:-2] + b"00"
    t = make()  # parentbased_always_on
    assert t.begin(headers(traceparent=CLIENT_TP)).sampled
    ctx = t.begin(headers(traceparent=unsampled))
    assert not ctx.sampled
    assert ctx.attempt_traceparent(1).endswith(b"-00")  # the decision travels on
    off = make(sampler=Sampler("always_off"))
    assert not off.begin(Headers()).sampled
    assert not make(sampler=Sampler("traceidratio", 0.0)).begin(Headers()).sampled
    assert make(sampler=Sampler("traceidratio", 1.0)).begin(headers(traceparent=unsampled)).sampled
    half = make(sampler=Sampler("parentbased_traceidratio", 0.5))
    share = sum(half.begin(Headers()).sampled for _ in range(4000)) / 4000
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError):
        Sampler("jaeger_remote")


def test_off_by_default_and_configured_by_the_standard_variables(monkeypatch):
    metrics = Registry()
    t = Tracing.from_environ({}, reactor=Clock(), metrics=metrics)
    assert not t.enabled and t.begin(headers(traceparent=CLIENT_TP)) is None
    assert metrics.get("lectr_trace_spans_dropped_total") is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    for off in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        assert not Tracing.from_environ(
            {**endpoint, **off}, reactor=Clock(), metrics=metrics
        ).enabled
    for name, value, message in (
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "http/protobuf"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "OTEL_TRACES_SAMPLER"),
        ("OTEL_TRACES_SAMPLER_ARG", "2", "OTEL_TRACES_SAMPLER"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "lots", "OTEL_BSP_MAX_QUEUE_SIZE"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0", "OTEL_BSP_SCHEDULE_DELAY"),
    ):
        with pytest.raises(ValueError, match=message):
            Tracing.from_environ({**endpoint, name: value}, reactor=Clock(), metrics=metrics)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    t = Tracing.from_environ(
        {
            **endpoint,
            "OTEL_SERVICE_NAME": "gateway-eu",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        },
        reactor=Clock(),
        metrics=metrics,
        propagation="none",
    )
    assert t.enabled and t.propagation == "none"
    assert t._exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    assert t._service_name == "gateway-eu" and t._sampler.name == "parentbased_traceidratio"


# --- the queue ------------------------------------------------------------------------------


def summary(ctx, **kw) -> RequestSummary:
    fields = dict(ended=ctx.started + 1.0, status=200, path="/v1/chat/completions")
    fields.update(kw)
    return RequestSummary(**fields)


@pytest_twisted.ensureDeferred
async def test_the_queue_is_bounded_and_drops_are_counted():
    clock, metrics = Clock(), Registry()
    held: list[Deferred] = []

    def slow_thread(fn, *args):  # the collector does not answer
        d = Deferred()
        held.append(d)
        return d

    t = make(
        reactor=clock,
        metrics=metrics,
        max_queue=10,
        batch_size=4,
        interval=1.0,
        run_in_thread=slow_thread,
    )
    t.start()
    for _ in range(30):
        ctx = t.begin(Headers())
        t.finish(ctx, summary(ctx, attempts=(Attempt(1, "openai", "m", 0, 1, "ok", 200),)))
    dropped = metrics.get("lectr_trace_spans_dropped_total")
    # 10 queued, 20 traces of 2 spans dropped
    assert dropped.value("queue_full") == 40
    assert metrics.get("lectr_trace_queue").value() == 10
    clock.advance(0)  # a full batch leaves at once; the rest waits for it
    assert len(held) == 1
    assert metrics.get("lectr_trace_queue").value() == 6
    held[0].callback(False)  # the collector refused the batch
    assert dropped.value("export_failed") == 8
    clock.advance(0)
    held[1].callback(True)
    assert metrics.get("lectr_trace_spans_exported_total").value() == 8
    t.finish(None, summary(ctx))  # tracing was off for that request: nothing happens
    ctx = t.begin(Headers())
    t.finish(ctx, summary(ctx))
    t.finish(ctx, summary(ctx))  # finishing twice queues once
    assert metrics.get("lectr_trace_queue").value() == 2 + 1


@pytest_twisted.ensureDeferred
async def test_nothing_is_exported_for_unsampled_requests():
    exporter = NullExporter()
    t = make(exporter, sampler=Sampler("always_off"), run_in_thread=synchronous)
    t.start()
    ctx = t.begin(Headers())
    t.finish(ctx, summary(ctx))
    await t.stop()
    assert exporter.batches == []


# --- export to a real OTLP receiver -----------------------------------------------------------


@pytest.fixture
def receiver():
    r = start_receiver()
    yield r
    r.stop()


def real(receiver, **kw) -> tuple[Tracing, Registry]:
    metrics = Registry()
    t = Tracing(
        OTLPSpanExporter(endpoint=receiver.endpoint, timeout=5),
        reactor=reactor,
        metrics=metrics,
        service_name="lectr-test",
        interval=0.05,
        **kw,
    )
    t.start()
    return t, metrics


@pytest_twisted.ensureDeferred
async def test_proxy_spans_reach_a_real_collector(receiver):
    t, metrics = real(receiver)
    try:
        now = reactor.seconds()
        # 1. a streamed chat, joining the client's trace
        chat = t.begin(headers(traceparent=CLIENT_TP, tracestate=b"vendor=1"))
        upstream_tp = chat.attempt_traceparent(1)
        t.finish(
            chat,
            RequestSummary(
                ended=now + 2.0,
                status=200,
                path="/v1/chat/completions",
                provider="openai",
                request_model="gpt-4o-mini",
                response_model="gpt-4o-mini-2024-07-18",
                streamed=True,
                input_tokens=12,
                output_tokens=34,
                time_to_first_token=0.25,
                org_id="00000000-0000-4000-8000-000000000001",
                request_id="req-1",
                attempts=(Attempt(1, "openai", "gpt-4o-mini", now + 0.01, now + 2.0, "ok", 200),),
                service_tier="flex",
                cost_usd="0.0000111",
            ),
        )
        # 2. a fallback: OpenAI rate-limits, Anthropic answers
        fallback = t.begin(Headers())
        tp1, tp2 = fallback.attempt_traceparent(1), fallback.attempt_traceparent(2)
        t.finish(
            fallback,
            RequestSummary(
                ended=now + 1.0,
                status=200,
                path="/v1/chat/completions",
                provider="anthropic",
                request_model="smart",
                response_model="claude-x",
                route="smart",
                attempts=(
                    Attempt(1, "openai", "gpt-4o", now, now + 0.1, "429", 429),
                    Attempt(2, "anthropic", "claude-x", now + 0.1, now + 1.0, "ok", 200),
                ),
            ),
        )
        # 3. a request Lectr refused: no upstream call
        refused = t.begin(Headers())
        t.finish(
            refused,
            RequestSummary(
                ended=now + 0.001,
                status=403,
                path="/v1/chat/completions",
                provider="openai",
                request_model="gpt-secret",
                error_type="model_not_allowed",
            ),
        )
        spans = await receiver.wait_for(6)
    finally:
        await t.stop()

    assert set(receiver.content_types) == {b"application/x-protobuf"}
    by_trace: dict[int, list] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
        assert s.resource["service.name"] == "lectr-test"
        assert s.scope == "lectr"

    # 1. the chat: under the client's span; its attempt is the span named upstream
    (server, attempt) = sorted(by_trace[CLIENT_TRACE], key=lambda s: s.kind)
    assert (server.kind, server.name, server.parent_span_id) == (
        SERVER,
        "chat gpt-4o-mini",
        CLIENT_SPAN,
    )
    assert server.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 34,
        "lectr.streamed": True,
        "lectr.time_to_first_token": 0.25,
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 200,
        "lectr.request_id": "req-1",
        "lectr.org_id": "00000000-0000-4000-8000-000000000001",
        "lectr.attempts": 1,
        "lectr.service_tier": "flex",
        "lectr.cost_usd": "0.0000111",
    }
    assert server.status_code == UNSET
    assert server.end_ns - server.start_ns == pytest.approx(2e9, rel=1e-3)
    assert attempt.kind == CLIENT and attempt.parent_span_id == server.span_id
    assert upstream_tp == format_traceparent(CLIENT_TRACE, attempt.span_id, True)
    assert attempt.attributes["lectr.outcome"] == "ok"

    # 2. the fallback: two attempts, the first one failed
    fb = by_trace[fallback.trace_id]
    (fb_server,) = [s for s in fb if s.kind == SERVER]
    attempts = sorted(
        (s for s in fb if s.kind == CLIENT), key=lambda s: s.attributes["lectr.attempt"]
    )
    assert fb_server.parent_span_id is None and fb_server.attributes["lectr.route"] == "smart"
    assert [a.parent_span_id for a in attempts] == [fb_server.span_id] * 2
    assert [a.span_id for a in attempts] == [parse_traceparent(tp1)[1], parse_traceparent(tp2)[1]]
    assert [(a.name, a.status_code) for a in attempts] == [
        ("chat gpt-4o", ERROR),
        ("chat claude-x", UNSET),
    ]
    assert attempts[0].attributes["error.type"] == "429"
    assert attempts[0].attributes["gen_ai.system"] == "openai"
    assert attempts[1].attributes["gen_ai.system"] == "anthropic"

    # 3. the refusal: one span, the reason in error.type
    (r,) = by_trace[refused.trace_id]
    assert r.attributes["error.type"] == "model_not_allowed"
    assert r.attributes["http.response.status_code"] == 403
    assert r.attributes["lectr.attempts"] == 0
    assert r.status_code == UNSET  # a 4xx is the client's error, not the server's

    assert metrics.get("lectr_trace_spans_exported_total").value() == 6


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest_twisted.ensureDeferred
async def test_a_collector_that_is_down_or_hangs_never_slows_requests(receiver):
    # down: connections refused, the batches fail and are counted
    metrics = Registry()
    down = Tracing(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{closed_port()}/v1/traces", timeout=1),
        reactor=reactor,
        metrics=metrics,
        interval=0.05,
    )
    down.start()
    ctx = down.begin(Headers())
    down.finish(ctx, summary(ctx))
    waited = 0.0
    while metrics.get("lectr_trace_spans_dropped_total").value("export_failed") < 1:
        assert waited < 10, "the failed export was not counted"
        await deferLater(reactor, 0.05)
        waited += 0.05
    await down.stop()

    # hangs: a listener that accepts and never answers; the queue fills, the
    # reactor keeps turning, begin/finish stay cheap, stop does not wait on it
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)
    metrics = Registry()
    hung = Tracing(
        OTLPSpanExporter(
            endpoint=f"http://127.0.0.1:{hole.getsockname()[1]}/v1/traces", timeout=30
        ),
        reactor=reactor,
        metrics=metrics,
        interval=0.01,
        max_queue=50,
        batch_size=10,
        stop_timeout=0.5,
    )
    hung.start()
    try:
        started = time.perf_counter()
        for i in range(2000):
            ctx = hung.begin(headers(traceparent=CLIENT_TP))
            hung.finish(ctx, summary(ctx))
            if i % 100 == 0:
                await deferLater(reactor, 0.005)  # the export loop runs meanwhile
        per_request = (time.perf_counter() - started - 20 * 0.005) / 2000
        assert per_request < 0.001  # generous: about 5 µs measured (bench/metrics_bench.py)
        dropped = metrics.get("lectr_trace_spans_dropped_total").value("queue_full")
        assert dropped >= 2000 - 50 - 10
        ticks = []
        call = reactor.callLater(0, lambda: ticks.append(1))
        await deferLater(reactor, 0.05)
        assert ticks and not call.active()  # the reactor is not blocked by the export
        t0 = time.perf_counter()
        await hung.stop()
        assert time.perf_counter() - t0 < 3
    finally:
        hole.close()


# --- the admin API, through the real service -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_admin_calls_and_their_database_work_are_traced(
    receiver, db_url, tmp_path, monkeypatch
):
    from tests.support.admin import AdminClient
    from tests.support.lectr_service import admin_url, start_lectr

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base_url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "lectr-admin-test")
    service = await start_lectr(db_url, tmp_path)
    try:
        assert service.components.tracing.enabled
        client = AdminClient(admin_url(service))
        created = await client.post(
            "/admin/orgs", {"name": "acme"}, headers={"traceparent": CLIENT_TP.decode()}
        )
        assert created.status == 201
        org_id = created.json["org"]["id"]
        listing = await client.get(f"/admin/orgs/{org_id}/requests")
        assert listing.status == 200
        missing = await client.get("/admin/orgs/00000000-0000-4000-8000-00000000dead")
        assert missing.status == 404
        for _ in range(3):  # health checks and scrapes make no spans
            await client.get("/readyz")
            await client.get("/metrics")
        await receiver.wait_for(3)
        await deferLater(reactor, 0.3)  # and nothing else arrives
    finally:
        await service.stopService()

    servers = [s for s in receiver.spans if s.kind == SERVER]
    assert sorted(s.name for s in servers) == [
        "GET /admin/orgs/{org_id}",
        "GET /admin/orgs/{org_id}/requests",
        "POST /admin/orgs",
    ]
    (create,) = receiver.by_name("POST /admin/orgs")
    assert (create.trace_id, create.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert create.attributes["http.route"] == "/admin/orgs"
    assert create.attributes["http.response.status_code"] == 201
    assert create.attributes["lectr.operation"] == "create_org"
    assert create.resource["service.name"] == "lectr-admin-test"
    children = [s for s in receiver.spans if s.parent_span_id == create.span_id]
    assert children, "the database work of the call"
    for child in children:
        assert child.kind == CLIENT and child.trace_id == CLIENT_TRACE
        assert child.attributes["db.system.name"] == "postgresql"
        assert child.attributes["db.query.summary"] == child.name
        assert create.start_ns <= child.start_ns <= child.end_ns <= create.end_ns
    (listing_span,) = receiver.by_name("GET /admin/orgs/{org_id}/requests")
    assert listing_span.attributes["lectr.org_id"] == org_id
    assert any(
        s.name == "list_request_logs" and s.parent_span_id == listing_span.span_id
        for s in receiver.spans
    )
    (not_found,) = receiver.by_name("GET /admin/orgs/{org_id}")
    assert not_found.attributes["error.type"] == "404"
    assert not_found.status_code == UNSET
    # nothing the client sent (the bearer token) is in any span
    for s in receiver.spans:
        assert "test-admin-token" not in repr(s.attributes)


def test_propagation_setting_is_checked():
    from lectr.config import ConfigError, load_config

    assert load_config({}, {}).trace_propagation == "lectr"
    assert load_config({}, {"LECTR_TRACE_PROPAGATION": " None "}).trace_propagation == "none"
    with pytest.raises(ConfigError, match="LECTR_TRACE_PROPAGATION is malformed"):
        load_config({}, {"LECTR_TRACE_PROPAGATION": "sometimes"})


@pytest_twisted.ensureDeferred
async def test_a_malformed_otel_variable_stops_start_up(db_url, tmp_path, monkeypatch):
    from lectr.config import ConfigError
    from tests.support.lectr_service import start_lectr

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "sometimes")
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER"):
        await start_lectr(db_url, tmp_path)
