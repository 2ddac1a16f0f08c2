"""Review of the observability layer: what a real Prometheus scraper reads
from /metrics (checked with prometheus_client's own parser), what hostile
label values and traceparent headers do, and how the workers' files merge."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from lectr import metrics as metrics_module
from lectr.gateway_metrics import GenAIMetrics
from lectr.metrics import MetricsRunDirectory, Registry
from lectr.tracing import RequestSummary, Tracing, parse_traceparent, synchronous
from lectr.usage.model import Usage, UsageRecord

_ANY_TMP = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def scraped(text: str) -> dict:
    """family name -> its samples, as a real parser reads the exposition;
    fails on anything it rejects, and on a family given twice."""
    families: dict = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} given twice"
        families[family.name] = family
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "one TYPE line per family"
    return families


def series(family) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for s in family.samples:
        key = (s.name, tuple(sorted(s.labels.items())))
        assert key not in out, f"duplicate series {key}"
        out[key] = s.value
    return out


def check_histograms(families) -> None:
    """Buckets cumulative and ending at +Inf, which equals _count."""
    for family in families.values():
        if family.type != "histogram":
            continue
        by_series: dict[tuple, dict] = {}
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            entry = by_series.setdefault(tuple(sorted(labels.items())), {"buckets": []})
            if s.name.endswith("_bucket"):
                entry["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                entry["count"] = s.value
            elif s.name.endswith("_sum"):
                entry["sum"] = s.value
        for key, entry in by_series.items():
            buckets = sorted(entry["buckets"])
            assert buckets and buckets[-1][0] == math.inf, key
            counts = [n for _, n in buckets]
            assert counts == sorted(counts), key
            assert entry["count"] == buckets[-1][1], key
            assert "sum" in entry, key


# --- a broken callback gauge in one process -------------------------------------------


def test_a_failing_callback_does_not_break_a_single_process_scrape():
    """With one worker (the default) /metrics is rendered from the process's
    values directly: a callback gauge that raises is left out, as it is from
    the workers' files, instead of turning the whole scrape into a 500."""
    r = Registry()
    r.counter("lectr_a_total", "a").inc(2)

    def broken() -> float:
        raise RuntimeError("gone")

    r.callback_gauge("lectr_broken", "b", broken)
    r.callback_gauge("lectr_fine", "f", lambda: 4)
    families = scraped(r.render())
    assert families["lectr_a"].samples[0].value == 2
    assert families["lectr_fine"].samples[0].value == 4
    assert "lectr_broken" not in families
    r.render()  # and again (logged once)
    r.callback_gauge("lectr_broken", "b", lambda: 1)  # the owner restarted: readable again
    assert scraped(r.render())["lectr_broken"].samples[0].value == 1


# --- a new worker with a pid an exited one had ------------------------------------------


def test_a_reused_pid_does_not_overwrite_an_exited_workers_counts(tmp_path, monkeypatch):
    """Pids are reused. A worker started with the pid of a worker that
    exited earlier in the same run must add to that worker's counts, not open
    its files and overwrite them."""
    run = MetricsRunDirectory.create(tmp_path)
    try:
        first = Registry()
        first.share(run.path, 4242)
        first.counter("lectr_req_total", "Requests", ["status"]).inc(10, "200")
        first.histogram("lectr_req_seconds", "Seconds", buckets=(1.0,)).observe(0.5)
        first.callback_gauge("lectr_active", "Active", lambda: 3)
        first.sync()
        first.unshare()
        run.process_ended(4242)

        # another process: what this one opened is not its own
        monkeypatch.setattr(metrics_module, "_OWN_FILES", set())
        second = Registry()
        second.share(run.path, 4242)
        second.counter("lectr_req_total", "Requests", ["status"]).inc(1, "200")
        second.histogram("lectr_req_seconds", "Seconds", buckets=(1.0,)).observe(2.0)
        second.callback_gauge("lectr_active", "Active", lambda: 1)
        families = scraped(second.render())
        assert series(families["lectr_req"]) == {("lectr_req_total", (("status", "200"),)): 11}
        h = series(families["lectr_req_seconds"])
        assert h[("lectr_req_seconds_count", ())] == 2
        assert h[("lectr_req_seconds_bucket", (("le", "1.0"),))] == 1
        assert h[("lectr_req_seconds_sum", ())] == 2.5
        assert series(families["lectr_active"]) == {("lectr_active", ()): 1}  # live only
        check_histograms(families)

        # the same process sharing again rewrites its own files: nothing twice
        second.unshare()
        second.share(run.path, 4242)
        assert scraped(second.render())["lectr_req"].samples[0].value == 11
    finally:
        run.remove()


# --- hostile label values, as a scraper reads them ------------------------------------------

_hostile = st.text(
    alphabet=st.one_of(
        st.sampled_from(["\\", '"', "\n", "\r", "\t", "{", "}", "=", ",", " ", "#", "\x00"]),
        st.characters(codec="utf-8"),
    ),
    max_size=20,
)


@_ANY_TMP
@given(
    st.lists(st.tuples(_hostile, st.floats(0, 100, allow_nan=False)), min_size=1, max_size=12),
    st.booleans(),
)
def test_hostile_label_values_reach_the_scraper_unchanged(tmp_path_factory, events, shared):
    """Backslashes, quotes, newlines and any UTF-8 in a label value are
    escaped so that the scraper reads back exactly the value, in one process
    and merged from the workers' files."""
    r = Registry()
    if shared:
        r.share(tmp_path_factory.mktemp("mp"), 1)
    c = r.counter("lectr_t_total", "help with \\ and \n", ["v"])
    h = r.histogram("lectr_t_seconds", "t", ["v"], buckets=(0.5, 5.0))
    expected: dict[str, list[float]] = {}
    for value, x in events:
        c.inc(1, value)
        h.observe(x, value)
        expected.setdefault(value, []).append(x)
    families = scraped(r.render())
    check_histograms(families)
    assert families["lectr_t"].documentation == "help with \\ and \n"
    counted = {s.labels["v"]: s.value for s in families["lectr_t"].samples}
    assert counted == {v: len(xs) for v, xs in expected.items()}
    sums = {
        s.labels["v"]: s.value
        for s in families["lectr_t_seconds"].samples
        if s.name == "lectr_t_seconds_sum"
    }
    assert sums.keys() == expected.keys()
    for v, xs in expected.items():
        assert sums[v] == pytest.approx(sum(xs))


def _row(provider: str, model: str, org: str, status: int) -> UsageRecord:
    return UsageRecord(
        request_id=str(uuid.uuid4()),
        created_at=datetime.now(UTC),
        org_id=org,
        key_id=None,
        provider=provider,
        model=model,
        method="POST",
        path="/v1/chat/completions",
        status=status,
        latency_ms=120.0,
        ttfb_ms=30.0,
        streamed=True,
        usage=Usage(5, 7, 12, None, None, "provider"),
    )


@_ANY_TMP
@given(
    st.lists(
        st.tuples(
            st.text(max_size=8),
            st.text(max_size=200),
            st.text(max_size=40),
            st.sampled_from([200, 429, 499, 500]),
        ),
        min_size=1,
        max_size=50,
    ),
    st.booleans(),
)
def test_client_chosen_genai_labels_are_capped_in_the_scrape(tmp_path_factory, rows, shared):
    """Whatever models, orgs and providers arrive (newlines, quotes, lone
    surrogates, 200 characters), the scrape parses, no label value is longer
    than 128 characters, and each label holds at most its cap of values plus
    ``other``."""
    r = Registry()
    if shared:
        r.share(tmp_path_factory.mktemp("mp"), 1)
    GenAIMetrics(r, max_models=4, max_orgs=3, max_providers=2, max_series=6).observe(
        [_row(*row) for row in rows]
    )
    families = scraped(r.render())
    check_histograms(families)
    seen: dict[str, set[str]] = {"gen_ai_system": set(), "gen_ai_request_model": set()}
    seen["org_id"] = set()
    combos = set()
    for name in (
        "gen_ai_client_token_usage",
        "gen_ai_server_request_duration",
        "gen_ai_server_time_to_first_token",
    ):
        for s in families[name].samples if name in families else ():
            for label, values in seen.items():
                values.add(s.labels[label])
                assert len(s.labels[label]) <= 128
            combos.add(tuple(s.labels[label] for label in seen))
    assert len(seen["gen_ai_system"] - {"other"}) <= 2
    assert len(seen["gen_ai_request_model"] - {"other"}) <= 4
    assert len(seen["org_id"] - {"other"}) <= 3
    assert len(combos) <= 6 + 3  # + (provider, other, other) past the series cap


# --- traceparent -------------------------------------------------------------------------------

_HEX = "0123456789abcdef"
_VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _w3c(value: bytes):
    """The W3C Trace Context level 1 rules, written out
    (https://www.w3.org/TR/trace-context/#traceparent-header)."""
    s = value.decode("latin-1")
    if len(s) < 55:
        return None
    version = s[:2]
    if any(c not in _HEX for c in version) or version == "ff":
        return None
    if version == "00" and len(s) != 55:
        return None
    if len(s) > 55 and s[55] != "-":  # a later version may append "-..."
        return None
    if (s[2], s[35], s[52]) != ("-", "-", "-"):
        return None
    trace, span, flags = s[3:35], s[36:52], s[53:55]
    if any(c not in _HEX for c in trace + span + flags):
        return None
    if int(trace, 16) == 0 or int(span, 16) == 0:
        return None
    return int(trace, 16), int(span, 16), bool(int(flags, 16) & 1)


@st.composite
def _near_valid_traceparent(draw) -> bytes:
    chars = list(
        draw(st.sampled_from([_VALID, "01" + _VALID[2:], "cc" + _VALID[2:] + "-later-fields"]))
    )
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(chars)))
        c = draw(st.sampled_from(list("0f9aF-gA \t\n\x00é")))
        op = draw(st.integers(0, 2))
        if op == 0 and i < len(chars):
            chars[i] = c
        elif op == 1:
            chars.insert(i, c)
        elif i < len(chars):
            del chars[i]
    return "".join(chars).encode("utf-8")


@settings(max_examples=2000)
@given(_near_valid_traceparent())
def test_traceparent_follows_the_w3c_rules(raw):
    """Near-valid headers (a character changed, added or removed: uppercase
    hex, version ff, zero ids, wrong lengths, later versions) are accepted
    exactly when the specification accepts them."""
    assert parse_traceparent(raw) == _w3c(raw)


# --- the collector's URL in log lines -------------------------------------------------------


def test_credentials_in_the_otlp_endpoint_never_reach_a_log_line(monkeypatch):
    """The OTLP exporter accepts a user and password in the endpoint (HTTP
    basic auth). The start-up line and the export-failure warning name the
    collector without them."""
    url = "https://tenant-7:s3cr3t-t0ken@collector.example:4318"
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": url}
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)

    class Refused:  # a collector that refuses every batch
        def export(self, spans):
            from opentelemetry.sdk.trace.export import SpanExportResult

            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            pass

    clock = Clock()
    with capturedLogs() as events:
        t = Tracing.from_environ(environ, reactor=clock, metrics=Registry())
        assert t._exporter._endpoint == url + "/v1/traces"  # the exporter still has them
        t.start()
        refused = Tracing(
            Refused(),
            reactor=clock,
            metrics=Registry(),
            description=t._description,  # as from_environ made it
            run_in_thread=synchronous,
            interval=1.0,
        )
        refused.start()
        ctx = refused.begin(None)
        refused.finish(ctx, RequestSummary(ended=ctx.started + 1, status=200))
        clock.advance(1.0)
        t._loop.stop()
        refused._loop.stop()
    text = "\n".join(formatEvent(e) for e in events)
    assert "tracing on: OTLP/HTTP to https://***@collector.example:4318/v1/traces" in text
    assert "trace export to https://***@collector.example:4318/v1/traces failed" in text
    assert "s3cr3t" not in text and "tenant-7" not in text
    assert "s3cr3t" not in repr(events)
