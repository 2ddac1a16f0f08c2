"""The whole surface of the official ``openai`` and ``anthropic`` SDKs through
a real Lectr, not just chat: a matrix of the endpoint families a gateway
user calls with nothing but a base-URL swap and a Lectr key.

For every call the test checks, end to end:

- the SDK call succeeds and parses (or raises the SDK's own exception, with
  the provider's message);
- the provider received it on the right method and path, with the body the
  SDK sent byte for byte (multipart uploads included; the one documented
  change is the ``stream_options.include_usage`` Lectr adds to an OpenAI
  chat/completions stream that did not ask), and the org's provider key -
  never the Lectr key, anywhere;
- Lectr logged one request row with the right provider, model, method,
  path, status and, where the provider reports usage, its token counts.

Every exchange is paired exactly: the SDK's HTTP client records what it
sent and received (event hooks), the fake provider answers each request
with its own ``x-request-id`` / ``request-id``, and the request row is read
by the ``x-lectr-request-id`` the client received.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anthropic
import httpx2
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import ADMIN_TOKEN, eventually
from tests.support.fake_provider import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    SPEECH_BYTES,
    TOOL_INPUT,
    TRANSCRIPT,
)

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello"}]
INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLAUDE_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
# An upload that a careless proxy would mangle: every byte value, CRLFs,
# a line that looks like a multipart delimiter, NULs, invalid UTF-8.
AWKWARD_BYTES = (
    b'{"custom_id":"r1"}\r\n--boundary\r\n\r\n\x00\xff\xfe' + bytes(range(256)) + b"\r\n--\r\n"
)


# request headers Lectr replaces or drops (docs/integration.md#headers)
NOT_PASSED = {
    "authorization",
    "x-api-key",
    "host",
    "content-length",
    "accept-encoding",
    "connection",
}


# --- plumbing ------------------------------------------------------------------------


@dataclass
class Exchange:
    """One HTTP exchange of an SDK client, as its HTTP client saw it."""

    request: Any
    response: Any = None

    @property
    def sent(self) -> bytes:
        return self.request.content

    @property
    def lectr_id(self) -> str:
        return self.response.headers["x-lectr-request-id"]


@dataclass
class Recorder:
    exchanges: list[Exchange] = field(default_factory=list)

    def on_request(self, request) -> None:
        request.read()  # (a multipart body is replayable once read)
        self.exchanges.append(Exchange(request))

    def on_response(self, response) -> None:
        for ex in reversed(self.exchanges):
            if ex.request is response.request:
                ex.response = response
                return

    def hooks(self) -> dict:
        return {"request": [self.on_request], "response": [self.on_response]}

    @property
    def last(self) -> Exchange:
        return self.exchanges[-1]

    def mark(self) -> int:
        return len(self.exchanges)

    def since(self, mark: int) -> list[Exchange]:
        return self.exchanges[mark:]


def openai_client(stack, key: str, rec: Recorder) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.proxy}/v1",
        api_key=key,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(event_hooks=rec.hooks()),
    )


def anthropic_client(stack, key: str, rec: Recorder, suffix: str = "") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.proxy + suffix,
        api_key=key,
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(event_hooks=rec.hooks()),
    )


def admin_get(stack, path: str):
    req = urllib.request.Request(
        stack.admin + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def logged_row(stack, org, lectr_id: str) -> dict:
    """The request-log row of one request (rows are written behind it)."""

    def row():
        try:
            return admin_get(stack, f"/admin/orgs/{org.id}/requests/{lectr_id}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    return eventually(row, timeout=10)


def upstream_call(stack, ex: Exchange, provider: str) -> dict:
    """The request the fake provider received for this exchange: the one it
    answered with the request id the SDK received."""
    header = "request-id" if provider == "anthropic" else "x-request-id"
    rid = ex.response.headers.get(header)
    assert rid, f"no {header} passed back to the SDK"
    url = f"{stack.fake.origin}/_control/calls?request_id={rid}"
    with urllib.request.urlopen(url, timeout=5) as r:
        [call] = json.loads(r.read())
    return call


def check(
    stack,
    org,
    ex: Exchange,
    *,
    provider: str,
    method: str,
    path: str,
    model: str | None,
    status: int = 200,
    tokens: tuple[int | None, int | None, int | None] | None = None,
    streamed: bool = False,
    query: str | None = None,
    body: str = "same",
) -> dict:
    """The provider got this exchange intact with the org's key; Lectr logged
    it (checked when the test ends, by ``logged_rows``). ``body``: ``same`` (byte for byte), ``usage_added`` (Lectr asked an
    OpenAI stream for its usage)."""
    assert ex.response is not None and ex.response.status_code == status
    call = upstream_call(stack, ex, provider)
    assert (call["method"], call["path"]) == (method, path)
    sent_query = ex.request.url.query
    sent_query = sent_query.decode() if isinstance(sent_query, bytes) else sent_query
    assert call["query"] == sent_query  # as the SDK wrote it
    if query is not None:
        assert parse_qs(call["query"]) == parse_qs(query)
    received = base64.b64decode(call["body_b64"])
    if body == "same":
        assert received == ex.sent
    else:
        assert body == "usage_added"
        assert received == ex.sent.replace(b"{", b"{" + INCLUDE_USAGE, 1)
    headers = call["headers"]
    if provider == "anthropic":
        assert headers["x-api-key"] == [ANTHROPIC_KEY]
        assert "authorization" not in headers
    else:
        assert headers["authorization"] == [f"Bearer {OPENAI_KEY}"]
        assert "x-api-key" not in headers
    for name, value in ex.request.headers.items():
        # every other header the SDK sent arrives as it was (anthropic-version,
        # anthropic-beta, content-type with its boundary, user-agent, x-stainless-*...)
        if name.lower() not in NOT_PASSED:
            assert ", ".join(headers.get(name.lower(), [])) == value, name
    assert org.key not in json.dumps(call)  # not in a header, the query or the body
    assert org.key.encode() not in received

    expect = {
        "provider": provider,
        "model": model,
        "method": method,
        "path": path,
        "status": status,
        "streamed": streamed,
    }
    # (the rows are checked together when the test ends: they are written a
    # moment behind the requests)
    _ROWS.append((org, ex.lectr_id, expect, tokens))
    return call


# (org, x-lectr-request-id, expected fields, expected token counts)
_ROWS: list[tuple[Any, str, dict, tuple | None]] = []


@pytest.fixture(autouse=True)
def logged_rows(stack):
    """Every request ``check`` saw has its row in the request log, with the
    provider, model, method, path, status and token counts expected."""
    _ROWS.clear()
    yield
    pending, rows = list(_ROWS), {}
    _ROWS.clear()

    def all_logged() -> bool:
        for org_id in {org.id for org, *_ in pending}:
            page = admin_get(stack, f"/admin/orgs/{org_id}/requests?limit=200")
            rows.update({r["request_id"]: r for r in page["items"]})
        return all(lectr_id in rows for _, lectr_id, *_ in pending)

    if pending:
        eventually(all_logged, timeout=10)
    for _, lectr_id, expect, tokens in pending:
        row = rows[lectr_id]
        assert {k: row[k] for k in expect} == expect, row
        counts = (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"])
        if tokens is None:
            assert counts == (None, None, None) and row["usage_source"] == "none", row
        else:
            assert counts == tokens and row["usage_source"] == "provider", row


@pytest.fixture(scope="module")
def org(stack):
    stack.fake._control("options", {"request_ids": True})
    return stack.new_org()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def oai(stack, org, rec) -> openai.OpenAI:
    return openai_client(stack, org.key, rec)


@pytest.fixture
def claude(stack, org, rec) -> anthropic.Anthropic:
    return anthropic_client(stack, org.key, rec)


# --- OpenAI: chat ------------------------------------------------------------------


def test_openai_chat_plain(stack, org, oai, rec):
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0.2)
    assert reply.choices[0].message.content == "Hello!"
    assert reply._request_id == rec.last.response.headers["x-request-id"]
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        tokens=(12, 5, 17),
    )


def test_openai_chat_stream_without_usage_request(stack, org, oai, rec):
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the fake"
    assert all(c.usage is None and c.choices for c in chunks)  # Lectr's usage chunk removed
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o",
        tokens=(12, 5, 17),
        streamed=True,
        body="usage_added",
    )


def test_openai_chat_stream_with_the_clients_own_include_usage(stack, org, oai, rec):
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # the client asked: it gets its usage chunk, and the null usage on the others
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 17
    assert all(c.usage is None for c in chunks[:-1])
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        tokens=(12, 5, 17),
        streamed=True,
    )


def test_openai_chat_stream_helper(stack, org, oai, rec):
    with oai.chat.completions.stream(model="gpt-4o-mini", messages=MESSAGES) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Hello from the fake"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        tokens=(12, 5, 17),
        streamed=True,
        body="usage_added",
    )


def test_openai_chat_tool_call(stack, org, oai, rec):
    reply = oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="auto"
    )
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_INPUT
    assert reply.choices[0].finish_reason == "tool_calls"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        tokens=(30, 9, 39),
    )


def test_openai_chat_tool_call_streamed(stack, org, oai, rec):
    with oai.chat.completions.stream(
        model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL]
    ) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", TOOL_INPUT)
    assert final.usage is None  # the client did not ask
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        tokens=(30, 9, 39),
        streamed=True,
        body="usage_added",
    )


class Answer(pydantic.BaseModel):
    answer: str
    n: int


def test_openai_chat_structured_output(stack, org, oai, rec):
    parsed = oai.chat.completions.parse(
        model="gpt-4o-mini", messages=MESSAGES, response_format=Answer
    )
    assert parsed.choices[0].message.parsed == Answer(answer="Hello!", n=1)
    call = check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        tokens=(12, 5, 17),
    )
    assert json.loads(call["body"])["response_format"]["type"] == "json_schema"

    reply = oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content) == {"answer": "Hello!", "n": 1}
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        tokens=(12, 5, 17),
    )


@pytest.mark.parametrize(
    "options",
    [{"include_usage": False}, {"include_obfuscation": False}],
    ids=["include_usage_false", "other_option"],
)
def test_openai_chat_stream_with_other_stream_options(stack, org, oai, rec, options):
    """stream_options that do not ask for usage: Lectr asks on the client's
    behalf (keeping its other options) and the client still gets exactly
    the stream it asked for."""
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options=options
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the fake"
    assert all(c.usage is None and c.choices for c in chunks)
    call = upstream_call(stack, rec.last, "openai")
    sent = json.loads(rec.last.sent)
    assert json.loads(call["body"]) == {
        **sent,
        "stream_options": {**options, "include_usage": True},
    }
    logged = logged_row(stack, org, rec.last.lectr_id)
    assert (logged["prompt_tokens"], logged["completion_tokens"]) == (12, 5)


def test_openai_errors_on_streams(stack, org, oai, rec):
    """A provider error before the stream starts, and an error event in
    the middle of one, reach the SDK as its exceptions."""
    stack.fake.next(
        status=400,
        body=json.dumps(
            {"error": {"message": "bad stream", "type": "invalid_request_error", "code": None}}
        ),
    )
    with pytest.raises(openai.BadRequestError, match="bad stream"):
        list(oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        status=400,
        streamed=True,
        body="usage_added",
    )
    first = (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    )
    error = b'data: {"error":{"message":"the server had an error","type":"server_error"}}\n\n'
    stack.fake.next(events=[first.decode(), error.decode()])
    with pytest.raises(openai.APIError, match="the server had an error"):
        list(oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))


def test_anthropic_error_event_mid_stream(stack, org, claude, rec):
    start = (
        'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        '"type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],'
        '"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1}}}\n\n'
    )
    error = (
        "event: error\n"
        'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    stack.fake.next(events=[start, error])
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        with claude.messages.stream(
            model="claude-sonnet-4-5", max_tokens=16, messages=MESSAGES
        ) as stream:
            stream.until_done()
    row = logged_row(stack, org, rec.last.lectr_id)
    assert (row["status"], row["model"], row["streamed"]) == (200, "claude-sonnet-4-5", True)


def test_openai_raw_response_headers(stack, org, oai, rec):
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    upstream = upstream_call(stack, rec.last, "openai")
    assert raw.headers["x-request-id"] == upstream["request_id"] == completion._request_id
    assert raw.headers["x-fake-provider"] == "openai"  # the provider's own headers pass
    assert raw.headers["x-lectr-request-id"] == rec.last.lectr_id
    assert raw.headers["x-lectr-route"].startswith("route=-; provider=openai; model=gpt-4o-mini")
    with oai.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    ) as response:
        assert response.headers["x-request-id"].startswith("req_")
        assert response.parse().choices[0].message.content == "Hello!"


# --- OpenAI: responses, embeddings, completions, moderations, models ---------------


def test_openai_responses(stack, org, oai, rec):
    resp = oai.responses.create(model="gpt-4o-mini", input="hi", instructions="be brief")
    assert resp.output_text == "Hi"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/responses",
        model="gpt-4o-mini",
        tokens=(9, 4, 13),
    )
    with oai.responses.stream(model="gpt-4o-mini", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Hi" and final.usage.total_tokens == 13
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/responses",
        model="gpt-4o-mini",
        tokens=(9, 4, 13),
        streamed=True,
    )
    got = oai.responses.retrieve(resp.id)
    assert got.id == resp.id
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="GET",
        path=f"/v1/responses/{resp.id}",
        model=None,
    )
    oai.responses.delete(resp.id)
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="DELETE",
        path=f"/v1/responses/{resp.id}",
        model=None,
    )


def test_openai_embeddings(stack, org, oai, rec):
    emb = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [3, 3]
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/embeddings",
        model="text-embedding-3-small",
        tokens=(16, None, 16),
    )


def test_openai_legacy_completions(stack, org, oai, rec):
    done = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=5)
    assert done.choices[0].text == "Hello!"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/completions",
        model="gpt-3.5-turbo-instruct",
        tokens=(7, 2, 9),
    )
    chunks = list(
        oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello", stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == "Hello from the fake"
    assert all(c.usage is None for c in chunks)
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/completions",
        model="gpt-3.5-turbo-instruct",
        tokens=(7, 5, 12),
        streamed=True,
        body="usage_added",
    )


def test_openai_moderations(stack, org, oai, rec):
    mod = oai.moderations.create(model="omni-moderation-latest", input="hello")
    assert mod.results[0].flagged is False
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/moderations",
        model="omni-moderation-latest",
    )


def test_openai_models_list_retrieve_delete(stack, org, oai, rec):
    assert [m.id for m in oai.models.list()] == ["gpt-4o-mini"]
    check(stack, org, rec.last, provider="openai", method="GET", path="/v1/models", model=None)
    assert oai.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="GET",
        path="/v1/models/gpt-4o-mini",
        model=None,
    )
    # a fine-tuned model's id has colons
    tuned = "ft:gpt-4o-mini-2024-07-18:acme::AbC123"
    assert oai.models.retrieve(tuned).id == tuned
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="GET",
        path=f"/v1/models/{tuned}",
        model=None,
    )
    assert oai.models.delete(tuned).deleted is True
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="DELETE",
        path=f"/v1/models/{tuned}",
        model=None,
    )


# --- OpenAI: files and batches -----------------------------------------------------


def test_openai_files_round_trip(stack, org, oai, rec):
    created = oai.files.create(file=("requests.jsonl", AWKWARD_BYTES), purpose="batch")
    assert created.bytes == len(AWKWARD_BYTES) and created.filename == "requests.jsonl"
    call = check(
        stack, org, rec.last, provider="openai", method="POST", path="/v1/files", model=None
    )
    assert call["headers"]["content-type"][0].startswith("multipart/form-data; boundary=")

    listed = oai.files.list(purpose="batch", limit=5)
    assert created.id in [f.id for f in listed.data]
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="GET",
        path="/v1/files",
        model=None,
        query="purpose=batch&limit=5",
    )
    assert oai.files.retrieve(created.id).bytes == len(AWKWARD_BYTES)
    content = oai.files.content(created.id)
    assert content.content == AWKWARD_BYTES  # the binary answer, byte for byte
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="GET",
        path=f"/v1/files/{created.id}/content",
        model=None,
    )
    assert oai.files.delete(created.id).deleted is True
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="DELETE",
        path=f"/v1/files/{created.id}",
        model=None,
    )


def test_openai_large_upload_is_intact(stack, org, oai, rec):
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
    created = oai.files.create(file=("big.bin", payload), purpose="user_data")
    assert created.bytes == len(payload)
    check(stack, org, rec.last, provider="openai", method="POST", path="/v1/files", model=None)
    assert oai.files.content(created.id).content == payload


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    content=st.binary(max_size=2048),
    # any name: quotes, backslashes, controls, non-ASCII (the SDK's HTTP
    # client escapes what a header cannot carry)
    name=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30),
    mime=st.sampled_from(
        ["application/jsonl", "application/octet-stream", "text/plain; charset=utf-8"]
    ),
)
def test_openai_upload_any_bytes_and_file_name(stack, org, oai, rec, content, name, mime):
    """Whatever the file holds and whatever its name, the multipart body the
    SDK builds reaches the provider byte for byte (Lectr reads it strictly
    but forwards it untouched)."""
    created = oai.files.create(file=(name, content, mime), purpose="user_data")
    assert created.bytes == len(content)
    check(stack, org, rec.last, provider="openai", method="POST", path="/v1/files", model=None)


def test_openai_batches(stack, org, oai, rec):
    upload = oai.files.create(file=("b.jsonl", b'{"custom_id":"1"}\n'), purpose="batch")
    batch = oai.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "validating" and batch.input_file_id == upload.id
    check(stack, org, rec.last, provider="openai", method="POST", path="/v1/batches", model=None)
    assert oai.batches.retrieve(batch.id).id == batch.id
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="GET",
        path=f"/v1/batches/{batch.id}",
        model=None,
    )
    assert oai.batches.cancel(batch.id).status == "cancelling"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path=f"/v1/batches/{batch.id}/cancel",
        model=None,
    )
    assert batch.id in [b.id for b in oai.batches.list(limit=10)]
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="GET",
        path="/v1/batches",
        model=None,
        query="limit=10",
    )


# --- OpenAI: audio and images ------------------------------------------------------


def test_openai_audio_transcription(stack, org, oai, rec):
    audio = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 8
    text = oai.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("hello.wav", audio, "audio/wav"), language="en"
    )
    assert text.text == TRANSCRIPT
    call = check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/audio/transcriptions",
        model="gpt-4o-transcribe",  # the multipart model field
        tokens=(14, 4, 18),
    )
    assert audio in base64.b64decode(call["body_b64"])


def test_openai_audio_transcription_streamed(stack, org, oai, rec):
    events = list(
        oai.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("hello.wav", b"RIFF....WAVE"), stream=True
        )
    )
    assert events[-1].type == "transcript.text.done" and events[-1].text == TRANSCRIPT
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/audio/transcriptions",
        model="gpt-4o-mini-transcribe",
        tokens=(14, 4, 18),
        # (a multipart body's stream field is not JSON's "stream": true)
        streamed=False,
    )


def test_openai_audio_translation(stack, org, oai, rec):
    text = oai.audio.translations.create(model="whisper-1", file=("bonjour.mp3", b"ID3\x03fake"))
    assert text.text == TRANSCRIPT
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/audio/translations",
        model="whisper-1",
    )


def test_openai_audio_speech_binary_answer(stack, org, oai, rec):
    speech = oai.audio.speech.create(model="tts-1", voice="alloy", input="Hello")
    assert speech.content == SPEECH_BYTES
    assert speech.response.headers["content-type"] == "audio/mpeg"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/audio/speech",
        model="tts-1",
    )
    with oai.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Hello", response_format="mp3"
    ) as response:
        assert b"".join(response.iter_bytes(chunk_size=100)) == SPEECH_BYTES


def test_openai_images(stack, org, oai, rec):
    image = oai.images.generate(model="gpt-image-1", prompt="a cat", size="1024x1024")
    assert base64.b64decode(image.data[0].b64_json) == b"\x89PNG fake"
    check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/images/generations",
        model="gpt-image-1",
        tokens=(50, 272, 322),
    )
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    edited = oai.images.edit(
        model="gpt-image-1", image=("cat.png", png, "image/png"), prompt="a hat"
    )
    assert edited.data[0].b64_json
    call = check(
        stack,
        org,
        rec.last,
        provider="openai",
        method="POST",
        path="/v1/images/edits",
        model="gpt-image-1",
        tokens=(50, 272, 322),
    )
    assert png in base64.b64decode(call["body_b64"])


def test_openai_image_stream_with_large_events(stack, org, oai, rec):
    """Streamed image generation: events of a megabyte and more (partial
    images in base64) reach the SDK whole, and the completed event's usage
    is metered."""
    big = base64.b64encode(bytes(range(256)) * 6000).decode()  # ~2 MB of base64
    usage = {"input_tokens": 50, "output_tokens": 272, "total_tokens": 322}
    events = [
        "event: image_generation.partial_image\ndata: "
        + json.dumps(
            {
                "type": "image_generation.partial_image",
                "b64_json": big[: 700_000 * (i + 1)],
                "partial_image_index": i,
                "created_at": 1,
                "size": "1024x1024",
                "quality": "low",
                "background": "opaque",
                "output_format": "png",
            }
        )
        + "\n\n"
        for i in range(2)
    ]
    events.append(
        "event: image_generation.completed\ndata: "
        + json.dumps(
            {
                "type": "image_generation.completed",
                "b64_json": big,
                "created_at": 1,
                "size": "1024x1024",
                "quality": "low",
                "background": "opaque",
                "output_format": "png",
                "usage": usage,
            }
        )
        + "\n\n"
    )
    stack.fake.next(events=events)
    got = list(
        oai.images.generate(model="gpt-image-1", prompt="a cat", stream=True, partial_images=2)
    )
    assert [e.type for e in got] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert got[-1].b64_json == big and got[1].b64_json == big[:1_400_000]
    row = logged_row(stack, org, rec.last.lectr_id)
    assert (row["status"], row["model"], row["streamed"]) == (200, "gpt-image-1", True)
    tokens = (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"])
    assert (tokens, row["usage_source"]) == ((50, 272, 322), "provider")


# --- OpenAI: the other families (the fake answers them with an echo) ----------------


# (name, call, method, path, model): every one goes through untouched; none
# reports usage
OTHER_OPENAI_CALLS = [
    (
        "vector_stores.create",
        lambda c: c.vector_stores.create(name="docs", metadata={"team": "a"}),
        "POST",
        "/v1/vector_stores",
        None,
    ),
    (
        "vector_stores.search",
        lambda c: c.vector_stores.search("vs_1", query="refund policy", max_num_results=3),
        "POST",
        "/v1/vector_stores/vs_1/search",
        None,
    ),
    (
        "fine_tuning.jobs.create",
        lambda c: c.fine_tuning.jobs.create(
            model="gpt-4o-mini-2024-07-18", training_file="file-abc", suffix="acme"
        ),
        "POST",
        "/v1/fine_tuning/jobs",
        "gpt-4o-mini-2024-07-18",
    ),
    (
        "fine_tuning.jobs.list",
        lambda c: c.fine_tuning.jobs.list(limit=2),
        "GET",
        "/v1/fine_tuning/jobs",
        None,
    ),
    (
        "uploads.create",
        lambda c: c.uploads.create(
            bytes=3, filename="a.jsonl", mime_type="text/jsonl", purpose="batch"
        ),
        "POST",
        "/v1/uploads",
        None,
    ),
    (
        "uploads.parts.create",
        lambda c: c.uploads.parts.create("upload_1", data=AWKWARD_BYTES),
        "POST",
        "/v1/uploads/upload_1/parts",
        None,
    ),
    (
        "conversations.create",
        lambda c: c.conversations.create(metadata={"topic": "demo"}),
        "POST",
        "/v1/conversations",
        None,
    ),
    (
        "responses.input_tokens.count",
        lambda c: c.responses.input_tokens.count(model="gpt-4o-mini", input="hello"),
        "POST",
        "/v1/responses/input_tokens",
        "gpt-4o-mini",
    ),
    (
        "containers.create",
        lambda c: c.containers.create(name="sandbox"),
        "POST",
        "/v1/containers",
        None,
    ),
]


@pytest.mark.parametrize(
    ("call", "method", "path", "model"),
    [c[1:] for c in OTHER_OPENAI_CALLS],
    ids=[c[0] for c in OTHER_OPENAI_CALLS],
)
def test_openai_other_families(stack, org, oai, rec, call, method, path, model):
    call(oai)
    check(stack, org, rec.last, provider="openai", method=method, path=path, model=model)


def test_async_clients_multipart_and_streams(stack, org):
    """The async clients build their bodies (multipart included) and read
    their streams on other code paths."""
    rec = Recorder()

    async def on_request(request) -> None:
        await request.aread()
        rec.exchanges.append(Exchange(request))

    async def on_response(response) -> None:
        rec.on_response(response)

    hooks = {"request": [on_request], "response": [on_response]}

    async def run() -> None:
        oai = openai.AsyncOpenAI(
            base_url=f"{stack.proxy}/v1",
            api_key=org.key,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
        )
        created = await oai.files.create(file=("a.jsonl", AWKWARD_BYTES), purpose="batch")
        assert created.bytes == len(AWKWARD_BYTES)
        check(stack, org, rec.last, provider="openai", method="POST", path="/v1/files", model=None)
        text = await oai.audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("a.wav", b"RIFF....WAVE")
        )
        assert text.text == TRANSCRIPT
        check(
            stack,
            org,
            rec.last,
            provider="openai",
            method="POST",
            path="/v1/audio/transcriptions",
            model="gpt-4o-transcribe",
            tokens=(14, 4, 18),
        )
        stream = await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage.total_tokens == 17
        await oai.close()
        claude = anthropic.AsyncAnthropic(
            base_url=stack.proxy,
            api_key=org.key,
            max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(event_hooks=hooks),
        )
        count = await claude.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES)
        assert count.input_tokens == 21
        async with claude.messages.stream(
            model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES, tools=[CLAUDE_TOOL]
        ) as s:
            final = await s.get_final_message()
        assert final.stop_reason == "tool_use"
        await claude.close()

    asyncio.run(run())
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        tokens=(10, 7, 17),
        streamed=True,
    )


# --- OpenAI: provider errors reach the SDK as its own exceptions --------------------


OPENAI_ERRORS = [
    (400, "invalid_request_error", openai.BadRequestError),
    (401, "invalid_request_error", openai.AuthenticationError),
    (403, "permission_error", openai.PermissionDeniedError),
    (404, "invalid_request_error", openai.NotFoundError),
    (409, "invalid_request_error", openai.ConflictError),
    (422, "invalid_request_error", openai.UnprocessableEntityError),
    (429, "requests", openai.RateLimitError),
    (500, "server_error", openai.InternalServerError),
    (503, "server_error", openai.InternalServerError),
]


@pytest.fixture(scope="module")
def error_org(stack):
    """Its own org: provider 401/403/429 answers cool its key down."""
    stack.fake._control("options", {"request_ids": True})
    return stack.new_org()


@pytest.mark.parametrize(
    ("status", "kind", "exc"), OPENAI_ERRORS, ids=[str(e[0]) for e in OPENAI_ERRORS]
)
def test_openai_provider_errors(stack, error_org, rec, status, kind, exc):
    client = openai_client(stack, error_org.key, rec)
    message = f"provider says {status}: the model `gpt-x` does not exist or you lack access"
    stack.fake.next(
        status=status,
        body=json.dumps(
            {"error": {"message": message, "type": kind, "param": "model", "code": f"c{status}"}}
        ),
        headers={"retry-after": "7"} if status == 429 else {},
    )
    with pytest.raises(exc) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert type(err.value) is exc
    assert err.value.status_code == status
    assert message in str(err.value)
    assert err.value.body["message"] == message
    assert (err.value.code, err.value.param, err.value.type) == (f"c{status}", "model", kind)
    if status == 429:
        assert err.value.response.headers["retry-after"] == "7"
    ex = rec.last
    upstream = upstream_call(stack, ex, "openai")
    assert err.value.request_id == upstream["request_id"]
    check(
        stack,
        error_org,
        ex,
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        status=status,
    )


# --- Anthropic ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/anthropic"])
def test_anthropic_messages(stack, org, rec, suffix):
    claude = anthropic_client(stack, org.key, rec, suffix)
    msg = claude.messages.create(
        model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES, system="be brief"
    )
    assert msg.content[0].text == "Hello!"
    assert msg._request_id == rec.last.response.headers["request-id"]
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-3-5-haiku-latest",
        tokens=(10, 5, 15),
    )


def test_anthropic_messages_stream(stack, org, claude, rec):
    with claude.messages.stream(
        model="claude-sonnet-4-5", max_tokens=32, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the fake" and final.usage.output_tokens == 5
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        tokens=(10, 5, 15),
        streamed=True,
    )
    events = list(
        claude.messages.create(
            model="claude-sonnet-4-5", max_tokens=32, messages=MESSAGES, stream=True
        )
    )
    assert [e.type for e in events][-1] == "message_stop"
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        tokens=(10, 5, 15),
        streamed=True,
    )


def test_anthropic_tools(stack, org, claude, rec):
    msg = claude.messages.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES, tools=[CLAUDE_TOOL]
    )
    tool_use = [b for b in msg.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in tool_use] == [("get_weather", TOOL_INPUT)]
    assert msg.stop_reason == "tool_use"
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        tokens=(10, 5, 15),
    )
    with claude.messages.stream(
        model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES, tools=[CLAUDE_TOOL]
    ) as stream:
        final = stream.get_final_message()
    tool_use = [b for b in final.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in tool_use] == [("get_weather", TOOL_INPUT)]
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        tokens=(10, 7, 17),
        streamed=True,
    )


def test_anthropic_auth_token_bearer(stack, org, rec):
    """The Lectr key as auth_token (Authorization: Bearer): the provider
    still gets x-api-key with the org's key, and no Authorization."""
    claude = anthropic.Anthropic(
        base_url=stack.proxy,
        auth_token=org.key,
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(event_hooks=rec.hooks()),
    )
    assert claude.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES).input_tokens
    assert rec.last.request.headers["authorization"] == f"Bearer {org.key}"
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages/count_tokens",
        model="claude-sonnet-4-5",
    )


def test_anthropic_count_tokens(stack, org, claude, rec):
    count = claude.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES)
    assert count.input_tokens == 21
    # not a generation: nothing billed, nothing counted
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages/count_tokens",
        model="claude-sonnet-4-5",
    )


def test_anthropic_models(stack, org, claude, rec):
    assert [m.id for m in claude.models.list()] == ["claude-3-5-haiku-latest"]
    call = check(
        stack, org, rec.last, provider="anthropic", method="GET", path="/v1/models", model=None
    )
    assert call["headers"]["anthropic-version"] == [rec.last.request.headers["anthropic-version"]]
    assert claude.models.retrieve("claude-sonnet-4-5").id == "claude-sonnet-4-5"
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="GET",
        path="/v1/models/claude-sonnet-4-5",
        model=None,
    )


def test_anthropic_beta_headers_pass(stack, org, claude, rec):
    msg = claude.beta.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=32,
        messages=MESSAGES,
        betas=["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"],
    )
    assert msg.content[0].text == "Hello!"
    call = check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        tokens=(10, 5, 15),
    )
    assert call["headers"]["anthropic-beta"] == [
        "interleaved-thinking-2025-05-14,context-1m-2025-08-07"
    ]


def test_anthropic_beta_files(stack, org, claude, rec):
    uploaded = claude.beta.files.upload(
        file=("notes.pdf", AWKWARD_BYTES, "application/pdf"), betas=["files-api-2025-04-14"]
    )
    assert uploaded.size_bytes == len(AWKWARD_BYTES)
    call = check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/files",
        model=None,
    )
    assert call["headers"]["anthropic-beta"] == ["files-api-2025-04-14"]
    assert uploaded.id in [f.id for f in claude.beta.files.list()]
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="GET",
        path="/v1/files",
        model=None,
    )
    assert claude.beta.files.download(uploaded.id).read() == AWKWARD_BYTES
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="GET",
        path=f"/v1/files/{uploaded.id}/content",
        model=None,
    )
    claude.beta.files.delete(uploaded.id)
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="DELETE",
        path=f"/v1/files/{uploaded.id}",
        model=None,
    )


BATCH_REQUESTS = [
    {
        "custom_id": f"req-{i}",
        "params": {"model": "claude-3-5-haiku-latest", "max_tokens": 16, "messages": MESSAGES},
    }
    for i in range(2)
]


def test_anthropic_message_batches_create_retrieve(stack, org, claude, rec):
    batch = claude.messages.batches.create(requests=BATCH_REQUESTS)
    assert batch.processing_status == "in_progress"
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages/batches",
        model=None,  # a batch names its models inside each request
    )
    got = claude.messages.batches.retrieve(batch.id)
    assert got.processing_status == "ended" and got.request_counts.succeeded == 2
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="GET",
        path=f"/v1/messages/batches/{batch.id}",
        model=None,
    )


def test_anthropic_message_batch_results(stack, org, claude, rec):
    """The SDK fetches a batch's results from its results_url, which
    Anthropic makes absolute on its own origin: passed on unchanged, the SDK
    went to the provider around Lectr, carrying the Lectr key. Lectr makes
    it relative, so the results come through Lectr."""
    batch = claude.messages.batches.create(requests=BATCH_REQUESTS)
    mark = rec.mark()
    try:
        results = list(claude.messages.batches.results(batch.id))
    finally:
        # whatever happened, the Lectr key went nowhere but to Lectr
        for ex in rec.since(mark):
            assert str(ex.request.url).startswith(stack.proxy), ex.request.url
    assert [r.custom_id for r in results] == ["req-0", "req-1"]


def test_anthropic_message_batch_results_by_path(stack, org, claude, rec):
    """The workaround: ask Lectr for the results by their path."""
    batch = claude.messages.batches.create(requests=BATCH_REQUESTS)
    raw = claude.get(
        f"/v1/messages/batches/{batch.id}/results",
        cast_to=httpx2.Response,
        options={"headers": {"Accept": "application/binary"}},
    )
    lines = [json.loads(line) for line in raw.content.splitlines() if line.strip()]
    assert [r["custom_id"] for r in lines] == ["req-0", "req-1"]
    check(
        stack,
        org,
        rec.last,
        provider="anthropic",
        method="GET",
        path=f"/v1/messages/batches/{batch.id}/results",
        model=None,
    )


ANTHROPIC_ERRORS = [
    (400, "invalid_request_error", anthropic.BadRequestError),
    (401, "authentication_error", anthropic.AuthenticationError),
    (403, "permission_error", anthropic.PermissionDeniedError),
    (404, "not_found_error", anthropic.NotFoundError),
    (413, "request_too_large", anthropic.ContentTooLargeError),
    (429, "rate_limit_error", anthropic.RateLimitError),
    (500, "api_error", anthropic.InternalServerError),
    (529, "overloaded_error", anthropic.OverloadedError),
]


@pytest.mark.parametrize(
    ("status", "kind", "exc"), ANTHROPIC_ERRORS, ids=[str(e[0]) for e in ANTHROPIC_ERRORS]
)
def test_anthropic_provider_errors(stack, error_org, rec, status, kind, exc):
    claude = anthropic_client(stack, error_org.key, rec)
    message = f"provider says {status}: model: claude-x"
    stack.fake.next(
        status=status,
        body=json.dumps({"type": "error", "error": {"type": kind, "message": message}}),
        headers={"retry-after": "7"} if status == 429 else {},
    )
    with pytest.raises(exc) as err:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=MESSAGES)
    assert type(err.value) is exc
    assert err.value.status_code == status
    assert err.value.body["error"] == {"type": kind, "message": message}
    assert message in str(err.value)
    if status == 429:
        assert err.value.response.headers["retry-after"] == "7"
    upstream = upstream_call(stack, rec.last, "anthropic")
    assert err.value.request_id == upstream["request_id"]
    check(
        stack,
        error_org,
        rec.last,
        provider="anthropic",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        status=status,
    )


# --- the meter behind the images cells (no stack needed) ----------------------------


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
@pytest.mark.parametrize("size", [64, 3 * 1024 * 1024])  # parsed whole; read from its tail
def test_image_answers_are_metered(path, size):
    """gpt-image-* answers report token usage after the image data: it is
    read (it was not: images were logged without tokens)."""
    from lectr.providers.body import read_body
    from lectr.usage.meters import meter_for, plan_request

    request = json.dumps({"model": "gpt-image-1", "prompt": "a cat"}).encode()
    plan = plan_request("openai", b"POST", path, read_body([b"application/json"], request))
    answer = json.dumps(
        {
            "created": 1,
            "background": "opaque",
            "data": [{"b64_json": "A" * size}],
            "output_format": "png",
            "size": "1024x1024",
            "usage": {
                "input_tokens": 50,
                "output_tokens": 272,
                "total_tokens": 322,
                "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
            },
        },
        separators=(",", ":"),
    ).encode()
    meter = meter_for(plan, "openai", path, 200, b"application/json")
    for at in range(0, len(answer), 65536):
        assert meter.feed(answer[at : at + 65536]) == answer[at : at + 65536]
    usage = meter.finish()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (50, 272, 322)
    assert usage.source == "provider"
