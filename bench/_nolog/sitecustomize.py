"""Benchmark-only: loaded (via PYTHONPATH) into the Lectr process of the
"usage logging off" run of `bench/run.py --only logging`. It turns the usage
recorder into a no-op, so the two runs differ only by usage logging."""

from lectr.usage.recorder import UsageRecorder


def _drop(self, record):
    pass


UsageRecorder.record = _drop
