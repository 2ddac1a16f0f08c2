"""What the limits cost inside a loaded proxy, measured in the process:

    python bench/limits_insitu.py [--seconds 8] [--rounds 3]

One Lectr (set up as bench/run.py sets it up: the shared Rust mock, wrk on
core 0, the proxy alone on core 1) with an org on the bench route and every
limit set on the org and on its key (caps that never refuse). wrk loads it
at c=32; a benchmark-only hook (bench/_limits_timing) times the limits step
(admission, its reservation and its headers) and the settlement of each
request, with the clock, inside the proxy. Printed per case: the time per
request in them, the proxy's CPU per request, and the first as a share of
the second: what the limits add to a request, without the host's drift
between two runs (which on a shared machine is larger than the effect).
The timing adds a little of its own: an empty function timed through the
same wrapper after each step ("probe") measures it, and the net share
subtracts it from both figures. The x-ratelimit-* lines on the response
head are measured too (each head is also rendered without them, and the
difference counted) and added to the net share; the extra work the
measuring does is taken out of the CPU per request. Not counted: the lease
rounds with PostgreSQL (four a second per node whatever the load; about
0.3 % of the proxy's samples at c=32, bench/profile_proxy.py).

The share is of the CPU of a request with limits, so the same request
without them costs (1 - share) of it: a throughput ratio of 1 - share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the shared set-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with run.Counted(
        "lectr-limits-insitu-", "_limits_timing", "BENCH_LIMITS_STATS", limits=True
    ) as bench:
        print(f"Limits inside the proxy (every limit on org and key, c=32; {run.load()}):")
        shares: dict[str, list[float]] = {}
        nets: dict[str, list[float]] = {}
        for rnd in range(args.rounds):
            for mode in ("json", "stream"):
                r, got = bench.run(mode, args.seconds)
                n = max(1, got["step"][0])
                step_us = got["step"][1] / n * 1e6
                settle_us = got["settle"][1] / max(1, got["settle"][0]) * 1e6
                probe_us = got["probe"][1] / max(1, got["probe"][0]) * 1e6
                head_us = got["head"][1] / n * 1e6
                # the process's CPU per request without what the measuring added
                # (the probe, the extra rendering of the head)
                cpu = r["cpu_us"] - probe_us - got["extra"][1] / n * 1e6
                share = (step_us + settle_us) / cpu * 100
                net = (step_us + settle_us - 2 * probe_us + head_us) / cpu * 100
                shares.setdefault(mode, []).append(share)
                nets.setdefault(mode, []).append(net)
                print(
                    f"  round {rnd + 1} {mode:6} {r['rps']:6.0f} req/s, CPU {cpu:5.0f} µs per "
                    f"request; limits step {step_us:5.1f} µs + settlement {settle_us:4.1f} µs "
                    f"= {share:4.1f} % of it; timing {probe_us:3.1f} µs a figure; headers "
                    f"on the head {head_us:3.1f} µs; all in, net of the timing: {net:4.1f} %",
                    flush=True,
                )
        for mode, values in shares.items():
            print(
                f"{mode}: the limits take {statistics.median(values):.1f} % of a request's CPU "
                f"as timed; with their headers on the head and net of the timing, "
                f"{statistics.median(nets[mode]):.1f} % "
                f"(a throughput of {1 - statistics.median(nets[mode]) / 100:.3f} of the same "
                "requests without limits)"
            )


if __name__ == "__main__":
    main()
