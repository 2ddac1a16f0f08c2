"""How long the proxy's reactor is busy with one thing at a time, and what
that does to the latency tail:

    python bench/reactor_turns.py [--seconds 10] [--rounds 2] [--conns 1,32]
                                  [--variant full|no-statement|no-logging]
                                  [--background-database] [--database-core 0]

One Lectr (set up as bench/run.py sets it up: the shared Rust mock, wrk on
core 0, the proxy alone on core 1; the bench route, every feature on,
usage rows written to PostgreSQL), loaded with JSON and streams. A
benchmark-only hook (bench/_turns) times every dispatch of a ready
descriptor and every run of the due timed calls: while one runs, nothing
else is served, so a request arriving then waits it out. Printed per run:
req/s, p50 and p99, the CPU per request of the proxy and of the PostgreSQL
server (every postgres process on the machine), the turns over 1, 2 and
5 ms (per 10,000 requests) and the longest, and the garbage collector's runs
and longest run per generation.

``--variant no-statement`` prepares the usage rows as for a write but sends
no statement to PostgreSQL; ``no-logging`` records no usage at all (both
benchmark-only hooks). ``--background-database`` gives the PostgreSQL
server's processes the lowest CPU share for the run (autogroup nice 19;
root; restored afterwards): on a 2-core machine the database shares the
cores of the benchmark, and a backend woken by an INSERT can take the
proxy's core for milliseconds - inside the proxy's send of the statement,
which then shows as a long turn. ``--database-core 0`` pins them to core 0
instead (with wrk and the provider), so the proxy is alone on core 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the shared set-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conns", default="1,32", help="concurrencies, comma-separated")
    parser.add_argument("--variant", choices=["full", "no-statement", "no-logging"], default="full")
    run.add_database_options(parser)
    args = parser.parse_args()
    os.environ["BENCH_TURNS_VARIANT"] = args.variant
    with run.Counted("lectr-turns-", "_turns", "BENCH_TURNS_STATS", limits=False) as bench:
        with run.database_placement(args.background_database, args.database_core):
            _turns(args, bench)


def _turns(args, bench) -> None:
    """Every (round, c, mode) cell: a warm-up, then the counted run."""
    print(
        f"Reactor turns inside the proxy ({args.variant}"
        f"{run.database_note(args.background_database, args.database_core)}; {run.load()}):"
    )
    for rnd in range(args.rounds):
        for conns in (int(c) for c in args.conns.split(",")):
            for mode in ("json", "stream"):
                script = run.wrk_script(bench.workdir, mode == "stream", bench.key, "bench")
                run.run_wrk(bench.url, script, conns, 3, bench.load_pin)  # warm-up
                os.kill(bench.pid, signal.SIGUSR1)  # count from here
                time.sleep(0.3)
                cpu = run._cpu_seconds(bench.pid), run.database_cpu()
                r = run.run_wrk(bench.url, script, conns, args.seconds, bench.load_pin)
                n = max(1, r["requests"])
                proxy_us = (run._cpu_seconds(bench.pid) - cpu[0]) / n * 1e6
                database_us = run.database_cpu_since(cpu[1]) / n * 1e6
                os.kill(bench.pid, signal.SIGUSR1)
                time.sleep(0.3)
                got = json.loads(bench.stats.read_text())
                per = 10_000 / n
                long = got["long"]
                over = "  ".join(
                    f">{ms} ms {sum(t > ms / 1000 for t in long) * per:5.1f}" for ms in (1, 2, 5)
                )
                gcs = " ".join(f"{len(g)}/{max(g, default=0) * 1e3:.1f}" for g in got["gc"])
                print(
                    f"  round {rnd + 1} c={conns:<3} {mode:6} {r['rps']:6.0f} req/s  "
                    f"p50 {r['p50']:5.2f} ms  p99 {r['p99']:5.2f} ms  CPU per request: proxy "
                    f"{proxy_us:5.1f} µs, database {database_us:5.1f} µs  turns per 10k requests: "
                    f"{over}  longest {max(long, default=0) * 1e3:5.1f} ms  "
                    f"collector (runs/longest ms by generation) {gcs}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
