"""One request or one answer must not hold the reactor: the proxy port's
request and answer paths (form bodies, chunked trailers on both sides).

Each finding has a regression test that fails on the code before the fix;
a form body's reading is also checked against the strict reading it had
(generated bodies). No timing assertion but a hang guard (``deadline``)."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import pytest
import pytest_twisted
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

import lectr.providers.body as body_module
from lectr.http.client import MAX_RESPONSE_HEAD, Origin, UpstreamClient
from lectr.http.server import ProxyServerFactory
from lectr.providers.body import (
    FORM_FIELDS_MAX,
    MODEL_MAX,
    BodyRefused,
    _bad_percent,
    check_model,
    form_model,
)
from tests.support.deadline import deadline
from tests.support.http_wire import RecordingSink, ScriptedUpstream

MiB = 1 << 20


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except BodyRefused as e:
        return ("refused", str(e))


# --- form bodies ----------------------------------------------------------------------------------

_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def reference_form_model(body: bytes) -> str | None:
    """form_model as it read before (split, partition, decode each name)."""
    if b";" in body:
        raise BodyRefused("form bodies must separate fields with '&' only")
    try:
        body.decode("ascii")
    except UnicodeDecodeError:
        raise BodyRefused("form bodies must be ASCII (percent-encode the rest)") from None
    fields = body.split(b"&")
    if len(fields) > FORM_FIELDS_MAX:
        raise BodyRefused(f"form bodies may carry at most {FORM_FIELDS_MAX} fields")
    model = None
    seen = False
    for field in fields:
        if not field:
            continue
        name, _, value = field.partition(b"=")
        if _PERCENT.search(name) or _PERCENT.search(value):
            raise BodyRefused("the form body has a malformed percent-encoding")
        if unquote_to_bytes(name.replace(b"+", b" ")) != b"model":
            continue
        if seen:
            raise BodyRefused("the form body repeats the 'model' field")
        seen = True
        try:
            model = check_model(unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8"))
        except UnicodeDecodeError:
            raise BodyRefused("'model' must be UTF-8 text") from None
    return model


def test_a_long_form_name_is_never_percent_decoded(monkeypatch):
    """32 MiB of %41 in one field name: decoded whole, it held the reactor
    20 s; only a name that can decode to "model" (5 to 15 bytes) is."""
    decoded: list[int] = []
    real = body_module._form_decode

    def spy(data: bytes) -> bytes:
        decoded.append(len(data))
        return real(data)

    monkeypatch.setattr(body_module, "_form_decode", spy)
    body = b"%41" * (32 * MiB // 3) + b"=1&model=gpt-4o"
    with deadline():
        assert form_model(body) == "gpt-4o"
    assert decoded and max(decoded) <= 15


def test_a_long_model_value_is_refused_undecoded(monkeypatch):
    """A 32 MiB model value of %XX (6.5 s to decode) is refused as too long
    without being decoded."""
    decoded: list[int] = []
    real = body_module._form_decode
    monkeypatch.setattr(body_module, "_form_decode", lambda d: decoded.append(len(d)) or real(d))
    with deadline(), pytest.raises(BodyRefused, match="1 to 256 characters"):
        form_model(b"model=" + b"%41" * (32 * MiB // 3))
    assert max(decoded) <= 15
    # the longest value that may still name a model is decoded and judged
    assert form_model(b"model=" + b"%41" * MODEL_MAX) == "A" * MODEL_MAX


def test_many_escapes_are_checked_without_a_match_per_escape():
    """11 million well-formed escapes in another field (0.8 s matched one by
    one: under the hang guard, so a check of the reading, not a regression
    test): accepted; one malformed escape at the very end: refused."""
    body = b"a=" + b"%41" * (32 * MiB // 3)
    with deadline():
        assert form_model(body) is None
        with pytest.raises(BodyRefused, match="malformed percent-encoding"):
            form_model(body + b"%4")


FORM_PIECES = [
    b"model",
    b"mod%65l",
    b"%6D%6f%64%65%6C",
    b"m+odel",
    b"=",
    b"&",
    b"&&",
    b"%",
    b"%4",
    b"%41",
    b"%zz",
    b"+",
    b"a",
    b"gpt-4o",
    b"%F0%9F%98%80",
    b"%FF",
    b"%00",
    b";",
    b"\xe9",
    b" ",
    b"x=y",
]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(FORM_PIECES), max_size=14).map(b"".join))
@example(b"model=a&model=b&x=%")
@example(b"x=%&model=a&model=b")
@example(b"mod%65l=%67pt&&")
@example(b"&" * (FORM_FIELDS_MAX - 1))
@example(b"&" * FORM_FIELDS_MAX)
def test_generated_form_bodies_are_read_as_before(body):
    """Same model, or same refusal with the same message, as the strict
    reading had (any model value it could read is at most 12 * MODEL_MAX
    bytes: the early length refusal never applies here)."""
    assert outcome(form_model, body) == outcome(reference_form_model, body)


@given(st.lists(st.sampled_from([b"%", b"4", b"a", b"G", b"f", b"=", b"&", b"%4"])).map(b"".join))
def test_bad_percent_is_the_regex(data):
    assert _bad_percent(data) == (_PERCENT.search(data) is not None)


# --- the proxy port: a chunked request's trailers -------------------------------------------------


class _Transport(StringTransport):
    def pauseProducing(self):  # (a real transport allows it once closing)
        pass

    def resumeProducing(self):
        pass


class _Handler:
    def headers_received(self, req):
        req.continue_body()

    def body_received(self, req):
        req.respond(200, [], b"got %d" % len(req.body))

    def request_error(self, req, status, kind, message):
        req.respond(status, [], message.encode())


def _server():
    clock = MemoryReactorClock()
    factory = ProxyServerFactory(
        _Handler(),
        reactor=clock,
        max_body_bytes=32 * MiB,
        body_timeout=1e9,
        header_timeout=1e9,
        keepalive_timeout=1e9,
    )
    proto = factory.buildProtocol(None)
    transport = _Transport()
    proto.makeConnection(transport)
    return clock, proto, transport, factory


HEAD = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_trailer_section_past_the_head_limit_is_refused():
    """llhttp joins a trailer field's pieces read by read: 32 MiB of one
    trailer value (within the body's wire bound) held the reactor 8 s in
    all. Past max_header_bytes it is a 413 now."""
    clock, proto, transport, factory = _server()
    proto.dataReceived(HEAD + b"3\r\nabc\r\n0\r\nX-Trailer: ")
    reads = 0
    with deadline():
        while not proto._stopped and reads < 32 * MiB // 65536:
            proto.dataReceived(b"a" * 65536)
            reads += 1
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.value().endswith(b"Request trailer section too large.")
    assert reads * 65536 <= 2 * factory.max_header_bytes


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_chunks_and_trailers_of_any_split_are_read_as_before(piece):
    """Small trailers, chunk data late after its size line, and a body of
    many small chunks read in pieces of any size: delivered whole."""
    clock, proto, transport, _ = _server()
    chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"b" * n) for n in range(1, 200))
    wire = HEAD + chunks + b"0\r\nX-One: " + b"v" * 20000 + b"\r\nX-Two: 2\r\n\r\n"
    for i in range(0, len(wire), piece):
        proto.dataReceived(wire[i : i + piece])
    clock.advance(0)
    total = sum(range(1, 200))
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert transport.value().endswith(b"got %d" % total)


# --- the upstream client: a chunked answer's trailers ----------------------------------------------


@pytest.fixture
def upstream():
    started = []

    def make(script):
        up = ScriptedUpstream(script)
        port = up.listen()
        started.append(up)
        return Origin.from_url(f"http://127.0.0.1:{port}")

    yield make
    for up in started:
        pytest_twisted.blockon(ensureDeferred(up.stop()))


@pytest.fixture
def client():
    c = UpstreamClient(reactor, connect_timeout=2, idle_timeout=20)
    yield c
    pytest_twisted.blockon(c.close_idle())


@pytest_twisted.ensureDeferred
async def test_an_answers_endless_trailer_is_cut(upstream, client):
    """A provider's trailer section had no bound (memory, and a copy of all
    of it per read: 256 MiB held the reactor 7 min in all): past
    MAX_RESPONSE_HEAD the answer fails as a protocol error."""

    def script(conn, seen):
        conn.transport.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: "
        )
        conn.transport.write(b"a" * (4 * MAX_RESPONSE_HEAD))
        conn.transport.loseConnection()

    origin = upstream(script)
    sink = RecordingSink()
    client.request(origin, b"GET", b"/x", [], None, sink)
    error = await sink.ended
    assert bytes(sink.data) == b"abc"
    assert error.kind == "protocol" and "trailers too large" in error.detail


@pytest_twisted.ensureDeferred
async def test_an_answers_small_trailers_still_end_it(upstream, client):
    def script(conn, seen):
        wire = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in range(1, 100))
            + b"0\r\nX-T: "
            + b"t" * 50000
            + b"\r\n\r\n"
        )
        for i in range(0, len(wire), 1000):
            reactor.callLater(0.001 * (i // 1000), conn.transport.write, wire[i : i + 1000])

    origin = upstream(script)
    sink = RecordingSink()
    client.request(origin, b"GET", b"/x", [], None, sink)
    assert await sink.ended == "done"
    assert bytes(sink.data) == b"".join(b"c" * n for n in range(1, 100))


# --- error bodies and headers checked for the provider key ----------------------------

SECRET = b"sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789"


def test_a_value_with_too_many_escapes_is_taken_to_quote_the_key_undecoded(monkeypatch):
    """A provider that echoes its request in an error (a FastAPI 422) can
    hand back a client's 1 MiB of escapes: urllib decodes them in a Python
    loop (0.5 s). Past ESCAPES_CHECKED_MAX the value is not decoded."""
    import lectr.providers.base as base

    core = base.secret_core(SECRET)

    def no_decoding(*args):
        raise AssertionError("decoded")

    echoed = b'{"detail":[{"input":"' + b"%41" * (MiB // 3) + b'"}]}'
    monkeypatch.setattr(base, "unquote_to_bytes", no_decoding)
    monkeypatch.setattr(base, "unquote", no_decoding)
    with deadline():
        assert base.quotes_secret(echoed, core)  # (may: it is not looked into)
        assert base.scrub_body(echoed, SECRET) == b"***"  # withheld whole


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from([b"%", b"%4", b"%41", b"%2D", b"%2d", b"a", b"-", b"sk", b"%25"]),
        max_size=40,
    ),
    quoted=st.booleans(),
)
def test_a_value_with_few_escapes_is_decoded_exactly(pieces, quoted):
    from lectr.providers.base import ESCAPES_CHECKED_MAX, quotes_secret, secret_core

    core = secret_core(SECRET)
    data = b"".join(pieces)
    if quoted:  # the key's core, one character percent-escaped
        data += b"%" + b"%02X" % core[0] + core[1:]
    assert data.count(b"%") <= ESCAPES_CHECKED_MAX
    expected = core in data.lower() or core in unquote_to_bytes(data).lower()
    assert quotes_secret(data, core) == expected
    if quoted:
        assert expected


def test_a_token_dense_or_deep_error_body_is_withheld_not_walked():
    """Read as JSON when it has a \\u escape: 1 MiB of empty arrays is
    500,000 values (0.5 s of the walk), a deep one raised RecursionError out
    of the walk."""
    from lectr.providers.base import SCRUB_VALUES_MAX, scrub_body

    dense = b'{"detail":"\\u0041","input":[' + b",".join([b"[]"] * (MiB // 3)) + b"]}"
    with deadline():
        assert scrub_body(dense, SECRET) == b"***"
    deep = b'{"a":"\\u0041","b":' + b"[" * 900 + b"]" * 900 + b"}"
    assert scrub_body(deep, SECRET) in (b"***", deep)  # (never an exception)
    small = b'{"detail":"\\u0041","input":[' + b",".join([b"[]"] * (SCRUB_VALUES_MAX // 2)) + b"]}"
    assert scrub_body(small, SECRET) == small  # (under the bound: looked through, kept)
    quoting = b'{"detail":"\\u0041 key ' + SECRET[:-4] + b'\\u0041"}'
    assert SECRET[:-4].lower() not in scrub_body(quoting, SECRET).lower()
