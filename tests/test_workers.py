"""``--workers N``: one socket, N worker processes, supervision, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lectr.workers import ListenSpec
from tests.support.fake_provider import OPENAI_KEY
from tests.support.process import FakeProviderProcess, LectrProcess, base_env, new_master_key

TOKEN = "workers-test-admin-token-0123456789"

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def workers_of(proc: LectrProcess) -> list[int]:
    return [
        p
        for p in children(proc.proc.pid)
        if "lectr.worker" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
    ]


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status


def test_listen_spec_parsing():
    spec = ListenSpec.parse("tcp:8080:interface=127.0.0.1:backlog=512")
    assert (spec.family, spec.address, spec.backlog) == (socket.AF_INET, ("127.0.0.1", 8080), 512)
    assert ListenSpec.parse("tcp:8080").address == ("0.0.0.0", 8080)
    assert ListenSpec.parse("tcp6:9000").family == socket.AF_INET6
    assert ListenSpec.parse("tcp:0:interface=\\:\\:1").address == ("::1", 0)
    assert ListenSpec.parse("unix:/run/lectr.sock").address == "/run/lectr.sock"
    for bad in ("ssl:443", "tcp:8080:foo=1"):
        with pytest.raises(ValueError):
            ListenSpec.parse(bad)


def test_two_workers_serve_supervise_and_stop(tmp_path, db_url):
    proc = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_WORKERS="2",
            LECTR_SHUTDOWN_GRACE="2",
        ),
        cwd=tmp_path,
    )
    try:
        proc.wait_for_output("Lectr is ready (2 workers)")
        workers = workers_of(proc)
        assert len(workers) == 2, proc.output
        for _ in range(20):
            assert get(proc.url("proxy", "/healthz")) == 200
        assert get(proc.url("admin", "/readyz")) == 200

        # a crashed worker is replaced, and the port keeps answering meanwhile
        os.kill(workers[0], signal.SIGKILL)
        assert get(proc.url("proxy", "/healthz")) == 200
        deadline = time.monotonic() + 30
        while "worker 0 is back" not in proc.output and "worker 1 is back" not in proc.output:
            assert time.monotonic() < deadline, proc.output
            time.sleep(0.1)
        replaced = workers_of(proc)
        assert len(replaced) == 2 and workers[0] not in replaced
    finally:
        proc.stop_cleanly()
    # no worker outlives the supervisor
    for pid in workers_of(proc) + replaced:
        assert (
            not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
        )


def test_port_in_use_with_workers(tmp_path, db_url):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        proc = LectrProcess(
            base_env(
                DATABASE_URL=db_url,
                ENCRYPTION_KEY=new_master_key(),
                LECTR_WORKERS="2",
                LECTR_PROXY_LISTEN=f"tcp:{port}:interface=127.0.0.1",
            ),
            cwd=tmp_path,
        )
        assert proc.wait_exit(60) != 0
    finally:
        holder.close()
    lines = [line for line in proc.stderr_lines if line.strip()]
    assert lines == [
        f"lectr: start-up failed: cannot listen on tcp:{port}:interface=127.0.0.1 "
        f"(proxy): Address already in use"
    ], proc.output


def _answers_quickly(port: int) -> str:
    """'refused', 'answered' or 'hung': what a new client meets."""
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return "refused"
    try:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        conn.settimeout(2)
        return "answered" if conn.recv(100) else "refused"  # closed: the same for a client
    except ConnectionResetError:
        return "refused"
    except TimeoutError:
        return "hung"
    finally:
        conn.close()


def test_new_connections_are_refused_during_the_shutdown_grace(tmp_path, db_url):
    """SIGTERM with a stream in flight: the stream finishes, while a new
    client is refused at once instead of waiting in a backlog nobody reads."""
    fake = FakeProviderProcess(interval=0.4)
    proc = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_ADMIN_TOKEN=TOKEN,
            LECTR_WORKERS="2",
            LECTR_SHUTDOWN_GRACE="20",
            LECTR_OPENAI_BASE_URL=fake.origin + "/openai",
        ),
        cwd=tmp_path,
    )
    try:
        proc.wait_for_output("Lectr is ready (2 workers)")
        port = proc.ports["proxy"]
        assert _answers_quickly(port) == "answered"
        reader, first_bytes, outcome = proc.start_stream(TOKEN, OPENAI_KEY)
        assert first_bytes.wait(20), proc.output
        proc.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        seen = []
        while time.monotonic() - stopped < 3:
            seen.append(_answers_quickly(port))
            assert seen[-1] != "hung", (seen, proc.output)
            if seen[-1] == "refused":
                break
            time.sleep(0.05)
        assert seen[-1] == "refused", seen
        refused_after = time.monotonic() - stopped
        reader.join(30)
        assert outcome["status"] == 200 and outcome["body"].rstrip().endswith(b"data: [DONE]")
        assert time.monotonic() - stopped > 1.0  # the stream really was still running
        assert refused_after < 2.0
        # and the supervisor then stops in order (one SIGTERM only: a second
        # one during the shutdown makes twistd log ReactorNotRunning)
        assert proc.wait_exit(60) in (0, -signal.SIGTERM), proc.output
        assert "Server Shut Down." in proc.output and "Traceback" not in proc.output
    finally:
        proc.kill()
        fake.stop()


# --- one /metrics for every worker -------------------------------------------------------

_401 = 'lectr_proxy_requests_total{provider="openai",status="401"}'


def scrape(proc: LectrProcess) -> dict[str, float]:
    """The samples of one /metrics answer (a new connection each time, so
    the scrapes land on different workers)."""
    with urllib.request.urlopen(proc.url("admin", "/metrics"), timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def unauthenticated_requests(proc: LectrProcess, n: int) -> None:
    for _ in range(n):
        req = urllib.request.Request(
            proc.url("proxy", "/v1/chat/completions"), data=b"{}", method="POST"
        )
        try:
            urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError as e:
            assert e.code == 401
        else:
            raise AssertionError("expected 401")


def per_worker_401s(run_dir: Path) -> dict[str, float]:
    """What each worker wrote to its counter file for ``_401``."""
    from prometheus_client.mmap_dict import MmapedDict

    counts = {}
    for path in run_dir.glob("counter_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "lectr_proxy_requests_total" and labels == {
                "provider": "openai",
                "status": "401",
            }:
                counts[path.name] = value
    return counts


def wait_for(predicate, what: str, proc: LectrProcess, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}:\n{proc.output}"
        time.sleep(0.2)


def test_metrics_add_up_over_every_worker(tmp_path, db_url):
    # a run directory left by a supervisor that was killed: never counted
    stale = tmp_path / ".lectr" / "metrics" / "run-1-stale"
    stale.mkdir(parents=True)
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    old = MmapedDict(str(stale / "counter_1.db"))
    old.write_value(
        mmap_key(
            "lectr_proxy_requests",
            "lectr_proxy_requests_total",
            ["provider", "status"],
            ["openai", "401"],
            "",
        ),
        1000.0,
        0.0,
    )
    old.close()

    proc = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_WORKERS="2",
            LECTR_DB_POOL_MIN="2",
            LECTR_DB_POOL_MAX="2",
        ),
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: "Lectr is ready (2 workers)" in proc.output, "not ready", proc, 60)
        assert not stale.exists()
        (run_dir,) = (tmp_path / ".lectr" / "metrics").glob("run-*")

        # until both workers have served some (the kernel spreads connections
        # over them, unevenly at times)
        sent = 0
        while True:
            unauthenticated_requests(proc, 30)
            sent += 30
            counts = wait_for(
                lambda n=sent: (c := per_worker_401s(run_dir)) and sum(c.values()) == n and c,
                "the workers did not write their counts",
                proc,
            )
            if len(counts) == 2 and all(v > 0 for v in counts.values()):
                break
            assert sent < 600, f"one worker served all {sent} requests: {counts}"
        # whichever worker answers the scrape reports the sum
        for _ in range(8):
            samples = scrape(proc)
            assert samples[_401] == sent
            assert samples["lectr_proxy_active_requests"] == 0
            # livesum: both pools (2 connections each)
            assert samples["lectr_db_pool_connections"] == 4
            assert samples['lectr_proxy_request_seconds_count{provider="openai"}'] == sent

        # a worker that dies keeps counting; its replacement adds to the sum
        victim = workers_of(proc)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "is back" in proc.output, "worker not restarted", proc)
        assert not list(run_dir.glob(f"gauge_live*_{victim}.db"))  # its gauges stop counting
        # its replacement took its files over: one per worker, however many died
        counters = sorted(p.name for p in run_dir.glob("counter_*.db"))
        assert counters == ["counter_worker0.db", "counter_worker1.db"]
        unauthenticated_requests(proc, 20)
        wait_for(lambda: scrape(proc)[_401] == sent + 20, "exited worker's counts lost", proc)
        for _ in range(4):
            samples = scrape(proc)
            assert samples[_401] == sent + 20
            assert samples["lectr_db_pool_connections"] == 4  # two live workers, not three
    finally:
        proc.stop_cleanly()
    assert not run_dir.exists()


def test_a_stopping_worker_is_killed_only_after_its_own_stop_could_end():
    """The supervisor kills a worker still stopping LECTR_SHUTDOWN_GRACE +
    KILL_MARGIN after SIGTERM: later than the worker's own bounded steps
    after the grace (the limits' hand-back, the last usage rows written or
    spilled), or a hung database would lose rows still in memory; and the
    compose file gives the supervisor that long."""
    import inspect
    import re
    from pathlib import Path

    from lectr.limits.manager import STOP_STEP_TIMEOUT
    from lectr.usage.recorder import UsageRecorder
    from lectr.workers import KILL_MARGIN

    handback = 2 * STOP_STEP_TIMEOUT
    flush = inspect.signature(UsageRecorder.__init__).parameters["stop_timeout"].default
    assert KILL_MARGIN >= handback + flush + 5.0
    compose = (Path(__file__).parent.parent / "docker" / "docker-compose.yml").read_text()
    grace = float(re.search(r"stop_grace_period: (\d+)s", compose).group(1))
    assert grace >= 30.0 + KILL_MARGIN + 5.0  # (LECTR_SHUTDOWN_GRACE's default: 30 s)
