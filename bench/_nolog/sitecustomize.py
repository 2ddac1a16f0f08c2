"""Benchmark-only: loaded (via PYTHONPATH, first entry) into the Lectr process
of the "usage logging off" run of `bench/run.py --only logging`. It turns the
usage recorder into a no-op, so the two runs differ only by usage logging.

It writes the file named by BENCH_NOLOG_MARKER when it is loaded, so the
benchmark can prove that the "off" run really ran without logging (before
this marker existed, the "off" run silently measured logging on)."""

import os

from lectr.usage.recorder import UsageRecorder


def _drop(self, record):
    pass


UsageRecorder.record = _drop

_marker = os.environ.get("BENCH_NOLOG_MARKER")
if _marker:
    with open(_marker, "a") as f:
        f.write(f"{os.getpid()}\n")
