"""lectr.http.server over real loopback TCP: keep-alive, pipelining, the
strictness catalogue (a table and generated variants), body control (the
handler decides before any body byte is read), limits and deadlines,
disconnects, backpressure and the unadmitted-connection cap."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from lectr.http.server import PENDING_MAX, ProxyServerFactory, ServerRequest
from tests.support.http_wire import connect, parse_responses, sleep

JSON = [(b"Content-Type", b"application/json")]
ROOT = Path(__file__).resolve().parents[1]


class Handler:
    """Records what the server hands over; answers according to ``mode``:
    ``echo`` (continue, answer with what was seen), ``deny`` (401 from
    headers_received), ``defer`` (keep the head; the test decides), ``hold``
    (keep the request once its body is in), ``later`` (answer 10 ms later)."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.heads: list[tuple[bytes, bytes, list]] = []
        self.bodies: list[bytes] = []
        self.errors: list[tuple[int, str]] = []
        self.pending: list = []
        self.lost: list = []
        self.active = 0
        self.max_active = 0

    def headers_received(self, req):
        self.heads.append((req.method, req.target, list(req.headers)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        req.on_lost = self.lost.append
        if self.mode == "deny":
            self.active -= 1
            req.respond(401, JSON, b'{"error":"no key"}')
            return
        if self.mode == "defer":
            self.pending.append(req)
            return
        req.admit()
        req.continue_body()

    def body_received(self, req):
        self.bodies.append(req.body)
        if self.mode == "hold":
            self.pending.append(req)
            return
        if self.mode == "later":
            reactor.callLater(0.01, self.answer, req)
            return
        self.answer(req)

    def answer(self, req):
        self.active -= 1
        doc = {
            "method": req.method.decode(),
            "target": req.target.decode("latin-1"),
            "path": req.path.decode("latin-1"),
            "query": req.query.decode("latin-1"),
            "body": len(req.body),
            "version": req.version.decode(),
        }
        req.respond(200, JSON, json.dumps(doc).encode())

    def request_error(self, req, status, kind, message):
        self.errors.append((status, kind))
        self.active -= 1
        req.respond(status, JSON, json.dumps({"kind": kind}).encode())


class Server:
    def __init__(self, handler: Handler, **opts) -> None:
        options = dict(
            reactor=reactor,
            max_body_bytes=1_000_000,
            body_timeout=5.0,
            header_timeout=5.0,
            keepalive_timeout=5.0,
        )
        options.update(opts)
        self.handler = handler
        self.factory = ProxyServerFactory(handler, **options)
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port


@pytest.fixture
def servers():
    started: list[Server] = []

    def make(handler: Handler | None = None, **opts) -> Server:
        s = Server(handler or Handler(), **opts)
        started.append(s)
        return s

    yield make
    for s in started:
        pytest_twisted.blockon(s.listening.stopListening())


def post(target: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        target,
        len(body),
        extra,
        body,
    )


async def held_request(servers):
    """A client connection and the request it sent, held by the handler
    with its body read (``Handler("hold")``): the test answers it."""
    handler = Handler("hold")
    s = servers(handler)
    c = await connect(s.port)
    c.send(post(b"/v1/x", b"{}"))
    while not handler.pending:
        await sleep(0.01)
    (req,) = handler.pending
    return c, req


# --- keep-alive and pipelining -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keep_alive_serves_several_requests_on_one_connection(servers):
    s = servers()
    c = await connect(s.port)
    for i in range(3):
        c.send(post(b"/v1/x?i=%d" % i, b"{}" * i))
        (resp,) = (await c.responses(i + 1))[i:]
        doc = json.loads(resp.body)
        assert resp.status == 200 and doc["query"] == f"?i={i}" and doc["body"] == 2 * i
        assert resp.header(b"connection") is None
    assert not c.closed
    c.close()


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order_one_at_a_time(servers):
    s = servers(Handler("later"))
    c = await connect(s.port)
    c.send(b"".join(post(b"/p/%d" % i, b"x" * i) for i in range(5)) + b"GET /p/5 HTTP/1.1\r\n\r\n")
    resps = await c.responses(6)
    assert [json.loads(r.body)["path"] for r in resps] == [f"/p/{i}" for i in range(6)]
    assert [json.loads(r.body)["body"] for r in resps] == [0, 1, 2, 3, 4, 0]
    assert s.handler.max_active == 1
    assert not c.closed
    c.close()


@pytest_twisted.ensureDeferred
async def test_http10_close_delimited_and_keep_alive(servers):
    class Streaming(Handler):
        def answer(self, req):
            req.start_response(200, None, JSON, None)
            req.write(b"abc")
            req.write_sequence([b"d", b"ef"])
            req.finish()

    s = servers(Streaming())
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.0\r\n\r\n")
    await c.closed_by_server()
    assert bytes(c.data).endswith(b"\r\n\r\nabcdef")
    assert b"transfer-encoding" not in bytes(c.data).lower()
    # HTTP/1.1: chunked, kept alive
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\n\r\n")
    (resp,) = await c.responses(1)
    assert resp.body == b"abcdef" and resp.header(b"transfer-encoding") == b"chunked"
    assert not c.closed
    c.close()
    # HTTP/1.0 keep-alive with a length
    s2 = servers()
    c = await connect(s2.port)
    c.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    (resp,) = await c.responses(1)
    assert resp.header(b"connection") == b"keep-alive"
    c.send(b"GET /b HTTP/1.0\r\n\r\n")
    await c.closed_by_server()
    assert len(parse_responses(bytes(c.data))) == 2


@pytest_twisted.ensureDeferred
async def test_head_and_204_never_carry_a_body(servers):
    class Bodies(Handler):
        def answer(self, req):
            status = 204 if req.path == b"/nc" else 200
            req.start_response(status, None, JSON, None if status == 204 else 5)
            req.write(b"hello")
            req.finish()

    s = servers(Bodies())
    c = await connect(s.port)
    c.send(b"HEAD /a HTTP/1.1\r\n\r\n")
    await c.until(lambda c: b"\r\n\r\n" in c.data)
    await sleep(0.05)
    assert bytes(c.data).endswith(b"Content-Length: 5\r\n\r\n")  # the length, no body
    c.data.clear()
    c.send(b"GET /nc HTTP/1.1\r\n\r\n")
    await c.until(lambda c: b"\r\n\r\n" in c.data)
    await sleep(0.05)
    raw = bytes(c.data)
    assert raw.startswith(b"HTTP/1.1 204 ") and raw.endswith(b"\r\n\r\n")
    assert b"content-length" not in raw.lower() and b"transfer-encoding" not in raw.lower()
    c.close()


@pytest_twisted.ensureDeferred
async def test_response_header_injection_is_refused(servers):
    class Injecting(Handler):
        def answer(self, req):
            req.respond(200, [(b"X-Evil", b"a\r\nSet-Cookie: x=1")], b"{}")

    s = servers(Injecting())
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\n\r\n")
    (resp,) = await c.responses(1)
    assert resp.status == 500 and resp.header(b"set-cookie") is None


# --- strictness -------------------------------------------------------------------------------------

CATALOGUE = [
    ("CL with TE", b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("two CL, differing", b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"),
    ("two CL, same", b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    ("CL list", b"POST /a HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc"),
    ("CL sign", b"POST /a HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc"),
    ("CL negative", b"POST /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
    ("TE gzip", b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("TE gzip, chunked", b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("TE chunked, gzip", b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
    (
        "TE twice",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    ("TE on HTTP/1.0", b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    (
        "bad chunk size",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    ),
    ("chunk bare LF", b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\n0\n\n"),
    ("obs-fold", b"GET /a HTTP/1.1\r\nX: a\r\n b\r\n\r\n"),
    ("leading whitespace line", b"GET /a HTTP/1.1\r\n X: a\r\n\r\n"),
    ("bare LF", b"GET /a HTTP/1.1\nX: a\n\n"),
    ("bare CR in value", b"GET /a HTTP/1.1\r\nX: a\rb\r\n\r\n"),
    ("NUL in value", b"GET /a HTTP/1.1\r\nX: a\x00b\r\n\r\n"),
    ("DEL in value", b"GET /a HTTP/1.1\r\nX: a\x7fb\r\n\r\n"),
    ("CTL in value", b"GET /a HTTP/1.1\r\nX: a\x01b\r\n\r\n"),
    ("space in name", b"GET /a HTTP/1.1\r\nX Y: a\r\n\r\n"),
    ("space before colon", b"GET /a HTTP/1.1\r\nX : a\r\n\r\n"),
    ("quote in name", b'GET /a HTTP/1.1\r\nX"Y: a\r\n\r\n'),
    ("empty name", b"GET /a HTTP/1.1\r\n: a\r\n\r\n"),
    ("NUL in target", b"GET /a\x00 HTTP/1.1\r\n\r\n"),
    ("space-split target", b"GET /a b HTTP/1.1\r\n\r\n"),
    ("tab in target", b"GET /a\tb HTTP/1.1\r\n\r\n"),
    ("DEL in target", b"GET /a\x7f HTTP/1.1\r\n\r\n"),
    ("0x80 in target", b"GET /a\x80 HTTP/1.1\r\n\r\n"),
    ("0x9f in query", b"GET /a?q=\x9f HTTP/1.1\r\n\r\n"),
    ("UTF-8 in target", "GET /é HTTP/1.1\r\n\r\n".encode()),
    ("fragment", b"GET /a#b HTTP/1.1\r\n\r\n"),
    ("lone percent", b"GET /a%zz HTTP/1.1\r\n\r\n"),
    ("truncated percent", b"GET /a%2 HTTP/1.1\r\n\r\n"),
    ("absolute-form", b"GET http://evil.example/a HTTP/1.1\r\n\r\n"),
    ("authority-form", b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n"),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n\r\n"),
    ("relative target", b"GET a/b HTTP/1.1\r\n\r\n"),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n\r\n"),
    ("HTTP/0.9", b"GET / HTTP/0.9\r\n\r\n"),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\n\r\n"),
    ("lower-case method", b"get / HTTP/1.1\r\n\r\n"),
    ("unknown method", b"FROB / HTTP/1.1\r\n\r\n"),
    ("upgrade", b"GET /a HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"),
    ("unknown expectation", b"POST /a HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx"),
    ("binary garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
]


@pytest.mark.parametrize("name,raw", CATALOGUE, ids=[c[0] for c in CATALOGUE])
@pytest_twisted.ensureDeferred
async def test_catalogue_of_refused_requests(servers, name, raw):
    s = servers()
    c = await connect(s.port)
    c.send(raw)
    await c.closed_by_server()
    resps = parse_responses(bytes(c.data))
    assert len(resps) == 1 and resps[0].status == 400, bytes(c.data)[:200]
    assert resps[0].header(b"connection") == b"close"
    assert s.handler.bodies == []
    if name not in ("bad chunk size", "chunk bare LF"):
        assert s.handler.heads == []  # refused before the handler saw anything
        assert json.loads(resps[0].body)["error"]["message"]
    else:
        # a malformed body of a request in hand: the handler answers in its dialect
        assert s.handler.errors == [(400, "bad_request")]
        assert json.loads(resps[0].body) == {"kind": "bad_request"}


@pytest_twisted.ensureDeferred
async def test_header_section_over_the_limit_is_431(servers):
    s = servers(max_header_bytes=4096)
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    await c.closed_by_server()
    (resp,) = parse_responses(bytes(c.data))
    assert resp.status == 431 and s.handler.heads == []
    # many small headers count too; and a head that never ends, fed slowly
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\n" + b"X-A: b\r\n" * 600 + b"\r\n")
    await c.closed_by_server()
    assert parse_responses(bytes(c.data))[0].status == 431
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\nX-Big: ")
    for _ in range(10):
        if c.closed:
            break
        c.send(b"a" * 1000)
        await sleep(0.01)
    await c.closed_by_server()
    assert parse_responses(bytes(c.data))[0].status == 431


def _target_is_valid(target: bytes) -> bool:
    """The rule, stated independently of the server's regular expression."""
    if not target.startswith(b"/"):
        return False
    i = 0
    while i < len(target):
        b = target[i]
        if b == 0x25:  # '%'
            hexdigits = b"0123456789abcdefABCDEF"
            if i + 2 >= len(target) + 0 or not (
                target[i + 1 : i + 2] and target[i + 1] in hexdigits and target[i + 2] in hexdigits
            ):
                return False
            i += 3
            continue
        if b <= 0x20 or b >= 0x7F or b == 0x23:
            return False
        i += 1
    return True


_target_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"/", b"?", b"%", b"%2F", b"%zz", b"#", b"a", b"=", b"&", b"~", b"%4"]),
        st.binary(min_size=1, max_size=1),
    ),
    max_size=12,
).map(lambda parts: b"/" + b"".join(parts))


@pytest.fixture(scope="module")
def echo_port():
    """A lectr.http echo server in its own process: the property tests below
    talk to it with blocking sockets (the reactor of this process would be
    blocked by them)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.http_echo"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


def _blocking_exchange(port: int, raw: bytes) -> list:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        data = b""
        while not parse_responses(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return parse_responses(data)


@settings(max_examples=300, deadline=None)
@given(target=_target_bytes)
def test_generated_targets_are_refused_or_seen_exactly(echo_port, target):
    assume(b"\r\n" not in target)
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    resps = _blocking_exchange(echo_port, raw)
    assert len(resps) == 1
    # Spaces after the target are delimiters (RFC 9112 §3 lets a server parse
    # the request line on whitespace boundaries): "GET /a  HTTP/1.1" is "/a".
    target = target.rstrip(b" ")
    if _target_is_valid(target):
        assert resps[0].status == 200, target
        assert json.loads(resps[0].body)["target"].encode("latin-1") == target
    else:
        assert resps[0].status == 400, target


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=24))
def test_generated_header_values_are_refused_or_seen_exactly(echo_port, value):
    assume(b"\r\n" not in value)
    raw = b"GET /a HTTP/1.1\r\nX-Test: " + value + b"\r\nHost: x\r\n\r\n"
    resps = _blocking_exchange(echo_port, raw)
    assert len(resps) == 1
    # field-content: VCHAR, SP, HTAB, obs-text (0x80-0xFF); nothing else
    valid = all(b == 9 or 0x20 <= b <= 0x7E or b >= 0x80 for b in value)
    if valid:
        assert resps[0].status == 200, value
        seen = [(n, v.encode("latin-1")) for n, v in json.loads(resps[0].body)["headers"]]
        assert ("X-Test", value.strip(b" \t")) in seen
    else:
        assert resps[0].status == 400, value


@settings(max_examples=150, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=40), min_size=1, max_size=4),
    cut=st.integers(min_value=1, max_value=400),
)
def test_generated_pipelines_split_anywhere_are_answered_in_order(echo_port, bodies, cut):
    """Several requests (Content-Length and chunked bodies) in one stream,
    delivered in two writes split at an arbitrary point."""
    raw = b""
    for i, body in enumerate(bodies):
        if i % 2:
            raw += b"POST /r%d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % i
            raw += (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        else:
            raw += post(b"/r%d" % i, body)
    with socket.create_connection(("127.0.0.1", echo_port), timeout=5) as sock:
        sock.sendall(raw[:cut])
        time.sleep(0.002)
        sock.sendall(raw[cut:])
        data = b""
        while len(parse_responses(data)) < len(bodies):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    docs = [json.loads(r.body) for r in parse_responses(data)]
    assert [d["target"] for d in docs] == [f"/r{i}" for i in range(len(bodies))]
    assert [d["body"].encode("latin-1") for d in docs] == bodies


# --- body control ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_100_continue_only_after_continue_body(servers):
    s = servers(Handler("defer"))
    c = await connect(s.port)
    c.send(b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    await c.until(lambda c: s.handler.pending)
    await sleep(0.2)
    assert bytes(c.data) == b""  # no 100 before the handler said so
    (req,) = s.handler.pending
    req.continue_body()
    await c.until(lambda c: b"100 Continue" in c.data)
    assert bytes(c.data) == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hello")
    await c.until(lambda c: s.handler.bodies)
    assert s.handler.bodies == [b"hello"]
    s.handler.answer(req)
    resps = await c.responses(2)
    assert [r.status for r in resps] == [100, 200]
    c.close()


@pytest_twisted.ensureDeferred
async def test_no_body_byte_is_read_before_the_handler_decides(servers):
    """The handler waits (an async key check); the client sends its body at
    once; the server does not read the socket meanwhile."""
    s = servers(Handler("defer"))
    c = await connect(s.port)
    c.send(b"POST /a HTTP/1.1\r\nContent-Length: 300000\r\n\r\n")
    await c.until(lambda c: s.handler.pending)
    c.send(b"x" * 300000)
    await sleep(0.3)
    (req,) = s.handler.pending
    assert req._size == 0 and not req._chunks
    assert req._proto._held_size == 0
    req.continue_body()
    await c.until(lambda c: s.handler.bodies)
    assert s.handler.bodies == [b"x" * 300000]
    s.handler.answer(req)
    (resp,) = await c.responses(1)
    assert json.loads(resp.body)["body"] == 300000
    c.close()


@pytest_twisted.ensureDeferred
async def test_answer_in_headers_received_closes_without_reading_the_body(servers):
    s = servers(Handler("deny"))
    c = await connect(s.port)
    c.send(b"POST /a HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"y" * 1000)
    await c.closed_by_server()
    (resp,) = parse_responses(bytes(c.data))
    assert resp.status == 401 and resp.header(b"connection") == b"close"
    assert s.handler.bodies == []
    # a bodyless request answered at once keeps the connection
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    resps = await c.responses(2)
    assert [r.status for r in resps] == [401, 401] and not c.closed
    c.close()


@pytest_twisted.ensureDeferred
async def test_declared_length_over_the_cap_is_413_before_reading(servers):
    s = servers(max_body_bytes=1000)
    c = await connect(s.port)
    c.send(b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n")
    await c.closed_by_server()
    (resp,) = parse_responses(bytes(c.data))
    assert resp.status == 413 and json.loads(resp.body) == {"kind": "too_large"}
    assert b"100 Continue" not in bytes(c.data)
    assert s.handler.errors == [(413, "too_large")] and s.handler.heads == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_passing_the_cap_is_413_at_once(servers):
    s = servers(max_body_bytes=1000)
    c = await connect(s.port)
    c.send(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"258\r\n" + b"a" * 600 + b"\r\n")
    await sleep(0.05)
    assert not c.closed
    c.send(b"258\r\n" + b"a" * 600 + b"\r\n")  # 1200 > 1000, the stream not finished
    await c.closed_by_server()
    (resp,) = parse_responses(bytes(c.data))
    assert resp.status == 413 and s.handler.errors == [(413, "too_large")]
    assert s.handler.bodies == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_within_the_cap(servers):
    s = servers(max_body_bytes=1000)
    c = await connect(s.port)
    c.send(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    c.send(b"2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
    (resp,) = await c.responses(1)
    assert json.loads(resp.body)["body"] == 5 and s.handler.bodies == [b"abcde"]
    assert all(name != b"X-Trailer" for name, _ in s.handler.heads[0][2])


@pytest_twisted.ensureDeferred
async def test_body_deadline_is_total_and_answers_408(servers):
    s = servers(body_timeout=0.4)
    c = await connect(s.port)
    c.send(b"POST /a HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
    t0 = reactor.seconds()
    for _ in range(20):  # a byte every 50 ms: the deadline is not reset per byte
        if c.closed:
            break
        c.send(b"z")
        await sleep(0.05)
    await c.closed_by_server()
    assert 0.35 <= reactor.seconds() - t0 < 1.0
    (resp,) = parse_responses(bytes(c.data))
    assert resp.status == 408 and s.handler.errors == [(408, "body_timeout")]


@pytest_twisted.ensureDeferred
async def test_header_timeout_closes_a_slow_head(servers):
    s = servers(header_timeout=0.3)
    c = await connect(s.port)
    t0 = reactor.seconds()
    for piece in (b"GET /a HT", b"TP/1.1\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n"):
        if c.closed:
            break
        c.send(piece)
        await sleep(0.1)
    await c.closed_by_server()
    assert 0.25 <= reactor.seconds() - t0 < 1.0
    assert bytes(c.data) == b"" and s.factory.header_timeouts == 1 and s.handler.heads == []
    # an idle new connection too
    c = await connect(s.port)
    await c.closed_by_server()


@pytest_twisted.ensureDeferred
async def test_keepalive_timeout_closes_an_idle_connection(servers):
    s = servers(keepalive_timeout=0.3, header_timeout=5)
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\n\r\n")
    await c.responses(1)
    t0 = reactor.seconds()
    await c.closed_by_server()
    assert 0.25 <= reactor.seconds() - t0 < 1.0


# --- disconnects and backpressure ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_on_lost_when_the_client_goes_away(servers):
    s = servers(Handler("hold"))
    c = await connect(s.port)
    c.send(post(b"/a", b"{}"))
    await c.until(lambda c: s.handler.pending)
    (req,) = s.handler.pending
    c.close()
    await c.closed_by_server()
    await sleep(0.05)
    assert len(s.handler.lost) == 1 and req.finished
    req.write(b"late")  # never written after the end, no error
    # and never after a finish
    s2 = servers()
    c = await connect(s2.port)
    c.send(post(b"/a", b"{}"))
    await c.responses(1)
    c.close()
    await sleep(0.05)
    assert s2.handler.lost == []


class _Producer:
    """Stands for the upstream: writes 64 KiB whenever it is not paused."""

    def __init__(self, req, total: int) -> None:
        self.req = req
        self.left = total
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True

    def pump(self):
        if self.stopped:
            return
        while not self.paused and self.left > 0:
            self.req.write(b"s" * 65536)
            self.left -= 65536
        if self.left > 0:
            reactor.callLater(0.001, self.pump)
        else:
            self.req.clear_producer()
            self.req.finish()


@pytest_twisted.ensureDeferred
async def test_backpressure_pauses_the_producer_and_bounds_memory(servers):
    s = servers(Handler("hold"))
    c = await connect(s.port)
    c.transport.pauseProducing()  # a client that does not read
    c.send(post(b"/a", b"{}"))
    await c.until(lambda c: s.handler.pending)
    (req,) = s.handler.pending
    req.start_response(200, None, [(b"Content-Type", b"text/event-stream")], None)
    producer = _Producer(req, 64 * 1024 * 1024)
    req.set_producer(producer)
    producer.pump()
    # the kernel's socket buffers fill first (megabytes), then the producer
    # stays paused
    left = None
    for _ in range(60):
        await sleep(0.25)
        if producer.paused and producer.left == left:
            break
        left = producer.left
    assert producer.paused and producer.left == left and producer.pauses >= 1
    transport = req._proto.transport
    buffered = len(transport.dataBuffer) + sum(map(len, transport._tempDataBuffer))
    assert buffered < 2 * 1024 * 1024  # bounded, not 64 MiB
    assert producer.left > 32 * 1024 * 1024
    c.transport.resumeProducing()
    await c.until(lambda c: c.data.endswith(b"0\r\n\r\n"), timeout=30)
    assert producer.left <= 0 and not producer.stopped
    c.close()


@pytest_twisted.ensureDeferred
async def test_abort_mid_response_never_looks_complete(servers):
    s = servers(Handler("hold"))
    c = await connect(s.port)
    c.send(post(b"/a", b"{}"))
    await c.until(lambda c: s.handler.pending)
    (req,) = s.handler.pending
    req.start_response(200, None, [], None)
    req.write(b"partial")
    req.abort()
    await c.closed_by_server()
    assert not bytes(c.data).endswith(b"0\r\n\r\n")
    assert s.handler.lost == []  # on_lost is not called for the handler's own abort


@pytest_twisted.ensureDeferred
async def test_handler_exception_becomes_500_not_a_hang(servers):
    class Broken(Handler):
        def body_received(self, req):
            raise RuntimeError("boom")

    s = servers(Broken())
    c = await connect(s.port)
    c.send(post(b"/a", b"{}"))
    await c.closed_by_server()
    (resp,) = parse_responses(bytes(c.data))
    assert resp.status == 500 and b"boom" not in resp.body


# --- the unadmitted-connection cap -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_over_the_unadmitted_cap_are_closed_at_once(servers):
    s = servers(Handler("defer"), max_unadmitted=2)
    a = await connect(s.port)
    b = await connect(s.port)
    await sleep(0.05)
    assert s.factory.unadmitted == 2
    c = await connect(s.port)
    await c.closed_by_server(timeout=2)
    assert s.factory.refused_unadmitted == 1
    # admitting one frees a place
    a.send(b"GET /a HTTP/1.1\r\n\r\n")
    await a.until(lambda _: s.handler.pending)
    s.handler.pending[0].admit()
    assert s.factory.unadmitted == 1
    d = await connect(s.port)
    await sleep(0.1)
    assert not d.closed and s.factory.unadmitted == 2
    # closing an unadmitted connection frees a place too
    b.close()
    await sleep(0.1)
    assert s.factory.unadmitted == 1
    for x in (a, d):
        x.close()


def test_status_lines_are_well_formed():
    from lectr.http.server import _STATUS_LINES

    assert _STATUS_LINES[200] == b"HTTP/1.1 200 OK\r\n"
    assert all(re.fullmatch(rb"HTTP/1\.1 \d{3} [ -~]+\r\n", v) for v in _STATUS_LINES.values())


@pytest_twisted.ensureDeferred
async def test_client_connections_send_small_writes_at_once(servers):
    """TCP_NODELAY on every accepted connection: each relayed event is sent
    as it is written, not held back until the previous one is acknowledged
    (the client's delayed ACK would stall a stream by up to 40 ms)."""
    c, req = await held_request(servers)
    sock = req._proto.transport.getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    c.close()


@pytest_twisted.ensureDeferred
async def test_a_turns_writes_go_out_at_its_end_in_order_without_a_write_registration(servers):
    """An answer's head, its chunks and its last chunk, written in one
    reactor turn, are not sent one by one: they leave together at the end of
    the turn, in order, without registering the socket for writability (two
    epoll_ctl calls and a dispatch per answer on Twisted's own path)."""
    c, req = await held_request(servers)
    transport = req._proto.transport
    registrations = []
    start_writing = transport.startWriting
    transport.startWriting = lambda: (registrations.append(1), start_writing())
    req.start_response(200, None, [(b"Content-Type", b"text/event-stream")], None)
    req.write(b"data: 1\n\n")
    req.write_sequence([b"data: ", b"2\n\n"])
    assert req._proto._pending  # held until the turn ends
    req.finish()
    await c.until(lambda c: c.data.endswith(b"0\r\n\r\n"))
    head, _, body = c.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
    assert registrations == [] and req._proto._pending is None
    c.close()


@pytest_twisted.ensureDeferred
async def test_what_runs_after_a_turns_answers_are_sent_runs_once_they_are(servers):
    """``after_sent``: bookkeeping that need not hold an answer back (the
    proxy records a request there) runs at the end of the turn, once the
    turn's answers are in the kernel, in the order it was asked for; one
    that raises is logged and the next still runs - also once the client
    has gone."""
    c, req = await held_request(servers)
    proto = req._proto
    seen = []
    failures = []

    def observe(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"].type)

    req.start_response(200, None, [(b"Content-Type", b"application/json")], 2)
    req.write(b"{}")
    req.finish()
    req.after_sent(lambda: seen.append(("first", proto._pending)))
    req.after_sent(lambda: 1 / 0)
    req.after_sent(lambda: seen.append(("third", proto._pending)))
    assert seen == [] and proto._pending  # (nothing ran, nothing was sent yet)
    globalLogPublisher.addObserver(observe)
    try:
        await c.until(lambda c: c.data.endswith(b"{}"))
        assert seen == [("first", None), ("third", None)]
        assert failures == [ZeroDivisionError]
    finally:
        globalLogPublisher.removeObserver(observe)
    c.close()
    await sleep(0.05)
    req.after_sent(lambda: seen.append("after the client left"))
    await sleep(0.05)
    assert seen[2:] == ["after the client left"]


@pytest_twisted.ensureDeferred
async def test_a_turns_writes_over_the_bound_go_at_once(servers):
    """Past PENDING_MAX bytes a connection's writes of the turn go into the
    transport at once, so that its buffer, not an unbounded list, is what
    pauses a producer."""
    c, req = await held_request(servers)
    req.start_response(200, None, [(b"Content-Type", b"application/octet-stream")], None)
    piece = b"x" * 1024
    writes = 0
    while True:
        req.write(piece)
        writes += 1
        if req._proto._pending is None:  # the bound was passed: sent at once
            break
        assert req._proto._pending_size <= PENDING_MAX
    assert writes == PENDING_MAX // (len(piece) + 7) + 1  # (7: the chunk's framing)
    req.finish()
    await c.until(lambda c: c.data.endswith(b"0\r\n\r\n"))
    c.close()


class _Proto:
    _closing = False


class _Proto:
    _closing = False


_FRAMING_NAMES = ("content-length", "transfer-encoding", "connection", "keep-alive")


@settings(max_examples=1000, deadline=None)
@given(
    headers=st.lists(
        st.tuples(
            st.one_of(
                st.binary(min_size=1, max_size=12),
                st.sampled_from(_FRAMING_NAMES)
                .flatmap(lambda n: st.sampled_from([n, n.upper(), n.title()]))
                .map(str.encode),
            ),
            st.binary(max_size=12),
        ),
        max_size=6,
    ),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
    block=st.lists(st.from_regex(rb"\A[0-9a-z]{0,8}\Z"), max_size=3),
)
# a CR and an LF in a value next to a block of lines
@example(headers=[(b"x", b"\n\r")], length=None, block=[b""])
@example(headers=[(b"x", b"\r")], length=0, block=[b"1", b"2"])
def test_generated_response_heads_keep_one_line_per_header(headers, length, block):
    """The head a handler's headers make: framing headers (any case) are the
    server's own and dropped; any CR or LF in a name or value is refused
    (response splitting), never written, whatever block of Lectr's own lines
    comes with it; every other header appears exactly once, as given, then
    the block as it is."""
    rendered = b"".join(b"x-block: " + v + b"\r\n" for v in block)
    req = ServerRequest(_Proto())
    req._keep_alive = True
    req._complete = True
    req.method = b"POST"
    kept = [(n, v) for n, v in headers if n.lower().decode("latin-1") not in _FRAMING_NAMES]
    if any(b"\r" in n + v or b"\n" in n + v for n, v in kept):
        with pytest.raises(ValueError):
            req._head(200, None, headers, length, rendered)
        return
    head = req._head(200, None, headers, length, rendered)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and lines[-2:] == [b"", b""]
    framing = [b"Content-Length: %d" % length] if length is not None else []
    if length is None:
        framing = [b"Transfer-Encoding: chunked"]
    extra = [b"x-block: " + v for v in block]
    assert lines[1:-2] == [n + b": " + v for n, v in kept] + framing + extra


async def _two_held(servers):
    """Two client connections to one server (one factory: one TurnWrites),
    each with a request the handler holds."""
    handler = Handler("hold")
    s = servers(handler)
    a = await connect(s.port)
    b = await connect(s.port)
    a.send(post(b"/a", b"{}"))
    await a.until(lambda _: len(handler.pending) == 1)
    b.send(post(b"/b", b"{}"))
    await b.until(lambda _: len(handler.pending) == 2)
    ra, rb = handler.pending
    assert ra.path == b"/a" and rb.path == b"/b"
    return s, a, b, ra, rb


async def _queue_behind_a_slow_reader(client, req) -> None:
    """The client stops reading and the answer's first chunk is more than the
    kernel takes: the rest waits in Twisted's queue, so the connection's
    next writes go through ``writeSequence`` (which refuses a bytearray,
    where ``sendmsg`` - taken when nothing is queued - accepts one)."""
    client.transport.pauseProducing()
    req.start_response(200, None, [(b"Content-Type", b"application/octet-stream")], None)
    req.write(b"x" * (32 << 20))
    transport = req._proto.transport
    assert transport._tempDataLen or transport.dataBuffer
    await sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_a_send_that_raises_cuts_its_connection_alone_and_the_turns_other_answers_go(
    servers,
):
    """A turn's writes go out together at its end; one connection's send
    raising there (anything but a socket error) must not keep the other
    connections' answers from leaving, and its own connection is cut."""
    s, a, b, ra, rb = await _two_held(servers)
    await _queue_behind_a_slow_reader(a, ra)
    # one turn: A writes a part its transport refuses, B answers
    ra.write(bytearray(b"more"))
    rb.respond(200, JSON, b'{"ok":true}')
    got = await b.responses(1, timeout=2.0)
    assert [r.status for r in got] == [200]
    assert rb._proto._pending is None
    a.transport.resumeProducing()
    await a.closed_by_server()
    b.close()


@pytest_twisted.ensureDeferred
async def test_an_answer_whose_send_raised_does_not_go_on_to_look_complete(servers):
    """The same failed send seen from its own connection: the part is gone,
    so the answer must end cut (no last chunk), never complete without it."""
    handler = Handler("hold")
    s = servers(handler)
    a = await connect(s.port)
    a.send(post(b"/a", b"{}"))
    await a.until(lambda _: handler.pending)
    (ra,) = handler.pending
    await _queue_behind_a_slow_reader(a, ra)
    ra.write(bytearray(b"MIDDLE"))
    await sleep(0.05)
    if not ra.finished:
        ra.write(b"END")
        ra.finish()
    a.transport.resumeProducing()
    await a.until(lambda c: c.closed or c.data.endswith(b"0\r\n\r\n"), timeout=30)
    assert a.closed
    assert not bytes(a.data).endswith(b"0\r\n\r\n")


CHUNKED_HEAD = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _chunked_trailers(s, start: bytes, piece: bytes, times: int, end: bytes):
    """A 1-byte chunked body whose trailer section begins with ``start``,
    then ``piece`` sent ``times`` times (while the server listens), then
    ``end``; the client and the answers it got."""
    c = await connect(s.port)
    c.send(CHUNKED_HEAD + b"1\r\nx\r\n0\r\n" + start)
    for _ in range(times):
        if c.closed:
            break
        c.send(piece)
        await sleep(0.002)
    if not c.closed:
        c.send(end)
    await c.until(lambda c: c.closed or parse_responses(bytes(c.data)), timeout=5)
    return c, parse_responses(bytes(c.data))


@pytest_twisted.ensureDeferred
async def test_chunked_trailer_section_is_bounded(servers):
    """A trailer field of 2 MiB (limits: 4 KiB head, 1000-byte body) is
    refused: httptools accumulates it (bytes +=, per read), so the bytes read
    after a head are bounded by the body and head limits together."""
    s = servers(max_header_bytes=4096, max_body_bytes=1000)
    c, resps = await _chunked_trailers(s, b"X-Trailer: ", b"a" * 65536, 32, b"\r\n\r\n")
    assert c.closed or not resps or resps[0].status != 200, resps[0]
    assert not resps or resps[0].status in (400, 413, 431), resps[0].status


@pytest_twisted.ensureDeferred
async def test_many_small_trailer_fields_are_bounded(servers):
    """100 000 trailer fields (~1 MiB) behind a 1-byte chunked body, with a
    4 KiB head limit: refused too."""
    s = servers(max_header_bytes=4096, max_body_bytes=1000)
    _, resps = await _chunked_trailers(s, b"", b"X-T: a\r\n" * 8192, 13, b"\r\n")
    assert not resps or resps[0].status in (400, 413, 431), resps[0].status


@pytest_twisted.ensureDeferred
async def test_head_begun_behind_an_async_answer_is_bound_by_header_timeout(servers):
    """Request A and the first bytes of B's head in one write, A answered
    asynchronously: B's head is bound by header_timeout from when it began,
    not by keepalive_timeout (300 s in production against 30 s: a slowloris
    head would live 10x longer). Here: header_timeout 0.3 s, keep-alive 10 s."""
    s = servers(Handler("later"), header_timeout=0.3, keepalive_timeout=10.0)
    c = await connect(s.port)
    c.send(post(b"/a", b"{}") + b"GET /b HTTP/1.1\r\nX-Slow: ")
    (resp,) = await c.responses(1)
    assert resp.status == 200
    for _ in range(20):  # 2 s of a head trickling in, one byte per 100 ms
        if c.closed:
            break
        c.send(b"a")
        await sleep(0.1)
    assert c.closed, "a head still arriving 2 s after it began (header_timeout 0.3 s)"


@pytest_twisted.ensureDeferred
async def test_head_begun_behind_an_async_answer_is_not_cut_by_keepalive(servers):
    """The other side: with keepalive_timeout shorter than header_timeout, a
    head that is arriving is not cut by the keep-alive (idle) deadline."""
    s = servers(Handler("later"), header_timeout=10.0, keepalive_timeout=0.3)
    c = await connect(s.port)
    c.send(post(b"/a", b"{}") + b"GET /b HTTP/1.1\r\nX-Slow: ")
    (resp,) = await c.responses(1)
    assert resp.status == 200
    for _ in range(8):
        if c.closed:
            break
        c.send(b"a")
        await sleep(0.1)
    if not c.closed:
        c.send(b"\r\n\r\n")
    resps = await c.responses(2)
    assert len(resps) == 2 and json.loads(resps[1].body)["path"] == "/b", bytes(c.data)[-200:]


@pytest_twisted.ensureDeferred
async def test_header_limit_is_not_bypassed_by_whitespace_in_one_read(servers):
    """max_header_bytes 4096: a head of ~30 KiB (trailing whitespace in a
    value) in one read counts its whitespace too."""
    s = servers(max_header_bytes=4096)
    c = await connect(s.port)
    c.send(b"GET /a HTTP/1.1\r\nX-Pad: a" + b" " * 30000 + b"\r\nHost: x\r\n\r\n")
    resps = await c.responses(1)
    assert resps and resps[0].status == 431, resps[0].status if resps else bytes(c.data)
