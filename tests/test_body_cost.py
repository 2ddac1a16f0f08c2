"""What a request body can cost the reactor before it is refused.

The body is judged on the reactor (one strict JSON reading, see
lectr/providers/body.py). Its top-level members are walked by a Python
loop, so their number is bounded (JSON_MEMBERS_MAX: a 31 MiB body of 2.6
million members held the reactor 4.6 s); a body that is no JSON object is
parsed only when small, to say whether it is JSON at all; and a large body
is parsed with the cyclic garbage collector paused (JSON makes no cycles).
"""

from __future__ import annotations

import gc
import json
import sys

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lectr.providers.body import (
    JSON_GC_PAUSE_MIN,
    JSON_MEMBERS_MAX,
    BodyRefused,
    _parse_object,
    parse_json,
    read_body,
)

JSON = [b"application/json"]


def members(n: int, model_at: int = 0) -> bytes:
    doc = {f"k{i}": i for i in range(n - 1)}
    items = list(doc.items())
    items.insert(model_at, ("model", "gpt-4o"))
    return json.dumps(dict(items), separators=(",", ":")).encode()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(JSON_MEMBERS_MAX - 3, JSON_MEMBERS_MAX + 3),
    model_at=st.integers(0, JSON_MEMBERS_MAX),
    spaced=st.booleans(),
)
def test_a_body_is_refused_past_the_top_level_member_limit(n, model_at, spaced):
    body = members(n, min(model_at, n - 1))
    if spaced:
        body = json.dumps(json.loads(body), indent=1).encode()
    if n <= JSON_MEMBERS_MAX:
        read = read_body(JSON, body)
        assert len(read.doc) == n and read.model == "gpt-4o"
    else:
        with pytest.raises(BodyRefused, match=f"more than {JSON_MEMBERS_MAX} top-level members"):
            read_body(JSON, body)


def test_a_huge_number_of_members_is_refused_after_the_limit_not_after_reading_them_all():
    """Past the limit the loop stops: the members after it are never read
    (here they are not even JSON)."""
    body = members(JSON_MEMBERS_MAX + 1)[:-1] + b"," + b"\x00" * 1_000_000 + b"}"
    with pytest.raises(BodyRefused, match="top-level members"):
        parse_json(body)


def test_nested_members_are_not_limited():
    doc = {"model": "gpt-4o", "metadata": {f"k{i}": i for i in range(5 * JSON_MEMBERS_MAX)}}
    read = read_body(JSON, json.dumps(doc).encode())
    assert read.doc == doc


def test_a_large_body_that_is_no_object_is_refused_without_being_parsed():
    # small: parsed, to say which
    assert_refused(b"[1,2", "not valid JSON")
    assert_refused(b"[1,2]", "must be a JSON object")
    # large: refused as no object, the same 400, without a parse (this one
    # is not even JSON past its start)
    assert_refused(b"[" + b"[]," * 100_000 + b"\x00", "must be a JSON object")


def assert_refused(body: bytes, message: str) -> None:
    with pytest.raises(BodyRefused, match=message):
        read_body(JSON, body)


def _parsing() -> bool:
    """Whether a body is being parsed (parse_json's loop is on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _parse_object.__code__:
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def collections():
    """For each collection of the cyclic garbage collector while the test
    runs: whether it ran during a parse."""
    seen: list[dict] = []

    def note(phase, info):
        if phase == "start":
            seen.append(_parsing())

    thresholds = gc.get_threshold()
    gc.set_threshold(100, 10, 10)  # (the collector would run every 100 containers)
    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)
        gc.set_threshold(*thresholds)


def container_body(size: int) -> bytes:
    unit = b"[],"
    n = size // len(unit)
    return b'{"model":"m","messages":[' + unit * n + b"[]]}"


def test_a_large_body_is_parsed_with_the_collector_paused(collections):
    body = container_body(2 * JSON_GC_PAUSE_MIN)
    assert gc.isenabled()
    doc, _ = parse_json(body)
    assert len(doc["messages"]) > 500_000
    assert True not in collections  # not one collection during the parse of its 700,000 lists
    assert gc.isenabled()


def test_a_small_body_is_parsed_as_any_code_runs(collections):
    body = container_body(JSON_GC_PAUSE_MIN // 2)
    parse_json(body)
    assert True in collections  # (the pause is for large bodies only)


def test_the_collector_runs_again_after_a_large_body_is_refused(collections):
    body = container_body(2 * JSON_GC_PAUSE_MIN)[:-2] + b"]"  # cut: not JSON
    with pytest.raises(BodyRefused):
        parse_json(body)
    assert gc.isenabled()


def test_a_collector_paused_by_someone_else_stays_paused():
    gc.disable()
    try:
        parse_json(container_body(2 * JSON_GC_PAUSE_MIN))
        assert not gc.isenabled()
    finally:
        gc.enable()


# --- multipart part headers ---------------------------------------------------------


def part(name: str, head_bytes: int, value: bytes = b"x") -> bytes:
    """A part whose header block (up to its blank line) is ``head_bytes`` long."""
    disposition = f'Content-Disposition: form-data; name="{name}"'.encode()
    pad = head_bytes - len(disposition)
    assert pad == 0 or pad >= 11
    filler = b"" if pad == 0 else b"X-Pad: " + b"p" * (pad - 9) + b"\r\n"
    return filler + disposition + b"\r\n\r\n" + value


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(60, 10_000), max_size=5), slack=st.integers(-2, 2))
def test_part_headers_are_bounded_all_parts_together(sizes, slack):
    from lectr.providers.body import MULTIPART_HEADS_MAX

    # the model's part, parts of the given sizes, and a last one that brings
    # the total to the bound, give or take `slack` bytes
    last = MULTIPART_HEADS_MAX - 60 - sum(sizes) + slack
    parts = [part("model", 60, b"whisper-1")] + [
        part(f"f{i}", size) for i, size in enumerate([*sizes, last])
    ]
    body = b"".join(b"--XyZ\r\n" + p + b"\r\n" for p in parts) + b"--XyZ--\r\n"
    event("refused" if slack > 0 else "accepted")
    if slack <= 0:
        assert read_body([b"multipart/form-data; boundary=XyZ"], body).model == "whisper-1"
    else:
        with pytest.raises(BodyRefused, match="part headers exceed"):
            read_body([b"multipart/form-data; boundary=XyZ"], body)


def test_millions_of_part_header_lines_are_refused_at_the_bound():
    """15 MiB of header lines in one part took 3.5 s of the reactor to read
    line by line; the search for the headers' end stops at the bound."""
    lines = b"x-a: b\r\n" * (15 * 1024 * 1024 // 8)
    body = (
        b"--XyZ\r\n"
        + lines
        + b'Content-Disposition: form-data; name="model"\r\n\r\ngpt\r\n--XyZ--\r\n'
    )
    with pytest.raises(BodyRefused, match="part headers exceed 65536 bytes"):
        read_body([b"multipart/form-data; boundary=XyZ"], body)
    # a part cut before its headers end, under the bound: the old message
    with pytest.raises(BodyRefused, match="no end of headers"):
        read_body([b"multipart/form-data; boundary=XyZ"], b"--XyZ\r\nx-a: b\r\n")
