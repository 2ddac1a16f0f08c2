"""Side-by-side benchmark: direct to a fake provider, through a bare
twisted.web + Agent passthrough, and through Lectr.

    python bench/run.py                 # everything (about 4 minutes)
    python bench/run.py --quick         # shorter runs
    python bench/run.py --only memory   # one section: throughput | ttfb | memory | logging |
                                        #   metrics | scaling | flusher

Needs `wrk` and `nginx` (apt-get install wrk nginx-light; installed on demand
when running as root). The fake provider is nginx answering canned OpenAI
responses (non-streaming JSON with usage; SSE streams of 20 events plus the
usage chunk); the slow provider of the memory test is a small Twisted server.
The load generator is pinned to core 0 and the proxy under test to core 1
(`taskset`), when the machine has two cores or more. PostgreSQL: the server
in DATABASE_URL when set (a scratch database is created on it), otherwise an
embedded one in a temporary directory.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789"
CHAT_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
STREAM_BODY = (
    '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> tuple[list[str], list[str]]:
    """(load generator prefix, proxy prefix) for taskset pinning."""
    n = os.cpu_count() or 1
    if n >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    return [], []


def ensure_tools() -> None:
    missing = [t for t in ("wrk", "nginx") if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: needs {', '.join(missing)}: apt-get install wrk nginx-light")
    pkgs = ["wrk" if t == "wrk" else "nginx-light" for t in missing]
    subprocess.run(["apt-get", "install", "-y", "-q", *pkgs], check=True, stdout=subprocess.DEVNULL)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(65536, hard)))
            return
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --- the fake provider (nginx) -----------------------------------------------------------


def sse_body(events: int = 20) -> str:
    created = 1700000000
    out = []
    head = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": created,
        "model": "gpt-4o-mini",
    }
    out.append(
        {
            **head,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
            "usage": None,
        }
    )
    for i in range(events - 2):
        out.append(
            {
                **head,
                "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
                "usage": None,
            }
        )
    out.append(
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}
    )
    usage = {
        **head,
        "choices": [],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": events - 2,
            "total_tokens": 9 + events - 2,
        },
    }
    lines = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in out]
    lines.append(f"data: {json.dumps(usage, separators=(',', ':'))}\n\n")
    lines.append("data: [DONE]\n\n")
    return "".join(lines)


CHAT_RESPONSE = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    },
    separators=(",", ":"),
)
MODELS_RESPONSE = '{"object":"list","data":[{"id":"gpt-4o-mini","object":"model"}]}'


def start_nginx(workdir: Path, port: int, pin: list[str]) -> subprocess.Popen:
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 32768; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path {workdir}/nginx-body;
  proxy_temp_path {workdir}/nginx-proxy;
  fastcgi_temp_path {workdir}/nginx-fcgi;
  uwsgi_temp_path {workdir}/nginx-uwsgi;
  scgi_temp_path {workdir}/nginx-scgi;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /openai/v1/models {{ default_type application/json; return 200 '{MODELS_RESPONSE}'; }}
    location = /openai/v1/chat/completions {{
      if ($http_x_bench_stream) {{ rewrite ^ /_stream last; }}
      default_type application/json;
      return 200 '{CHAT_RESPONSE}';
    }}
    location = /_stream {{
      internal;
      default_type text/event-stream;
      return 200 '{sse_body()}';
    }}
  }}
}}
""")
    proc = subprocess.Popen(
        [*pin, "nginx", "-c", str(conf), "-p", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/openai/v1/models")
    return proc


def wait_http(url: str, timeout: float = 60.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not come up")


# --- Lectr --------------------------------------------------------------------------------


class Lectr:
    def __init__(
        self,
        workdir: Path,
        upstream: str,
        pin: list[str],
        workers: int = 1,
        extra_path: str | None = None,
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.workdir = workdir
        self.key_b64 = base64.b64encode(os.urandom(32)).decode()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("LECTR_", "ENCRYPTION_KEY"))
        }
        self.env.update(
            {
                # extra_path first: its sitecustomize.py is the one Python loads
                "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(REPO)) if p),
                "ENCRYPTION_KEY": self.key_b64,
                "LECTR_DATA_DIR": str(workdir / "lectr-data"),
                "LECTR_PROXY_LISTEN": f"tcp:{self.port}:interface=127.0.0.1:backlog=4096",
                "LECTR_ADMIN_LISTEN": f"tcp:{self.admin_port}:interface=127.0.0.1",
                "LECTR_OPENAI_BASE_URL": upstream,
                "LECTR_ADMIN_TOKEN": "bench-admin-token-0123456789abcdef",
                "LECTR_WORKERS": str(workers),
            }
        )
        self.db_name = None
        server = os.environ.get("DATABASE_URL")
        if server:
            import psycopg2

            self.db_name = f"lectr_bench_{os.getpid()}"
            conn = psycopg2.connect(server)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{self.db_name}"')
                cur.execute(f'CREATE DATABASE "{self.db_name}"')
            conn.close()
            self.server_url = server
            base, _, _ = server.rpartition("/")
            self.env["DATABASE_URL"] = f"{base}/{self.db_name}"
        else:
            self.server_url = None
            self.env.pop("DATABASE_URL", None)
        (workdir / "lectr-data").mkdir(exist_ok=True)
        self.log = open(workdir / "lectr.log", "w")
        self.proc = subprocess.Popen(
            [
                *pin,
                PY,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--nodaemon",
                "--pidfile=",
                "lectr",
            ],
            cwd=workdir,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_fd_limit,
        )
        wait_http(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=120)
        self.lectr_key = self._provision()

    def _admin(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "authorization": "Bearer bench-admin-token-0123456789abcdef",
                "content-type": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def _provision(self) -> str:
        org = self._admin("POST", "/admin/orgs", {"name": "bench"})
        org_id = org["org"]["id"] if "org" in org else org["id"]
        key = org.get("api_key") or org.get("key")
        plaintext = key["key"] if isinstance(key, dict) else key
        self._admin(
            "POST",
            f"/admin/orgs/{org_id}/provider-keys",
            {"provider": "openai", "key": UPSTREAM_KEY, "name": "bench"},
        )
        return plaintext

    def rss_kib(self) -> int:
        """Resident memory of the Lectr process(es), in KiB."""
        pids = [self.proc.pid] + _children(self.proc.pid)
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def serving_pid(self) -> int:
        """The process that serves requests (a worker when --workers > 1)."""
        kids = _children(self.proc.pid)
        return kids[0] if kids and self.env["LECTR_WORKERS"] != "1" else self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        if self.server_url and self.db_name:
            import psycopg2

            conn = psycopg2.connect(self.server_url)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            conn.close()


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    pids = [int(p) for p in out.split()]
    # skip the embedded PostgreSQL, which is not Lectr
    return [
        p for p in pids if "postgres" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
    ]


# --- wrk ---------------------------------------------------------------------------------------


def wrk_script(workdir: Path, stream: bool, key: str | None) -> Path:
    body = STREAM_BODY if stream else CHAT_BODY
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = '{body}'",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if key:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
    if stream:
        lines.append('wrk.headers["X-Bench-Stream"] = "1"')
    path = workdir / f"post-{'stream' if stream else 'json'}-{'key' if key else 'nokey'}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def run_wrk(url: str, script: Path, conns: int, seconds: int, pin: list[str]) -> dict:
    out = subprocess.run(
        [
            *pin,
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
    ).stdout
    result = {
        "rps": 0.0,
        "p50": float("nan"),
        "p90": float("nan"),
        "p99": float("nan"),
        "errors": 0,
    }
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(m.group(1))
    for pct in ("50", "90", "99"):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M):
            result[f"p{pct}"] = _ms(m.group(1))
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    result["errors"] = errors
    return result


# --- sections ----------------------------------------------------------------------------------


def throughput(
    targets: dict[str, tuple[str, str | None]], workdir: Path, seconds: int, load_pin: list[str]
) -> list[dict]:
    rows = []
    for stream in (False, True):
        for conns in (1, 32, 128):
            for name, (url, key) in targets.items():
                r = measure(url, wrk_script(workdir, stream, key), conns, seconds, load_pin)
                rows.append(
                    {"mode": "stream" if stream else "json", "c": conns, "target": name, **r}
                )
                print(
                    f"  {rows[-1]['mode']:6} c={conns:<4} {name:8} {r['rps']:9.0f} req/s  "
                    f"p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  errors {r['errors']}",
                    flush=True,
                )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "\n| mode | conc | target | req/s | p50 ms | p90 ms | p99 ms | errors | req/s vs direct "
        "| added p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        direct = next(
            r
            for r in rows
            if r["mode"] == row["mode"] and r["c"] == row["c"] and r["target"] == "direct"
        )
        ratio = row["rps"] / direct["rps"] if direct["rps"] else float("nan")
        added = row["p50"] - direct["p50"]
        print(
            f"| {row['mode']} | {row['c']} | {row['target']} | {row['rps']:.0f} | "
            f"{row['p50']:.2f} | {row['p90']:.2f} | {row['p99']:.2f} | {row['errors']} | "
            f"{ratio:.2f} | {added:+.2f} |"
        )


def ttfb(direct_url: str, lectr_url: str, key: str, n: int = 300) -> None:
    """Median time to the first body byte of a stream, direct and through Lectr."""
    import http.client
    from urllib.parse import urlsplit

    def measure(url: str, auth: str | None) -> list[float]:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        headers = {"content-type": "application/json", "x-bench-stream": "1"}
        if auth:
            headers["authorization"] = f"Bearer {auth}"
        samples = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            conn.request("POST", parts.path, STREAM_BODY, headers)
            resp = conn.getresponse()
            resp.read(1)
            t1 = time.perf_counter()
            resp.read()
            if i >= 20:
                samples.append((t1 - t0) * 1000)
        conn.close()
        return sorted(samples)

    d = measure(direct_url, None)
    lc = measure(lectr_url, key)
    med = lambda xs: xs[len(xs) // 2]  # noqa: E731
    p99 = lambda xs: xs[int(len(xs) * 0.99) - 1]  # noqa: E731
    print("\nTime to first byte of a stream (sequential requests, keep-alive):")
    print(f"  direct  p50 {med(d):.3f} ms  p99 {p99(d):.3f} ms")
    print(f"  lectr   p50 {med(lc):.3f} ms  p99 {p99(lc):.3f} ms")
    print(f"  added   p50 {med(lc) - med(d):+.3f} ms")


def memory(workdir: Path, counts: list[int], proxy_pin: list[str]) -> None:
    """Resident memory of Lectr with N concurrent open streams from a slow provider."""
    slow_port = free_port()
    slow = subprocess.Popen(
        [PY, str(BENCH / "slow_upstream.py"), "--port", str(slow_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=raise_fd_limit,
    )
    try:
        wait_http(f"http://127.0.0.1:{slow_port}/openai/v1/models")
        (workdir / "mem").mkdir()
        lectr = Lectr(workdir / "mem", f"http://127.0.0.1:{slow_port}/openai", proxy_pin)
        try:
            print("\nResident memory with concurrent open streams (slow-dripping provider):")
            for n in counts:
                base = lectr.rss_kib()
                out = subprocess.run(
                    [
                        PY,
                        str(BENCH / "hold_streams.py"),
                        "--url",
                        f"http://127.0.0.1:{lectr.port}/v1/chat/completions",
                        "--key",
                        lectr.lectr_key,
                        "--count",
                        str(n),
                        "--hold",
                        "8",
                        "--rss-pid",
                        str(lectr.serving_pid()),
                    ],
                    capture_output=True,
                    text=True,
                    preexec_fn=raise_fd_limit,
                ).stdout
                m = re.search(r"open=(\d+) rss_kib=(\d+)", out)
                if not m:
                    print(f"  {n:>6} streams: failed ({out.strip()[-200:]})")
                    continue
                opened, rss = int(m.group(1)), int(m.group(2))
                per = (rss - base) / opened if opened else float("nan")
                print(
                    f"  {n:>6} streams: {opened} open, RSS {rss / 1024:.1f} MiB "
                    f"(baseline {base / 1024:.1f} MiB) → {per:.1f} KiB per stream"
                )
                time.sleep(3)
        finally:
            lectr.stop()
    finally:
        slow.terminate()
        slow.wait(10)


def measure(url: str, script: Path, conns: int, seconds: int, pin: list[str]) -> dict:
    run_wrk(url, script, conns, 2, pin)  # warm-up
    return run_wrk(url, script, conns, seconds, pin)


def both_modes(lectr: Lectr, sub: Path, conns: int, seconds: int, load_pin: list[str]):
    """(mode, wrk result) for non-streaming then streaming requests to ``lectr``."""
    url = f"http://127.0.0.1:{lectr.port}/v1/chat/completions"
    for stream in (False, True):
        script = wrk_script(sub, stream, lectr.lectr_key)
        yield ("stream" if stream else "json"), measure(url, script, conns, seconds, load_pin)


def scaling(workdir: Path, upstream: str, seconds: int, load_pin: list[str]) -> None:
    """--workers 1 against --workers 2, both free to use every core (on a
    2-core machine the load generator and the fake provider share them)."""
    print("\nScaling with --workers (proxy not pinned; wrk and nginx on core 0):")
    print("| workers | mode | conc | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for workers in (1, 2):
        sub = workdir / f"scale{workers}"
        sub.mkdir()
        lectr = Lectr(sub, upstream, [], workers=workers)
        try:
            for mode, r in both_modes(lectr, sub, 128, seconds, load_pin):
                print(
                    f"| {workers} | {mode} | 128 | {r['rps']:.0f} | "
                    f"{r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} |",
                    flush=True,
                )
        finally:
            lectr.stop()


def logging_cost(
    workdir: Path, upstream: str, seconds: int, load_pin: list[str], proxy_pin: list[str]
) -> None:
    """The proxy with usage logging on, then with the recorder turned into a
    no-op (bench/_nolog), same machine, same run."""
    print("\nUsage logging on vs off (json, c=32, then stream, c=32):")
    print("| usage logging | mode | req/s | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for label, extra in (("on", None), ("off", str(BENCH / "_nolog"))):
        sub = workdir / f"log-{label}"
        sub.mkdir()
        lectr = Lectr(sub, upstream, proxy_pin, extra_path=extra)
        try:
            for mode, r in both_modes(lectr, sub, 32, seconds, load_pin):
                print(
                    f"| {label} | {mode} | {r['rps']:.0f} | "
                    f"{r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} |",
                    flush=True,
                )
        finally:
            lectr.stop()


def metrics_cost(
    workdir: Path,
    upstream: str,
    seconds: int,
    load_pin: list[str],
    proxy_pin: list[str],
    workers: int,
    rounds: int = 2,
) -> None:
    """The proxy with metrics on, then with every metric update turned into
    a no-op (bench/_nometrics), alternating ``rounds`` times in one run so
    that drift on a shared machine hits both alike."""
    print(f"\nMetrics on vs off (--workers {workers}; json, c=32, then stream, c=32):")
    print("| metrics | round | mode | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    totals: dict[tuple[str, str], float] = {}
    for n in range(rounds):
        for label, extra in (("on", None), ("off", str(BENCH / "_nometrics"))):
            sub = workdir / f"metrics-{label}-{n}"
            sub.mkdir()
            pin = proxy_pin if workers == 1 else []
            lectr = Lectr(sub, upstream, pin, extra_path=extra, workers=workers)
            try:
                for mode, r in both_modes(lectr, sub, 32, seconds, load_pin):
                    totals[(label, mode)] = totals.get((label, mode), 0.0) + r["rps"]
                    print(
                        f"| {label} | {n + 1} | {mode} | {r['rps']:.0f} | "
                        f"{r['p50']:.2f} | {r['p99']:.2f} |",
                        flush=True,
                    )
            finally:
                lectr.stop()
    for mode in ("json", "stream"):
        on, off = totals[("on", mode)], totals[("off", mode)]
        print(f"{mode}: metrics on / off = {on / off:.3f} ({(on - off) / off * 100:+.1f} % req/s)")


def flusher() -> None:
    script = BENCH / "flusher_bench.py"
    if not script.exists():
        print("\n(flusher benchmark script not present)")
        return
    print("\nUsage flusher throughput:")
    subprocess.run([PY, str(script)], cwd=REPO, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 s runs instead of 10 s")
    parser.add_argument(
        "--only",
        choices=["throughput", "ttfb", "memory", "scaling", "logging", "metrics", "flusher"],
    )
    parser.add_argument("--workers", type=int, default=1, help="Lectr --workers for throughput")
    parser.add_argument("--memory-counts", default="1000,10000")
    args = parser.parse_args()
    ensure_tools()
    raise_fd_limit()
    load_pin, proxy_pin = cores()
    seconds = 5 if args.quick else 10
    print(
        f"Lectr benchmark: {os.cpu_count()} cores; load generator "
        f"{'pinned to core 0' if load_pin else 'not pinned'}, proxies "
        f"{'pinned to core 1' if proxy_pin else 'not pinned'}, nginx fake provider on core 0."
    )
    print(
        f"PostgreSQL: {'DATABASE_URL server' if os.environ.get('DATABASE_URL') else 'embedded'}"
        f"; Lectr workers: {args.workers}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="lectr-bench-"))
    procs: list[subprocess.Popen] = []
    lectr = None
    try:
        nginx_port = free_port()
        procs.append(start_nginx(workdir, nginx_port, load_pin))
        upstream = f"http://127.0.0.1:{nginx_port}/openai"
        direct = f"{upstream}/v1/chat/completions"
        if args.only in (None, "throughput", "ttfb"):
            bare_port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        *proxy_pin,
                        PY,
                        str(BENCH / "bare_passthrough.py"),
                        "--port",
                        str(bare_port),
                        "--upstream",
                        upstream,
                        "--key",
                        UPSTREAM_KEY,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=raise_fd_limit,
                )
            )
            wait_http(f"http://127.0.0.1:{bare_port}/v1/models")
            lectr = Lectr(workdir, upstream, proxy_pin, workers=args.workers)
            targets = {
                "direct": (direct, None),
                "bare": (f"http://127.0.0.1:{bare_port}/v1/chat/completions", None),
                "lectr": (f"http://127.0.0.1:{lectr.port}/v1/chat/completions", lectr.lectr_key),
            }
            if args.only in (None, "throughput"):
                print(f"\nThroughput ({seconds} s per run, after a 2 s warm-up):")
                print_table(throughput(targets, workdir, seconds, load_pin))
            if args.only in (None, "ttfb"):
                ttfb(direct, targets["lectr"][0], lectr.lectr_key)
            lectr.stop()
            lectr = None
        if args.only in (None, "memory"):
            memory(workdir, [int(x) for x in args.memory_counts.split(",")], proxy_pin)
        if args.only in (None, "logging"):
            logging_cost(workdir, upstream, seconds, load_pin, proxy_pin)
        if args.only in (None, "metrics"):
            metrics_cost(workdir, upstream, seconds, load_pin, proxy_pin, args.workers)
        if args.only in (None, "scaling"):
            scaling(workdir, upstream, seconds, load_pin)
        if args.only in (None, "flusher"):
            flusher()
    finally:
        if lectr is not None:
            lectr.stop()
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
