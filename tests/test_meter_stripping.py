"""The stripping OpenAI stream meter against a reference, for generated
streams (compact and spaced JSON, LF and CRLF line ends, comments, event and id
lines, extra blank lines, decoys in the text) and any split of the
provider's bytes into reads: the client gets the stream with the (first)
usage-only event removed and the ``,"usage":null`` / ``, "usage": null``
member of each event before it removed - every other byte unchanged - and
the meter reports the last usage report (or the estimate when none came).

The reference works on the whole stream: split into events, apply the rule,
join again."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import replace

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lectr.providers.body import read_body
from lectr.usage.meters import CARRY_MAX, meter_for, openai_usage, plan_request
from lectr.usage.model import NO_USAGE, Usage

SSE = b"text/event-stream"
CHAT = "/v1/chat/completions"
NULLS = (b',"usage":null', b', "usage": null')


def passing_meter():
    """The client asked for usage itself: every byte passes."""
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    p = plan_request("openai", b"POST", CHAT, read_body([b"application/json"], body.encode()))
    assert not p.strip_usage_chunk
    return meter_for(p, "openai", CHAT, 200, SSE)


def stripping_meter():
    body = json.dumps({"model": "m", "stream": True}).encode()
    p = plan_request("openai", b"POST", CHAT, read_body([b"application/json"], body))
    assert p.strip_usage_chunk
    return meter_for(p, "openai", CHAT, 200, SSE)


def feed_all(meter, pieces, end=True):
    """As the proxy does: each read, then (``end``: the answer ended, not
    cut) what is held back."""
    out = b"".join(bytes(meter.feed(p)) for p in pieces)
    if end:
        out += meter.flush()
    return out, meter.finish()


# --- the reference ------------------------------------------------------------------


def event_data(event: bytes, nl: bytes) -> bytes | None:
    lines = [ln for ln in event.split(nl) if ln.startswith(b"data:")]
    if len(lines) != 1:
        return None
    value = lines[0][5:]
    return value[1:] if value[:1] == b" " else value


def parse(data: bytes | None):
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def reference(events: list[bytes], nl: bytes) -> tuple[bytes, Usage]:
    """``events``: whole events (their blank line included) or lone extra
    blank lines, as the stream has them."""
    out, cut, final, model, deltas = [], False, None, None, 0
    for event in events:
        doc = parse(event_data(event, nl))
        if doc is not None:
            if model is None and isinstance(doc.get("model"), str):
                model = doc["model"]
            report = openai_usage(doc.get("usage"), doc.get("model"))
            if report is not None:
                final = report
            else:
                for choice in doc.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        deltas += 1
        usage_only = (
            doc is not None and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)
        )
        if not cut and usage_only:
            cut = True
            continue
        if not cut:
            for null in NULLS:
                event = event.replace(null, b"")
        out.append(event)
    if final is None:
        final = Usage(completion_tokens=deltas, source="estimated") if events else NO_USAGE
    if final.model is None and model is not None:
        final = replace(final, model=model)
    return b"".join(out), final


# --- generated streams --------------------------------------------------------------

# text deltas, with decoys: usage keys and nulls inside the content string
# (JSON escapes their quotes), escaped quotes, multi-byte characters
TEXTS = st.sampled_from(
    [
        "hi",
        "",
        '"usage":null',
        ',"usage":null',
        ', "usage": null,',
        '"usage":{',
        "usage",
        'say "x"',
        "\\",
        "é",
        "日本",
        "😀",
        "\r\n",
        "data: x\n\n",
    ]
)


@st.composite
def streams(draw, blank_lines=False):
    spaced = draw(st.booleans())
    sep = (", ", ": ") if spaced else (",", ":")
    nl = draw(st.sampled_from([b"\n", b"\r\n"]))
    prefix = draw(st.sampled_from([b"data: ", b"data:"]))
    ascii_ = draw(st.booleans())

    def dumps(doc):
        return json.dumps(doc, separators=sep, ensure_ascii=ascii_).encode()

    def data_event(doc, name=False, ident=None):
        head = b""
        if name:
            head += b"event: chunk" + nl
        if ident is not None:
            head += b"id: " + str(ident).encode() + nl
        return head + prefix + dumps(doc) + nl + nl

    def report(p, c):
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    kinds = ["chunk", "chunk", "chunk", "comment", "usage", "other"]
    if blank_lines:
        kinds.append("blank")
    kinds = draw(st.lists(st.sampled_from(kinds), max_size=12))
    events = []
    for i, kind in enumerate(kinds):
        name = draw(st.booleans()) if kind != "comment" else False
        ident = draw(st.one_of(st.none(), st.integers(0, 99)))
        if kind == "chunk":
            doc = {
                "id": "c",
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": draw(TEXTS)}, "finish_reason": None}],
                "usage": None,
            }
            events.append(data_event(doc, name, ident))
        elif kind == "comment":
            events.append(b": keep-alive" + nl + nl)
        elif kind == "blank":  # an extra blank line between events (legal SSE)
            events.append(nl)
        elif kind == "usage":
            doc = {"id": "c", "model": "m2", "choices": [], "usage": report(3 + i, i)}
            events.append(data_event(doc, name, ident))
        else:  # a report on a chunk with choices: never stripped
            doc = {"id": "c", "choices": [{"index": 0, "delta": {}}], "usage": report(7, i)}
            events.append(data_event(doc, name, ident))
    if draw(st.booleans()):
        events.append(prefix + b"[DONE]" + nl + nl)
    return events, nl


def splits(draw, stream: bytes, events: list[bytes]):
    """Reads: runs of whole events (the batched path) and cuts anywhere."""
    bounds, at = [], 0
    for e in events:
        at += len(e)
        bounds.append(at)
    cuts = draw(st.lists(st.sampled_from(bounds) if bounds else st.just(0), max_size=8))
    many = draw(st.sampled_from([0, 3, 30]))
    cuts += draw(st.lists(st.integers(0, len(stream)), max_size=many))
    points = sorted(set(cuts) | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def whole_within(events: list[bytes], size: int) -> list[bytes]:
    """The events wholly within the stream's first ``size`` bytes."""
    whole, at = [], 0
    for e in events:
        if at + len(e) > size:
            break
        whole.append(e)
        at += len(e)
    return whole


class _Hung(BaseException):  # (not an Exception: the meter catches those)
    pass


def _alarm(signum, frame):
    raise _Hung("the meter did not return within 1 s")


@contextlib.contextmanager
def watchdog(what: str):
    """A meter stuck in a loop fails the test within 1 s instead of hanging
    it (pytest-timeout's own timer, if set, goes on afterwards with what it
    had left)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    started = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, 1)
    try:
        yield
    except _Hung:
        raise AssertionError(f"the meter hangs on {what}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def feed_guarded(pieces, end=True):
    with watchdog(f"the reads {pieces!r}"):
        return feed_all(stripping_meter(), pieces, end)


def check(events, nl, pieces):
    expected, usage = reference(events, nl)
    out, got = feed_guarded(pieces)
    assert out == expected
    # (an estimate differing here: test_spaced_estimate_does_not_depend_on_a_leading_event_line)
    assert got == usage
    assert got.model == usage.model


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_stream_any_split(data):
    events, nl = data.draw(streams())
    stream = b"".join(events)
    check(events, nl, splits(data.draw, stream, events))


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # (a hang costs the watchdog's second)
)
@given(data=st.data())
def test_any_stream_with_extra_blank_lines_any_split(data):
    """An extra blank line between events is legal SSE (a no-op for the
    client): it must pass through, and never stall the meter."""
    events, nl = data.draw(streams(blank_lines=True))
    stream = b"".join(events)
    check(events, nl, splits(data.draw, stream, events))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_cut_stream_forwards_a_prefix_of_the_stripped_stream(data):
    """Cut anywhere (the connection dropped): what the client got is a
    prefix of the stripped stream holding at least every whole event before
    the cut; a report whose data line arrived whole is metered."""
    events, nl = data.draw(streams())
    stream = b"".join(events)
    cut = data.draw(st.integers(0, len(stream)))
    expected, _ = reference(events, nl)
    whole_events = whole_within(events, cut)
    before, usage_before = reference(whole_events, nl)
    out, got = feed_guarded(splits(data.draw, stream[:cut], whole_events), end=False)
    assert expected.startswith(out)
    assert len(out) >= len(before)
    if usage_before.source == "provider":
        assert got == usage_before or got.source == "provider"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_each_read_forwards_every_event_it_completes(data):
    """The fast path keeps the start of an event until its end comes (so
    that the event is read whole): after each read the client has every
    event that read completed, stripped as the whole stream is - nothing
    whole waits for a later read."""
    events, nl = data.draw(streams(blank_lines=True))
    stream = b"".join(events)
    pieces = splits(data.draw, stream, events)
    expected, _ = reference(events, nl)
    meter = stripping_meter()
    out, fed = b"", 0
    with watchdog(f"the reads {pieces!r}"):
        for piece in pieces:
            out += meter.feed(piece)
            fed += len(piece)
            before, _ = reference(whole_within(events, fed), nl)
            assert expected.startswith(out)
            assert len(out) >= len(before), (pieces, fed)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_events_around_the_carried_bound_any_split(data):
    """Events shorter and longer than the fast path keeps whole
    (``CARRY_MAX``) among generated ones, split anywhere: the same output and
    usage as the reference, both when stripping and when passing through."""
    events, nl = data.draw(streams(blank_lines=True))
    sizes = data.draw(
        st.lists(
            st.sampled_from(
                [CARRY_MAX - 120, CARRY_MAX - 60, CARRY_MAX, CARRY_MAX + 1, 3 * CARRY_MAX]
            ),
            min_size=1,
            max_size=3,
        )
    )
    # (in the stream's JSON style: a provider writes one throughout)
    sep = (", ", ": ") if any(b'"c", ' in e for e in events) else (",", ":")
    for size in sizes:
        doc = {
            "id": "c",
            "choices": [{"index": 0, "delta": {"content": "y" * size}}],
            "usage": None,
        }
        big = b"data: " + json.dumps(doc, separators=sep).encode() + nl + nl
        events.insert(data.draw(st.integers(0, len(events))), big)
    stream = b"".join(events)
    pieces = splits(data.draw, stream, events)
    check(events, nl, pieces)
    _, usage = reference(events, nl)
    with watchdog(f"the reads {pieces!r}"):
        out, got = feed_all(passing_meter(), pieces)
    assert out == stream
    assert got == usage


# --- pinned cases ------------------------------------------------------------------

CHUNK = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'


def test_usage_chunk_split_inside_the_key_and_crlf():
    stream = (CHUNK + USAGE + CHUNK + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
    expected = stream.replace(b',"usage":null', b"", 1).replace(USAGE.replace(b"\n", b"\r\n"), b"")
    for at in range(1, len(stream)):
        out, usage = feed_all(stripping_meter(), [stream[:at], stream[at:]])
        assert out == expected, at
        assert usage == Usage(2, 1, 3, None, None, "provider")


def _big_chunk(spaced: bool) -> bytes:
    sep = (", ", ": ") if spaced else (",", ":")
    doc = {"choices": [{"delta": {"content": "x" * 70_000}}], "usage": None}
    return b"data: " + json.dumps(doc, separators=sep).encode() + b"\n\n"


def test_a_big_event_loses_its_null_usage_member_whatever_the_reads():
    """An event over STRIP_HOLD_MAX (a large delta) carries the null member
    too: the client must not see it, in one read or in several."""
    big = _big_chunk(False)
    stream = big + USAGE + b"data: [DONE]\n\n"
    expected = big.replace(b',"usage":null', b"") + b"data: [DONE]\n\n"
    whole, _ = feed_all(stripping_meter(), [stream])
    assert whole == expected  # the batched path strips it
    pieces = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    out, usage = feed_all(stripping_meter(), pieces)
    assert usage == Usage(2, 1, 3, None, None, "provider")
    assert out == expected


def test_an_extra_blank_line_does_not_hang_the_meter():
    """A read whose last event boundary is "\\n\\n\\n" (an extra blank line,
    legal SSE) going to the base SSEMeter._feed_events - a partial event
    follows, or the OpenAI run path falls back to it (a usage line after an
    ``id:`` line): rfind's last "\\n\\n" overlaps the one before, and the loop
    once started over at 1 for ever, on the reactor thread."""
    stream = b'data: {"a":1}\n\n\ndata: {"b":2}\n\n'
    out, _ = feed_guarded([stream[:18], stream[18:]])
    assert out == stream
    usage = b'id: 1\ndata: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n\n'
    out, got = feed_guarded([usage])
    assert out == b"\n"
    assert got == Usage(2, 1, 3, None, None, "provider")


def _meter(provider: str, path: str, body: dict):
    p = plan_request(
        provider, b"POST", path, read_body([b"application/json"], json.dumps(body).encode())
    )
    return meter_for(p, provider, path, 200, SSE)


def test_every_stream_meter_passes_extra_blank_lines_through():
    """The same boundary in the meters that strip nothing (a client that
    asked for usage itself; Anthropic's events): bytes unchanged, usage
    metered, no stall."""
    openai = (
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n\n'
    )
    anthropic = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude",'
        b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n\n'
    )
    cases = [
        (
            lambda: _meter(
                "openai",
                CHAT,
                {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
            ),
            openai,
            (2, 1),
        ),
        (
            lambda: _meter("anthropic", "/v1/messages", {"model": "claude", "stream": True}),
            anthropic,
            (5, 7),
        ),
    ]
    for make, stream, (prompt, completion) in cases:
        for at in range(1, len(stream)):
            meter = make()
            with watchdog(f"a split at {at}"):
                out = meter.feed(stream[:at]) + meter.feed(stream[at:])
                usage = meter.finish()
            assert bytes(out) == stream, at
            assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion), at


def test_spaced_estimate_does_not_depend_on_a_leading_event_line():
    """A stream cut before its report is estimated from its text deltas. In
    spaced JSON, a run that starts with a comment or an ``event:`` line hides
    its first brace from _count_deltas' 16-byte look (it then counts the
    compact needles, which spaced JSON never has): 0 deltas in one read,
    1 when the same bytes arrive in two."""
    for head in (b": keep-alive\n\n", b"event: chunk\n"):
        stream = head + b'data: {"id": "c", "choices": [{"delta": {"content": "hi"}}]}\n\n'
        split = feed_all(stripping_meter(), [stream[:20], stream[20:]])[1]
        whole = feed_all(stripping_meter(), [stream])[1]
        assert split == whole == Usage(completion_tokens=1, source="estimated")
        assert whole == split
