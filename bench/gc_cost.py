"""What CPython's cyclic garbage collector costs a loaded proxy:

    python bench/gc_cost.py [--seconds 8] [--rounds 2] [--young 700]

One Lectr (set up as bench/run.py sets it up: the shared Rust mock, wrk on
core 0, the proxy alone on core 1; the bench route, no limits), loaded at
c=32 with JSON and streams. A benchmark-only hook (bench/_gc_timing) times
every collection inside the proxy. Printed per run: req/s, the proxy's CPU
per request, the collector's time per request, collections per generation
and the objects they found unreachable (cyclic garbage: a finished request
should leave none, tests/test_request_cycles.py).

py-spy cannot show this cost: a collection runs inside whichever Python
line allocated the object that crossed the threshold, so its time is
spread over the profile. ``--young 700`` runs Lectr with CPython's default
young-generation threshold instead of Lectr's (lectr.service.GC_YOUNG_THRESHOLD).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the shared set-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--young", type=int, help="the young generation's threshold to run with")
    args = parser.parse_args()
    if args.young:
        os.environ["BENCH_GC_YOUNG"] = str(args.young)
    with run.Counted("lectr-gc-", "_gc_timing", "BENCH_GC_STATS", limits=False) as bench:
        print(f"The cyclic garbage collector inside the proxy (c=32; {run.load()}):")
        for rnd in range(args.rounds):
            for mode in ("json", "stream"):
                r, got = bench.run(mode, args.seconds)
                n = max(1, r["requests"])
                print(
                    f"  round {rnd + 1} {mode:6} {r['rps']:6.0f} req/s, CPU {r['cpu_us']:5.0f} µs "
                    f"per request; collector {sum(got['seconds']) / n * 1e6:5.1f} µs per request "
                    f"(collections by generation {got['collections']}, "
                    f"{', '.join(f'{s * 1e3:.0f}' for s in got['seconds'])} ms; "
                    f"{got['collected'] / n:.1f} objects found per request; "
                    f"threshold {got['threshold']})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
