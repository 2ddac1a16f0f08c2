"""Second review of the day's changes to the request path and routing.

- A message-batch answer was rewritten only when it came without any
  ``Content-Encoding``: one sent as ``identity`` (no coding at all), or
  compressed although Lectr asked for ``identity``, reached the client with
  its absolute ``results_url``, which the SDK then fetches, with the Lectr
  key, from wherever the provider pointed it.
- A ``results_url`` that was already relative was passed on as it came,
  whatever it was: the TypeScript SDK fetches a relative one by appending
  it to its base URL as text (``http://lectr:8080`` + ``@evil.example/…``
  is a URL on evil.example, the Lectr key sent there), and an absolute one
  with no batch path gave a network-path reference (``//evil.example/x``).
- A batch answer holding a lone surrogate escape (valid JSON) crashed the
  call once rewritten.
- ``-c jit=off`` went to the server as the ``options`` startup parameter,
  which PgBouncer refuses by default ("unsupported startup parameter:
  options"): Lectr could no longer connect through it; and passing
  ``options`` at all made libpq ignore ``PGOPTIONS``.
"""

from __future__ import annotations

import gzip
import json
import re
import string
import struct
import zlib

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from lectr.db.database import Database, DatabaseUnavailable
from lectr.providers.dialects import relative_results_urls
from tests.support.fake_provider import Script
from tests.test_proxy import gw  # noqa: F401 (the fixture)

BATCH_ID = "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF"
ABSOLUTE = f"https://evil.example/v1/messages/batches/{BATCH_ID}/results"
RELATIVE = f"/v1/messages/batches/{BATCH_ID}/results"


def _batch(url: str = ABSOLUTE) -> dict:
    return {
        "id": BATCH_ID,
        "type": "message_batch",
        "processing_status": "ended",
        "request_counts": {"processing": 0, "succeeded": 1, "errored": 0},
        "results_url": url,
    }


async def _retrieve(gw):  # noqa: F811
    """What the SDK does before fetching the results: the batch, read as
    sent (no client decoding)."""
    import treq
    from twisted.web.client import Agent
    from twisted.web.http_headers import Headers

    resp = await Agent(reactor).request(
        b"GET",
        gw.url(f"/anthropic/v1/messages/batches/{BATCH_ID}").encode(),
        Headers({"x-api-key": [gw.key], "anthropic-version": ["2023-06-01"]}),
    )
    return resp, await treq.content(resp)


# --- 1. a batch answer in identity, or compressed ------------------------------------------


def _coded(body: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    return body


@pytest.mark.parametrize("coding", ["identity", "Identity", "gzip", "x-gzip", "deflate"])
@pytest_twisted.ensureDeferred
async def test_a_batch_answer_in_any_readable_coding_has_its_results_url_made_relative(
    gw,  # noqa: F811
    coding,
):
    body = json.dumps(_batch()).encode()
    gw.provider.next(Script(body=_coded(body, coding), headers={"content-encoding": coding}))
    resp, out = await _retrieve(gw)
    assert resp.code == 200
    # relayed decoded, and said so
    assert resp.headers.getRawHeaders(b"content-encoding") in (None, [b"identity"]), coding
    doc = json.loads(out)
    assert doc["results_url"] == RELATIVE
    assert {k: v for k, v in doc.items() if k != "results_url"} == {
        k: v for k, v in _batch().items() if k != "results_url"
    }


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        (["br"], b"\x0b\x80" + json.dumps(_batch()).encode()),  # (not really brotli: unread)
        (["gzip", "gzip"], gzip.compress(gzip.compress(json.dumps(_batch()).encode()))),
        (["gzip"], b"not gzip " + json.dumps(_batch()).encode()),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_batch_answer_lectr_cannot_read_is_cut_not_relayed(gw, fields, body):  # noqa: F811
    """A coding Lectr cannot decode (or several, or a body that does not
    decode): the URL inside cannot be made relative, so the answer is not
    relayed - its connection is cut, as for an answer too large to hold."""
    from twisted.web.client import ResponseFailed

    gw.provider.next(Script(body=body, headers={"content-encoding": fields}))
    try:
        resp, out = await _retrieve(gw)
    except ResponseFailed:
        return
    raise AssertionError(f"relayed: {resp.code} {out[:80]!r}")


# --- 2. results_url as the SDKs read it --------------------------------------------------------

#: what any client, joining the URL to its base or appending it to its base
#: URL as text (the TypeScript SDK's buildURL), keeps on Lectr's origin: an
#: absolute path, not a network-path reference (WHATWG reads a backslash as a
#: slash, and drops tabs and line breaks)
_PATH_ABSOLUTE = re.compile(r"/(?![/\\])")


def _on_lectr(url: str) -> bool:
    return _PATH_ABSOLUTE.match(re.sub(r"[\t\n\r]", "", url)) is not None


def _ts_sdk_url(base: str, path: str) -> str | None:
    """The host the TypeScript SDK would send a request for ``path`` to
    (``new URL(baseURL + path)`` for a path without a scheme), read the
    way the WHATWG parser reads a special URL's authority."""
    if re.match(r"[a-z][a-z0-9+.\-]*:", path, re.I):
        return "absolute"
    text = re.sub(r"[\t\n\r]", "", base + path).replace("\\", "/")
    rest = text.split("://", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    return authority.rpartition("@")[2]


@pytest.mark.parametrize(
    "url",
    [
        f"@evil.example{RELATIVE}",
        ".evil.example/x",
        ":1@evil.example/x",
        "https://evil.example//evil2.example/x",
        "//evil.example",
        "/\\evil.example/x",
        "\\\\evil.example/x",
        "/\t/evil.example/x",
    ],
)
def test_a_results_url_no_sdk_can_take_off_lectr_is_made_an_absolute_path(url):
    body = json.dumps(_batch(url)).encode()
    got = json.loads(relative_results_urls(body))["results_url"]
    assert _on_lectr(got), (url, got)
    for base in ("http://lectr.internal:8080", "http://lectr.internal"):
        assert _ts_sdk_url(base, got) == base.split("://")[1], (url, got)


def test_the_ts_sdk_model_reads_the_leak():
    """The check above is not vacuous: the URL passed on before sent the
    TypeScript SDK to evil.example."""
    assert _ts_sdk_url("http://lectr.internal:8080", f"@evil.example{RELATIVE}") == "evil.example"


_url_piece = st.sampled_from(
    ["/", "//", "\\", "@", ":", ".", "?", "#", "\t", "https:", "evil.example", "a", "%2f"]
    + ["/v1/messages/batches/", BATCH_ID, "/results", "?q=1"]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_url_piece, max_size=8).map("".join))
def test_no_results_url_leaves_lectr_whatever_the_provider_sends(url):
    body = json.dumps(_batch(url)).encode()
    got = json.loads(relative_results_urls(body))["results_url"]
    assert _on_lectr(got), (url, got)
    for base in ("http://lectr.internal:8080", "http://lectr.internal"):
        assert _ts_sdk_url(base, got) == base.split("://")[1], (url, got)
    if _on_lectr(url) and "\t" not in url:
        assert got == url  # a path is passed on as it is


def test_a_batch_answer_with_a_lone_surrogate_is_rewritten_not_crashed():
    body = b'{"results_url": "' + ABSOLUTE.encode() + b'", "note": "\\ud800 \xc3\xa9"}'
    out = relative_results_urls(body)
    doc = json.loads(out)
    assert doc["results_url"] == RELATIVE
    assert doc["note"] == "\ud800 \u00e9"
    out.decode("utf-8")  # valid UTF-8


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.printable + "\u00e9\u2028\ud800\udfff", max_size=20))
def test_any_string_beside_the_url_survives_the_rewrite(text):
    doc = {**_batch(), "note": text}
    body = json.dumps(doc).encode()
    out = relative_results_urls(body)
    out.decode("utf-8")
    # (as the body reads: a surrogate pair written as two escapes is one character)
    assert json.loads(out) == {**json.loads(body), "results_url": RELATIVE}


# --- 3. jit=off without a startup parameter ----------------------------------------------------


class _Startup(Protocol):
    """Reads a libpq startup packet (answering 'N' to SSL and GSS
    encryption requests), hands its parameters over, hangs up."""

    def __init__(self, seen: Deferred) -> None:
        self.buf = b""
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 8:
            (n,) = struct.unpack("!I", self.buf[:4])
            if len(self.buf) < n:
                return
            packet, self.buf = self.buf[:n], self.buf[n:]
            (code,) = struct.unpack("!I", packet[4:8])
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                self.transport.write(b"N")
                continue
            parts = packet[8:].split(b"\x00")
            params = dict(zip(parts[0::2], parts[1::2], strict=False))
            if not self.seen.called:
                self.seen.callback(params)
            self.transport.loseConnection()
            return


@pytest_twisted.ensureDeferred
async def test_lectr_sends_no_options_startup_parameter():
    """PgBouncer (its default ignore_startup_parameters) refuses a client
    whose startup packet carries ``options``: "FATAL: unsupported startup
    parameter: options" (PgBouncer 1.18). Lectr's pool must connect with
    the parameters libpq sends on its own."""
    seen: Deferred = Deferred()
    factory = Factory.forProtocol(lambda: _Startup(seen))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        dsn = f"postgresql://root@127.0.0.1:{port.getHost().port}/test?sslmode=disable"
        db = Database(dsn, reactor=reactor, min_size=1, max_size=1, connect_timeout=2.0)
        with pytest.raises(DatabaseUnavailable):
            await db.start()
        params = await seen
    finally:
        await port.stopListening()
    assert b"user" in params and b"database" in params
    assert b"options" not in params, params[b"options"]


@pytest_twisted.ensureDeferred
async def test_pgoptions_from_the_environment_are_kept_and_jit_is_off(db_url, monkeypatch):
    """libpq reads PGOPTIONS only when no ``options`` is given: passing one
    dropped an operator's PGOPTIONS (a search_path, a statement_timeout)."""
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=4321")
    db = Database(db_url, reactor=reactor, min_size=1, max_size=1)
    await db.start()
    try:
        [(jit, timeout)] = await db.runQuery(
            "show", "SELECT current_setting('jit'), current_setting('statement_timeout')"
        )
    finally:
        await db.close()
    assert (jit, timeout) == ("off", "4321ms")


@pytest_twisted.ensureDeferred
async def test_jit_named_in_pgoptions_wins(db_url, monkeypatch):
    monkeypatch.setenv("PGOPTIONS", "-cjit=on")
    db = Database(db_url, reactor=reactor, min_size=1, max_size=1)
    await db.start()
    try:
        [(jit,)] = await db.runQuery("show", "SELECT current_setting('jit')")
    finally:
        await db.close()
    assert jit == "on"
