"""``--workers N``: one socket, N worker processes, supervision, shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from lectr.workers import ListenSpec
from tests.support.process import LectrProcess, base_env, new_master_key

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
        deadline = time.monotonic() + 60
        while "Lectr is ready (2 workers)" not in proc.output:
            assert time.monotonic() < deadline, proc.output
            assert proc.proc.poll() is None, proc.output
            time.sleep(0.1)
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
