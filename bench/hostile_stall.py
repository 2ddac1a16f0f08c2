"""How long one client's large or token-dense request body holds the proxy's
reactor, seen by another client:

    python bench/hostile_stall.py [--mib 15] [--rounds 3]

One Lectr (set up as bench/run.py sets it up: the shared Rust mock, the
proxy alone on core 1, every feature on). A probe client sends small chat
requests one after another on a kept-alive connection and notes each one's
latency; meanwhile another client posts one body of each kind below, one at
a time, each on its own connection, as an authenticated tenant could. For
each kind: the body's own time to its answer, and the probe's longest
latency while the body was being judged (the probe's median when idle is
printed first: the difference is the stall every other request on the
process saw). The mock is one thread too, so part of that stall is the
mock's own reading of the body: ``--direct`` sends both straight to it,
with no proxy, for that share. The last column is the proxy's own figure,
without the mock: its longest reactor turn while the body was in flight,
timed inside the process by the hook of bench/reactor_turns.py
(bench/_turns).

The bodies are at most 16 MiB, the shared mock's limit; the proxy's own is
``max_body_bytes`` (32 MiB by default). The figures scale with the size.

``--neighbour N`` measures the body judge's turns instead: one org keeps N
token-dense bodies ("small objects") in flight at once, each on its own
connection, while another org posts a 1 MiB body (an inline image: judged
too, as every body of 256 KiB or more) one after another; its time alone,
then under that flood. The judge takes the orgs in turn, so the second
org waits for at most the first org's body in the judge, not for all of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the shared set-up

MiB = 1024 * 1024


def bodies(size: int) -> dict[str, bytes]:
    head = b'{"model":"bench","messages":'

    def filled(unit: bytes, open_: bytes = b"[", close: bytes = b"]}") -> bytes:
        n = (size - len(head) - 8) // (len(unit) + 1)
        return head + open_ + b",".join([unit] * n) + close

    image = b'[{"role":"user","content":"' + b"A" * (size - 80) + b'"}]}'
    return {
        "one large string (an inline image)": head + image,
        "integers": filled(b"0"),
        "empty arrays": filled(b"[]"),
        "small objects": filled(b'{"a":1}'),
        "short strings": filled(b'"ab"'),
        "one message of integers": filled(b"0", b'[{"role":"user","content":[', b"]}]}"),
        "top-level members (refused)": b"{"
        + b",".join(b'"k%d":0' % i for i in range(size // 12))
        + b',"model":"bench"}',
        "an array, no object (refused)": b"[" + b",".join([b"[]"] * (size // 3)) + b"]",
    }


class Probe(threading.Thread):
    def __init__(self, port: int, key: str) -> None:
        super().__init__(daemon=True)
        self.port, self.key = port, key
        self.samples: list[tuple[float, float]] = []  # (sent at, latency s)
        self.stop = threading.Event()

    def run(self) -> None:
        body = json.dumps(
            {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            t = time.perf_counter()
            conn.request("POST", run.CHAT_PATH, body, headers)
            r = conn.getresponse()
            r.read()
            self.samples.append((t, time.perf_counter() - t))
            time.sleep(0.002)
        conn.close()

    def worst_between(self, start: float, end: float) -> float:
        return max((lat for t, lat in self.samples if t + lat >= start and t <= end), default=0.0)


def post(port: int, key: str, body: bytes) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t = time.perf_counter()
    conn.request(
        "POST",
        run.CHAT_PATH,
        body,
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status, time.perf_counter() - t


def neighbour(bench, n: int, size: int, rounds: int) -> None:
    """Another org's large body, alone and while ``n`` token-dense bodies of
    the bench org are in flight."""
    port, flood_key = bench.lectr.port, bench.key
    key = bench.lectr.add_org("neighbour", route=True, limits=False)
    mine = bodies(MiB)["one large string (an inline image)"]
    flood = bodies(size)["small objects"]
    alone = [post(port, key, mine) for _ in range(max(rounds, 5))]
    stop = threading.Event()
    flooded: list[int] = []

    def flooder() -> None:
        while not stop.is_set():
            flooded.append(post(port, flood_key, flood)[0])

    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(3)  # (the flood's bodies are all waiting by now)
    under = []
    for _ in range(max(rounds, 5) * 2):
        under.append(post(port, key, mine))
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=120)

    def shown(results: list[tuple[int, float]]) -> str:
        took = [t for _, t in results]
        codes = sorted({s for s, _ in results})
        return (
            f"median {statistics.median(took):.2f} s, worst {max(took):.2f} s "
            f"(status {', '.join(map(str, codes))})"
        )

    codes = {c: flooded.count(c) for c in sorted(set(flooded))}
    print(
        f"Provider: {bench.upstream.kind}; {run.load()}\n"
        f"another org's 1 MiB body, alone: {shown(alone)}\n"
        f"... while {n} bodies of {size / MiB:g} MiB (small objects) of the bench org are in flight: "
        f"{shown(under)}\n"
        f"the flood's bodies meanwhile: {len(flooded)} answered, by status {codes}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=15.0, help="body size (the mock takes 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="one kind of body (a substring of its name)")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="probe and bodies straight to the mock, no proxy: the provider's own share",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy record the proxy meanwhile (raw stacks)"
    )
    parser.add_argument(
        "--neighbour",
        type=int,
        metavar="N",
        help="another org's large body while this org keeps N token-dense ones in flight",
    )
    args = parser.parse_args()
    size = int(args.mib * MiB)
    bench = upstream = None
    try:
        if args.direct:
            load_pin, _ = run.cores()
            upstream = run.Upstream(Path(tempfile.mkdtemp(prefix="lectr-stall-")), load_pin)
            pid, port, key = None, upstream.port, run.UPSTREAM_KEY
        else:  # (Lectr with the bench hook that times every reactor turn)
            bench = run.Counted("lectr-stall-", "_turns", "BENCH_TURNS_STATS", limits=False)
            upstream = bench.upstream
            pid, port, key = bench.pid, bench.lectr.port, bench.key
            if args.neighbour:
                neighbour(bench, args.neighbour, size, args.rounds)
                return
        probe = Probe(port, key)
        probe.start()
        time.sleep(2)
        idle = statistics.median(lat for _, lat in probe.samples)
        print(
            f"Provider: {upstream.kind}; {run.load()}\n"
            f"probe (a small chat request, one after another): median {idle * 1e3:.2f} ms idle\n"
        )
        print(
            f"| body ({args.mib:g} MiB) | status | its time, s | probe's worst while it ran, ms "
            "| the proxy's longest reactor turn, ms |"
        )
        print("|---|---|---|---|---|")
        spy = None
        if args.profile and pid is not None:
            spy = subprocess.Popen(
                ["py-spy", "record", "-r", "500", "-f", "raw", "-o", args.profile, "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        for name, body in bodies(size).items():
            if args.only and args.only not in name:
                continue
            times, worst, turns, status = [], [], [], None
            for _ in range(args.rounds):
                if bench is not None:
                    os.kill(pid, signal.SIGUSR1)  # (the hook starts timing afresh)
                    time.sleep(0.3)
                start = time.perf_counter()
                status, took = post(port, key, body)
                end = time.perf_counter()
                time.sleep(0.3)  # (the probe's request in flight at the end comes back)
                times.append(took)
                worst.append(probe.worst_between(start, end))
                if bench is not None:
                    os.kill(pid, signal.SIGUSR1)  # (it writes what it timed)
                    time.sleep(0.3)
                    turns.append(max(json.loads(bench.stats.read_text())["long"], default=0.0))
            longest = f"{statistics.median(turns) * 1e3:.0f}" if turns else "-"
            print(
                f"| {name} | {status} | {statistics.median(times):.2f} | "
                f"{statistics.median(worst) * 1e3:.0f} | {longest} |",
                flush=True,
            )
        probe.stop.set()
        probe.join(timeout=10)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
    finally:
        if bench is not None:
            bench.__exit__()
        elif upstream is not None:
            upstream.stop()


if __name__ == "__main__":
    main()
