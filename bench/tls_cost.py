"""What reaching the provider over https costs each proxy: CPU per request
(the serving process's own CPU time over the requests wrk completed), JSON
and streams at c=32, with the provider over plain HTTP and behind nginx
terminating TLS (bench/run.py --upstream-tls), one after the other.

    python bench/tls_cost.py                 # lectr and bare
    python bench/tls_cost.py --targets lectr --seconds 10
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import run  # bench/run.py: the shared set-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="lectr,bare", help="comma-separated")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("-c", "--conns", type=int, default=32)
    args = parser.parse_args()
    run.ensure_tools(need_nginx=True)
    run.raise_fd_limit()
    load_pin, proxy_pin = run.cores()
    print(f"CPU per request, c={args.conns}, {args.seconds} s cells ({run.load()})")
    got = {}
    for tls in (False, True):
        workdir = Path(tempfile.mkdtemp(prefix="lectr-tls-cost-"))
        upstream = run.Upstream(workdir, load_pin)
        front = run.TlsFront(workdir, upstream, load_pin) if tls else None
        try:
            for name in args.targets.split(","):
                proc, pid, target = run.serve(name, workdir, upstream, proxy_pin)
                try:
                    for mode in ("json", "stream"):
                        script = run.wrk_script(workdir, mode == "stream", target.key)
                        r = run.measure(
                            target.url, script, args.conns, args.seconds, load_pin, cpu_pid=pid
                        )
                        got[(name, mode, tls)] = r["cpu_us"]
                        print(
                            f"  {name:6} {mode:6} {'https' if tls else 'http ':5} "
                            f"{r['rps']:7.0f} req/s  {r['cpu_us']:7.1f} µs CPU per request  "
                            f"errors {r['errors']}",
                            flush=True,
                        )
                finally:
                    proc.stop()
        finally:
            if front is not None:
                front.stop()
            upstream.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    print("https costs, per request:")
    for name in args.targets.split(","):
        for mode in ("json", "stream"):
            plain, tls = got[(name, mode, False)], got[(name, mode, True)]
            print(f"  {name:6} {mode:6} +{tls - plain:6.1f} µs ({tls / plain - 1:+.0%})")


if __name__ == "__main__":
    main()
