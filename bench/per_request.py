"""What one proxied request costs in system calls and in function calls,
counted (not timed) under wrk:

    python bench/per_request.py                      # syscalls, Lectr and bare, json and stream
    python bench/per_request.py --calls --top 40     # Lectr's Python and C calls per request
    python bench/per_request.py --target lectr --mode stream

Same set-up as bench/run.py (shared Rust mock and wrk on core 0, the proxy
alone on core 1, the bench route with its two-key pool: every feature on).

- **syscalls** (default): ``strace -c -f`` attached to the proxy for one wrk
  run; every system call's count divided by the requests wrk completed. A
  hop cannot do with fewer than one read and one write on each side (four
  per request); what is above that is the event loop's bookkeeping
  (``epoll_ctl`` registrations, ``epoll_wait`` per turn, address look-ups).
- **--calls**: ``bench/_calls/sitecustomize.py`` loaded into Lectr counts
  every Python function call and every C function call (with its Python
  caller) while wrk runs; divided by the requests Lectr's calls started
  (``Call.start``). The counting slows Lectr many times over, so only the
  counts mean anything: how many steps a request takes, and where.

Needs ``strace`` (apt-get install strace) for syscalls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the shared set-up

SECONDS = 5


def syscalls(target: run.Target, pid: int, mode: str, workdir: Path, load_pin: list[str]) -> str:
    script = run.wrk_script(workdir, mode == "stream", target.key)
    run.run_wrk(target.url, script, 32, 3, load_pin)  # warm-up
    out = workdir / f"strace-{target.name}-{mode}.txt"
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)], stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)  # (attached before the measured run)
    result = run.run_wrk(target.url, script, 32, SECONDS, load_pin)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(60)
    requests = max(result["requests"], 1)
    rows = []
    for line in out.read_text().splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
            rows.append((int(parts[3]) / requests, parts[-1]))
    rows.sort(reverse=True)
    total = sum(n for n, _ in rows)
    lines = [f"{target.name}, {mode}: {requests} requests (wrk -c32 {SECONDS} s, traced)"]
    lines += [f"  {n:7.2f}  {name}" for n, name in rows if n >= 0.005]
    lines.append(f"  {total:7.2f}  all system calls per request")
    return "\n".join(lines)


def calls(proc: run.Lectr, target: run.Target, mode: str, workdir: Path, load_pin, top: int) -> str:
    script = run.wrk_script(workdir, mode == "stream", target.key)
    run.run_wrk(target.url, script, 32, 3, load_pin)  # warm-up
    out = Path(proc.env["BENCH_CALLS_OUT"])
    pid = proc.serving_pid()
    os.kill(pid, signal.SIGUSR2)
    run.run_wrk(target.url, script, 32, SECONDS, load_pin)
    os.kill(pid, signal.SIGUSR2)
    for _ in range(100):
        if out.exists():
            break
        time.sleep(0.1)
    rows = json.loads(out.read_text())
    out.unlink()
    requests = next((n for kind, name, n in rows if name == "lectr/proxy/call.py:start"), 0)
    if not requests:
        raise SystemExit("bench: no Call.start counted: were requests proxied?")
    py = sum(n for kind, _, n in rows if kind == "py")
    c = sum(n for kind, _, n in rows if kind == "c")
    lines = [
        f"lectr, {mode}: {requests} requests; per request {py / requests:.0f} Python function "
        f"calls and {c / requests:.0f} C function calls",
        "  Python functions (calls per request):",
    ]
    lines += [f"  {n / requests:7.2f}  {name}" for kind, name, n in rows if kind == "py"][:top]
    lines.append("  C functions <- their Python caller (calls per request):")
    lines += [f"  {n / requests:7.2f}  {name}" for kind, name, n in rows if kind == "c"][:top]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["lectr", "bare"], action="append")
    parser.add_argument("--mode", choices=["json", "stream"], action="append")
    parser.add_argument("--calls", action="store_true", help="count function calls (Lectr only)")
    parser.add_argument("--top", type=int, default=25, help="rows per table with --calls")
    args = parser.parse_args()
    if not args.calls and not shutil.which("strace"):
        sys.exit("bench: needs strace (apt-get install strace)")
    run.ensure_tools(need_nginx=not (run.SHARED / "mock_upstream.rs").exists())
    run.raise_fd_limit()
    load_pin, proxy_pin = run.cores()
    targets = ["lectr"] if args.calls else (args.target or ["lectr", "bare"])
    modes = args.mode or ["json", "stream"]
    workdir = Path(tempfile.mkdtemp(prefix="lectr-per-request-"))
    upstream = run.Upstream(workdir, load_pin)
    try:
        for name in targets:
            extra = str(run.BENCH / "_calls") if args.calls else None
            os.environ["BENCH_CALLS_OUT"] = str(workdir / "calls.json")
            proc, pid, target = run.serve(name, workdir, upstream, proxy_pin, extra_path=extra)
            if extra and not (proc.nolog_marker and proc.nolog_marker.exists()):
                raise SystemExit("bench: Lectr did not load bench/_calls")
            try:
                for mode in modes:
                    if args.calls:
                        text = calls(proc, target, mode, workdir, load_pin, args.top)
                    else:
                        text = syscalls(target, pid, mode, workdir, load_pin)
                    print(text, flush=True)
            finally:
                proc.stop()
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
