"""What metrics and tracing cost per call, on the reactor thread.

    .venv/bin/python bench/metrics_bench.py

Prints, in nanoseconds per call (best of 5 runs):

- Lectr's registry (``lectr.metrics``): a labelled counter ``inc`` and a
  histogram ``observe``, the calls the request path makes;
- prometheus_client's own multiprocess values for the same calls (a lock and
  an mmap write per call), which is what Lectr avoids on the hot path;
- the once-a-second work that replaces it: writing a realistic registry
  (about 400 series) to the multiprocess files, and a scrape of 4 workers;
- the GenAI metrics, per usage row, in the recorder's flush;
- tracing: ``begin`` + ``finish`` of a request with tracing off (one
  attribute check) and on (ids, the traceparent to send upstream, the queue).
"""

from __future__ import annotations

import os
import sys
import tempfile
import timeit
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from lectr.gateway_metrics import GenAIMetrics
from lectr.metrics import Registry
from lectr.tracing import Attempt, RequestSummary, Tracing
from lectr.usage.model import Usage, UsageRecord

N = 200_000


def per_call(fn, n: int = N) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9


def lectr_registry() -> None:
    r = Registry()
    c = r.counter("lectr_x_total", "x", ["provider", "status"])
    h = r.histogram("lectr_x_seconds", "x", ["provider"])
    print(
        f"lectr Counter.inc(1, provider, status)     {per_call(lambda: c.inc(1, 'openai', '200')):7.0f} ns"
    )
    print(
        f"lectr Histogram.observe(v, provider)       {per_call(lambda: h.observe(0.05, 'openai')):7.0f} ns"
    )


def prometheus_multiprocess(directory: str) -> None:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import CollectorRegistry, Counter, Histogram, values

    values.ValueClass = values.MultiProcessValue()
    r = CollectorRegistry()
    c = Counter("bench_x_total", "x", ["provider", "status"], registry=r)
    h = Histogram("bench_x_seconds", "x", ["provider"], registry=r)
    child_c, child_h = c.labels("openai", "200"), h.labels("openai")
    print(
        f"prometheus_client mp labels().inc()        {per_call(lambda: c.labels('openai', '200').inc()):7.0f} ns"
    )
    print(f"prometheus_client mp child.inc()           {per_call(lambda: child_c.inc()):7.0f} ns")
    print(
        f"prometheus_client mp labels().observe(v)   {per_call(lambda: h.labels('openai').observe(0.05)):7.0f} ns"
    )
    print(
        f"prometheus_client mp child.observe(v)      {per_call(lambda: child_h.observe(0.05)):7.0f} ns"
    )
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def realistic(registry: Registry) -> Registry:
    """About the series a busy worker holds: admin and proxy counters by
    status, latency histograms by provider, db operations by description."""
    req = registry.counter("lectr_proxy_requests_total", "x", ["provider", "status"])
    lat = registry.histogram("lectr_proxy_request_seconds", "x", ["provider"])
    db = registry.histogram("lectr_db_transaction_seconds", "x", ["desc"])
    for p in ("openai", "anthropic", "mistral", "groq"):
        for s in ("200", "400", "401", "429", "500", "502", "499"):
            req.inc(5, p, s)
        lat.observe(0.2, p)
    for d in range(20):
        db.observe(0.003, f"op_{d}")
    registry.callback_gauge("lectr_proxy_active_requests", "x", lambda: 7)
    return registry


def sync_and_scrape(directory: str) -> None:
    workers = []
    for pid in range(4):
        r = realistic(Registry())
        r.share(Path(directory), 90000 + pid)
        r.sync()
        workers.append(r)
    series = sum(
        len(m._values) or sum(len(m.buckets) + 1 for _ in m._series)
        for m in workers[0]._metrics.values()
    )
    sync = per_call(workers[0].sync, 2000) / 1000
    scrape = per_call(workers[0].render, 200) / 1000
    print(f"sync of one worker's registry (~{series} samples)  {sync:9.0f} us, once a second")
    print(f"/metrics over 4 workers' files              {scrape:9.0f} us per scrape")
    local = realistic(Registry())
    print(
        f"/metrics of one process (no files)          {per_call(local.render, 200) / 1000:9.0f} us per scrape"
    )


def genai() -> None:
    m = GenAIMetrics(Registry())
    now = datetime.now(UTC)
    rows = [
        UsageRecord(
            str(uuid.uuid4()),
            now,
            f"00000000-0000-4000-8000-{i % 50:012d}",
            None,
            "openai",
            ("gpt-4o-mini", "gpt-4o", "o3")[i % 3],
            "POST",
            "/v1/chat/completions",
            200,
            812.0,
            95.0,
            bool(i % 2),
            Usage(1200, 350, 1550, None, None, "provider"),
        )
        for i in range(1000)
    ]
    cost = per_call(lambda: m.observe(rows), 200) / len(rows)
    print(f"GenAI metrics per usage row (flusher)      {cost:7.0f} ns")


def tracing() -> None:
    clock = Clock()
    headers = Headers(
        {b"traceparent": [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]}
    )
    off = Tracing.disabled(reactor=clock)

    def request_off() -> None:
        ctx = off.begin(headers) if off.enabled else None
        if ctx is not None:
            raise AssertionError

    class Exporter:
        def export(self, spans):
            raise AssertionError("not reached")

        def shutdown(self):
            pass

    on = Tracing(Exporter(), reactor=clock, metrics=Registry(), max_queue=10**9)
    summary_attempt = (Attempt(1, "openai", "gpt-4o-mini", 0.0, 1.0, "ok", 200),)

    def request_on() -> None:
        ctx = on.begin(headers) if on.enabled else None
        ctx.attempt_traceparent(1)
        on.finish(
            ctx,
            RequestSummary(
                ended=1.0,
                status=200,
                path="/v1/chat/completions",
                provider="openai",
                request_model="gpt-4o-mini",
                attempts=summary_attempt,
            ),
        )

    print(f"tracing off: begin() per request           {per_call(request_off):7.0f} ns")
    print(f"tracing on: begin + traceparent + finish   {per_call(request_on, 100_000):7.0f} ns")


def main() -> None:
    print(f"Python {sys.version.split()[0]}; best of 5 runs")
    lectr_registry()
    with tempfile.TemporaryDirectory() as d:
        prometheus_multiprocess(d)
    with tempfile.TemporaryDirectory() as d:
        sync_and_scrape(d)
    genai()
    tracing()


if __name__ == "__main__":
    main()
