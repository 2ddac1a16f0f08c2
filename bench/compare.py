"""This checkout against an earlier revision, side by side in one run:

    python bench/compare.py --against f00ea49 [--rounds 5] [--seconds 6] [-c 32]
    python bench/compare.py --tree /tmp/compiled   # a prepared tree (e.g. a compiled build)

Two Lectr processes - one running the code of ``--against`` (a temporary
``git worktree``, first on its PYTHONPATH) or of ``--tree`` (a tree prepared
by hand, e.g. the same code with compiled modules next to it), one running
this checkout - and the bare passthrough, set up as bench/run.py sets them up
(the shared Rust mock, wrk on core 0, the proxy under test alone on core 1;
the bench route, every feature on), are loaded in turn, JSON then streams,
each round in the other order. Printed: every cell, then per mode the
medians, each Lectr's ratio to bare (the median of the rounds' own ratios)
and this checkout's CPU per request over the earlier one's (the median of
the rounds' own ratios), and each one's p99 (the median of the rounds):
on a shared machine whose speed moves by 20-40 % from minute to minute, a
change of a few per cent shows only in figures measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the shared set-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    earlier = parser.add_mutually_exclusive_group(required=True)
    earlier.add_argument("--against", help="a git revision (commit, tag, branch)")
    earlier.add_argument("--tree", help="a directory holding a lectr/ package to run instead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("-c", "--conns", type=int, default=32)
    parser.add_argument(
        "--upstream-tls",
        action="store_true",
        help="reach the provider over https (bench/run.py --upstream-tls)",
    )
    args = parser.parse_args()
    run.ensure_tools(need_nginx=args.upstream_tls or not (run.SHARED / "mock_upstream.rs").exists())
    run.raise_fd_limit()
    load_pin, proxy_pin = run.cores()
    workdir = Path(tempfile.mkdtemp(prefix="lectr-compare-"))
    git = ["git", "-C", str(run.REPO)]
    if args.tree:
        tree = Path(args.tree).resolve()
        if not (tree / "lectr" / "__init__.py").exists():
            sys.exit(f"bench: {tree} holds no lectr/ package")
        args.against = tree.name
    else:
        tree = workdir / "against"
        subprocess.run(
            [*git, "worktree", "add", "-q", "--detach", str(tree), args.against], check=True
        )
    upstream = run.Upstream(workdir, load_pin)
    procs: list = []
    if args.upstream_tls:
        procs.append(run.TlsFront(workdir, upstream, load_pin))
    try:
        for name in ("earlier", "this"):
            (workdir / name).mkdir()
        earlier = run.Lectr(workdir / "earlier", upstream.base, proxy_pin, extra_path=str(tree))
        procs.append(earlier)
        this = run.Lectr(workdir / "this", upstream.base, proxy_pin)
        procs.append(this)
        bare = run.Passthrough("bare", upstream, proxy_pin)
        procs.append(bare)
        targets = [
            (args.against, earlier.port, earlier.add_org("bench-a", route=True, limits=False)),
            ("this", this.port, this.add_org("bench-b", route=True, limits=False)),
        ]
        cells = [(n, f"http://127.0.0.1:{p}{run.CHAT_PATH}", k, None) for n, p, k in targets]
        cells = [
            (cells[0][0], cells[0][1], cells[0][2], earlier.serving_pid()),
            (cells[1][0], cells[1][1], cells[1][2], this.serving_pid()),
            ("bare", bare.url, run.CLIENT_KEY, bare.proc.pid),
        ]
        print(
            f"{args.against} against this checkout and bare, c={args.conns}"
            f"{', the provider over https' if args.upstream_tls else ''} ({run.load()})"
        )
        got: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(args.rounds):
            order = cells if rnd % 2 == 0 else cells[::-1]
            for mode in ("json", "stream"):
                for name, url, key, pid in order:
                    script = run.wrk_script(workdir, mode == "stream", key, "bench")
                    r = run.measure(url, script, args.conns, args.seconds, load_pin, cpu_pid=pid)
                    got.setdefault((mode, name), []).append(r)
                    print(
                        f"  round {rnd + 1} {mode:6} {name:12} {r['rps']:7.0f} req/s  "
                        f"CPU {r['cpu_us']:6.1f} µs per request  p99 {r['p99']:6.2f} ms  "
                        f"errors {r['errors']}",
                        flush=True,
                    )
        a = args.against

        def med(mode: str, name: str, field: str) -> float:
            return statistics.median(x[field] for x in got[(mode, name)])

        def ratio(mode: str, x: str, y: str, field: str) -> float:
            pairs = zip(got[(mode, x)], got[(mode, y)], strict=True)
            return statistics.median(p[field] / q[field] for p, q in pairs)

        for mode in ("json", "stream"):
            print(
                f"{mode}: {a} {med(mode, a, 'rps'):.0f} req/s ({med(mode, a, 'cpu_us'):.1f} µs), "
                f"this {med(mode, 'this', 'rps'):.0f} req/s ({med(mode, 'this', 'cpu_us'):.1f} µs), "
                f"bare {med(mode, 'bare', 'rps'):.0f} req/s; vs bare: {a} "
                f"{ratio(mode, a, 'bare', 'rps'):.2f}×, this {ratio(mode, 'this', 'bare', 'rps'):.2f}×; "
                f"CPU per request, this / {a}: {ratio(mode, 'this', a, 'cpu_us'):.3f}; "
                f"p99 {a} {med(mode, a, 'p99'):.2f} ms, this {med(mode, 'this', 'p99'):.2f} ms, "
                f"bare {med(mode, 'bare', 'p99'):.2f} ms"
            )
    finally:
        for p in procs:
            p.stop()
        upstream.stop()
        if not args.tree:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()
