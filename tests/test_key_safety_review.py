"""Third review of key safety on the relay: what still let a provider key
(or a credential) through, or let a provider's answer stall the reactor.

- a compressed error body is inflated within the masking cap (a gzip bomb
  of 1 MiB held 1 GiB and the reactor for seconds);
- a key check's message with characters whose lower case is longer (``İ``)
  no longer shifts the masked runs off the key;
- a JSON error body that begins with whitespace is read for ``\\u``-escaped
  keys like any other;
- the OTLP endpoint's credentials do not reach a log line when they hold a
  character the URL syntax reads as the end of the authority.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import string
import zlib
from urllib.parse import unquote

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from lectr.providers.base import ECHO_RUN, scrub, scrub_body
from lectr.providers.dialects import relative_results_urls
from lectr.proxy.call import SCRUB_MAX, redirect_origin
from lectr.tracing import _loggable_url
from tests.support.fake_provider import OPENAI_KEY, Script
from tests.support.lectr_service import proxy_url
from tests.test_routing_proxy import CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # a Lectr, an org with keys, the fake provider


# --- a compressed error body larger than the cap once inflated ------------------------------


def _bomb(size: int, wbits: int) -> bytes:
    """``size`` bytes of JSON-ish padding quoting the key, compressed."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = f'{{"error":{{"message":"bad key {OPENAI_KEY}","pad":"'.encode()
    out = [c.compress(head)]
    block = b" " * (1 << 20)
    left = size
    while left > 0:
        out.append(c.compress(block[: min(left, len(block))]))
        left -= len(block)
    out.append(c.compress(b'"}}'))
    out.append(c.flush())
    return b"".join(out)


@pytest_twisted.ensureDeferred
async def test_an_error_body_inflating_past_the_cap_is_withheld(env):
    """A gzip (or deflate) error body under the 1 MiB the proxy holds, which
    inflates to many times that: withheld as a body that could not be
    checked, not inflated whole on the reactor and relayed."""
    for encoding, wbits in (("gzip", 31), ("deflate", 15)):
        body = _bomb(16 * SCRUB_MAX, wbits)
        assert len(body) < SCRUB_MAX
        env.provider.next(Script(status=400, body=body, headers={"content-encoding": encoding}))
        resp = await env.post("/v1/chat/completions", CHAT)
        out = await resp.content()
        assert resp.code == 400
        assert len(out) < 4096, (encoding, len(out))
        assert OPENAI_KEY.encode() not in out
        assert "could not be checked" in json.loads(out)["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_compressed_error_within_the_cap_is_still_decoded_and_masked(env):
    """The bound leaves ordinary compressed errors as they were."""
    body = _bomb(1000, 31)
    env.provider.next(Script(status=400, body=body, headers={"content-encoding": "gzip"}))
    resp = await env.post("/v1/chat/completions", CHAT)
    out = await resp.content()
    assert resp.code == 400
    doc = json.loads(out)
    assert doc["error"]["message"] == "bad key ***"


def _encode(body: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    return body  # identity, or a coding the fake cannot make (sent as it is)


# Content-Encoding as one field or several, codings stacked, repeated, mixed
# with identity, in any case: (the fields, the codings applied in order)
_STACKED = [
    (["gzip", "gzip"], ["gzip", "gzip"]),
    (["gzip, gzip"], ["gzip", "gzip"]),
    (["deflate", "GZIP"], ["deflate", "gzip"]),
    (["gzip", "identity", "deflate"], ["gzip", "deflate"]),
    (["x-gzip,deflate"], ["x-gzip", "deflate"]),
    (["br", "gzip"], ["gzip"]),
    (["gzip", "br"], ["gzip"]),
    ([" , gzip,", "gzip"], ["gzip", "gzip"]),
]


async def _post_undecoded(env, body: dict):
    """A POST whose answer is read as sent: treq's own client would gunzip a
    coded body and hide the header."""
    resp = await Agent(reactor, pool=env.pool).request(
        b"POST",
        proxy_url(env.service, "/v1/chat/completions").encode(),
        Headers({"content-type": ["application/json"], "authorization": [f"Bearer {env.key}"]}),
        FileBodyProducer(io.BytesIO(json.dumps(body).encode())),
    )
    return resp, await treq.content(resp)


@pytest_twisted.ensureDeferred
async def test_an_error_body_in_several_codings_never_reaches_the_client_half_decoded(env):
    """Only the first Content-Encoding field was read: an error body gzipped
    twice (two fields) was inflated once and relayed, still gzip, without
    its Content-Encoding, so the key it quoted was never masked and any
    client could gunzip it. Now every field counts, and a body in more than
    one coding is withheld like one that does not decode."""
    plain = f'{{"error":{{"message":"bad key {OPENAI_KEY}"}}}}'.encode()
    for fields, applied in _STACKED:
        body = plain
        for coding in applied:
            body = _encode(body, coding)
        env.provider.next(Script(status=401, body=body, headers={"content-encoding": fields}))
        resp, out = await _post_undecoded(env, CHAT)
        assert resp.code == 401, fields
        assert resp.headers.getRawHeaders("content-encoding") is None, fields
        doc = json.loads(out)  # plain JSON, nothing left to decode
        assert "could not be checked" in doc["error"]["message"], (fields, doc)


@pytest_twisted.ensureDeferred
async def test_identity_beside_one_coding_is_still_decoded_and_masked(env):
    plain = f'{{"error":{{"message":"bad key {OPENAI_KEY}"}}}}'.encode()
    for fields in (["identity", "gzip"], ["gzip, identity"], ["Identity"], [" GZip "]):
        coded = "gzip" in ",".join(fields).lower()
        body = gzip.compress(plain) if coded else plain
        env.provider.next(Script(status=401, body=body, headers={"content-encoding": fields}))
        resp, out = await _post_undecoded(env, CHAT)
        assert resp.headers.getRawHeaders("content-encoding") is None, fields
        assert json.loads(out)["error"]["message"] == "bad key ***", (fields, out)


# --- a key check's message: runs masked where they are --------------------------------------

KEY_CHARS = string.ascii_letters + string.digits


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_no_run_of_the_key_survives_whatever_text_surrounds_it(data):
    """The provider's message around the quoted run is any text: characters
    whose lower case is longer (``İ``: two) moved the masked positions off
    the run, and the start of the key was shown."""
    key = data.draw(st.text(alphabet=KEY_CHARS, min_size=24, max_size=48))
    start = data.draw(st.integers(0, len(key) - ECHO_RUN))
    end = data.draw(st.integers(start + ECHO_RUN, len(key)))
    echo = key[start:end]
    if data.draw(st.booleans()):
        echo = echo.swapcase()
    # any text, or text rich in characters whose case mapping changes length
    odd = st.sampled_from(["İ" * 4, "İ", "ı", "\u212a", "ß", " ", "%"])
    around = st.one_of(st.text(max_size=30), st.lists(odd, max_size=12).map("".join))
    before = data.draw(around)
    after = data.draw(around)
    out = scrub(before + echo + after, key)
    readable = unquote(out).lower()
    low = key.lower()
    assert not any(low[i : i + ECHO_RUN] in readable for i in range(len(low) - ECHO_RUN + 1)), out


def test_a_dotted_capital_i_before_the_key_does_not_unmask_its_start():
    key = "sk-proj-ABCDEFGHijklmnopQRSTUVWXyz0123456789"
    out = scrub("İ" * 12 + "key " + key[5:30] + " end", key)
    assert "ABCDEFGH" not in out and out.endswith("key *** end"), out


# --- a JSON error body that begins with whitespace ------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    lead=st.text(alphabet=" \t\r\n", max_size=4),
    trail=st.text(alphabet=" \t\r\n", max_size=4),
    escaped=st.sets(st.integers(0, 40), min_size=1),
)
def test_a_json_escaped_key_is_masked_after_leading_whitespace(lead, trail, escaped):
    """JSON may begin with whitespace: a client's parser reads the body the
    same way, ``\\u`` escapes restored, so Lectr must read it too."""
    key = "sk-proj-" + "aB3dE5gH7jK9mN1pQ2rS4tU6vW8xY0zA"
    core = key[len(key) // 3 :]
    echo = "".join(
        f"\\u{ord(c):04x}" if i in escaped else c for i, c in enumerate(key) if i >= len(key) // 3
    )
    body = (lead + '{"error":{"message":"Incorrect key: ' + echo + '."}}' + trail).encode()
    out = scrub_body(body, key.encode())
    if out == b"***":
        return  # withheld whole
    assert core.lower() not in json.loads(out)["error"]["message"].lower()


# --- the OTLP endpoint in log lines ---------------------------------------------------------

SECRET_CHARS = string.ascii_uppercase + "/?#:%!$&'()*+,;=[]@"


@settings(max_examples=500, deadline=None)
@given(
    user=st.text(alphabet=SECRET_CHARS, max_size=12),
    password=st.text(alphabet=SECRET_CHARS, min_size=1, max_size=16),
    query=st.sampled_from(["", "?token=ZZZ", "?a=b@c&T=ZZZ"]),
)
def test_the_collector_url_in_a_log_line_holds_no_credential(user, password, query):
    """HTTP basic credentials in OTEL_EXPORTER_OTLP_ENDPOINT, typed as they
    are (a ``/``, ``?`` or ``#`` in a password, unescaped): no character of
    them (upper case here; the rest of the URL is lower case) is logged."""
    url = f"https://{user}:{password}@collector.example:4318/v1/traces{query}"
    out = _loggable_url(url)
    shown = out.replace("<unparseable URL>", "").replace("<URL not shown>", "")
    assert not any(c.isupper() for c in shown), (url, out)


def test_the_collector_url_without_credentials_is_logged_as_it_is():
    assert (
        _loggable_url("http://collector.example:4318/v1/traces")
        == "http://collector.example:4318/v1/traces"
    )
    assert (
        _loggable_url("https://u:p@collector.example/v1/traces?x=1")
        == "https://***@collector.example/v1/traces?***"
    )
    assert _loggable_url("https://u:p/w@collector.example/v1/traces") == "<URL not shown>"
    assert _loggable_url("u:p@collector.example:4318") == "<URL not shown>"


# --- a key check's message of a MiB ----------------------------------------------------------


def test_a_long_message_is_masked_only_as_far_as_it_can_be_shown(monkeypatch):
    """A provider may answer a key check with a message of up to 1 MiB (the
    body's cap): masking it whole held the reactor for about a second; only
    its first 900 characters (three times what is shown) are read, and a
    run at the start is still masked."""
    import lectr.providers.base as base

    seen: list[int] = []
    real = base._mask_runs

    def spy(text: str, secret: str) -> str:
        seen.append(len(text))
        return real(text, secret)

    monkeypatch.setattr(base, "_mask_runs", spy)
    key = "sk-proj-ABCDEFGHijklmnopQRSTUVWXyz0123456789"
    message = "bad key " + key[4:] + " " + "lorem ipsum  \n " * 70_000
    out = scrub(message, key)
    assert seen and max(seen) <= 3 * 300, seen
    assert out.startswith("bad key *** lorem ipsum lorem ipsum") and len(out) == 300
    assert "ABCDEFGH" not in out


# --- a message batch's results_url ----------------------------------------------------------

_ids = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["https", "http", "HTTPS"]),
    host=st.sampled_from(["api.anthropic.com", "127.0.0.1:9000", "evil.example", "h"]),
    prefix=st.sampled_from(["", "/anthropic", "/a/b"]),
    batch=_ids,
    query=st.one_of(st.just(""), st.text(alphabet="abc=&%20", max_size=12)),
    paged=st.booleans(),
    spaced=st.booleans(),
)
def test_no_absolute_results_url_reaches_the_client(
    scheme, host, prefix, batch, query, paged, spaced
):
    """Anthropic names a batch's results by an absolute URL on its origin;
    the SDK follows it with the client's key, around Lectr. Whatever the
    URL, the client gets a relative one, to the batch's results path, and
    every other field as it was."""
    url = f"{scheme}://{host}{prefix}/v1/messages/batches/{batch}/results"
    if query:
        url += "?" + query
    one = {"id": batch, "type": "message_batch", "results_url": url, "n": 1.5, "t": "é"}
    doc = {"data": [one, {**one, "results_url": None}], "has_more": False} if paged else one
    body = json.dumps(doc, indent=2 if spaced else None).encode()
    out = json.loads(relative_results_urls(body))
    got = out["data"][0] if paged else out
    expected = f"/v1/messages/batches/{batch}/results" + (f"?{query}" if query else "")
    assert got["results_url"] == expected
    assert {k: v for k, v in got.items() if k != "results_url"} == {
        k: v for k, v in one.items() if k != "results_url"
    }
    if paged:
        assert out["data"][1]["results_url"] is None and out["has_more"] is False


def test_answers_without_an_absolute_results_url_are_untouched():
    for body in (
        b"",
        b"not json",
        b'{"results_url": "/v1/messages/batches/b/results"}',
        b'{"results_url": null}',
        b'["results_url"]',
        b'{"data": "results_url"}',
    ):
        assert relative_results_urls(body) is body


def test_only_batch_answers_are_held_for_the_rewrite():
    from lectr.providers.dialects import AnthropicDialect, OpenAIDialect

    anthropic, openai = AnthropicDialect(), OpenAIDialect()
    for path in (
        "/v1/messages/batches",
        "/v1/messages/batches/msgbatch_1",
        "/v1/messages/batches/msgbatch_1/cancel",
    ):
        assert anthropic.answer_rewrite(path) is relative_results_urls, path
    for path in (
        "/v1/messages",
        "/v1/messages/batches/msgbatch_1/results",  # (the results: relayed as they come)
        "/v1/messages/count_tokens",
        "/v1/models",
    ):
        assert anthropic.answer_rewrite(path) is None, path
    assert openai.answer_rewrite("/v1/batches") is None


# --- a redirect out of Lectr ----------------------------------------------------------------

_LECTR = "http://lectr.internal:8080/anthropic/v1/messages"
_piece = st.sampled_from(
    ["/", "//", "\\", "\\\\", "/\\", "\t", "\n", " ", "\x00", "\x1f", "http:", "https:", "HTTP:"]
    + ["evil.example", "api.anthropic.com", "lectr.internal:8080", "[::1]", "u:p@", ":99"]
    + ["/v1/x", "v1", "..", "?key=sk-1", "#f", "%2f", "%5c", "@", ".", "x"]
)


def _follows_to(location: str):
    """Where the SDKs' HTTP client (httpx) goes when it follows this
    Location from a request to Lectr; None when it refuses to."""
    httpx = pytest.importorskip("httpx2")
    request = httpx.Request("POST", _LECTR)
    try:
        response = httpx.Response(307, headers={"Location": location}, request=request)
        return httpx.Client()._redirect_url(request, response)
    except (httpx.InvalidURL, httpx.RemoteProtocolError, UnicodeEncodeError, ValueError):
        return None


@settings(max_examples=600, deadline=None)
@given(st.lists(_piece, max_size=7).map("".join))
def test_a_location_passed_back_never_leads_the_client_out_of_lectr(location):
    """The class, against the client that follows: whatever Location a
    provider sends, when Lectr passes it back (redirect_origin says None),
    the SDKs' HTTP client following it stays on Lectr's origin; and what
    an error names is an origin, never a path, query or user information."""
    elsewhere = redirect_origin(location.encode("latin-1"))
    if elsewhere is None:
        target = _follows_to(location)
        if target is not None:
            assert (target.scheme, target.host, target.port) == ("http", "lectr.internal", 8080), (
                location,
                str(target),
            )
    else:
        # an origin: no path, query, fragment or user information
        assert re.fullmatch(r"another address|([a-z]+:)?//[A-Za-z0-9.\-\[\]:]+", elsewhere), (
            location,
            elsewhere,
        )
