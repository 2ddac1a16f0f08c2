"""A stream that ends inside an event Lectr was holding back (deciding
whether it is the usage chunk it asked for) loses nothing: what is held is
forwarded when the answer ends (``Meter.flush``), unless it is that chunk."""

from __future__ import annotations

import json

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fake_provider import Script, sse
from tests.test_meter_stripping import reference, splits, streams, stripping_meter
from tests.test_routing_proxy import CHAT
from tests.test_routing_proxy import env as routing_env


def relayed(pieces: list[bytes]) -> bytes:
    """What the proxy sends for these reads: each read's output, then what
    the meter still holds when the answer ends."""
    meter = stripping_meter()
    out = b"".join(bytes(meter.feed(p)) for p in pieces)
    out += meter.flush()
    meter.finish()
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_an_unterminated_last_event_is_forwarded(data):
    events, nl = data.draw(streams())
    tail = data.draw(
        st.sampled_from([b"data: [DONE]", b"data:[DONE]", b": bye", b"event: end", b"data: [DO"])
    )
    if data.draw(st.booleans()):
        tail += nl  # a whole line, but not a whole event
    stream = b"".join(events) + tail
    expected, _ = reference(events, nl)
    assert relayed(splits(data.draw, stream, [*events, tail])) == expected + tail


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_an_unterminated_usage_chunk_is_still_stripped(data):
    """The usage chunk Lectr asked for, at the very end without its blank
    line: still not the client's to see."""
    events, nl = data.draw(streams())
    events = [e for e in events if b'"choices":[]' not in e and b'"choices": []' not in e]
    report = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    line = b"data: " + json.dumps({"id": "c", "choices": [], "usage": report}).encode()
    if data.draw(st.booleans()):
        line += nl
    stream = b"".join(events) + line
    expected, _ = reference(events, nl)
    assert relayed(splits(data.draw, stream, [*events, line])) == expected


# --- through the proxy ---------------------------------------------------------------

env = routing_env  # a Lectr, an org with keys, the fake provider


@pytest_twisted.ensureDeferred
async def test_a_last_event_without_its_newline_reaches_the_client(env):
    """A provider whose stream ends ``data: [DONE]`` with no newline, while
    Lectr waits for the usage chunk it asked for: the client still gets it."""
    events = [
        sse({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
        b"data: [DONE]",
    ]
    env.provider.next(
        Script(events=events, interval=0.02, headers={"content-type": "text/event-stream"})
    )
    resp = await env.post("/v1/chat/completions", {**CHAT, "stream": True})
    out = await resp.content()
    assert resp.code == 200
    assert out == events[0] + events[1]


def test_a_failing_flush_forwards_what_it_held(monkeypatch):
    """A meter never breaks the relay: a flush that fails gives up metering
    and forwards the held bytes as they came, as ``feed`` does."""
    import lectr.usage.meters as meters

    meter = stripping_meter()
    assert meter.feed(b"data: [DO") == b""  # held: not known not to be the usage chunk

    def broken(data):
        raise RuntimeError("boom")

    monkeypatch.setattr(meters, "_strip_null_usage", broken)
    assert meter.flush() == b"data: [DO"
    assert meter.flush() == b""  # (once)
