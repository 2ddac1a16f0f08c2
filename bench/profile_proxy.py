"""Per-function CPU profile of a proxy under wrk: where the time goes.

    python bench/profile_proxy.py                       # lectr and bare, json and stream, c=32
    python bench/profile_proxy.py --target lean --mode stream --seconds 15
    python bench/profile_proxy.py --target lectr-limited  # every limit set on org and key
    python bench/profile_proxy.py --out bench/profiles  # also write one text table per case
    python bench/profile_proxy.py --native              # perf: the interpreter, kernel, C parts

Same set-up as bench/run.py (shared Rust mock and wrk on core 0, the proxy
alone on core 1). ``py-spy record --format raw`` samples the proxy process
(100 Hz, only samples holding the GIL, i.e. Python work) while wrk loads it;
the collapsed stacks are folded into two top-15 tables per case:

- **self**: the function on top of the stack (where the CPU is spent);
- **total**: every function anywhere on the stack (what a call costs with
  everything below it).

``--native`` samples with ``perf record -e cpu-clock`` instead (the software
clock: a VM often has no hardware counters) and prints the shares by library
(the interpreter, the kernel, libc, llhttp, cryptography) and by symbol:
what runs underneath the Python, and how much of it no Python change can
remove.

Needs ``py-spy`` (pip install py-spy), or ``perf`` for ``--native`` (Debian's
linux-perf), and permission to ptrace (root).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the shared set-up

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def fold(raw: Path) -> tuple[collections.Counter, collections.Counter, int]:
    """(self samples, total samples, all samples) per ``function (file)``."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    n = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        n += c
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            frames.append(f"{m['func']} ({m['file']})" if m else frame)
        if frames and frames[0].startswith("process "):
            frames = frames[1:]  # py-spy's "process PID:..." root, with --subprocesses
        if not frames:
            continue
        own[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    return own, total, n


def table(
    title: str, counts: collections.Counter, n: int, top: int = 15, below: float = 1.0
) -> str:
    """The ``top`` entries, skipping those on more than ``below`` of all
    samples (the reactor loop and dispatch frames under every sample)."""
    lines = [f"{title} ({n} samples)", f"{'%':>6}  {'samples':>7}  function (file)"]
    shown = 0
    for func, c in counts.most_common():
        if c > below * n:
            continue
        lines.append(f"{100.0 * c / n:6.1f}  {c:7d}  {func}")
        shown += 1
        if shown == top:
            break
    return "\n".join(lines)


def by_file(own: collections.Counter) -> collections.Counter:
    """Self samples per source file: which layer the CPU goes to."""
    files: collections.Counter = collections.Counter()
    for func, c in own.items():
        m = re.search(r"\(([^()]*)\)$", func)
        files[m.group(1) if m else func] += c
    return files


def _head(case: str, conns: int, seconds: int, result: dict) -> str:
    """A profile's first line: the case, wrk's result, the machine's load, when."""
    return (
        f"# {case}, wrk -c{conns} {seconds} s: {result['rps']:.0f} req/s "
        f"(p50 {result['p50']:.2f} ms, errors {result['errors']}); {run.load()}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )


def _perf_table(data: Path, sort: str, top: int) -> str:
    """The ``top`` lines of ``perf report --sort SORT`` (shares of all samples)."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", sort, "--stdio", "-q"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.strip() for line in report.splitlines()]
    rows = [r for r in rows if r[:1].isdigit()][:top]
    return "\n".join(rows)


def native_case(target, mode: str, conns: int, seconds: int, pid: int, workdir: Path) -> str:
    """What runs underneath the Python: ``perf record`` with the software
    clock (hardware counters are often missing on VMs) on the proxy while
    wrk loads it; the shares by library (the interpreter, the kernel, libc,
    the C extensions) and by symbol."""
    data = workdir / f"{target.name}-{mode}.perf"
    script = run.wrk_script(workdir, mode == "stream", target.key)
    run.run_wrk(target.url, script, conns, 3, LOAD_PIN)  # warm-up
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", "997", "-p", str(pid), "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # (attached before the measured run)
    result = run.run_wrk(target.url, script, conns, seconds, LOAD_PIN)
    perf.send_signal(signal.SIGINT)
    perf.wait(60)
    return (
        "\n\n".join(
            [
                _head(f"{target.name}, {mode}, native", conns, seconds, result),
                "by library (perf report --sort dso)\n" + _perf_table(data, "dso", 10),
                "by symbol (perf report --sort sym)\n" + _perf_table(data, "sym", 20),
            ]
        )
        + "\n"
    )


def profile_case(target, mode: str, conns: int, seconds: int, pid: int, workdir: Path) -> str:
    raw = workdir / f"{target.name}-{mode}.raw"
    script = run.wrk_script(workdir, mode == "stream", target.key)
    run.run_wrk(target.url, script, conns, 3, LOAD_PIN)  # warm-up
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--gil",
            "--nolineno",
            "--rate",
            "200",
            "--duration",
            str(seconds),
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result = run.run_wrk(target.url, script, conns, seconds, LOAD_PIN)
    spy.wait(seconds + 30)
    own, total, n = fold(raw)
    return (
        "\n\n".join(
            [
                _head(f"{target.name}, {mode}", conns, seconds, result),
                table("self: where the CPU is spent", own, n),
                table("self, by file", by_file(own), n),
                table(
                    "total: with callees (frames under >= 70% of samples skipped)",
                    total,
                    n,
                    below=0.7,
                ),
            ]
        )
        + "\n"
    )


LOAD_PIN: list[str] = []


def main() -> None:
    global LOAD_PIN
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", choices=["lectr", "lectr-limited", "bare", "lean"], action="append"
    )
    parser.add_argument("--mode", choices=["json", "stream"], action="append")
    parser.add_argument("-c", "--conns", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", help="directory for the text tables")
    parser.add_argument("--raw", help="directory to keep py-spy's collapsed stacks in")
    parser.add_argument(
        "--native",
        action="store_true",
        help="perf's shares by library and symbol instead of py-spy's Python functions",
    )
    parser.add_argument(
        "--upstream-tls",
        action="store_true",
        help="reach the provider over https (bench/run.py --upstream-tls)",
    )
    args = parser.parse_args()
    if args.native and not shutil.which("perf"):
        sys.exit("bench: --native needs perf (apt-get install linux-perf)")
    if not args.native and not shutil.which("py-spy"):
        sys.exit("bench: needs py-spy (pip install py-spy)")
    run.ensure_tools(need_nginx=args.upstream_tls or not (run.SHARED / "mock_upstream.rs").exists())
    run.raise_fd_limit()
    LOAD_PIN, proxy_pin = run.cores()
    targets = args.target or ["lectr", "bare"]
    modes = args.mode or ["json", "stream"]
    workdir = Path(tempfile.mkdtemp(prefix="lectr-profile-"))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    upstream = run.Upstream(workdir, LOAD_PIN)
    front = run.TlsFront(workdir, upstream, LOAD_PIN) if args.upstream_tls else None
    print(f"Provider: {upstream.kind}" + (" behind nginx terminating TLS" if front else ""))
    try:
        for name in targets:
            proc, pid, target = run.serve(name, workdir, upstream, proxy_pin)
            try:
                for mode in modes:
                    case = native_case if args.native else profile_case
                    text = case(target, mode, args.conns, args.seconds, pid, workdir)
                    print(text, flush=True)
                    if out:
                        suffix = "-native" if args.native else ""
                        (out / f"{name}-{mode}{suffix}.txt").write_text(text)
                    if args.raw and not args.native:
                        Path(args.raw).mkdir(parents=True, exist_ok=True)
                        shutil.copy(workdir / f"{name}-{mode}.raw", args.raw)
            finally:
                proc.stop()
    finally:
        if front is not None:
            front.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
