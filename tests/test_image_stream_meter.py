"""Streamed OpenAI image answers (``POST /v1/images/generations`` and
``/v1/images/edits`` with ``stream: true``) are metered exactly, from the
``usage`` of their last event (``image_generation.completed`` /
``image_edit.completed``), the way the JSON image answers are; the stream is
relayed unchanged, never asked for its usage, and its partial images (a
megabyte and more of base64 each) are never held whole by the meter. They
were logged without token counts, so streamed gpt-image-* generations
escaped token limits."""

from __future__ import annotations

import base64
import json
import tracemalloc

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.providers.body import read_body
from lectr.usage.meters import SSE_LINE_MAX, SSE_TAIL_BYTES, meter_for, plan_request
from lectr.usage.model import NO_USAGE
from lectr.usage.stream_usage import (
    CHAT_AND_COMPLETIONS_STREAM_USAGE,
    CHAT_STREAM_USAGE,
    NO_STREAM_USAGE,
)
from tests.e2e.conftest import fake, stack  # noqa: F401 (fixtures)
from tests.e2e.test_sdk_surface import Recorder, logged_row, openai_client, upstream_call

MIB = 1024 * 1024
KINDS = {"/v1/images/generations": "image_generation", "/v1/images/edits": "image_edit"}
# base64 text to cut the images from (a little over 3 MiB)
B64 = base64.b64encode(bytes(range(256)) * (3 * MIB // 256 * 3 // 4 + 256)).decode()
assert len(B64) > 3 * MIB + 1024

USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
    "output_tokens": 272,
    "total_tokens": 322,
}


def image_event(
    kind: str,
    final: bool,
    size: int,
    index: int = 0,
    usage: dict | None = None,
    named: bool = True,
    spaced: bool = False,
    crlf: bool = False,
) -> bytes:
    """One event of an image stream as OpenAI writes it: the image's base64,
    then (the completed event) its usage, last."""
    doc = {"type": f"{kind}.completed" if final else f"{kind}.partial_image"}
    doc["b64_json"] = B64[:size]
    doc.update(
        created_at=1,
        size="1024x1024",
        quality="high",
        background="opaque",
        output_format="png",
    )
    if final:
        doc["usage"] = usage if usage is not None else USAGE
    else:
        doc["partial_image_index"] = index
    payload = json.dumps(doc, separators=None if spaced else (",", ":"))
    nl = "\r\n" if crlf else "\n"
    head = f"event: {doc['type']}{nl}" if named else ""
    return f"{head}data: {payload}{nl}{nl}".encode()


def image_stream(path: str, partials: list[int], final: int, **kw) -> bytes:
    kind = KINDS[path]
    events = [image_event(kind, False, size, i, **kw) for i, size in enumerate(partials)]
    events.append(image_event(kind, True, final, **kw))
    return b"".join(events)


def stream_plan(path: str):
    body = json.dumps({"model": "gpt-image-1", "prompt": "a cat", "stream": True}).encode()
    return plan_request("openai", b"POST", path, read_body([b"application/json"], body))


def json_usage(path: str, usage: dict):
    """What the JSON image path makes of the same usage object."""
    answer = json.dumps(
        {"created": 1, "data": [{"b64_json": "AAAA"}], "usage": usage}, separators=(",", ":")
    ).encode()
    plan = plan_request(
        "openai",
        b"POST",
        path,
        read_body([b"application/json"], json.dumps({"model": "gpt-image-1"}).encode()),
    )
    meter = meter_for(plan, "openai", path, 200, b"application/json")
    meter.feed(answer)
    return meter.finish()


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def relay(meter, chunks: list[bytes]) -> bytes:
    out = []
    for chunk in chunks:
        forwarded = meter.feed(chunk)
        assert forwarded == chunk  # byte for byte, as it came, when it came
        out.append(forwarded)
    out.append(meter.flush())
    return b"".join(out)


# sizes of an image's base64: small, about the meter's event bound, well past it
IMAGE_SIZES = st.one_of(
    st.integers(0, 4096),
    st.sampled_from([SSE_LINE_MAX - 300, SSE_LINE_MAX, SSE_LINE_MAX + 1, 3 * MIB]),
    st.integers(0, 3 * MIB),
)
COUNTS = st.integers(0, 10**9)


# --- the request goes up as the client wrote it --------------------------------------


@pytest.mark.parametrize("path", sorted(KINDS))
@pytest.mark.parametrize(
    "inject", [CHAT_STREAM_USAGE, CHAT_AND_COMPLETIONS_STREAM_USAGE, NO_STREAM_USAGE]
)
@pytest.mark.parametrize("model", [None, "gpt-image-1", "gpt-image-1.5"])
def test_image_stream_request_is_not_asked_for_its_usage(path, inject, model):
    """Image streams report usage without being asked: no stream_options is
    added (OpenAI refuses unknown members), and nothing is to be stripped."""
    body = b'{"model":"gpt-image-1","prompt":"a cat","stream":true,"partial_images":2}'
    plan = plan_request(
        "openai", b"POST", path, read_body([b"application/json"], body), model, inject
    )
    expected = body if model in (None, "gpt-image-1") else body.replace(b"-1", b"-1.5", 1)
    assert (plan.body, plan.stream, plan.strip_usage_chunk) == (expected, True, False)
    meter = meter_for(plan, "openai", path, 200, b"text/event-stream; charset=utf-8")
    stream = image_stream(path, [100, 200], 300)
    assert relay(meter, pieces(stream, [7, 150, 400])) == stream


def test_image_edit_stream_multipart_request_is_untouched():
    boundary = b"b0undary"
    body = (
        b'--b0undary\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n'
        b'--b0undary\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n'
        b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--b0undary--\r\n"
    )
    read = read_body([b"multipart/form-data; boundary=" + boundary], body)
    plan = plan_request(
        "openai", b"POST", "/v1/images/edits", read, None, CHAT_AND_COMPLETIONS_STREAM_USAGE
    )
    assert (plan.body, plan.strip_usage_chunk, plan.model) == (body, False, "gpt-image-1")


# --- exact counts, any chunking ----------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    path=st.sampled_from(sorted(KINDS)),
    partials=st.lists(IMAGE_SIZES, max_size=3),
    final=IMAGE_SIZES,
    cuts=st.lists(st.integers(0, 2**40), max_size=24),
    named=st.booleans(),
    spaced=st.booleans(),
    crlf=st.booleans(),
    counts=st.tuples(COUNTS, COUNTS, COUNTS, COUNTS),
)
def test_image_stream_is_metered_exactly(path, partials, final, cuts, named, spaced, crlf, counts):
    """The completed event's usage, whatever the image sizes (under and over
    the meter's 1 MiB event bound), the SSE style and the reads the stream
    arrives in; the same counts as the JSON answer with that usage."""
    text, image, output, extra = counts
    usage = {
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": output,
        "total_tokens": text + image + output,
    }
    stream = image_stream(path, partials, final, usage=usage, named=named, spaced=spaced, crlf=crlf)
    meter = meter_for(stream_plan(path), "openai", path, 200, b"text/event-stream")
    assert relay(meter, pieces(stream, cuts)) == stream
    got = meter.finish()
    assert got.source == "provider"
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (
        text + image,
        output,
        text + image + output,
    )
    same = json_usage(path, usage)  # what the JSON answer with this usage records
    assert (got, got.raw, got.model) == (same, same.raw, same.model)
    assert json.loads(got.raw) == usage


@pytest.mark.parametrize("path", sorted(KINDS))
def test_image_stream_without_usage_is_not_counted(path):
    """A completed event without usage: no prompt or total invented (the
    source is what the other OpenAI streams give a stream without a
    report)."""
    kind = KINDS[path]
    event = image_event(kind, True, 2 * MIB).replace(
        b',"usage":' + json.dumps(USAGE, separators=(",", ":")).encode(), b""
    )
    assert b'"usage"' not in event
    meter = meter_for(stream_plan(path), "openai", path, 200, b"text/event-stream")
    assert relay(meter, pieces(event, [MIB, MIB + 5])) == event
    got = meter.finish()
    assert (got.prompt_tokens, got.total_tokens) == (None, None)


# --- bounded memory ------------------------------------------------------------------------

#: what a meter may keep between reads: a line up to the event bound (in a
#: bytearray, which grows by an eighth more than it needs), the tail windows
#: of an over-long line and event, small change. A whole event is 3 MiB.
HOLD_MAX = SSE_LINE_MAX * 9 // 8 + 4 * SSE_TAIL_BYTES + 64 * 1024


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(sorted(KINDS)),
    cuts=st.lists(st.integers(0, 2**40), min_size=1, max_size=40),
    read=st.sampled_from([None, 1000, 64 * 1024, 700 * 1024, 2 * MIB]),
)
def test_three_mib_events_are_not_held(path, cuts, read):
    """Three partial images and a final one of 3 MiB each, in arbitrary
    reads: what the meter keeps between reads stays under its bound (a whole
    event is 3 MiB), what it allocates inside a read is proportional to that
    read, and the counts are exact."""
    stream = image_stream(path, [3 * MIB] * 3, 3 * MIB)
    chunks = pieces(stream, cuts)
    if read is not None:  # and every piece cut into reads of at most this size
        chunks = [c[i : i + read] for c in chunks for i in range(0, len(c), read)]
    del cuts
    tracemalloc.start()
    try:
        meter = meter_for(stream_plan(path), "openai", path, 200, b"text/event-stream")
        base = tracemalloc.get_traced_memory()[0]
        for chunk in chunks:
            tracemalloc.reset_peak()
            forwarded = meter.feed(chunk)
            assert forwarded == chunk
            del forwarded
            held, peak = tracemalloc.get_traced_memory()
            assert held - base <= HOLD_MAX, (held - base, len(chunk))
            # (copies of the read, and one of a line up to the bound when it
            # ends: never of a whole event beyond the read that brought it)
            assert peak - base <= HOLD_MAX + SSE_LINE_MAX + 6 * len(chunk), (
                peak - base,
                len(chunk),
            )
        usage = meter.finish()
    finally:
        tracemalloc.stop()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (50, 272, 322)
    assert usage.source == "provider"


# --- a stream cut short ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(sorted(KINDS)),
    partials=st.lists(IMAGE_SIZES, max_size=2),
    final=IMAGE_SIZES,
    cut=st.floats(0, 1, exclude_max=True),
    cuts=st.lists(st.integers(0, 2**40), max_size=8),
)
def test_image_stream_cut_before_its_usage_is_estimated(path, partials, final, cut, cuts):
    """A stream cut before the completed event's usage is whole: estimated,
    as every OpenAI stream that began (the pricing guesses the prompt from
    the request's size; an image stream has no text deltas to count), never
    a usage read from a window of a cut event; nothing at all before the
    first byte."""
    stream = image_stream(path, partials, final)
    end = stream.rindex(b"}", 0, stream.rindex(b"}"))  # the usage object's closing brace
    sent = stream[: int(cut * end)]
    meter = meter_for(stream_plan(path), "openai", path, 200, b"text/event-stream")
    assert relay(meter, pieces(sent, cuts)) == sent
    got = meter.finish(complete=False)
    if not sent:
        assert got == NO_USAGE
    else:
        assert got.source == "estimated"
        assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (None, 0, None)


# --- end to end: the openai SDK through a real Lectr --------------------------------------


def _partial_and_final(kind: str) -> list[str]:
    events = [image_event(kind, False, size, i) for i, size in enumerate([700_000, 1_400_000])]
    events.append(image_event(kind, True, 3 * MIB))
    return [e.decode() for e in events]


@pytest.fixture(scope="module")
def org(stack):  # noqa: F811
    stack.fake._control("options", {"request_ids": True})
    return stack.new_org()


@pytest.mark.e2e
def test_sdk_image_streams_are_metered(stack, org):  # noqa: F811
    """``images.generate(stream=True)`` and ``images.edit(stream=True)``
    through Lectr: the SDK gets every event whole, the provider gets the
    SDK's bytes, and the request log has the provider's counts."""
    rec = Recorder()
    client = openai_client(stack, org.key, rec)
    stack.fake.next(events=_partial_and_final("image_generation"))
    got = list(
        client.images.generate(model="gpt-image-1", prompt="a cat", stream=True, partial_images=2)
    )
    assert [e.type for e in got] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert got[-1].b64_json == B64[: 3 * MIB] and got[-1].usage.output_tokens == 272
    generated = rec.last

    stack.fake.next(events=_partial_and_final("image_edit"))
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    got = list(
        client.images.edit(
            model="gpt-image-1", image=("cat.png", png, "image/png"), prompt="a hat", stream=True
        )
    )
    assert got[-1].type == "image_edit.completed" and got[-1].b64_json == B64[: 3 * MIB]
    edited = rec.last

    # (a multipart body's stream field is not JSON's "stream": true: the
    # edit's row says not streamed, as a streamed transcription's does)
    for ex, streamed in ((generated, True), (edited, False)):
        call = upstream_call(stack, ex, "openai")
        assert base64.b64decode(call["body_b64"]) == ex.sent  # no stream_options added
        row = logged_row(stack, org, ex.lectr_id)
        assert (row["status"], row["model"], row["streamed"]) == (200, "gpt-image-1", streamed)
        counts = (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"])
        assert (counts, row["usage_source"]) == ((50, 272, 322), "provider"), row


@pytest.mark.e2e
def test_cut_image_stream_is_logged_as_estimated(stack, org):  # noqa: F811
    """The provider drops the connection after the partial images: the row
    is estimated, as for the other OpenAI streams."""
    # (an interval: an abort right behind the writes would discard them unsent)
    stack.fake.next(events=_partial_and_final("image_generation"), drop_after=2, interval=0.3)
    body = {"model": "gpt-image-1", "prompt": "a cat", "stream": True, "partial_images": 2}
    with pytest.raises(httpx2.TransportError):
        with httpx2.stream(
            "POST",
            f"{stack.proxy}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {org.key}"},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            lectr_id = response.headers["x-lectr-request-id"]
            for _ in response.iter_bytes():
                pass

    found = logged_row(stack, org, lectr_id)
    assert (found["status"], found["streamed"]) == (200, True)
    assert found["usage_source"] == "estimated", found
    assert found["completion_tokens"] == 0
