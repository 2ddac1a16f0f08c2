"""Benchmark-only: loaded (via PYTHONPATH) into the Lectr process of the
"metrics off" run of `bench/run.py --only metrics`. Every metric update
becomes a no-op (counters, gauges, histograms, and the GenAI metrics of the
usage flush), so the two runs differ only by metrics."""

from lectr import metrics
from lectr.gateway_metrics import GenAIMetrics


def _nothing(self, *args, **kwargs):
    pass


metrics.Counter.inc = _nothing
metrics.Gauge.set = metrics.Gauge.inc = metrics.Gauge.dec = _nothing
metrics.Histogram.observe = _nothing
GenAIMetrics.observe = _nothing
