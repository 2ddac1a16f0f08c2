"""Benchmark-only: loaded (via PYTHONPATH) into the Lectr process of
``bench/limits_insitu.py``. Times, inside the loaded proxy, the limits
policy step (admission, with its reservation and headers) and the
settlement, and writes the totals to ``$BENCH_LIMITS_STATS`` (JSON) on
SIGUSR1, then starts counting afresh. After each timed step it also times
an empty function through the same wrapper ("probe"): what the timing
itself adds to each figure, measured in the same process and seconds.

The x-ratelimit-* lines an admission adds to the response head ("head"):
each head written with them is also rendered once without them (never
sent), in alternating order, and the difference is counted; the time of
that extra rendering is counted too ("extra"), so that it can be taken
out of the process's CPU."""

import json
import os
import signal
import time

from lectr.http import server
from lectr.limits import limiter
from lectr.policy import limits as step

_stats = {
    "step": [0, 0.0],
    "settle": [0, 0.0],
    "probe": [0, 0.0],
    "head": [0, 0.0],
    "extra": [0, 0.0],
}


def _timed(func, name):
    counts = _stats[name]
    clock = time.perf_counter

    def timed(*args, **kwargs):
        t = clock()
        try:
            return func(*args, **kwargs)
        finally:
            counts[0] += 1
            counts[1] += clock() - t

    return timed


def _empty(*args, **kwargs):
    return None


_probe = _timed(_empty, "probe")
_step = _timed(step.Limits.__call__, "step")


def _step_and_probe(self, call):
    try:
        return _step(self, call)
    finally:
        _probe(self, call)


step.Limits.__call__ = _step_and_probe
limiter.Admission.settle = _timed(limiter.Admission.settle, "settle")


_head = server.ServerRequest._head
_flip = [False]


def _head_measured(self, status, reason, headers, length, block=b""):
    if not block:
        return _head(self, status, reason, headers, length)
    clock = time.perf_counter
    _flip[0] = first_without = not _flip[0]
    if first_without:
        t0 = clock()
        _head(self, status, reason, headers, length)
        t1 = clock()
        out = _head(self, status, reason, headers, length, block)
        t2 = clock()
        without, with_block = t1 - t0, t2 - t1
    else:
        t0 = clock()
        out = _head(self, status, reason, headers, length, block)
        t1 = clock()
        _head(self, status, reason, headers, length)
        t2 = clock()
        with_block, without = t1 - t0, t2 - t1
    _stats["head"][0] += 1
    _stats["head"][1] += with_block - without
    _stats["extra"][0] += 1
    _stats["extra"][1] += without
    return out


server.ServerRequest._head = _head_measured


def _dump(*_):
    with open(os.environ["BENCH_LIMITS_STATS"], "w") as f:
        json.dump(_stats, f)
    for counts in _stats.values():
        counts[0], counts[1] = 0, 0.0


signal.signal(signal.SIGUSR1, _dump)
