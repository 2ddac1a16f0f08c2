"""Benchmark-only: loaded (via PYTHONPATH) into the Lectr process of
``bench/per_request.py --calls``. On SIGUSR2 it starts counting every
function call the interpreter makes (``sys.setprofile``: Python functions by
file and name, C functions by name and the Python function calling them); on
the next SIGUSR2 it stops and writes the counts to ``$BENCH_CALLS_OUT``
(JSON). The counting slows the process down many times over: the counts per
request are what it is for, not the time."""

import collections
import json
import os
import signal
import sys

_counts: collections.Counter = collections.Counter()
_on = False


def _where(code) -> str:
    path = code.co_filename
    for cut in ("site-packages/", "/lectr/"):
        if cut in path:
            path = ("lectr/" if cut == "/lectr/" else "") + path.rsplit(cut, 1)[-1]
            break
    return f"{path}:{code.co_name}"


def _profile(frame, event, arg):
    if event == "call":
        _counts[("py", _where(frame.f_code))] += 1
    elif event == "c_call":
        name = getattr(arg, "__qualname__", None) or repr(arg)
        _counts[("c", f"{name} <- {_where(frame.f_code)}")] += 1


def _toggle(signum, frame):
    global _on
    if not _on:
        _counts.clear()
        sys.setprofile(_profile)
        _on = True
        return
    sys.setprofile(None)
    _on = False
    with open(os.environ["BENCH_CALLS_OUT"], "w") as out:
        json.dump([[kind, name, n] for (kind, name), n in _counts.most_common()], out)


signal.signal(signal.SIGUSR2, _toggle)

_marker = os.environ.get("BENCH_NOLOG_MARKER")  # (bench/run.py's proof that this file loaded)
if _marker:
    open(_marker, "w").close()
