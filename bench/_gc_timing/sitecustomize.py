"""Benchmark-only: loaded (via PYTHONPATH) into the Lectr process of
``bench/gc_cost.py``. Times every run of CPython's cyclic garbage collector
(``gc.callbacks``) and, on SIGUSR1, writes the totals since the last signal
to ``$BENCH_GC_STATS`` (JSON): collections and seconds per generation, and
the objects found unreachable. With ``BENCH_GC_YOUNG`` set, the young
generation's threshold Lectr sets once serving is replaced by that value
(to compare with CPython's default, 700)."""

import gc
import json
import os
import signal
import time

_stats = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "collected": 0}
_started = [0.0]


def _callback(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    generation = info["generation"]
    _stats["collections"][generation] += 1
    _stats["seconds"][generation] += time.perf_counter() - _started[0]
    _stats["collected"] += info["collected"]


gc.callbacks.append(_callback)

_young = os.environ.get("BENCH_GC_YOUNG")
if _young:
    _set_threshold = gc.set_threshold

    def _threshold(threshold0, *older):
        _set_threshold(int(_young), *older)

    gc.set_threshold = _threshold


def _dump(*_):
    with open(os.environ["BENCH_GC_STATS"], "w") as f:
        json.dump({**_stats, "threshold": gc.get_threshold()}, f)
    _stats["collections"] = [0, 0, 0]
    _stats["seconds"] = [0.0, 0.0, 0.0]
    _stats["collected"] = 0


signal.signal(signal.SIGUSR1, _dump)
