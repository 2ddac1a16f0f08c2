"""Benchmark-only: loaded (via PYTHONPATH) into the Lectr process of
``bench/reactor_turns.py``. Times every piece of work the reactor does
without serving anything else in between - each dispatch of a ready
descriptor (``_doReadOrWrite``) and each run of the due timed calls
(``runUntilCurrent``) - and every run of the cyclic garbage collector (which
happens inside one of them). On SIGUSR1 it writes what it timed since the
last signal to ``$BENCH_TURNS_STATS`` (JSON) and starts afresh.

``$BENCH_TURNS_VARIANT``: ``no-logging`` turns the usage recorder into a
no-op; ``no-statement`` prepares every batch of usage rows as for a write
(repaired, GenAI metrics fed, column arrays built, in slices) but sends no
statement to PostgreSQL - to tell the flusher's own work from the
database's."""

import gc
import json
import os
import signal
import time

from twisted.internet import base, epollreactor

_clock = time.perf_counter
_turns: list[float] = []  # every turn over 0.5 ms, in seconds
_stats = {"turns": 0, "gc": [[], [], []]}


def _timed(method):
    def timed(*args):
        started = _clock()
        try:
            return method(*args)
        finally:
            took = _clock() - started
            _stats["turns"] += 1
            if took > 0.0005:
                _turns.append(took)

    return timed


epollreactor.EPollReactor._doReadOrWrite = _timed(epollreactor.EPollReactor._doReadOrWrite)
base.ReactorBase.runUntilCurrent = _timed(base.ReactorBase.runUntilCurrent)

_gc_started = [0.0]


def _gc(phase, info):
    if phase == "start":
        _gc_started[0] = _clock()
    else:
        _stats["gc"][info["generation"]].append(_clock() - _gc_started[0])


gc.callbacks.append(_gc)


def _dump(*_):
    with open(os.environ["BENCH_TURNS_STATS"], "w") as f:
        json.dump({"turns": _stats["turns"], "long": _turns, "gc": _stats["gc"]}, f)
    _turns.clear()
    _stats["turns"] = 0
    _stats["gc"] = [[], [], []]


signal.signal(signal.SIGUSR1, _dump)

_variant = os.environ.get("BENCH_TURNS_VARIANT", "full")
if _variant == "no-logging":
    from lectr.usage.recorder import UsageRecorder

    def _record(self, record):
        pass

    UsageRecorder.record = _record
elif _variant == "no-statement":
    from lectr.storage import request_logs

    async def _insert(self, rows):
        if not rows:
            return 0
        await request_logs._columns_in_slices(rows, self._db.pause)
        return len(rows)

    request_logs.RequestLogStore.insert = _insert
elif _variant != "full":
    raise SystemExit(f"BENCH_TURNS_VARIANT: unknown variant {_variant!r}")
