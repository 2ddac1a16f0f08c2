"""Side-by-side benchmark of Lectr against the bare Twisted passthrough.

    python bench/run.py                 # everything (about 15 minutes)
    python bench/run.py --quick         # shorter cells, 2 rounds
    python bench/run.py --only lean     # one section: throughput | ttfb | memory | logging |
                                        #   metrics | features | scaling | flusher | lean

What runs, and where (the method of ../shared/bench/README.md):

- **the fake provider**: ``../shared/bench/mock_upstream.rs`` (relative to the
  repository), compiled with ``rustc`` into a temporary directory: one epoll
  thread, keep-alive, every SSE event its own ``write()`` and HTTP chunk (the
  realistic case for a relay and its usage meter), ``--api-key`` checks that the
  proxy swapped the key in. Without ``../shared/bench`` (or ``rustc``), nginx
  answers canned responses instead; its stream is then one write — the best
  case, and the output says so.
- **bare**: ``../shared/bench/twisted_passthrough.py``, the ~100-line twisted.web
  + Agent passthrough (key check, key swap, pooled Agent, body streamed back):
  the ceiling of one CPython reactor with twisted.web before any product logic.
  Fallback: ``bench/bare_passthrough.py`` (the same work, written here).
- **lectr**: ``twistd -n lectr``, an org, a Lectr key and a provider key
  provisioned through the admin API; every feature on.
- **lean** (``--only lean``): ``bench/lean_passthrough.py``, the same work as
  bare on Lectr's own transport (``lectr.http``): the ceiling of that transport.
- **wrk** (closed loop, one thread, Lua POST script).

wrk and the provider are pinned to core 0, the proxy under test alone to core 1
(``taskset``), when the machine has two cores. Each cell: 3 s warm-up, then the
measured run; every cell is measured in each of ``--rounds`` rounds (targets
interleaved) and the median is printed, with the ratio to bare. The machine's
load (``uptime``) is printed with each round: absolute figures are noisy on a
shared machine, ratios measured in one run are what counts.

Needs ``wrk`` (and ``nginx`` for the fallback provider); installed on demand
with apt-get when running as root. PostgreSQL: the server in DATABASE_URL when
set (a scratch database is created on it), otherwise an embedded one (a child
of the proxy, so on the proxy's core). On a 2-core machine the database shares
the benchmark's cores: ``--database-core 0`` pins a local server to core 0 (with
wrk and the provider, leaving the proxy alone on core 1), ``--background-database``
gives it the lowest CPU share; in a deployment it has its own machine.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared" / "bench"
PY = sys.executable
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789"
CLIENT_KEY = "sk-bench-client-key-0123456789"  # the bare/lean passthroughs' client key
# "bench" is a route of Lectr's bench org (two targets over a two-key pool: every feature on);
# the mock and the bare passthrough answer whatever the model.
CHAT_BODY = '{"model":"bench","messages":[{"role":"user","content":"Say hello"}]}'
STREAM_BODY = '{"model":"bench","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
CHAT_PATH = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> tuple[list[str], list[str]]:
    """(load generator and provider prefix, proxy prefix) for taskset pinning."""
    n = os.cpu_count() or 1
    if n >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    return [], []


def _postgres_pids() -> list[str]:
    """Every PostgreSQL server process on this machine."""
    return subprocess.run(["pgrep", "postgres"], capture_output=True, text=True).stdout.split()


def database_share(nice: int) -> int:
    """Set the autogroup nice value (the CPU share of the scheduler group)
    of every PostgreSQL server process on this machine: 19 puts the
    database in the background, 0 restores it. Returns how many were set
    (none without root or without a local server)."""
    done = 0
    for pid in _postgres_pids():
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
            done += 1
        except OSError:
            pass
    return done


def database_core(core: int) -> dict[int, set[int]]:
    """Pin every PostgreSQL server process on this machine to ``core`` (its
    backends forked later inherit the postmaster's affinity). Returns the
    affinity each one had, for :func:`database_affinity_restore` (empty
    without root or without a local server)."""
    before: dict[int, set[int]] = {}
    for pid in map(int, _postgres_pids()):
        try:
            mask = os.sched_getaffinity(pid)
            os.sched_setaffinity(pid, {core})
            before[pid] = mask
        except OSError:
            pass  # (not ours, or exited meanwhile)
    return before


def database_affinity_restore(before: dict[int, set[int]]) -> None:
    """Give the processes pinned by :func:`database_core` their affinity
    back; a process forked since (a backend) gets its postmaster's."""
    if not before:
        return
    widest = max(before.values(), key=len)
    for pid in map(int, _postgres_pids()):
        try:
            os.sched_setaffinity(pid, before.get(pid, widest))
        except OSError:
            pass


@contextlib.contextmanager
def database_placement(background: bool, core: int | None):
    """The local PostgreSQL server in the background (lowest CPU share)
    and/or on one core for the duration of a benchmark; exits if that
    cannot be done (it needs root and the server of DATABASE_URL running on
    this machine: an embedded one is the proxy's child, on its core).
    Whatever was changed is restored, also on exit."""
    if (background or core is not None) and not os.environ.get("DATABASE_URL"):
        sys.exit("bench: placing PostgreSQL needs DATABASE_URL (a running local server)")
    if core is not None and core not in os.sched_getaffinity(0):
        sys.exit(f"bench: --database-core {core}: this machine has no such core")
    shared = False
    pinned: dict[int, set[int]] = {}
    try:
        if background:
            shared = database_share(19) > 0
            if not shared:
                sys.exit("bench: cannot lower PostgreSQL's CPU share (root, a local server)")
        if core is not None:
            pinned = database_core(core)
            if not pinned:
                sys.exit("bench: cannot pin PostgreSQL to a core (root, a local server)")
        yield
    finally:
        if shared:
            database_share(0)
        database_affinity_restore(pinned)


def add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--background-database",
        action="store_true",
        help="give the local PostgreSQL server the lowest CPU share for the run (root): on a "
        "2-core machine it otherwise takes part of the proxy's core",
    )
    parser.add_argument(
        "--database-core",
        type=int,
        metavar="CORE",
        help="pin the local PostgreSQL server to this core for the run (root); 0 puts it with "
        "wrk and the provider, leaving the proxy alone on core 1",
    )


def database_note(background: bool, core: int | None) -> str:
    """How the benchmark placed PostgreSQL, for its header line."""
    notes = []
    if background:
        notes.append("in the background: lowest CPU share")
    if core is not None:
        notes.append(f"pinned to core {core}")
    return f" ({', '.join(notes)})" if notes else ""


def load() -> str:
    """The machine's load averages (the machine is shared)."""
    try:
        return "load " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load ?"


def ensure_tools(need_nginx: bool) -> None:
    wanted = {"wrk": "wrk"}
    if need_nginx:
        wanted["nginx"] = "nginx-light"
    missing = [t for t in wanted if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: needs {', '.join(missing)}: apt-get install wrk nginx-light")
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *(wanted[t] for t in missing)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


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


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the fake provider ---------------------------------------------------------------------


class Upstream:
    """The fake provider: the shared Rust mock, or nginx with canned answers.
    ``base`` is what Lectr's LECTR_OPENAI_BASE_URL (and the passthroughs'
    --upstream) is set to; ``base + CHAT_PATH`` answers chat completions."""

    def __init__(self, workdir: Path, pin: list[str], *, force_fallback: bool = False) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.own = self.base  # (the provider itself: its stats, even behind a TLS front)
        self.realistic = False
        mock_src = SHARED / "mock_upstream.rs"
        if mock_src.exists() and shutil.which("rustc") and not force_fallback:
            binary = workdir / "mock_upstream"
            subprocess.run(
                ["rustc", "-O", "--edition", "2021", "-o", str(binary), str(mock_src)],
                check=True,
            )
            self.proc = subprocess.Popen(
                [
                    *pin,
                    str(binary),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--chunks",
                    "20",
                    "--api-key",
                    UPSTREAM_KEY,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=raise_fd_limit,
            )
            self.kind = "shared Rust mock (one write per SSE event)"
            self.realistic = True
            wait_http(f"{self.base}/__health")
        else:
            self.proc = start_nginx(workdir, self.port, pin)
            self.kind = "nginx canned answers (FALLBACK: a stream arrives in one write)"

    def requests(self) -> int | None:
        """Requests the mock has answered so far (None for nginx)."""
        if not self.realistic:
            return None
        with urllib.request.urlopen(f"{self.own}/__stats", timeout=5) as r:
            stats = json.loads(r.read())
        return stats["chat"] + stats["chat_stream"] + stats["unauthorized"]

    def unauthorized(self) -> int:
        if not self.realistic:
            return 0
        with urllib.request.urlopen(f"{self.own}/__stats", timeout=5) as r:
            return json.loads(r.read())["unauthorized"]

    def stop(self) -> None:
        stop_proc(self.proc)


def sse_body(events: int = 20) -> str:
    created = 1700000000
    head = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": created,
        "model": "gpt-4o-mini",
    }
    out = [
        {
            **head,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
    ]
    for i in range(events - 2):
        out.append(
            {
                **head,
                "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
            }
        )
    out.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    lines = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in out]
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
    """Fallback provider. The stream case is selected by the ``"stream":true``
    of the body (as the real mock does), via a header the wrk script adds."""
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
    location = /v1/models {{ default_type application/json; return 200 '{MODELS_RESPONSE}'; }}
    location = /__health {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    location = /v1/chat/completions {{
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
    wait_http(f"http://127.0.0.1:{port}/__health")
    return proc


class TlsFront:
    """``--upstream-tls``: nginx terminating TLS in front of the provider (on
    the provider's core), as every real provider is reached - over https,
    kept alive. A CA made for the run signs a certificate for ``localhost``;
    ``SSL_CERT_FILE`` names that CA to every process started after this
    (OpenSSL's default trust store: the proxies verify the provider as they
    would a real one, nothing relaxed). The provider's ``base`` becomes
    ``https://localhost:PORT``."""

    def __init__(self, workdir: Path, upstream: Upstream, pin: list[str]) -> None:
        if not shutil.which("nginx"):
            sys.exit("bench: --upstream-tls needs nginx: apt-get install nginx-light")
        ca, cert, key = _tls_files(workdir)
        self.port = free_port()
        conf = workdir / "nginx-tls.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx-tls.pid;
error_log {workdir}/nginx-tls-error.log warn;
events {{ worker_connections 32768; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path {workdir}/nginx-tls-body;
  proxy_temp_path {workdir}/nginx-tls-proxy;
  fastcgi_temp_path {workdir}/nginx-tls-fcgi;
  uwsgi_temp_path {workdir}/nginx-tls-uwsgi;
  scgi_temp_path {workdir}/nginx-tls-scgi;
  upstream provider {{ server 127.0.0.1:{upstream.port}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{self.port} ssl backlog=4096;
    listen [::1]:{self.port} ssl backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://provider;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
""")
        os.environ["SSL_CERT_FILE"] = str(ca)
        self.proc = subprocess.Popen(
            [*pin, "nginx", "-c", str(conf), "-p", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        upstream.base = f"https://localhost:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                break
            time.sleep(0.1)
        else:
            sys.exit("bench: the TLS front did not start (see nginx-tls-error.log)")

    def stop(self) -> None:
        stop_proc(self.proc)


def _tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for localhost (and 127.0.0.1, ::1) it signs."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, public_key, signer, ca: bool, sans=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lectr bench CA")])
    ca = cert(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    sans = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    leaf = cert(name, ca_name, key.public_key(), ca_key, False, sans)
    pem = serialization.Encoding.PEM
    paths = workdir / "tls-ca.pem", workdir / "tls-cert.pem", workdir / "tls-key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


# --- the passthroughs -----------------------------------------------------------------------


class Passthrough:
    """A bare passthrough process: ``bare`` (the shared twisted.web + Agent one,
    or this project's fallback) or ``lean`` (lectr.http server + client)."""

    def __init__(self, kind: str, upstream: Upstream, pin: list[str]) -> None:
        self.port = free_port()
        if kind == "bare":
            shared = SHARED / "twisted_passthrough.py"
            script = shared if shared.exists() else BENCH / "bare_passthrough.py"
            self.source = "shared" if shared.exists() else "fallback"
        else:
            script = BENCH / "lean_passthrough.py"
            self.source = "lectr.http"
        self.proc = subprocess.Popen(
            [
                *pin,
                PY,
                str(script),
                "--port",
                str(self.port),
                "--upstream",
                upstream.base,
                "--client-key",
                CLIENT_KEY,
                "--upstream-key",
                UPSTREAM_KEY,
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=raise_fd_limit,
        )
        self.url = f"http://127.0.0.1:{self.port}{CHAT_PATH}"
        wait_http(self.url)  # 401 (no key) is an answer

    def stop(self) -> None:
        stop_proc(self.proc)


# --- Lectr --------------------------------------------------------------------------------
_DB_SEQ = itertools.count(1)


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
        self.nolog_marker = None
        if extra_path:
            self.nolog_marker = workdir / "nolog-loaded"
            self.env["BENCH_NOLOG_MARKER"] = str(self.nolog_marker)
        self.db_name = None
        server = os.environ.get("DATABASE_URL")
        if server:
            import psycopg2

            self.db_name = f"lectr_bench_{os.getpid()}_{next(_DB_SEQ)}"  # (one per instance)
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
        # every feature on: a two-key pool (the mock knows one key: both hold it) and a
        # two-target route; requests name the route
        self.org_id, key = self._org("bench", route=True, limits=False)
        return key

    def add_org(self, name: str, *, route: bool, limits: bool | str) -> str:
        """Another org on the same process, for the features section: one
        provider key and the model named directly (``route=False``), or the
        bench org's two-key pool and two-target route; with ``limits``, every
        limit set on the org and on its key, high enough never to refuse
        (``"rpm"``: only a requests-per-minute limit on the org).
        Returns the org's Lectr key."""
        return self._org(name, route=route, limits=limits)[1]

    def _org(self, name: str, *, route: bool, limits: bool | str) -> tuple[str, str]:
        org = self._admin("POST", "/admin/orgs", {"name": name})
        org_id = org["org"]["id"]
        for n in ("a", "b") if route else ("a",):
            self._admin(
                "POST",
                f"/admin/orgs/{org_id}/provider-keys",
                {"provider": "openai", "key": UPSTREAM_KEY, "name": f"{name}-{n}"},
            )
        if route:
            self._admin(
                "PUT",
                f"/admin/orgs/{org_id}/routes/bench",
                {
                    "targets": [
                        {"provider": "openai", "model": "gpt-4o-mini"},
                        {"provider": "openai", "model": "gpt-4o"},
                    ]
                },
            )
        if limits == "rpm":  # one limit, on the org
            self._admin("PUT", f"/admin/orgs/{org_id}/limits", {"rpm": 100_000_000})
        elif limits:
            caps = {
                "rpm": 100_000_000,
                "tpm": 1_000_000_000,
                "max_concurrent": 100_000,
                "usd_per_day": "1000000",
                "usd_per_month": "10000000",
            }
            self._admin("PUT", f"/admin/orgs/{org_id}/limits", caps)
            self._admin("PUT", f"/admin/orgs/{org_id}/keys/{org['key']['id']}/limits", caps)
        return org_id, org["key"]["key"]

    def logged_requests(self) -> int:
        """Requests in the org's request log so far (usage totals by provider)."""
        report = self._admin("GET", f"/admin/orgs/{self.org_id}/usage?group_by=provider")
        return sum(item["requests"] for item in report["items"])

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


def wrk_script(workdir: Path, stream: bool, key: str, model: str = "bench") -> Path:
    body = (STREAM_BODY if stream else CHAT_BODY).replace('"bench"', json.dumps(model))
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = '{body}'",
        'wrk.headers["Content-Type"] = "application/json"',
        f'wrk.headers["Authorization"] = "Bearer {key}"',
    ]
    if stream:
        lines.append('wrk.headers["X-Bench-Stream"] = "1"')  # only the nginx fallback reads it
    path = workdir / f"post-{'stream' if stream else 'json'}-{key[:11]}-{model}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def run_wrk(url: str, script: Path, conns: int, seconds: float, pin: list[str]) -> dict:
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
        "requests": 0,
    }
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        result["requests"] = int(m.group(1))
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


def measure(
    url: str, script: Path, conns: int, seconds: float, pin: list[str], cpu_pid: int | None = None
) -> dict:
    """A 3 s warm-up, then the measured run. With ``cpu_pid``, also
    ``cpu_us``: that process's own CPU time per request during the run
    (steadier than req/s on a shared machine: another tenant slows the
    clock, not the work)."""
    run_wrk(url, script, conns, 3, pin)  # warm-up
    if cpu_pid is None:
        return run_wrk(url, script, conns, seconds, pin)
    cpu = _cpu_seconds(cpu_pid)
    result = run_wrk(url, script, conns, seconds, pin)
    result["cpu_us"] = (_cpu_seconds(cpu_pid) - cpu) / max(1, result["requests"]) * 1e6
    return result


class Counted:
    """The shared mock and one Lectr carrying the counting hook ``hook``
    (a directory of bench/ with a sitecustomize.py) that writes its figures
    to the file named by the environment variable ``stats_env``, with an org
    on the bench route (``limits``: every limit on the org and its key).
    Use as a context manager."""

    def __init__(self, prefix: str, hook: str, stats_env: str, *, limits: bool) -> None:
        ensure_tools(need_nginx=not (SHARED / "mock_upstream.rs").exists())
        raise_fd_limit()
        self.load_pin, proxy_pin = cores()
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.stats = self.workdir / "stats.json"
        os.environ[stats_env] = str(self.stats)
        self.upstream = Upstream(self.workdir, self.load_pin)
        self.lectr = None
        try:
            self.lectr = Lectr(
                self.workdir, self.upstream.base, proxy_pin, extra_path=str(BENCH / hook)
            )
            self.key = self.lectr.add_org("bench-counted", route=True, limits=limits)
        except BaseException:
            self.__exit__()
            raise
        self.pid = self.lectr.serving_pid()
        self.url = f"http://127.0.0.1:{self.lectr.port}{CHAT_PATH}"

    def run(self, mode: str, seconds: float) -> tuple[dict, dict]:
        """A measured c=32 run: a warm-up, SIGUSR1 (the hook starts counting
        afresh), the run with the process's CPU per request (:func:`measure`),
        SIGUSR1 again (the hook writes what it counted to ``stats``, JSON).
        Returns the run and the hook's figures."""
        script = wrk_script(self.workdir, mode == "stream", self.key, "bench")
        run_wrk(self.url, script, 32, 3, self.load_pin)  # warm-up
        os.kill(self.pid, signal.SIGUSR1)  # start counting here
        time.sleep(0.3)
        r = measure(self.url, script, 32, seconds, self.load_pin, cpu_pid=self.pid)
        os.kill(self.pid, signal.SIGUSR1)
        time.sleep(0.3)
        return r, json.loads(self.stats.read_text())

    def __enter__(self) -> Counted:
        return self

    def __exit__(self, *exc) -> None:
        if self.lectr is not None:
            self.lectr.stop()
        self.upstream.stop()


# --- throughput: several targets, several rounds, medians, ratios vs bare -------------------


class Target:
    def __init__(self, name: str, url: str, key: str) -> None:
        self.name, self.url, self.key = name, url, key


def serve(name: str, workdir: Path, upstream: Upstream, pin: list[str], extra_path=None):
    """Start one proxy under test: ``lectr`` (the bench route, every feature
    on), ``lectr-limited`` (the same, every limit set on org and key), or a
    passthrough (``bare``, ``lean``). Returns (the process object, the pid
    serving requests, its Target)."""
    if name.startswith("lectr"):
        (workdir / name).mkdir()
        proc = Lectr(workdir / name, upstream.base, pin, extra_path=extra_path)
        key = proc.lectr_key
        if name == "lectr-limited":
            key = proc.add_org("bench-limited", route=True, limits=True)
        return (
            proc,
            proc.serving_pid(),
            Target(name, f"http://127.0.0.1:{proc.port}{CHAT_PATH}", key),
        )
    proc = Passthrough(name, upstream, pin)
    return proc, proc.proc.pid, Target(name, proc.url, CLIENT_KEY)


def throughput(
    targets: list[Target],
    upstream: Upstream,
    workdir: Path,
    seconds: float,
    rounds: int,
    conns_list: tuple[int, ...],
    load_pin: list[str],
) -> list[dict]:
    """Every (mode, c, target) cell once per round, targets interleaved; the
    medians of the rounds, and each target's ratio to bare."""
    samples: dict[tuple[str, int, str], list[dict]] = {}
    for rnd in range(1, rounds + 1):
        print(f"  round {rnd}/{rounds} ({load()})", flush=True)
        for stream in (False, True):
            mode = "stream" if stream else "json"
            for conns in conns_list:
                for t in targets:
                    before = upstream.requests()
                    r = measure(t.url, wrk_script(workdir, stream, t.key), conns, seconds, load_pin)
                    after = upstream.requests()
                    if before is not None and after - before < r["requests"]:
                        r["errors"] += r["requests"] - (after - before)  # never reached the mock
                    samples.setdefault((mode, conns, t.name), []).append(r)
                    print(
                        f"    {mode:6} c={conns:<4} {t.name:6} {r['rps']:9.0f} req/s  "
                        f"p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  errors {r['errors']}",
                        flush=True,
                    )
    rows = []
    for (mode, conns, name), runs in samples.items():
        row = {"mode": mode, "c": conns, "target": name, "rounds": [x["rps"] for x in runs]}
        for k in ("rps", "p50", "p90", "p99"):
            row[k] = statistics.median(x[k] for x in runs)
        row["errors"] = sum(x["errors"] for x in runs)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    def find(mode, c, target):
        return next(
            (r for r in rows if r["mode"] == mode and r["c"] == c and r["target"] == target), None
        )

    print(
        "\n| mode | c | target | req/s (median) | rounds | p50 ms | p99 ms | errors "
        "| req/s vs bare | added p50 ms vs direct |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        bare = find(row["mode"], row["c"], "bare")
        direct = find(row["mode"], row["c"], "direct")
        ratio = row["rps"] / bare["rps"] if bare and bare["rps"] else float("nan")
        added = row["p50"] - direct["p50"] if direct else float("nan")
        rounds = " / ".join(f"{x:.0f}" for x in row["rounds"])
        print(
            f"| {row['mode']} | {row['c']} | {row['target']} | {row['rps']:.0f} | {rounds} | "
            f"{row['p50']:.2f} | {row['p99']:.2f} | {row['errors']} | "
            f"{ratio:.2f}× | {added:+.2f} |"
        )


# --- other sections -----------------------------------------------------------------------------


def ttfb(targets: list[Target], n: int = 300) -> None:
    """Median time to the first body byte of a stream, per target."""
    import http.client
    from urllib.parse import urlsplit

    def sample(t: Target) -> list[float]:
        parts = urlsplit(t.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        headers = {
            "content-type": "application/json",
            "x-bench-stream": "1",
            "authorization": f"Bearer {t.key}",
        }
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

    print(f"\nTime to first byte of a stream (sequential requests, keep-alive; {load()}):")
    results = {t.name: sample(t) for t in targets}
    direct = results.get("direct")
    for name, xs in results.items():
        med, p99 = xs[len(xs) // 2], xs[int(len(xs) * 0.99) - 1]
        added = f"  added p50 {med - direct[len(direct) // 2]:+.3f} ms" if direct else ""
        print(f"  {name:7} p50 {med:.3f} ms  p99 {p99:.3f} ms{added}")


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
            print(f"\nResident memory with concurrent open streams (slow provider; {load()}):")
            for n in counts:
                # (the serving process alone, as hold_streams.py reads it once the
                # streams are open: not its body judge, a child of ~45 MiB that holds
                # no stream - counted in the baseline only, it made the figure per
                # stream 45 MiB / n too small)
                base = _rss_kib(lectr.serving_pid())
                out = subprocess.run(
                    [
                        PY,
                        str(BENCH / "hold_streams.py"),
                        "--url",
                        f"http://127.0.0.1:{lectr.port}{CHAT_PATH}",
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
        stop_proc(slow)


#: a stream the shared mock holds open: its first event at once, the next after 10 minutes
IDLE_STREAM_BODY = (
    '{"model":"gpt-4o-mini","stream":true,"user":"mock-chunk-delay-ms=600000",'
    '"messages":[{"role":"user","content":"hi"}]}'
)


def lean_memory(upstream: Upstream, counts: list[int], proxy_pin: list[str]) -> None:
    """Resident memory of the lean passthrough per open idle stream (server
    and upstream sides both live in that process)."""
    if not upstream.realistic:
        print("\n(lean memory: needs the shared mock's per-request pacing; skipped)")
        return
    print(f"\nLean transport: resident memory per open idle stream ({load()}):")
    for n in counts:
        lean = Passthrough("lean", upstream, proxy_pin)
        try:
            time.sleep(0.5)
            base = _rss_kib(lean.proc.pid)
            out = subprocess.run(
                [
                    PY,
                    str(BENCH / "hold_streams.py"),
                    "--url",
                    lean.url,
                    "--key",
                    CLIENT_KEY,
                    "--count",
                    str(n),
                    "--hold",
                    "2",
                    "--rss-pid",
                    str(lean.proc.pid),
                    "--body",
                    IDLE_STREAM_BODY,
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
        finally:
            lean.stop()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def database_cpu() -> dict[int, float]:
    """User + system CPU time so far of each PostgreSQL server process on
    this machine, by pid (empty when there is none or it cannot be read)."""
    times = {}
    for pid in map(int, _postgres_pids()):
        try:
            times[pid] = _cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            pass  # (exited meanwhile)
    return times


def database_cpu_since(before: dict[int, float]) -> float:
    """The CPU time PostgreSQL's processes spent since ``before`` (a
    :func:`database_cpu` snapshot): each process's own difference, a process
    started since counted whole. (A process that ended meanwhile, an
    autovacuum worker, takes its last moments with it: a slight undercount.)"""
    return sum(t - before.get(pid, 0.0) for pid, t in database_cpu().items())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scaling(workdir: Path, upstream: Upstream, seconds: float, load_pin: list[str]) -> None:
    """--workers 1 against --workers 2, both free to use every core (on a
    2-core machine the load generator and the fake provider share them)."""
    print(f"\nScaling with --workers (proxy not pinned; wrk and provider on core 0; {load()}):")
    print("| workers | mode | c | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for workers in (1, 2):
        sub = workdir / f"scale{workers}"
        sub.mkdir()
        lectr = Lectr(sub, upstream.base, [], workers=workers)
        try:
            url = f"http://127.0.0.1:{lectr.port}{CHAT_PATH}"
            for stream in (False, True):
                script = wrk_script(sub, stream, lectr.lectr_key)
                r = measure(url, script, 128, seconds, load_pin)
                print(
                    f"| {workers} | {'stream' if stream else 'json'} | 128 | {r['rps']:.0f} | "
                    f"{r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} |",
                    flush=True,
                )
        finally:
            lectr.stop()


def logging_cost(
    workdir: Path,
    upstream: Upstream,
    seconds: float,
    rounds: int,
    load_pin: list[str],
    proxy_pin: list[str],
) -> None:
    """Lectr with usage logging on, then with the recorder turned into a no-op
    (bench/_nolog/sitecustomize.py, first on the PYTHONPATH), same run. Each
    run proves its setting: the "off" process must have loaded the no-op (a
    marker file) and written no request-log row; the "on" one must have
    logged the requests it answered."""
    print(f"\nUsage logging on vs off (c=32; medians of {rounds} rounds; {load()}):")
    results: dict[tuple[str, str], list[dict]] = {}
    checks = []
    for label, extra in (("on", None), ("off", str(BENCH / "_nolog"))):
        sub = workdir / f"log-{label}"
        sub.mkdir()
        lectr = Lectr(sub, upstream.base, proxy_pin, extra_path=extra)
        try:
            if extra and not (lectr.nolog_marker and lectr.nolog_marker.exists()):
                raise SystemExit("bench: the logging-off run did not load bench/_nolog")
            url = f"http://127.0.0.1:{lectr.port}{CHAT_PATH}"
            answered = 0
            for _ in range(rounds):
                for stream in (False, True):
                    script = wrk_script(sub, stream, lectr.lectr_key)
                    r = measure(url, script, 32, seconds, load_pin)
                    answered += r["requests"]
                    results.setdefault((label, "stream" if stream else "json"), []).append(r)
            time.sleep(2.5)  # the flusher writes every second
            logged = lectr.logged_requests()
            checks.append(f"logging {label}: {logged} request-log rows for ≥{answered} requests")
            if label == "off" and logged:
                raise SystemExit("bench: the logging-off run wrote request-log rows")
            if label == "on" and logged < answered:
                raise SystemExit("bench: the logging-on run did not log every request")
        finally:
            lectr.stop()
    print("| usage logging | mode | req/s | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for (label, mode), runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in ("rps", "p50", "p90", "p99")}
        print(
            f"| {label} | {mode} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p90']:.2f} | "
            f"{med['p99']:.2f} |"
        )
    for line in checks:
        print(f"  ({line})")


def metrics_cost(
    workdir: Path,
    upstream: Upstream,
    seconds: float,
    rounds: int,
    load_pin: list[str],
    proxy_pin: list[str],
) -> None:
    """Lectr with metrics on, then with every metric update turned into a
    no-op (bench/_nometrics), alternating ``rounds`` times in one run so
    that drift on a shared machine hits both alike."""
    print(f"\nMetrics on vs off (c=32; {rounds} alternating rounds; {load()}):")
    print("| metrics | round | mode | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    totals: dict[tuple[str, str], float] = {}
    for n in range(rounds):
        for label, extra in (("on", None), ("off", str(BENCH / "_nometrics"))):
            sub = workdir / f"metrics-{label}-{n}"
            sub.mkdir()
            lectr = Lectr(sub, upstream.base, proxy_pin, extra_path=extra)
            try:
                url = f"http://127.0.0.1:{lectr.port}{CHAT_PATH}"
                for stream in (False, True):
                    mode = "stream" if stream else "json"
                    r = measure(
                        url, wrk_script(sub, stream, lectr.lectr_key), 32, seconds, load_pin
                    )
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


def features(
    workdir: Path,
    upstream: Upstream,
    seconds: float,
    rounds: int,
    load_pin: list[str],
    proxy_pin: list[str],
) -> None:
    """What routing and limits cost, in one Lectr process and one run: four
    orgs, requests interleaved per round at c=32. ``plain``: one provider key,
    the model named directly; ``routed``: a two-key pool and a two-target
    route (the request names the route); ``rpm``: the same plus a
    requests-per-minute limit on the org; ``limited``: the same plus every
    limit set on the org and on its key (caps that never refuse)."""
    print(f"\nRouting and limits (c=32, {seconds} s cells, {rounds} rounds; {load()}):")
    sub = workdir / "features"
    sub.mkdir()
    lectr = Lectr(sub, upstream.base, proxy_pin)
    try:
        url = f"http://127.0.0.1:{lectr.port}{CHAT_PATH}"
        cases = [
            ("plain", lectr.add_org("bench-plain", route=False, limits=False), "gpt-4o-mini"),
            ("routed", lectr.add_org("bench-routed", route=True, limits=False), "bench"),
            ("rpm", lectr.add_org("bench-rpm", route=True, limits="rpm"), "bench"),
            ("limited", lectr.add_org("bench-limited", route=True, limits=True), "bench"),
        ]
        pid = lectr.serving_pid()
        got: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(1, rounds + 1):
            print(f"  round {rnd}/{rounds} ({load()})", flush=True)
            for stream in (False, True):
                mode = "stream" if stream else "json"
                # each round starts with another case: drift within a round
                # falls on each case alike
                shift = (rnd - 1) % len(cases)
                for name, key, model in cases[shift:] + cases[:shift]:
                    script = wrk_script(workdir, stream, key, model)
                    r = measure(url, script, 32, seconds, load_pin, cpu_pid=pid)
                    got.setdefault((name, mode), []).append(r)
                    print(
                        f"    {mode:6} {name:8} {r['rps']:9.0f} req/s  p50 {r['p50']:6.2f} ms  "
                        f"p99 {r['p99']:6.2f} ms  CPU {r['cpu_us']:6.1f} us/request  "
                        f"errors {r['errors']}",
                        flush=True,
                    )
        print(
            "\n| mode | case | req/s (median) | rounds | vs plain | CPU µs/request (median) "
            "| rounds | req/s per CPU, vs plain | errors |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        med: dict[tuple[str, str], tuple[float, float]] = {}
        for mode in ("json", "stream"):
            for name, _, _ in cases:
                runs = got[(name, mode)]
                med[(name, mode)] = (
                    statistics.median(x["rps"] for x in runs),
                    statistics.median(x["cpu_us"] for x in runs),
                )
            plain_rps, plain_cpu = med[("plain", mode)]
            for name, _, _ in cases:
                runs = got[(name, mode)]
                rps, cpu = med[(name, mode)]
                each = " / ".join(f"{x['rps']:.0f}" for x in runs)
                each_cpu = " / ".join(f"{x['cpu_us']:.0f}" for x in runs)
                print(
                    f"| {mode} | {name} | {rps:.0f} | {each} | {rps / plain_rps:.3f} | "
                    f"{cpu:.1f} | {each_cpu} | {plain_cpu / cpu:.3f} | "
                    f"{sum(x['errors'] for x in runs)} |"
                )
            (r_rps, r_cpu), (l_rps, l_cpu) = med[("routed", mode)], med[("limited", mode)]
            # each round's own ratio (its cells minutes apart at most), then the
            # median: steadier than a ratio of medians when the host drifts
            paired = [
                (lim["rps"] / rt["rps"], rt["cpu_us"] / lim["cpu_us"])
                for rt, lim in zip(got[("routed", mode)], got[("limited", mode)], strict=True)
                if rt["rps"] and lim["cpu_us"]
            ]
            print(
                f"{mode}: limited / routed = {l_rps / r_rps:.3f} (req/s), "
                f"{r_cpu / l_cpu:.3f} (requests per CPU second); median of the rounds' own "
                f"ratios: {statistics.median(p[0] for p in paired):.3f} (req/s), "
                f"{statistics.median(p[1] for p in paired):.3f} (per CPU second)"
            )
    finally:
        lectr.stop()


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
    parser.add_argument("--quick", action="store_true", help="5 s cells instead of 10 s")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per cell (median)")
    parser.add_argument(
        "--only",
        choices=[
            "throughput",
            "ttfb",
            "memory",
            "scaling",
            "logging",
            "metrics",
            "flusher",
            "lean",
            "features",
        ],
    )
    parser.add_argument("--conns", default="1,32,128", help="concurrencies, comma-separated")
    parser.add_argument("--workers", type=int, default=1, help="Lectr --workers for throughput")
    parser.add_argument("--memory-counts", default="1000,10000")
    parser.add_argument(
        "--fallback-upstream", action="store_true", help="use nginx even if the shared mock exists"
    )
    parser.add_argument(
        "--upstream-tls",
        action="store_true",
        help="reach the provider over https (nginx terminating TLS in front of it, on its core)",
    )
    add_database_options(parser)
    args = parser.parse_args()
    use_mock = (SHARED / "mock_upstream.rs").exists() and shutil.which("rustc")
    ensure_tools(need_nginx=args.fallback_upstream or args.upstream_tls or not use_mock)
    raise_fd_limit()
    load_pin, proxy_pin = cores()
    seconds = 5 if args.quick else 10
    conns_list = tuple(int(c) for c in args.conns.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="lectr-bench-"))
    procs = []
    placement = contextlib.ExitStack()
    placement.enter_context(database_placement(args.background_database, args.database_core))
    try:
        upstream = Upstream(workdir, load_pin, force_fallback=args.fallback_upstream)
        procs.append(upstream)
        if args.upstream_tls:
            procs.append(TlsFront(workdir, upstream, load_pin))
        keep = len(procs)  # (the provider, and its TLS front, for every section)
        print(
            f"Lectr benchmark: {os.cpu_count()} cores; wrk and provider "
            f"{'pinned to core 0' if load_pin else 'not pinned'}, proxy under test "
            f"{'alone on core 1' if proxy_pin else 'not pinned'}; {load()}"
        )
        print(
            f"Provider: {upstream.kind}"
            + (" behind nginx terminating TLS (https, kept alive)" if args.upstream_tls else "")
        )
        print(
            f"PostgreSQL: {'DATABASE_URL server' if os.environ.get('DATABASE_URL') else 'embedded'}"
            f"{database_note(args.background_database, args.database_core)}"
            f"; Lectr workers: {args.workers}; {seconds} s cells after a 3 s warm-up, "
            f"{args.rounds} rounds"
        )
        direct = Target("direct", upstream.base + CHAT_PATH, UPSTREAM_KEY)
        if args.only in (None, "throughput", "ttfb", "lean"):
            bare = Passthrough("bare", upstream, proxy_pin)
            procs.append(bare)
            print(f"Bare passthrough: {bare.source}")
            targets = [direct, Target("bare", bare.url, CLIENT_KEY)]
            if args.only == "lean":
                lean = Passthrough("lean", upstream, proxy_pin)
                procs.append(lean)
                targets.append(Target("lean", lean.url, CLIENT_KEY))
                title = "Lean transport ceiling (lectr.http passthrough vs bare)"
            else:
                lectr = Lectr(workdir, upstream.base, proxy_pin, workers=args.workers)
                procs.append(lectr)
                targets.append(
                    Target("lectr", f"http://127.0.0.1:{lectr.port}{CHAT_PATH}", lectr.lectr_key)
                )
                title = "Throughput"
            if args.only != "ttfb":
                print(f"\n{title} ({seconds} s cells):")
                rows = throughput(
                    targets, upstream, workdir, seconds, args.rounds, conns_list, load_pin
                )
                print_table(rows)
            if args.only in (None, "ttfb", "lean"):
                ttfb(targets)
            for p in procs[keep:]:
                p.stop()
            del procs[keep:]
            if args.only == "lean":
                lean_memory(upstream, [int(x) for x in args.memory_counts.split(",")], proxy_pin)
            if upstream.unauthorized():
                print(f"\nWARNING: the provider refused {upstream.unauthorized()} requests (key)")
        if args.only in (None, "memory"):
            memory(workdir, [int(x) for x in args.memory_counts.split(",")], proxy_pin)
        if args.only in (None, "logging"):
            logging_cost(workdir, upstream, seconds, args.rounds, load_pin, proxy_pin)
        if args.only in (None, "metrics"):
            metrics_cost(workdir, upstream, seconds, args.rounds, load_pin, proxy_pin)
        if args.only in (None, "features"):
            features(workdir, upstream, seconds, args.rounds, load_pin, proxy_pin)
        if args.only in (None, "scaling"):
            scaling(workdir, upstream, seconds, load_pin)
        if args.only in (None, "flusher"):
            flusher()
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        placement.close()


if __name__ == "__main__":
    main()
