"""Second review of the observability layer: the collector's credentials in
OTLP headers, requests the proxy refuses before a call exists, and what the
export queue holds on to while the collector is down."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import tracemalloc
from unittest import mock

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.web.http_headers import Headers

from lectr.metrics import Registry
from lectr.tracing import RequestSummary, Tracing
from tests.support.fake_provider import FakeProviderServer
from tests.support.lectr_service import start_lectr
from tests.test_proxy import raw_http

# --- OTLP headers: the collector's API key ----------------------------------------------------

_ENDPOINT = "http://127.0.0.1:4318"
# what the exporter takes in a header value written as is (OTel's "liberal"
# format): printable ASCII but '"', ',', ';' and '\'
_VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '",;\\')
_REFUSED_CHARS = ['"', ";", "\\", "é", "\x7f", "\x01", "€"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _everything_logged():
    """Every line written while it is open: Twisted's log events, the
    standard library's records (any logger) and standard error."""
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    stderr = io.StringIO()
    seen: list[str] = []
    try:
        with capturedLogs() as events, contextlib.redirect_stderr(stderr):
            yield seen
    finally:
        root.removeHandler(handler)
        seen.extend(formatEvent(e) for e in events)
        seen.extend(repr(e) for e in events)
        seen.extend(handler.lines)
        seen.append(stderr.getvalue())


def _from_environ(variable: str, headers: str) -> Tracing:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": _ENDPOINT, variable: headers}
    with mock.patch.dict(os.environ, environ):
        for other in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
            if other != variable:
                os.environ.pop(other, None)
        return Tracing.from_environ(dict(os.environ), reactor=Clock(), metrics=Registry())


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"]),
    st.text(alphabet=_VALUE_CHARS, max_size=12),
    st.sampled_from(_REFUSED_CHARS),
    st.text(alphabet=_VALUE_CHARS + "".join(_REFUSED_CHARS), max_size=12),
    st.booleans(),
)
def test_a_malformed_otlp_header_is_refused_without_showing_its_value(
    variable, before, refused, after, first
):
    """A collector's API key in OTEL_EXPORTER_OTLP_HEADERS with a character
    the format does not take unescaped (a quote around it, a ';', a '\\', a
    non-ASCII letter): the exporter would drop the header (every export then
    refused by the collector) and print the whole entry, the key with it, to
    standard error. Lectr refuses to start instead, naming the variable and
    the entry's place, never its value."""
    secret = f"S3CR3T{before}{refused}{after}T0KEN"
    entry = f"authorization=Bearer {secret}"
    headers = f"{entry},x-tenant=acme" if first else f"x-tenant=acme, {entry}"
    with _everything_logged() as lines, pytest.raises(ValueError) as refused_start:
        _from_environ(variable, headers)
    message = str(refused_start.value)
    assert variable in message and f"entry {1 if first else 2}" in message
    for text in [message, *lines]:
        assert "S3CR3T" not in text and "T0KEN" not in text and secret not in text


@settings(max_examples=60, deadline=None)
@given(
    st.text(alphabet=_VALUE_CHARS, min_size=1, max_size=40).filter(lambda v: v.strip()),
)
def test_a_well_formed_otlp_header_reaches_the_exporter(value):
    """Values the exporter takes are not refused, and it sends them."""
    with _everything_logged() as lines:
        tracing = _from_environ("OTEL_EXPORTER_OTLP_HEADERS", f"x-api-key={value}, x-team=a")
    assert tracing.enabled
    sent = tracing._exporter._client._headers
    assert sent["x-team"] == "a" and sent["x-api-key"].strip()
    assert not [line for line in lines if "Header format invalid" in line]


# --- requests refused before a call exists -------------------------------------------------


def _count(service, provider: str, status: str) -> float:
    return service.components.metrics.get("lectr_proxy_requests_total").value(provider, status)


@pytest_twisted.ensureDeferred
async def test_requests_refused_before_a_call_are_counted(db_url, tmp_path):
    """A 413 answered from a declared Content-Length (before the handler
    sees the head) and a 503 to a request that arrives while the proxy
    drains are requests the client got a status for:
    ``lectr_proxy_requests_total`` counts them, by the provider their path
    names (docs/integration.md says the 413s are counted there)."""
    fake = await FakeProviderServer.start()
    service = await start_lectr(db_url, tmp_path, fake, LECTR_MAX_BODY_BYTES="1000")
    try:
        port = service.components.proxy_port.port.getHost().port
        big = b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n"
        for path, provider in (
            (b"/v1/chat/completions", "openai"),
            (b"/anthropic/v1/messages", "anthropic"),
            (b"/nowhere", "unknown"),
        ):
            out = await deferToThread(
                raw_http, port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + big
            )
            assert out.startswith(b"HTTP/1.1 413 ")
            assert _count(service, provider, "413") == 1, provider
        assert service.components.metrics.get("lectr_proxy_body_too_large_total").value() == 3

        handler = service.components.proxy
        handler.stopping = True  # draining: requests on open connections are refused
        try:
            out = await deferToThread(
                raw_http,
                port,
                b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 2\r\n\r\n{}",
            )
        finally:
            handler.stopping = False
        assert out.startswith(b"HTTP/1.1 503 ")
        assert _count(service, "openai", "503") == 1
    finally:
        await service.stopService()
        await fake.stop()


# --- what the export queue holds --------------------------------------------------------------


class _Down:
    """A collector that never gets a batch (the loop is not started)."""

    def export(self, spans):  # pragma: no cover - never called
        raise AssertionError("no export expected")

    def shutdown(self) -> None:
        pass


def test_queued_traces_do_not_keep_the_clients_traceparent():
    """While the collector is down, up to OTEL_BSP_MAX_QUEUE_SIZE finished
    traces wait. A client's traceparent can be as long as the header limit
    (a later version may append fields): a queued trace must not keep it,
    or 2048 of them hold 128 MiB instead of a few hundred KiB."""
    n, size = 300, 60_000
    tracing = Tracing(_Down(), reactor=Clock(), metrics=Registry(), max_queue=n)
    tp = b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-"
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            header = tp + (b"%06d" % i) * (size // 6)  # a new object each time
            ctx = tracing.begin(Headers({b"traceparent": [header]}))
            assert ctx is not None and ctx.parent_span_id is not None  # a valid parent
            tracing.finish(ctx, RequestSummary(ended=ctx.started + 1, status=200))
            del header, ctx
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tracing._queue) == n
    assert held < n * 5_000, f"{held / n:.0f} bytes per queued trace"
