"""Issue 11, from outside: hostile input as classes, through a real
``twistd lectr`` (its memory measured from /proc), a real PostgreSQL and a
fake provider in a process.

- every request that reaches the handler ends exactly once - an answer, one
  request-log row, out of the active set - whatever its target, headers or
  body (generated with hypothesis);
- memory stays flat when 500 requests with 1 MB bodies fail in every way
  after their body was read;
- a request without a valid key never makes Lectr hold its body (50 slow
  30 MiB uploads), a slow body with a key is cut by LECTR_BODY_READ_TIMEOUT,
  and connections waiting without a checked key are capped.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fake_provider import OPENAI_KEY
from tests.support.process import FakeProviderProcess, LectrProcess, base_env, new_master_key

pytestmark = pytest.mark.e2e

TOKEN = "hardening-admin-token-0123456789"


class Gateway:
    def __init__(self, lectr: LectrProcess, db_url: str, fake: FakeProviderProcess) -> None:
        self.lectr = lectr
        self.db_url = db_url
        self.fake = fake
        self.port = lectr.ports["proxy"]
        status, doc = self.admin("POST", "/admin/orgs", {"name": "Hardening"})
        assert status == 201, doc
        self.org_id = doc["org"]["id"]
        self.key = doc["key"]["key"]
        status, doc = self.admin(
            "POST",
            f"/admin/orgs/{self.org_id}/provider-keys",
            {"provider": "openai", "key": OPENAI_KEY},
        )
        assert status == 201, doc

    def admin(self, method: str, path: str, body=None):
        request = urllib.request.Request(
            self.lectr.url("admin", path),
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.lectr.url("admin", "/metrics"), timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    def rss_mib(self) -> float:
        with open(f"/proc/{self.lectr.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def exchange(self, request: bytes, timeout: float = 10.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            try:
                s.sendall(request)
            except OSError:
                pass
            out = b""
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                out += data
            return out

    def rows(self, request_ids: list[str]) -> dict[str, int]:
        conn = psycopg2.connect(self.db_url)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT request_id::text, count(*) FROM request_logs "
                    "WHERE request_id = ANY(%s::uuid[]) GROUP BY 1",
                    (request_ids,),
                )
                return dict(cur.fetchall())
        finally:
            conn.close()

    def wait_idle(self) -> None:
        deadline = time.monotonic() + 10
        while self.metric("lectr_proxy_active_requests") != 0:
            assert time.monotonic() < deadline, "requests still in flight"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def gateway(pg_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    name, db_url = pg_server.create_database()
    fake = FakeProviderProcess()
    lectr = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_ADMIN_TOKEN=TOKEN,
            LECTR_OPENAI_BASE_URL=fake.origin + "/openai",
            LECTR_ANTHROPIC_BASE_URL=fake.origin + "/anthropic",
            LECTR_DATA_DIR=str(tmp / "data"),
            LECTR_BODY_READ_TIMEOUT="2",
            LECTR_MAX_UNAUTHENTICATED="40",
        ),
        cwd=tmp,
    )
    try:
        lectr.wait_ready()
        yield Gateway(lectr, db_url, fake)
    finally:
        lectr.stop()
        fake.stop()
        pg_server.drop_database(name)
    assert "Unhandled error" not in lectr.output, lectr.output
    assert "Traceback" not in lectr.output, lectr.output


def status_of(response: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    return int(m.group(1)) if m else None


def request_id_of(response: bytes) -> str | None:
    head = response.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"\r\nx-lectr-request-id: ([0-9a-f-]{36})", head, re.IGNORECASE)
    return m.group(1).decode() if m else None


# --- every request ends exactly once ---------------------------------------------------------

_ROOTS = [
    b"/v1/chat/completions",
    b"/openai/v1/",
    b"/anthropic/v1/messages",
    b"/v1/models",
    b"/v1/",
]
path_bytes = st.binary(max_size=24).map(
    lambda b: b.replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"")
)
header_names = st.sampled_from(
    [b"X-Test", b"Content-Type", b"Anthropic-Version", b"Accept-Encoding", b"X-Lectr-Session",
     b"Forwarded", b"Cookie", b"Expect", b"Connection", b"X-\x85"]
)  # fmt: skip
header_values = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda model, extra: json.dumps({"model": model, "messages": [], **extra}).encode(),
        st.text(max_size=20),
        st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3),
    ),
)


def test_every_request_ends_exactly_once(gateway):
    seen: list[tuple[int | None, str | None]] = []

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        st.sampled_from(_ROOTS),
        path_bytes,
        st.one_of(st.just(b""), path_bytes.map(lambda q: b"?" + q)),
        st.lists(st.tuples(header_names, header_values), max_size=4),
        bodies,
    )
    def send(root, tail, query, headers, body):
        head = [b"POST " + root + tail + query + b" HTTP/1.1", b"Host: x"]
        head.append(b"Authorization: Bearer " + gateway.key.encode())
        head += [name + b": " + value for name, value in headers]
        head.append(b"Content-Length: %d" % len(body))
        head.append(b"Connection: close")
        response = gateway.exchange(b"\r\n".join(head) + b"\r\n\r\n" + body)
        status = status_of(response)
        assert status is not None, response[:300]
        if status >= 500:  # only ever the provider's own answer, relayed
            assert b"\r\nx-lectr-route: " in response.split(b"\r\n\r\n")[0], response[:300]
        early = status in (401, 404, 413) or b'"message":"The request path' in response
        seen.append((status, request_id_of(response), early))

    send()
    gateway.wait_idle()
    # every request the handler authenticated has exactly one row (a target
    # refused before the key was checked, 401, 404 and 413 have no org)
    handled = [rid for status, rid, early in seen if rid is not None and not early]
    deadline = time.monotonic() + 10
    while True:
        rows = gateway.rows(handled)
        if len(rows) == len(handled) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(rows) == set(handled)
    assert set(rows.values()) <= {1}
    statuses = {status for status, _, _ in seen}
    assert statuses <= {200, 400, 403, 404, 408, 413, 417, 431, 500, 502}, statuses


def test_memory_stays_flat_when_large_requests_fail_after_their_body_was_read(gateway):
    megabyte = b"x" * (1 << 20)
    shapes = [
        # duplicate keys: refused after the body is read
        b'{"model":"gpt-4o","model":"gpt-4o-mini","input":"' + megabyte + b'"}',
        # not JSON although declared so
        b'{"model":"gpt-4o",' + megabyte,
        # a model that is not a model
        b'{"model":"\\u0000","input":"' + megabyte + b'"}',
    ]

    def send(i: int) -> int | None:
        body = shapes[i % len(shapes)]
        request = (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + gateway.key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % len(body)
            + body
        )
        return status_of(gateway.exchange(request))

    for i in range(100):  # warm up: caches, pools, allocator arenas
        assert send(i) == 400
    gateway.wait_idle()
    before = gateway.rss_mib()
    for i in range(500):
        assert send(i) == 400
    gateway.wait_idle()
    after = gateway.rss_mib()
    print(f"RSS over 500 failing 1 MB requests: {before:.1f} MiB -> {after:.1f} MiB")
    assert after - before < 50, (before, after)


def test_requests_without_a_key_never_make_lectr_hold_their_body(gateway):
    """50 connections each announcing a 30 MiB body with no key and trickling
    it: each gets 401 from its headers alone; memory does not grow."""
    before = gateway.rss_mib()
    results: list[int | None] = []

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n" % (30 << 20)
            )
            out = b""
            try:
                for _ in range(200):  # trickle until Lectr closes the connection
                    s.sendall(b"x" * 4096)
                    time.sleep(0.005)
            except OSError:
                pass
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except OSError:
                pass
            results.append(status_of(out))

    threads = [threading.Thread(target=upload) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    after = gateway.rss_mib()
    print(f"RSS with 50 keyless 30 MiB uploads: {before:.1f} MiB -> {after:.1f} MiB")
    assert results == [401] * 50
    assert after - before < 50, (before, after)


def test_a_slow_body_with_a_key_is_cut_by_the_body_deadline(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + gateway.key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        started = time.monotonic()
        out = b""
        try:
            while True:
                s.sendall(b" ")  # one byte at a time: the deadline is total, not per byte
                time.sleep(0.1)
                if time.monotonic() - started > 6:
                    break
        except OSError:
            pass
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    assert status_of(out) == 408, out[:300]
    assert 1.5 < time.monotonic() - started < 6


def test_connections_waiting_without_a_checked_key_are_capped(gateway):
    refused_before = gateway.metric("lectr_http_connections_refused_total")
    idle = []
    try:
        for _ in range(60):  # the cap is 40 (LECTR_MAX_UNAUTHENTICATED)
            idle.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
        time.sleep(0.5)
        closed = 0
        for s in idle:
            s.settimeout(0.2)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        assert closed >= 15, closed
        assert gateway.metric("lectr_http_unadmitted_connections") >= 40
    finally:
        for s in idle:
            s.close()
    # every refusal is counted
    assert gateway.metric("lectr_http_connections_refused_total") - refused_before >= closed
    # the port still serves
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert status_of(gateway.exchange(request)) == 200


# a chunked body whose framing breaks after a valid start: a bad size line, a
# chunk longer or shorter than its size, a bare LF, a missing CRLF
_BROKEN_CHUNKS = st.sampled_from(
    [b"zz\r\nab\r\n", b"2\r\nabc\r\n", b"3\r\nab\r\n\r\n", b"2\nab\n", b"2\r\nab0\r\n", b"-1\r\n"]
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    start=st.sampled_from([b"", b'5\r\n{"a":\r\n']),
    broken=_BROKEN_CHUNKS,
    anthropic=st.booleans(),
)
def test_a_body_with_broken_framing_gets_a_400_in_the_routes_dialect(
    gateway, start, broken, anthropic
):
    path = b"/anthropic/v1/messages" if anthropic else b"/openai/v1/chat/completions"
    out = gateway.exchange(
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + gateway.key.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + start
        + broken
    )
    assert status_of(out) == 400, out[:300]
    doc = json.loads(out.partition(b"\r\n\r\n")[2])
    if anthropic:
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error", doc
    else:
        assert doc["error"]["type"] == "invalid_request_error", doc
        assert doc["error"]["code"] is None  # (OpenAI's own for a malformed request)
