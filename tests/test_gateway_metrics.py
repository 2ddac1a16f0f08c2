"""GenAI semantic-convention metrics and upstream attempt/fallback counters:
what they count, and that no client input makes their label sets grow
without bound."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.gateway_metrics import GenAIMetrics, UpstreamMetrics
from lectr.genai import operation_name
from lectr.metrics import Registry
from lectr.usage.model import NO_USAGE, Usage, UsageRecord

ORG = "00000000-0000-4000-8000-0000000000a1"


def rec(**kw) -> UsageRecord:
    fields = dict(
        request_id=str(uuid.uuid4()),
        created_at=datetime.now(UTC),
        org_id=ORG,
        key_id=None,
        provider="openai",
        model="gpt-4o-mini",
        method="POST",
        path="/v1/chat/completions",
        status=200,
        latency_ms=1500.0,
        ttfb_ms=250.0,
        streamed=True,
        usage=Usage(120, 30, 150, None, None, "provider"),
    )
    fields.update(kw)
    return UsageRecord(**fields)


def label_values(registry: Registry, metric: str, label: str) -> set[str]:
    m = registry.get(metric)
    i = m.labelnames.index(label)
    return {key[i] for key in m._series}


def test_operations_by_path():
    assert operation_name("/v1/chat/completions") == "chat"
    assert operation_name("/v1/messages") == "chat"
    assert operation_name("/v1/responses/") == "chat"
    assert operation_name("/v1/embeddings") == "embeddings"
    assert operation_name("/v1/completions") == "text_completion"
    assert operation_name("/v1/models") is None
    assert operation_name("/v1/files/file-abc") is None


def test_genai_metrics_from_usage_rows():
    r = Registry()
    m = GenAIMetrics(r)
    m.observe(
        [
            rec(),  # a streamed chat
            rec(streamed=False, ttfb_ms=900.0, latency_ms=900.0),
            rec(path="/v1/embeddings", streamed=False, usage=Usage(8, None, 8, source="provider")),
            rec(status=429, streamed=False, ttfb_ms=None, latency_ms=20.0, usage=NO_USAGE),
            rec(method="GET", path="/v1/models", streamed=False, usage=NO_USAGE),  # not GenAI
            rec(provider="anthropic", model="claude-x", path="/v1/messages", status=499),
        ]
    )
    chat = ("chat", "openai", "gpt-4o-mini", ORG)
    duration = r.get("gen_ai_server_request_duration")
    assert duration.count(*chat, "") == 2
    assert duration.sum(*chat, "") == 1.5 + 0.9
    assert duration.count(*chat, "429") == 1
    assert duration.count("embeddings", "openai", "gpt-4o-mini", ORG, "") == 1
    assert duration.count("chat", "anthropic", "claude-x", ORG, "499") == 1
    ttft = r.get("gen_ai_server_time_to_first_token")
    assert ttft.count(*chat) == 1 and ttft.sum(*chat) == 0.25  # streams that succeeded only
    tokens = r.get("gen_ai_client_token_usage")
    assert tokens.count(*chat, "input") == 2 and tokens.sum(*chat, "input") == 240
    assert tokens.sum(*chat, "output") == 60
    assert tokens.count("embeddings", "openai", "gpt-4o-mini", ORG, "output") == 0
    assert "/v1/models" not in r.render()
    m.observe([rec(model="lone\ud800surrogate")])  # repaired: the exposition is UTF-8
    assert "lone\ufffdsurrogate" in r.render()
    text = r.render()
    assert "# TYPE gen_ai_client_token_usage histogram" in text
    assert 'gen_ai_token_type="input"' in text


def test_upstream_attempts_and_fallbacks():
    r = Registry()
    m = UpstreamMetrics(r)
    m.attempt("openai", "429")
    m.fallback("openai", "429")
    m.attempt("anthropic", "ok")
    m.attempt("anthropic", "something new")
    m.fallback("anthropic", "Bearer sk-secret")
    attempts = r.get("lectr_upstream_attempts_total")
    assert attempts.value("openai", "429") == 1
    assert attempts.value("anthropic", "ok") == 1
    assert attempts.value("anthropic", "other") == 1
    fallbacks = r.get("lectr_fallbacks_total")
    assert fallbacks.value("openai", "429") == 1
    assert fallbacks.value("anthropic", "other") == 1
    assert "sk-secret" not in r.render()


@settings(max_examples=30, deadline=None)
@given(
    models=st.lists(
        st.text(st.characters(codec=None, exclude_categories=()), max_size=300),
        min_size=1,
        max_size=60,
    ),
    orgs=st.lists(st.uuids().map(str), min_size=1, max_size=40),
)
def test_client_chosen_labels_stay_bounded(models, orgs):
    """Whatever models clients name and however many orgs there are, each
    label keeps at most its limit of values plus "other", and the folds are
    counted."""
    r = Registry()
    m = GenAIMetrics(r, max_models=5, max_orgs=7, max_series=20)
    rows = [rec(model=model, org_id=org) for model in models for org in orgs[:3]]
    rows += [rec(org_id=org) for org in orgs]
    m.observe(rows)
    models_seen = label_values(r, "gen_ai_server_request_duration", "gen_ai_request_model")
    orgs_seen = label_values(r, "gen_ai_server_request_duration", "org_id")
    assert len(models_seen - {"other"}) <= 5
    assert len(orgs_seen - {"other"}) <= 7
    assert all(len(v) <= 128 for v in models_seen)
    r.render().encode()  # lone surrogates were replaced: the exposition encodes
    duration = r.get("gen_ai_server_request_duration")
    assert len(duration._series) <= 20 + 1  # + (provider, other, other)
    total = sum(s[-1] for s in duration._series.values())
    assert total == len(rows)  # nothing is lost, only folded
    distinct_models = len({mo[:128] for mo in models} | {"gpt-4o-mini"})
    if distinct_models > 5:
        assert r.get("lectr_metrics_labels_folded_total").value("gen_ai_request_model") > 0


def _observe_row_by_row(m: GenAIMetrics, rows) -> None:
    """The reference: every row on its own, as the metrics were first kept."""
    for r in rows:
        op = operation_name(r.path)
        if op is None:
            continue
        labels = (op, *m._labels(r))
        status = r.status
        m.duration.observe(r.latency_ms / 1000.0, *labels, str(status) if status >= 400 else "")
        if r.streamed and r.ttfb_ms is not None and status < 400:
            m.ttft.observe(r.ttfb_ms / 1000.0, *labels)
        if r.usage.source != "none":
            if r.usage.prompt_tokens is not None:
                m.token_usage.observe(r.usage.prompt_tokens, *labels, "input")
            if r.usage.completion_tokens is not None:
                m.token_usage.observe(r.usage.completion_tokens, *labels, "output")


_ROWS = st.lists(
    st.builds(
        rec,
        path=st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/x"]),
        provider=st.sampled_from(["openai", "anthropic", "p" * 200]),
        model=st.none() | st.sampled_from(["a", "b", "c", "other", "\ud800x", "m" * 300]),
        org_id=st.sampled_from([ORG, "o2", "o3"]),
        status=st.sampled_from([200, 201, 400, 429, 500]),
        latency_ms=st.floats(min_value=0, max_value=1e6),
        ttfb_ms=st.none() | st.floats(min_value=0, max_value=1e6),
        streamed=st.booleans(),
        usage=st.sampled_from(
            [
                NO_USAGE,
                Usage(1, 2, 3, None, None, "provider"),
                Usage(None, 7, None, None, None, "estimated"),
                Usage(5, None, None, None, None, "provider"),
            ]
        ),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(_ROWS, min_size=1, max_size=3),
    limits=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 8)),
)
def test_a_batch_is_observed_as_its_rows_one_by_one(batches, limits):
    """Observing a batch series by series gives the histograms, and the
    folding counts, that observing its rows one by one gives - whatever the
    paths, label values, folding limits and order."""
    models, orgs, providers, series = limits
    got_registry, want_registry = Registry(), Registry()
    kw = dict(max_models=models, max_orgs=orgs, max_providers=providers, max_series=series)
    got, want = GenAIMetrics(got_registry, **kw), GenAIMetrics(want_registry, **kw)
    for rows in batches:
        got.observe(rows)
        _observe_row_by_row(want, rows)
    for name in ("duration", "ttft", "token_usage"):
        assert getattr(got, name)._series == getattr(want, name)._series
    folded = "lectr_metrics_labels_folded_total"
    assert got_registry.get(folded)._values == want_registry.get(folded)._values


def test_a_malformed_row_leaves_the_rest_of_its_batch_observed():
    """A row the proxy should never have made (a bug upstream) is left out of
    the histograms; the rows around it are observed as if it were not
    there, and nothing is raised into the flusher."""
    good = [rec(), rec(status=500, model="gpt-4o"), rec(streamed=False)]
    bad = [
        rec(latency_ms="slow"),
        rec(status=None),
        rec(usage=None),
        rec(path=["/v1/chat/completions"]),
    ]
    got, want = GenAIMetrics(Registry()), GenAIMetrics(Registry())
    got.observe([good[0], bad[0], bad[1], good[1], bad[2], bad[3], good[2]])
    want.observe(good)
    for name in ("duration", "ttft", "token_usage"):
        assert getattr(got, name)._series == getattr(want, name)._series
    assert got.duration._series  # (something was observed)
