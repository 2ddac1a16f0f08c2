"""Ways a provider could echo the org's provider key back - in other
spellings, in headers, in a redirect - and a Lectr key given in the query
string: none reaches the client or the provider."""

from __future__ import annotations

import json
import string
from urllib.parse import unquote

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.providers.base import scrub_body
from tests.support.fake_provider import OPENAI_KEY, Script
from tests.support.lectr_service import proxy_url
from tests.test_routing_proxy import CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # a Lectr, an org with keys, the fake provider


# --- scrub_body: key-echo variants --------------------------------------------------------


@pytest.mark.parametrize("variant", ["json_escape", "upper", "suffix", "url_escape"])
def test_scrub_body_masks_every_echo_of_the_exact_key(variant):
    key = "sk-proj-" + "aB3dE5gH7jK9mN1pQ2rS4tU6vW8xY0zA"
    """``scrub_body`` masks the key however it is spelt: JSON-escaped (a
    client's parser restores it), upper-cased, without its ``sk-`` prefix,
    percent-escaped."""
    if variant == "json_escape":
        echo = key.replace("-", "\\u002d")
    elif variant == "upper":
        echo = key.upper()
    elif variant == "suffix":
        echo = key[3:]  # "proj-…": the part after the prefix, 37 of 40 characters
    else:
        echo = "".join(f"%{ord(c):02X}" if c in "-" else c for c in key)
    body = f'{{"error":{{"message":"Incorrect API key provided: {echo}."}}}}'.encode()
    out = scrub_body(body, key.encode())
    restored = json.loads(out)["error"]["message"]
    if variant == "url_escape":
        restored = unquote(restored)
    assert key[-24:].lower() not in restored.lower()


def _all_header_bytes(resp) -> bytes:
    return b"\n".join(
        name + b": " + b",".join(values) for name, values in resp.headers.getAllRawHeaders()
    )


async def _post_no_redirect(env, path: str, body):
    """As ``env.post``, without following a 3xx (treq would)."""
    return await treq.post(
        proxy_url(env.service, path),
        data=json.dumps(body).encode(),
        headers={"content-type": ["application/json"], "authorization": [f"Bearer {env.key}"]},
        allow_redirects=False,
        pool=env.pool,
    )


# --- provider response headers are relayed unscrubbed ------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_provider_header_quoting_the_key_is_not_relayed(env):
    """A 401's WWW-Authenticate (or any debug header) quoting the key the
    provider was sent: masked like the body."""
    env.provider.next(
        Script(
            status=401,
            headers={"www-authenticate": f'Bearer realm="api", error="invalid_token {OPENAI_KEY}"'},
            body=b'{"error":{"message":"bad key"}}',
        )
    )
    resp = await env.post("/v1/chat/completions", CHAT)
    await resp.content()
    assert resp.code == 401
    assert OPENAI_KEY.encode() not in _all_header_bytes(resp)


@pytest_twisted.ensureDeferred
async def test_a_redirect_location_carrying_the_key_is_not_relayed(env):
    """A provider that authenticates by query string (Gemini's ?key=) and
    redirects keeps the query: the Location quoting the key is masked."""
    for location in (f"https://elsewhere.example/v1?key={OPENAI_KEY}", f"/v1?key={OPENAI_KEY}"):
        env.provider.next(Script(redirect_to=location))
        resp = await _post_no_redirect(env, "/v1/chat/completions", CHAT)
        body = await resp.content()
        # (an absolute one is not passed back at all: 502)
        assert resp.code == (302 if location.startswith("/") else 502)
        assert OPENAI_KEY.encode() not in _all_header_bytes(resp) + body


@pytest_twisted.ensureDeferred
async def test_a_3xx_body_quoting_the_key_is_masked(env):
    """A redirect page is held and masked as an error body is."""
    env.provider.next(
        Script(
            status=307,
            headers={"location": "/v1/elsewhere"},
            body=f"Moved: https://elsewhere.example/v1?key={OPENAI_KEY}".encode(),
        )
    )
    resp = await _post_no_redirect(env, "/v1/chat/completions", CHAT)
    body = await resp.content()
    assert resp.code == 307
    assert OPENAI_KEY.encode() not in body


# --- the error body's masking misses encodings of the key --------------------------------


@pytest_twisted.ensureDeferred
async def test_a_json_escaped_key_in_an_error_body_is_masked(env):
    """JSON may escape any character: ``sk\\u002d...`` is the key once the
    client parses the body: masked in the decoded strings."""
    escaped = OPENAI_KEY.replace("-", "\\u002d")
    body = ('{"error":{"message":"Incorrect API key provided: ' + escaped + '"}}').encode()
    env.provider.next(Script(status=401, body=body))
    resp = await env.post("/v1/chat/completions", CHAT)
    raw = await resp.content()
    assert resp.code == 401
    assert OPENAI_KEY not in json.loads(raw)["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_lectr_key_in_the_query_string_is_not_sent_upstream(env):
    """Clients built for query-string keys (Gemini's ``?key=``, ``?api_key=``)
    put the Lectr key in the URL: that parameter is not forwarded - a third
    party would receive (and log) the org's Lectr key."""
    resp = await env.post(f"/v1/chat/completions?api_key={env.key}", CHAT)
    await resp.content()
    assert resp.code == 200
    [call] = env.provider.calls()
    assert env.key not in call.query


def _client_reading(out: bytes) -> str:
    """What a client makes of a body: JSON strings decoded (then any
    percent-escapes), else the text."""
    try:
        doc = json.loads(out)
    except ValueError:
        return unquote(out.decode("utf-8", "replace"))
    strings: list[str] = []

    def walk(v) -> None:
        if isinstance(v, str):
            strings.append(unquote(v))
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)

    walk(doc)
    return "\n".join(strings)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_no_spelling_of_the_key_survives_scrubbing(data):
    """Generated echoes of the key: any prefix dropped (up to a third), each
    character as it is, in the other case, JSON-\\u-escaped (in a JSON body)
    or percent-escaped; in a JSON body or plain text. What a client reads
    after scrubbing never holds the key's identifying part."""
    key = "sk-proj-" + data.draw(
        st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=24, max_size=48)
    )
    as_json = data.draw(st.booleans())
    forms = ["plain", "swap", "pct"] + (["json"] if as_json else [])
    start = data.draw(st.integers(0, len(key) // 3))
    echo = []
    for c in key[start:]:
        form = data.draw(st.sampled_from(forms))
        echo.append(
            c.swapcase()
            if form == "swap"
            else f"%{ord(c):02X}"
            if form == "pct"
            else f"\\u{ord(c):04x}"
            if form == "json"
            else c
        )
    text = "Incorrect API key provided: " + "".join(echo) + "."
    body = ('{"error":{"message":"' + text + '"}}').encode() if as_json else text.encode()
    out = scrub_body(body, key.encode())
    assert key[len(key) // 3 :].lower() not in _client_reading(out).lower()


# --- a key check's message (the admin API's 422/502 when a key is added) -------------------


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_key_checks_message_never_repeats_a_run_of_the_key(data):
    """``scrub(message, key)`` on a provider's answer to a key check: the
    provider may quote the key cut short, masked at one end, in another case
    or percent-escaped, and a key may have no recognisable prefix (Azure's
    32 hex digits). No run of ``RUN`` characters of the key survives."""
    from lectr.providers.base import ECHO_RUN, scrub

    alphabet = data.draw(
        st.sampled_from(["0123456789abcdef", string.ascii_letters + string.digits])
    )
    key = data.draw(st.text(alphabet=alphabet, min_size=24, max_size=64))
    start = data.draw(st.integers(0, len(key) - ECHO_RUN))
    end = data.draw(st.integers(start + ECHO_RUN, len(key)))
    echo = key[start:end]
    form = data.draw(st.sampled_from(["plain", "upper", "masked_end", "pct"]))
    if form == "upper":
        echo = echo.upper()
    elif form == "masked_end":
        echo = echo[:-4] + "****" if len(echo) >= ECHO_RUN + 4 else echo
    elif form == "pct":
        echo = "".join(f"%{ord(c):02X}" for c in echo)
    message = f"Incorrect API key provided: {echo}. You can find your API key at https://x.example."
    out = scrub(message, key)
    readable = unquote(out).lower()
    low = key.lower()
    assert not any(low[i : i + ECHO_RUN] in readable for i in range(len(low) - ECHO_RUN + 1)), out
    assert "You can find your API key" in out or form == "pct"
