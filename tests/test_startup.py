"""``twistd lectr`` as an operator meets it: first run, clear start-up
failures, concurrent start-ups. Real processes, real PostgreSQL."""

from __future__ import annotations

import os
import socket
import stat
import time
import urllib.request

import pytest

from tests.support.process import LectrProcess, base_env, new_master_key

pytestmark = pytest.mark.slow


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def assert_one_clear_line(proc: LectrProcess, *needles: str) -> str:
    """The failure is on stderr as exactly one line, with no traceback."""
    assert "Traceback" not in proc.output
    lines = [line for line in proc.stderr_lines if line.strip()]
    assert len(lines) == 1, proc.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_failing(tmp_path, timeout: float = 60.0, **env) -> LectrProcess:
    proc = LectrProcess(base_env(**env), cwd=tmp_path)
    code = proc.wait_exit(timeout)
    assert code != 0, proc.output
    return proc


def test_malformed_database_url(tmp_path):
    proc = run_failing(
        tmp_path, DATABASE_URL="mysql://root:hunter2@db/x", ENCRYPTION_KEY=new_master_key()
    )
    line = assert_one_clear_line(proc, "DATABASE_URL", "malformed")
    assert "hunter2" not in proc.output
    assert line.startswith("lectr:")


def test_database_url_without_encryption_key_refuses_to_start(tmp_path, db_url):
    proc = run_failing(tmp_path, DATABASE_URL=db_url)
    assert_one_clear_line(proc, "ENCRYPTION_KEY is required")


def test_malformed_encryption_key(tmp_path, db_url):
    bad = "bm90LTMyLWJ5dGVz"  # base64 of 12 bytes
    proc = run_failing(tmp_path, DATABASE_URL=db_url, ENCRYPTION_KEY=bad)
    assert_one_clear_line(proc, "ENCRYPTION_KEY", "32 bytes")
    assert bad not in proc.output


def test_unreachable_database_gives_up_after_bounded_retry(tmp_path):
    started = time.monotonic()
    proc = run_failing(
        tmp_path,
        DATABASE_URL="postgresql://lectr:pw-do-not-log@127.0.0.1:1/lectr",
        ENCRYPTION_KEY=new_master_key(),
        LECTR_DB_CONNECT_TIMEOUT="2",
    )
    elapsed = time.monotonic() - started
    line = assert_one_clear_line(proc, "cannot connect to PostgreSQL", "gave up after 2s")
    assert "pw-do-not-log" not in proc.output
    assert "127.0.0.1:1" in line
    assert elapsed < 30


def test_port_in_use(tmp_path, db_url):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        proc = run_failing(
            tmp_path,
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_PROXY_LISTEN=f"tcp:{port}:interface=127.0.0.1",
        )
    finally:
        holder.close()
    assert_one_clear_line(proc, f"cannot listen on tcp:{port}", "proxy", "in use")


@pytest.mark.parametrize("busy", ["proxy", "admin API"])
def test_a_port_in_use_is_found_before_the_database_and_the_token(tmp_path, busy):
    """First run, development mode: the port is checked before the embedded
    PostgreSQL starts and before the one-time admin token is made and
    printed (it would be lost: the next run no longer shows it)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    setting = "LECTR_PROXY_LISTEN" if busy == "proxy" else "LECTR_ADMIN_LISTEN"
    data = tmp_path / "data"
    started = time.monotonic()
    try:
        proc = run_failing(tmp_path, timeout=60, LECTR_DATA_DIR=str(data), **{setting: endpoint})
    finally:
        holder.close()
    assert proc.proc.returncode == 1
    line = assert_one_clear_line(proc, f"cannot listen on {endpoint} ({busy})", "in use")
    assert line.startswith("lectr: start-up failed:")
    assert "admin token" not in proc.output and "DEVELOPMENT MODE" not in proc.output
    assert not data.exists()  # no secrets made, no embedded database started
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("name", "value"),
    [("OTEL_TRACES_SAMPLER", "sometimes"), ("OTEL_BSP_MAX_QUEUE_SIZE", "lots")],
)
def test_a_malformed_otel_variable_is_found_before_anything_is_made(tmp_path, name, value):
    """The OTEL_* variables were read after the ports were bound and, on a
    first run in development mode, after the embedded PostgreSQL and the
    one-time admin token were made and printed: a typo in a tracing setting
    still left secrets behind. They are settings like Lectr's own."""
    data = tmp_path / "data"
    proc = run_failing(
        tmp_path,
        timeout=60,
        LECTR_DATA_DIR=str(data),
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
        **{name: value},
    )
    assert proc.proc.returncode == 1
    line = assert_one_clear_line(proc, name)
    assert line.startswith("lectr: configuration error:")
    assert "admin token" not in proc.output and "DEVELOPMENT MODE" not in proc.output
    assert not data.exists()  # no secrets made, no embedded database started


def test_a_second_instance_in_the_same_directory_says_so_in_one_line(tmp_path, db_url):
    env = base_env(DATABASE_URL=db_url, ENCRYPTION_KEY=new_master_key())
    first = LectrProcess(env, cwd=tmp_path, pidfile=None)  # twistd's default pidfile
    try:
        first.wait_ready()
        assert (tmp_path / "twistd.pid").read_text().strip() == str(first.proc.pid)
        second = LectrProcess(env, cwd=tmp_path, pidfile=None)
        assert second.wait_exit(30) == 1
        line = assert_one_clear_line(second, "already running", f"PID {first.proc.pid}")
        assert line.startswith("lectr: ")
        assert "Another twistd server" not in second.output
        # the first one is unharmed
        assert http_get(first.url("admin", "/healthz"))[0] == 200
    finally:
        first.stop_cleanly()
    assert not (tmp_path / "twistd.pid").exists()


def test_no_migrate_against_an_empty_database(tmp_path, empty_db_url):
    proc = run_failing(
        tmp_path, DATABASE_URL=empty_db_url, ENCRYPTION_KEY=new_master_key(), LECTR_NO_MIGRATE="1"
    )
    assert_one_clear_line(proc, "schema is at revision none")


def test_with_database_url(tmp_path, empty_db_url):
    proc = LectrProcess(
        base_env(DATABASE_URL=empty_db_url, ENCRYPTION_KEY=new_master_key()), cwd=tmp_path
    )
    try:
        proc.wait_ready()
        assert http_get(proc.url("proxy", "/healthz"))[0] == 200
        status, body = http_get(proc.url("admin", "/healthz"))
        assert status == 200
        status, body = http_get(proc.url("admin", "/readyz"))
        assert (status, b"ready" in body) == (200, True)
        assert "DEVELOPMENT MODE" not in proc.output
        assert "schema migrated from empty" in proc.output
        assert (
            "provider base URLs: openai https://api.openai.com, "
            "anthropic https://api.anthropic.com" in proc.output
        )
    finally:
        proc.stop_cleanly()


def test_command_line_wins_over_environment(tmp_path, empty_db_url):
    proc = LectrProcess(
        base_env(
            DATABASE_URL="postgresql://nobody@127.0.0.1:1/nothing", ENCRYPTION_KEY=new_master_key()
        ),
        cwd=tmp_path,
        args=("--database-url", empty_db_url, "--db-pool-min", "1", "--db-pool-max", "3"),
    )
    try:
        proc.wait_ready()
        assert "(1 connections, at most 3)" in proc.output
    finally:
        proc.stop()


def test_two_processes_starting_together_both_come_up(tmp_path, empty_db_url):
    env = base_env(DATABASE_URL=empty_db_url, ENCRYPTION_KEY=new_master_key())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    procs = [LectrProcess(env, cwd=tmp_path / "a"), LectrProcess(env, cwd=tmp_path / "b")]
    try:
        for p in procs:
            p.wait_ready()
            assert http_get(p.url("admin", "/readyz"))[0] == 200
        migrated = [p for p in procs if "schema migrated from empty" in p.output]
        current = [p for p in procs if "schema is current" in p.output]
        assert (len(migrated), len(current)) == (1, 1)
    finally:
        for p in procs:
            p.stop()


def test_first_run_development_mode_and_restart(tmp_path):
    env = base_env(LECTR_DATA_DIR=str(tmp_path / "data"))
    first = LectrProcess(env, cwd=tmp_path)
    try:
        first.wait_ready(timeout=120)
        assert http_get(first.url("proxy", "/healthz"))[0] == 200
        assert http_get(first.url("admin", "/readyz"))[0] == 200
        token = (tmp_path / "data" / "admin.token").read_text().strip()
        assert f"admin token (shown once): {token}" in first.output
        assert "DEVELOPMENT MODE" in first.output
        for name in ("admin.token", "encryption.key"):
            mode = stat.S_IMODE(os.stat(tmp_path / "data" / name).st_mode)
            assert mode == 0o600, (name, oct(mode))
        key = (tmp_path / "data" / "encryption.key").read_text()
        pid_file = tmp_path / "data" / "pg" / "postmaster.pid"
        assert pid_file.exists()
    finally:
        first.stop_cleanly()
    # stopped with Lectr
    assert not pid_file.exists(), first.output

    second = LectrProcess(env, cwd=tmp_path)
    try:
        second.wait_ready(timeout=120)
        assert http_get(second.url("admin", "/readyz"))[0] == 200
        assert token not in second.output  # printed once, on the run that made it
        assert "admin token in" in second.output
        assert (tmp_path / "data" / "encryption.key").read_text() == key
        assert "schema is current" in second.output
    finally:
        second.stop_cleanly()
