"""Second review of usage metering: regressions found after the legacy
completions change (ec8aabd) and the stream meters' bounds."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lectr.usage.meters import (
    SSE_LINE_MAX,
    SSE_TAIL_BYTES,
    AnthropicStreamMeter,
    OpenAIStreamMeter,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "module", ["lectr.usage.meters", "lectr.providers.body", "lectr.usage.model"]
)
def test_the_meters_import_first_in_a_fresh_interpreter(module):
    """``lectr.usage.meters`` imports ``lectr.providers.body``, whose package
    imports ``lectr.providers.base``, which (since the providers name their
    usage paths) imports ``lectr.usage.meters`` back: importing the meters
    first (``bench/pricing_bench.py``, a script using ``plan_request``) met
    the module half-built and raised ImportError."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}; from lectr.usage.meters import plan_request"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_a_body_whose_model_cannot_be_rewritten_is_still_refused():
    # (BodyRefused is imported where it is raised, since the fix above)
    from lectr.providers.body import BodyRefused, read_body
    from lectr.usage.meters import plan_request

    read = read_body([b"application/x-www-form-urlencoded"], b"model=a&x=1")
    assert read.model == "a" and read.model_span is None
    with pytest.raises(BodyRefused, match="cannot be rewritten"):
        plan_request("openai", b"POST", "/v1/files", read, "b")
    assert plan_request("openai", b"POST", "/v1/files", read, "a").body == b"model=a&x=1"


# --- an event of many data lines past SSE_LINE_MAX ------------------------------------


def _many_lines_event(lines: int) -> bytes:
    """One event whose data passes SSE_LINE_MAX, then goes on in short data
    lines (SSE joins them), its usage report at the end of its data."""
    head = b"data: " + b"x" * (SSE_LINE_MAX + 10) + b"\n"
    report = b'data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n'
    return head + b"data: y\n" * lines + report + b"\n"


def _feed_times(make, streams: list[bytes], rounds: int = 4) -> list[float]:
    """The least time each stream took to feed, over rounds that alternate
    them (a busy machine slows both alike)."""
    best = [math.inf] * len(streams)
    for _ in range(rounds):
        for n, stream in enumerate(streams):
            meter = make()
            started = time.perf_counter()
            out = b"".join(meter.feed(stream[i : i + 16384]) for i in range(0, len(stream), 16384))
            best[n] = min(best[n], time.perf_counter() - started)
            assert out == stream
    return best


@pytest.mark.parametrize("make", [OpenAIStreamMeter, AnthropicStreamMeter])
def test_short_data_lines_past_the_line_bound_cost_no_tail_copy_each(make):
    """Past SSE_LINE_MAX an event's data keeps only its last SSE_TAIL_BYTES;
    each further data line copied that whole window (64 KiB for an 8-byte
    line): 2 MB of such lines from a broken or hostile upstream held the
    reactor for about 2 s, 7 times what the same lines cost in events under
    the bound. Now amortized, as the partial line's tail is."""
    lines = 250_000
    # CRLF, both: the same work line by line on both sides (the fast path
    # takes the LF events under the bound whole, without assembling lines)
    over = _many_lines_event(lines).replace(b"\n", b"\r\n")
    # the same short lines, in events of 1,000 lines (under the bound), and
    # the long head as one event of its own
    under = (
        b"data: "
        + b"x" * (SSE_LINE_MAX + 10)
        + b"\n\n"
        + (b"data: y\n" * 1000 + b"\n") * (lines // 1000)
    ).replace(b"\n", b"\r\n")
    took_over, took_under = _feed_times(make, [over, under])
    ratio = took_over / took_under
    assert ratio < 3, f"{ratio:.1f} times the cost of the same lines under the bound"


class _TailSeen(OpenAIStreamMeter):
    def __init__(self) -> None:
        super().__init__()
        self.tails: list[bytes] = []

    def _event_truncated(self, name, tail):
        self.tails.append(tail)
        super()._event_truncated(name, tail)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    first=st.integers(SSE_LINE_MAX - 2000, SSE_LINE_MAX + 2000),
    lines=st.lists(st.integers(0, 40_000), max_size=40),
    crlf=st.booleans(),
    reads=st.lists(st.integers(1, 3_000_000), max_size=12),
)
@example(first=SSE_LINE_MAX - 6, lines=[], crlf=True, reads=[SSE_LINE_MAX + 1])  # CR | LF
@example(first=SSE_LINE_MAX + 200_000, lines=[], crlf=True, reads=[SSE_LINE_MAX + 200_007])
def test_a_long_many_line_events_window_is_the_tail_of_its_data(first, lines, crlf, reads):
    """Whatever the lines and the reads, the window handed on is the last
    SSE_TAIL_BYTES of the event's data (its lines joined by newlines, as SSE
    joins them), and the report at its end is read from it; the bytes pass
    as they came."""
    nl = b"\r\n" if crlf else b"\n"
    report = b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    values = [b"x" * first] + [bytes([97 + n % 26]) * size for n, size in enumerate(lines)]
    values.append(report)
    stream = b"".join(b"data: " + v + nl for v in values) + nl
    points = sorted({0, len(stream), *(r % (len(stream) + 1) for r in reads)})
    meter = _TailSeen()
    out = b"".join(
        meter.feed(stream[a:b]) for a, b in zip(points, points[1:], strict=False) if b > a
    )
    assert out == stream
    usage = meter.finish()
    data = b"\n".join(values)
    if len(data) + 1 > SSE_LINE_MAX:  # (past the bound, counted as the meter counts: + 1 a line)
        assert meter.tails == [data[-SSE_TAIL_BYTES:]]
        assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (3, 4, "provider")
    else:  # kept whole: the joined data is not JSON, so no report
        assert meter.tails == [] and usage.source == "estimated"
