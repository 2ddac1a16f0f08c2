"""Token accounting on the wire: request planning (include_usage injection)
and response meters fed in every possible chunking."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.providers.body import BodyRefused, read_body
from lectr.usage import meters
from lectr.usage.meters import (
    _OPENAI_TEXT_DELTA_RE as OPENAI_TEXT_DELTA_RE,
)
from lectr.usage.meters import (
    _RESPONSES_DELTA_RE as RESPONSES_DELTA_RE,
)
from lectr.usage.meters import (
    _USAGE_KEY_RE,
    INCLUDE_USAGE_MEMBER,
    JSON_FULL_PARSE_MAX,
    NOOP_METER,
    SSE_LINE_MAX,
    RequestPlan,
    _last_usage_key,
    anthropic_usage,
    meter_for,
    openai_usage,
)
from lectr.usage.meters import plan_request as plan_judged
from lectr.usage.model import NO_USAGE, RAW_USAGE_MAX, Usage
from tests.support.fake_provider import (
    anthropic_message,
    anthropic_stream,
    openai_chat_completion,
    openai_chat_stream,
    sse,
)

JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
CHAT = "/v1/chat/completions"
WORDS = ["Hel", "lo", " wor", "ld", "!"]


def plan_request(dialect, method, path, ct, raw) -> RequestPlan:
    """Judge the body as the proxy does, then plan it."""
    return plan_judged(dialect, method, path, read_body([ct] if ct else None, raw))


def plan(provider="openai", path=CHAT, body: dict | bytes | None = None, ct=JSON, method=b"POST"):
    raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    return plan_request(provider, method, path, ct, raw)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def run(meter, pieces: list[bytes]) -> tuple[bytes, Usage]:
    out = b"".join(meter.feed(p) for p in pieces)
    return out, meter.finish()


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def usage_chunk_event(events: list[bytes]) -> bytes:
    [event] = [e for e in events if b'"choices":[]' in e]
    return event


# --- plan_request ----------------------------------------------------------------


def test_chat_stream_without_include_usage_gets_it_spliced_in():
    raw = (
        b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi \\u00e9"}]}'
    )
    p = plan_request("openai", b"POST", CHAT, b"application/json; charset=utf-8", raw)
    assert p.strip_usage_chunk is True
    assert p.stream is True
    assert p.model == "gpt-4o-mini"
    # a byte-level splice: everything the client sent is still there, unchanged
    assert p.body == b"{" + INCLUDE_USAGE_MEMBER + raw[1:]
    doc = json.loads(p.body)
    assert doc["stream_options"] == {"include_usage": True}
    assert doc["messages"] == json.loads(raw)["messages"]


@pytest.mark.parametrize("prefix", [b"", b"  \r\n\t", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n "])
def test_splice_after_whitespace_and_bom(prefix):
    raw = prefix + b'{"stream": true, "model": "m"}'
    p = plan_request("openai", b"POST", CHAT, JSON, raw)
    assert p.strip_usage_chunk
    # a byte-order mark is not forwarded (the bytes sent are the bytes judged)
    assert p.body.startswith(prefix.removeprefix(b"\xef\xbb\xbf") + b"{" + INCLUDE_USAGE_MEMBER)
    assert json.loads(p.body)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "options, expected",
    [
        (None, {"include_usage": True}),
        ({}, {"include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        (
            {"include_obfuscation": False},
            {"include_obfuscation": False, "include_usage": True},
        ),
    ],
)
def test_existing_stream_options_are_completed(options, expected):
    body = {"model": "m", "stream": True, "stream_options": options, "temperature": 0.25}
    p = plan(body=body)
    assert p.strip_usage_chunk is True
    doc = json.loads(p.body)
    assert doc["stream_options"] == expected
    assert {k: v for k, v in doc.items() if k != "stream_options"} == {
        "model": "m",
        "stream": True,
        "temperature": 0.25,
    }


def test_rewrite_survives_lone_surrogates():
    raw = b'{"model":"m","stream":true,"stream_options":null,"user":"\\ud800x"}'
    p = plan_request("openai", b"POST", CHAT, JSON, raw)
    assert p.strip_usage_chunk
    assert json.loads(p.body)["user"] == "\ud800x"


def test_client_that_asked_for_usage_is_left_alone():
    raw = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    p = plan_request("openai", b"POST", CHAT, JSON, raw)
    assert p.body is raw
    assert p.strip_usage_chunk is False
    assert p.stream is True


@pytest.mark.parametrize(
    "provider, path, method, body",
    [
        ("openai", CHAT, b"POST", {"model": "m", "stream": False}),
        ("openai", CHAT, b"POST", {"model": "m"}),
        ("openai", CHAT, b"POST", {"model": "m", "stream": "yes"}),
        ("openai", CHAT, b"POST", {"model": "m", "stream": True, "stream_options": "bad"}),
        ("openai", "/v1/responses", b"POST", {"model": "m", "stream": True}),
        ("openai", "/v1/completions", b"POST", {"model": "m", "stream": True}),
        ("anthropic", "/v1/messages", b"POST", {"model": "claude", "stream": True}),
        ("openai", CHAT, b"PUT", {"model": "m", "stream": True}),
    ],
)
def test_no_injection_elsewhere(provider, path, method, body):
    raw = json.dumps(body).encode()
    p = plan_request(provider, method, path, JSON, raw)
    assert p.body is raw
    assert p.strip_usage_chunk is False
    assert p.stream is (body.get("stream") is True)


def test_model_only_when_a_string():
    for bad in (5, ["a"], None):
        with pytest.raises(BodyRefused, match="must be a string"):
            plan(body={"model": bad})
    assert plan(body={}).model is None
    assert plan(body={"model": "gpt-4o"}).model == "gpt-4o"
    assert plan(body={"model": "x"}, ct=b"Application/Vnd.Foo+JSON").model == "x"


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b'"text"', b"null", b"\xff\xfe{", b"{} x"])
def test_malformed_json_bodies(raw):
    with pytest.raises(BodyRefused) as e:
        plan_request("openai", b"POST", CHAT, JSON, raw)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("raw", [b"", b"  \n"])
def test_empty_json_body_is_not_malformed(raw):
    p = plan_request("openai", b"GET", "/v1/models", JSON, raw)
    assert p == RequestPlan(None, False, raw, False)


def test_non_json_bodies_pass_through():
    raw = b"model=gpt-4o&stream=true"
    p = plan_request("openai", b"POST", CHAT, b"application/x-www-form-urlencoded", raw)
    assert p == RequestPlan("gpt-4o", False, raw, False)  # the model is read; nothing changes
    binary = b"\x00\x01\x02{"
    assert plan_request("openai", b"POST", "/v1/files", b"application/octet-stream", binary) == (
        RequestPlan(None, False, binary, False)
    )
    assert plan_request("openai", b"GET", "/v1/models", None, b"") == RequestPlan(
        None, False, b"", False
    )


def _multipart(boundary: str, parts: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/mpeg\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_model_field():
    audio = b'\x00\x01name="model"\r\n\r\nnot-this' * 1000
    body = _multipart(
        "XyZ", [("file", audio, "a.mp3"), ("model", b"gpt-4o-transcribe", None), ("x", b"1", None)]
    )
    ct = b'multipart/form-data; boundary="XyZ"'
    p = plan_request("openai", b"POST", "/v1/audio/transcriptions", ct, body)
    assert p == RequestPlan("gpt-4o-transcribe", False, body, False)
    assert p.body is body
    unquoted = b"multipart/form-data; boundary=XyZ"
    assert plan_request("openai", b"POST", "/x", unquoted, body).model == "gpt-4o-transcribe"


def test_multipart_without_model():
    body = _multipart("b1", [("file", b"data", "model"), ("language", b"en", None)])
    ct = b"multipart/form-data; boundary=b1"
    assert plan_request("openai", b"POST", "/x", ct, body).model is None
    # a multipart body Lectr cannot read strictly is refused, never forwarded unjudged
    for ctype, raw in ((b"multipart/form-data", body), (ct, b"garbage"), (ct, body[:30])):
        with pytest.raises(BodyRefused):
            plan_request("openai", b"POST", "/x", ctype, raw)


# --- OpenAI chat streams ------------------------------------------------------------


def chat_events(include_usage=True, prompt=12, cached=3) -> list[bytes]:
    return openai_chat_stream("gpt-4o-mini", WORDS, include_usage, prompt=prompt, cached=cached)


EXPECTED_CHAT = Usage(12, 5, 17, 3, None, "provider")


def stripping_meter():
    p = plan(body={"model": "gpt-4o-mini", "stream": True})
    assert p.strip_usage_chunk
    return meter_for(p, "openai", CHAT, 200, SSE)


def passthrough_meter():
    p = plan(body={"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    return meter_for(p, "openai", CHAT, 200, SSE)


def test_chat_stream_usage_whole_and_bytewise():
    events = chat_events()
    stream = b"".join(events)
    for pieces in ([stream], bytewise(stream), events):
        meter = passthrough_meter()
        out, usage = run(meter, pieces)
        assert out == stream
        assert usage == EXPECTED_CHAT


def test_passthrough_meter_returns_the_same_objects():
    meter = passthrough_meter()
    for event in chat_events():
        assert meter.feed(event) is event


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_chat_stream_any_split(cuts):
    stream = b"".join(chat_events())
    out, usage = run(passthrough_meter(), split_at(stream, cuts))
    assert out == stream
    assert usage == EXPECTED_CHAT


def test_stripping_gives_exactly_the_stream_without_include_usage():
    with_usage = openai_chat_stream("gpt-4o-mini", WORDS, True, cached=3, cid="c1", created=7)
    without = b"".join(
        openai_chat_stream("gpt-4o-mini", WORDS, False, cached=3, cid="c1", created=7)
    )
    assert b'"usage"' in b"".join(with_usage) and b'"usage"' not in without
    stream = b"".join(with_usage)
    for pieces in ([stream], bytewise(stream), with_usage):
        out, usage = run(stripping_meter(), pieces)
        assert out == without
        assert usage == EXPECTED_CHAT


def test_stripping_removes_exactly_the_usage_chunk():
    events = chat_events()
    stream = b"".join(events)
    expected = stream.replace(usage_chunk_event(events), b"").replace(b',"usage":null', b"")
    for pieces in ([stream], bytewise(stream), events):
        out, usage = run(stripping_meter(), pieces)
        assert out == expected
        assert usage == EXPECTED_CHAT
    # what the client gets parses to the same chunks as the stream without
    # include_usage (which also has no usage chunk)
    assert b'"choices":[]' not in expected
    assert expected.count(b"data: ") == len(events) - 1
    assert expected.endswith(b"data: [DONE]\n\n")


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=60), crlf=st.booleans())
def test_stripping_any_split(cuts, crlf):
    events = chat_events()
    if crlf:
        events = [e.replace(b"\n", b"\r\n") for e in events]
    stream = b"".join(events)
    expected = stream.replace(usage_chunk_event(events), b"").replace(b',"usage":null', b"")
    out, usage = run(stripping_meter(), split_at(stream, cuts))
    assert out == expected
    assert usage == EXPECTED_CHAT


_CONTENT_TEXT = st.sampled_from(["hi", ' "usage":{', '"usage":null,', "usage", ""])


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(_CONTENT_TEXT, max_size=10),
    after=st.lists(_CONTENT_TEXT, max_size=3),
    spaced=st.booleans(),
    runs=st.lists(st.integers(min_value=1, max_value=6), max_size=20),
)
def test_stripping_runs_of_whole_events(before, after, spaced, runs):
    """Whatever runs of whole events the stream arrives in (the batched
    path), stripping removes exactly the usage-only event and the
    ``"usage": null`` member of each event before it - compact or spaced,
    whatever the text deltas say about usage - leaves every event after it
    byte for byte, and reads the report."""
    sep = (", ", ": ") if spaced else (",", ":")
    null = b', "usage": null' if spaced else b',"usage":null'

    def chunk(text: str, usage: object) -> bytes:
        doc = {"model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}
        return b"data: " + json.dumps({**doc, "usage": usage}, separators=sep).encode() + b"\n\n"

    report = {"prompt_tokens": 4, "completion_tokens": len(before), "total_tokens": 4}
    usage_event = (
        b"data: " + json.dumps({"choices": [], "usage": report}, separators=sep).encode() + b"\n\n"
    )
    events = [chunk(t, None) for t in before] + [usage_event]
    events += [chunk(t, None) for t in after] + [b"data: [DONE]\n\n"]
    expected = b"".join(
        [e.replace(null, b"") for e in events[: len(before)]] + events[len(before) + 1 :]
    )
    pieces, at = [], 0
    for size in [*runs, len(events)]:
        if at < len(events):
            pieces.append(b"".join(events[at : at + size]))
            at += size
    out, usage = run(stripping_meter(), pieces)
    assert out == expected
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (
        4,
        len(before),
        "provider",
    )


def test_stripping_keeps_comments_event_names_and_ids():
    # everything around the usage chunk survives byte for byte
    usage_event = (
        b'id: 7\ndata: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
    )
    stream = (
        b": keep-alive\n\n"
        b'event: chunk\ndata: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
        + usage_event
        + b": bye\n\ndata: [DONE]\n\n"
    )
    for pieces in ([stream], bytewise(stream)):
        out, usage = run(stripping_meter(), pieces)
        assert out == stream.replace(usage_event, b"").replace(b',"usage":null', b"")
        assert usage == Usage(2, 1, 3, None, None, "provider")


def test_stripping_only_once_and_only_usage_only_chunks():
    other = (
        b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    first = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    second = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}\n\n'
    stream = other + first + second + b"data: [DONE]\n\n"
    out, usage = run(stripping_meter(), bytewise(stream))
    assert out == other + second + b"data: [DONE]\n\n"
    assert usage == Usage(5, 3, 8, None, None, "provider")  # the last report wins


def test_stripping_without_a_usage_chunk_changes_nothing():
    events = chat_events(include_usage=False)
    stream = b"".join(events)
    out, usage = run(stripping_meter(), bytewise(stream))
    assert out == stream
    assert usage == Usage(completion_tokens=len(WORDS), source="estimated")


def test_stripping_does_not_hold_big_events():
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * 200_000 + b'"}}]}\n\n'
    meter = stripping_meter()
    forwarded = [meter.feed(big[i : i + 1000]) for i in range(0, len(big), 1000)]
    # a line too large to be the usage chunk is not held back until its end
    assert sum(len(f) for f in forwarded[:-1]) > len(big) - 70_000
    assert b"".join(forwarded) == big


def test_chat_disconnect_mid_stream_is_estimated():
    events = chat_events()
    # the client went away after the role chunk and three words
    out, usage = run(stripping_meter(), events[:4])
    assert out == b"".join(events[:4]).replace(b',"usage":null', b"")
    assert usage == Usage(completion_tokens=3, source="estimated")
    # nothing at all
    assert stripping_meter().finish() == NO_USAGE


_DELTA_EVENT = st.sampled_from(
    [
        {"choices": [{"delta": {"content": "x"}}], "usage": None},
        {"choices": [{"delta": {"role": "assistant", "content": ""}}], "usage": None},
        {"choices": [{"delta": {"content": 'say ": then'}}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": '{"a'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": ""}}]}}]},
        {"choices": [{"delta": {"content": None, "refusal": "no"}}]},
        {"choices": [{"delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]},
        {"type": "response.output_text.delta", "delta": "x"},
        {"type": "response.created", "response": {"status": "in_progress"}},
        {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None},
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    docs=st.lists(_DELTA_EVENT, max_size=40),
    spaced=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    strip=st.booleans(),
)
def test_a_cut_stream_is_estimated_as_the_regexes_count_it(docs, spaced, cuts, strip):
    """However the events arrive (whole runs take the batched fast path, split
    ones the per-event path), the estimate of a stream cut before its usage
    report is every text delta, as the reference regexes count them event
    by event - in compact JSON and in spaced JSON alike."""
    separators = (", ", ": ") if spaced else (",", ":")
    events = [json.dumps(d, separators=separators).encode() for d in docs]
    stream = b"".join(b"data: " + e + b"\n\n" for e in events)
    expected = sum(
        len(OPENAI_TEXT_DELTA_RE.findall(e)) + len(RESPONSES_DELTA_RE.findall(e)) for e in events
    )
    for pieces in (split_at(stream, cuts), [b"data: " + e + b"\n\n" for e in events]):
        meter = stripping_meter() if strip else passthrough_meter()
        with pytest.MonkeyPatch.context() as patch:
            if not spaced:  # compact JSON is counted without the regexes
                patch.setattr(meters, "_OPENAI_TEXT_DELTA_RE", None)
            out, usage = run(meter, pieces)
        if not strip or not spaced:
            assert out == (stream if not strip else stream.replace(b',"usage":null', b""))
        assert usage == (
            Usage(completion_tokens=expected, source="estimated") if stream else NO_USAGE
        )


def test_chat_cut_inside_the_usage_chunk_line():
    events = chat_events()
    usage_event = usage_chunk_event(events)
    stream = b"".join(events)
    cut = stream.index(usage_event) + len(usage_event) - 2  # the line is whole, no blank line
    meter = passthrough_meter()
    meter.feed(stream[:cut])
    assert meter.finish() == EXPECTED_CHAT
    meter = passthrough_meter()
    meter.feed(stream[: stream.index(usage_event) + 40])  # half a line
    assert meter.finish().source == "estimated"


def test_finish_is_idempotent():
    meter = passthrough_meter()
    run(meter, chat_events())
    assert meter.finish() == meter.finish() == EXPECTED_CHAT


def test_legacy_completions_stream():
    events = [
        sse({"choices": [{"text": "a", "index": 0}]}),
        sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
        b"data: [DONE]\n\n",
    ]
    m = meter_for(plan(path="/v1/completions"), "openai", "/v1/completions", 200, SSE)
    assert run(m, events)[1] == Usage(3, 1, 4, None, None, "provider")


# --- OpenAI Responses streams --------------------------------------------------------

RESPONSES_USAGE = {
    "input_tokens": 9,
    "output_tokens": 4,
    "total_tokens": 13,
    "input_tokens_details": {"cached_tokens": 2},
}


def responses_events(text: str = "Hi", deltas: int = 3, final=True) -> list[bytes]:
    resp = {"id": "resp_1", "object": "response", "output": [{"content": [{"text": text}]}]}
    events = [
        sse({"type": "response.created", "response": {**resp, "usage": None}}, "response.created"),
    ]
    for _ in range(deltas):
        events.append(
            sse({"type": "response.output_text.delta", "delta": "H"}, "response.output_text.delta")
        )
    if final:
        events.append(
            sse(
                {"type": "response.completed", "response": {**resp, "usage": RESPONSES_USAGE}},
                "response.completed",
            )
        )
    return events


def responses_meter():
    return meter_for(plan(path="/v1/responses"), "openai", "/v1/responses", 200, SSE)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_responses_stream_any_split(cuts):
    stream = b"".join(responses_events())
    out, usage = run(responses_meter(), split_at(stream, cuts))
    assert out == stream
    assert usage == Usage(9, 4, 13, 2, None, "provider")


def test_responses_stream_cut_is_estimated():
    out, usage = run(responses_meter(), responses_events(deltas=5, final=False))
    assert usage == Usage(completion_tokens=5, source="estimated")


def test_huge_response_completed_event_is_read_from_its_tail():
    text = "y" * (3 * SSE_LINE_MAX)
    stream = b"".join(responses_events(text=text))
    meter = responses_meter()
    for i in range(0, len(stream), 65536):
        meter.feed(stream[i : i + 65536])
        # bounded: the meter never keeps the whole line
        assert len(meter._line) + len(meter._line_tail) <= SSE_LINE_MAX + 3 * 65536
    assert meter.finish() == Usage(9, 4, 13, 2, None, "provider")


def test_transcription_stream():
    events = [
        sse({"type": "transcript.text.delta", "delta": "he"}),
        sse(
            {
                "type": "transcript.text.done",
                "text": "hello",
                "usage": {"type": "tokens", "input_tokens": 20, "output_tokens": 2},
            }
        ),
    ]
    m = meter_for(plan(), "openai", "/v1/audio/transcriptions", 200, SSE)
    assert run(m, bytewise(b"".join(events)))[1] == Usage(20, 2, 22, None, None, "provider")


# --- Anthropic streams ------------------------------------------------------------


def anthropic_events(cache_read=4, cache_creation=6, input_tokens=10) -> list[bytes]:
    events = anthropic_stream("claude-3-5-haiku", WORDS, input_tokens, cache_read)
    start = json.loads(events[0].split(b"data: ", 1)[1])
    start["message"]["usage"]["cache_creation_input_tokens"] = cache_creation
    events[0] = sse(start, "message_start")
    return events


EXPECTED_ANTHROPIC = Usage(20, 5, 25, 4, 6, "provider")


def anthropic_meter():
    return meter_for(
        plan("anthropic", "/v1/messages", {"model": "c", "stream": True}),
        "anthropic",
        "/v1/messages",
        200,
        SSE,
    )


def test_anthropic_stream_whole_and_bytewise():
    stream = b"".join(anthropic_events())
    for pieces in ([stream], bytewise(stream)):
        out, usage = run(anthropic_meter(), pieces)
        assert out == stream
        assert usage == EXPECTED_ANTHROPIC


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=40), crlf=st.booleans())
def test_anthropic_stream_any_split(cuts, crlf):
    stream = b"".join(anthropic_events())
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    out, usage = run(anthropic_meter(), split_at(stream, cuts))
    assert out == stream
    assert usage == EXPECTED_ANTHROPIC


def test_anthropic_message_delta_with_updated_input_counts():
    events = anthropic_events()
    events[-2] = sse(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 11, "cache_read_input_tokens": 4, "output_tokens": 9},
        },
        "message_delta",
    )
    assert run(anthropic_meter(), events)[1] == Usage(21, 9, 30, 4, 6, "provider")


def test_anthropic_disconnect_keeps_input_and_estimates_output():
    events = anthropic_events()
    # message_start, content_block_start, ping and two deltas ("Hel", "lo": 5 bytes)
    out, usage = run(anthropic_meter(), events[:5])
    assert usage == Usage(20, 2, 22, 4, 6, "estimated")
    assert anthropic_meter().finish() == NO_USAGE


def test_anthropic_stream_without_event_lines():
    stream = b"".join(e.split(b"\n", 1)[1] for e in anthropic_events())
    assert b"event:" not in stream
    assert run(anthropic_meter(), bytewise(stream))[1] == EXPECTED_ANTHROPIC


# --- non-streaming JSON ------------------------------------------------------------


def json_meter(provider="openai", path=CHAT, **kw):
    return meter_for(plan(provider, path, {"model": "m"}), provider, path, 200, JSON, **kw)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_openai_chat_json_any_split(cuts):
    doc = openai_chat_completion("gpt-4o", prompt=30, completion=7)
    doc["usage"]["prompt_tokens_details"]["cached_tokens"] = 10
    body = json.dumps(doc).encode()
    meter = json_meter()
    pieces = split_at(body, cuts)
    for piece in pieces:
        assert meter.feed(piece) is piece  # never changed, never delayed
    assert meter.finish() == Usage(30, 7, 37, 10, None, "provider")


def test_anthropic_json_message():
    doc = anthropic_message("claude", input_tokens=100, output_tokens=40)
    doc["usage"]["cache_read_input_tokens"] = 50
    doc["usage"]["cache_creation_input_tokens"] = 25
    body = json.dumps(doc).encode()
    out, usage = run(json_meter("anthropic", "/v1/messages"), bytewise(body))
    assert out == body
    assert usage == Usage(175, 40, 215, 50, 25, "provider")


def test_embeddings_and_responses_json():
    body = json.dumps(
        {"data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}, "model": "e"}
    ).encode()
    assert run(json_meter(path="/v1/embeddings"), [body])[1] == Usage(
        8, None, 8, None, None, "provider"
    )
    body = json.dumps({"output": [], "usage": RESPONSES_USAGE}).encode()
    assert run(json_meter(path="/v1/responses"), [body])[1] == Usage(9, 4, 13, 2, None, "provider")


def test_large_json_body_is_read_from_its_tail():
    # an embeddings answer far larger than what is parsed whole
    data = [{"object": "embedding", "index": i, "embedding": [0.123456] * 1536} for i in range(200)]
    doc = {
        "object": "list",
        "data": data,
        "model": "e",
        "usage": {"prompt_tokens": 480, "total_tokens": 480},
    }
    body = json.dumps(doc).encode()
    assert len(body) > 4 * JSON_FULL_PARSE_MAX
    meter = json_meter(path="/v1/embeddings")
    rng = random.Random(5)
    pos = 0
    while pos < len(body):
        step = rng.randint(1, 200_000)
        meter.feed(body[pos : pos + step])
        pos += step
        assert meter._tail_size <= 2 * 256 * 1024 + 200_000
    assert meter.finish() == Usage(480, None, 480, None, None, "provider")


def test_large_anthropic_body_with_tool_input_named_usage():
    doc = anthropic_message("claude", input_tokens=7, output_tokens=3)
    doc["content"] = [
        {"type": "tool_use", "id": "t", "name": "f", "input": {"usage": {"input_tokens": 999}}},
        {"type": "text", "text": "z" * (2 * JSON_FULL_PARSE_MAX)},
    ]
    body = json.dumps(doc).encode()
    assert run(json_meter("anthropic", "/v1/messages"), [body])[1] == Usage(
        7, 3, 10, 0, 0, "provider"
    )


def test_truncated_json_is_estimated_from_the_text_it_delivered():
    doc = openai_chat_completion("gpt-4o-2024-08-06", prompt=30, completion=7)
    doc["choices"][0]["message"]["content"] = "x" * 41
    body = json.dumps(doc).encode()
    usage = run(json_meter(), [body[: body.index(b'"usage"')]])[1]
    # the answer was generated (a non-streaming body comes whole): priced as
    # estimated, output from the text seen (41 bytes: 11 tokens)
    assert usage == Usage(completion_tokens=11, source="estimated")
    assert usage.model == "gpt-4o-2024-08-06"
    # cut inside the answer itself: what did arrive is not a whole string
    assert run(json_meter(), [body[:-200]])[1].source == "estimated"


def test_foreign_json_counts_nothing():
    assert run(json_meter(), [b"<html>oops</html>"])[1] == NO_USAGE
    assert run(json_meter(), [b'{"usage": "many"}'])[1] == NO_USAGE
    assert run(json_meter(), [b'{"usage": {"prompt_tokens": -1}}'])[1] == NO_USAGE
    assert run(json_meter(), [])[1] == NO_USAGE


def test_gzip_bodies_are_metered_on_a_copy():
    body = json.dumps(openai_chat_completion("m", prompt=3, completion=2)).encode()
    packed = gzip.compress(body)
    meter = json_meter(content_encoding=b"gzip")
    out, usage = run(meter, bytewise(packed))
    assert out == packed
    assert usage == Usage(3, 2, 5, 0, None, "provider")
    stream = gzip.compress(b"".join(anthropic_events()))
    m = meter_for(plan(), "anthropic", "/v1/messages", 200, SSE, content_encoding=b"gzip")
    assert run(m, [stream[:50], stream[50:]]) == (stream, EXPECTED_ANTHROPIC)
    # a coding Lectr does not decode is not metered
    assert json_meter(content_encoding=b"br") is NOOP_METER
    # a body that is not gzip after all
    assert run(json_meter(content_encoding=b"gzip"), [body])[1] == NO_USAGE


# --- choosing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "provider, path, status, ct",
    [
        ("openai", CHAT, 400, JSON),
        ("openai", CHAT, 500, SSE),
        ("openai", CHAT, 304, JSON),
        ("openai", "/v1/models", 200, JSON),
        ("openai", "/v1/files", 200, JSON),
        ("openai", "/v1/embeddings", 200, SSE),
        ("openai", CHAT, 200, b"text/plain"),
        ("anthropic", "/v1/messages/count_tokens", 200, JSON),
        ("anthropic", CHAT, 200, JSON),
        ("other", CHAT, 200, JSON),
    ],
)
def test_noop_for_everything_else(provider, path, status, ct):
    meter = meter_for(plan(), provider, path, status, ct)
    assert meter is NOOP_METER
    data = b'{"usage":{"prompt_tokens":1}}'
    assert meter.feed(data) is data
    assert meter.finish() == NO_USAGE


def test_trailing_slash_paths_are_metered():
    body = json.dumps(openai_chat_completion("m")).encode()
    m = meter_for(plan(), "openai", CHAT + "/", 200, JSON)
    assert run(m, [body])[1].source == "provider"


@settings(max_examples=100, deadline=None)
@given(data=st.lists(st.binary(max_size=300), max_size=20), strip=st.booleans())
def test_garbage_never_raises_and_is_forwarded(data, strip):
    meter = stripping_meter() if strip else passthrough_meter()
    out = b"".join(meter.feed(d) for d in data)
    usage = meter.finish()
    if not strip:
        assert out == b"".join(data)
    assert usage.source in ("provider", "estimated", "none")


def test_model_is_read_whatever_the_declared_content_type():
    """The model policy must see the model the provider will see: a JSON
    body sent as text/plain or as curl -d's form type is still JSON to it."""
    body = b'{"model": "gpt-4o", "messages": []}'
    for ctype in (b"text/plain", b"application/x-www-form-urlencoded", None, b"", b"foo/bar"):
        assert plan_request("openai", b"POST", CHAT, ctype, body).model == "gpt-4o", ctype
    assert plan_request("openai", b"POST", CHAT, None, b'  \n{"model":"m"}').model == "m"
    # looks like JSON to a lenient parser, but is not: refused, never forwarded
    with pytest.raises(BodyRefused):
        plan_request("openai", b"POST", CHAT, b"text/plain", b"{not json at all")
    # not JSON-like and not declared JSON: forwarded untouched, no model
    p = plan_request("openai", b"POST", CHAT, b"text/plain", b"hello")
    assert (p.model, p.body) == (None, b"hello")
    # a URL-encoded form names its model too; two of them is ambiguous
    form = b"model=whisper-1&language=en"
    ctype = b"application/x-www-form-urlencoded"
    assert plan_request("openai", b"POST", "/v1/x", ctype, form).model == "whisper-1"
    with pytest.raises(BodyRefused):
        plan_request("openai", b"POST", "/v1/x", ctype, form + b"&model=gpt-4o")


# --- what pricing needs: reasoning, cache TTLs, raw usage, the served model ---------


def test_openai_reasoning_tokens_are_inside_the_completion_count():
    usage = openai_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 500,
            "total_tokens": 600,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 448},
        },
        "o4-mini-2025-04-16",
    )
    assert usage == Usage(100, 500, 600, 64, None, "provider", 448, None)
    assert usage.model == "o4-mini-2025-04-16"
    # Responses API names
    usage = openai_usage(
        {
            "input_tokens": 100,
            "output_tokens": 500,
            "total_tokens": 600,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 448},
        }
    )
    assert (usage.completion_tokens, usage.reasoning_tokens, usage.cached_tokens) == (500, 448, 0)


def test_reasoning_reported_beside_the_completion_count_is_added_to_it():
    # xAI: total = prompt + completion + reasoning
    usage = openai_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "total_tokens": 330,
            "completion_tokens_details": {"reasoning_tokens": 300},
        }
    )
    assert (usage.completion_tokens, usage.reasoning_tokens, usage.total_tokens) == (320, 300, 330)
    # without a total nothing says so: the OpenAI convention (inside)
    usage = openai_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "completion_tokens_details": {"reasoning_tokens": 15},
        }
    )
    assert (usage.completion_tokens, usage.total_tokens) == (20, 30)


def test_deepseek_cache_hits_are_cached_tokens():
    usage = openai_usage(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 10,
            "total_tokens": 1010,
            "prompt_cache_hit_tokens": 900,
            "prompt_cache_miss_tokens": 100,
        }
    )
    assert (usage.prompt_tokens, usage.cached_tokens) == (1000, 900)


def test_anthropic_cache_writes_split_by_ttl():
    raw = {
        "input_tokens": 10,
        "output_tokens": 5,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    }
    usage = anthropic_usage(raw, "claude-sonnet-4-5-20250929")
    assert usage == Usage(410, 5, 415, 100, 300, "provider", None, 200)
    assert usage.model == "claude-sonnet-4-5-20250929"
    assert json.loads(usage.raw) == raw
    # the split alone (no cache_creation_input_tokens): the total is its sum
    del raw["cache_creation_input_tokens"]
    assert anthropic_usage(raw) == Usage(410, 5, 415, 100, 300, "provider", None, 200)
    # a plain cache_creation_input_tokens: all 5-minute writes
    plain = anthropic_usage(
        {"input_tokens": 1, "output_tokens": 1, "cache_creation_input_tokens": 7}
    )
    assert (plain.cache_creation_tokens, plain.cache_creation_1h_tokens) == (7, None)


def test_raw_usage_is_the_providers_object_bounded():
    raw = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "zz": {"é": 1}}
    assert json.loads(openai_usage(raw).raw) == raw
    assert openai_usage(raw).raw == json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    huge = {"prompt_tokens": 1, "completion_tokens": 2, "junk": "x" * 100_000}
    assert len(openai_usage(huge).raw) == RAW_USAGE_MAX


def test_the_served_model_is_read_from_every_response_shape():
    doc = openai_chat_completion("gpt-4o-2024-08-06")
    assert run(json_meter(), [json.dumps(doc).encode()])[1].model == "gpt-4o-2024-08-06"
    # a body too large to parse whole: the model from its head
    doc["choices"][0]["message"]["content"] = "x" * (2 * JSON_FULL_PARSE_MAX)
    usage = run(json_meter(), [json.dumps(doc).encode()])[1]
    assert (usage.source, usage.model) == ("provider", "gpt-4o-2024-08-06")
    stream = openai_chat_stream("gpt-4o-mini-2024-07-18", WORDS, True, prompt=12, cached=3)
    for pieces in ([b"".join(stream)], stream):
        usage = run(stripping_meter(), pieces)[1]
        assert (usage, usage.model) == (EXPECTED_CHAT, "gpt-4o-mini-2024-07-18")
    # cut before the usage chunk: the model of the chunks seen
    assert run(stripping_meter(), stream[:3])[1].model == "gpt-4o-mini-2024-07-18"
    events = anthropic_events()
    assert run(anthropic_meter(), events)[1].model == "claude-3-5-haiku"
    assert run(anthropic_meter(), events[:3])[1].model == "claude-3-5-haiku"


def test_anthropic_stream_keeps_both_raw_reports():
    usage = run(anthropic_meter(), anthropic_events())[1]
    start, delta = json.loads(usage.raw)
    assert start["cache_creation_input_tokens"] == 6
    assert delta == {"output_tokens": 5}


def test_a_stream_cut_before_any_text_is_estimated_not_nothing():
    # the provider had the prompt: the row must not read "nothing happened"
    events = chat_events()
    usage = run(stripping_meter(), events[:1])[1]
    assert usage == Usage(completion_tokens=0, source="estimated")
    usage = run(anthropic_meter(), anthropic_events()[:1])[1]
    assert usage == Usage(20, 1, 21, 4, 6, "estimated")


_COUNTS = st.dictionaries(
    st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens"]),
    st.integers(min_value=0, max_value=10**6),
)
# any JSON value, decoys included: nested "usage" objects with counts and
# nested "model" members, before or after the top-level ones
_DECOY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | _COUNTS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["usage", "model", "a"]), inner, max_size=3)
        | st.fixed_dictionaries({"usage": _COUNTS})
        | st.fixed_dictionaries({"model": st.text(min_size=1, max_size=5)})
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    usage=_COUNTS,
    model=st.none() | st.text(min_size=1, max_size=12),
    others=st.dictionaries(st.sampled_from(["id", "choices", "x", "metadata"]), _DECOY, max_size=4),
    order=st.randoms(use_true_random=False),
    style=st.sampled_from(["spaced", "indented", "compact"]),
    kind=st.sampled_from(["openai", "anthropic"]),
)
def test_json_answers_read_without_a_full_parse_agree_with_one(
    usage, model, others, order, style, kind
):
    """The meter reads a whole JSON answer's top-level usage and model
    without parsing all of it when it can tell them exactly; whatever the
    member order, nesting, decoys and formatting, the result is the one a
    full parse gives."""
    members = [("usage", usage), *others.items()]
    if model is not None:
        members.append(("model", model))
    order.shuffle(members)
    body = json.dumps(
        dict(members),
        indent=1 if style == "indented" else None,
        separators=(",", ":") if style == "compact" else None,
    ).encode()
    read = anthropic_usage if kind == "anthropic" else openai_usage
    path = "/v1/messages" if kind == "anthropic" else CHAT
    doc = json.loads(body)
    expected = read(doc.get("usage"), doc.get("model")) or NO_USAGE
    got = run(json_meter(kind, path), [body])[1]
    assert got == expected and got.model == expected.model and got.raw == expected.raw


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b'"usage"',
                b'"usage":{',
                b'"usage" : {',
                b'"usage":null',
                b":",
                b"{",
                b" ",
                b"x",
                b'"',
            ]
        ),
        max_size=12,
    )
)
def test_the_last_usage_key_is_the_last_match(pieces):
    """The shortcut (search back for the key, check the pattern there) finds
    what listing every match finds, whatever follows the last key."""
    data = b"".join(pieces)
    matches = list(_USAGE_KEY_RE.finditer(data))
    found = _last_usage_key(data)
    if not matches:
        assert found is None
    else:
        assert found is not None and found.span() == matches[-1].span()


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities too: json.loads reads them
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _JSON_VALUES, max_size=6))
def test_a_usage_object_is_kept_as_compact_json_of_what_was_received(usage):
    """The usage text a row keeps (the encoder built once) is what
    ``json.dumps`` gives for the object, compact and unescaped, cut to
    RAW_USAGE_MAX - floats, NaN, any text, any nesting."""
    expected = json.dumps(usage, separators=(",", ":"), ensure_ascii=False)[:RAW_USAGE_MAX]
    assert meters._raw(usage) == expected
    decoded = json.loads(json.dumps(usage))
    assert (
        meters._raw(decoded)
        == json.dumps(decoded, separators=(",", ":"), ensure_ascii=False)[:RAW_USAGE_MAX]
    )
