"""OpenTelemetry traces, exported over OTLP/HTTP (protobuf), off by default.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, unless ``OTEL_SDK_DISABLED=true``
or ``OTEL_TRACES_EXPORTER=none``. The standard variables apply:
``OTEL_SERVICE_NAME`` (default ``lectr``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_HEADERS`` / ``_TIMEOUT`` / ``_COMPRESSION`` /
``_CERTIFICATE``…, ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``) and the batch sizes
``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_SCHEDULE_DELAY``,
``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``. ``LECTR_TRACE_PROPAGATION`` says what the
provider sees (below).

The proxy API (what the proxy core calls; ``tracing`` is the service's
:class:`Tracing`, ``None`` never: a disabled one answers ``enabled = False``)::

    ctx = tracing.begin(request.headers) if tracing.enabled else None
    ...
    for n, target in enumerate(attempts, 1):
        if ctx is not None:
            value = ctx.attempt_traceparent(n)
            # set the upstream request's `traceparent` to `value`, or remove
            # it (and `tracestate`) when `value` is None
        ...
    if ctx is not None:
        tracing.finish(ctx, RequestSummary(ended=reactor.seconds(), status=..., ...,
                                           attempts=(Attempt(1, ...), Attempt(2, ...))))

- ``begin(headers)``: one attribute check when tracing is off (``enabled``);
  when on, it reads the client's ``traceparent`` (W3C; a malformed one is
  ignored and a new trace starts), allocates the trace and span ids, makes
  the sampling decision and notes the start time (``reactor.seconds()``).
  About a microsecond. Returns a :class:`TraceContext`.
- ``ctx.attempt_traceparent(n)``: the ``traceparent`` header value for the
  upstream request of attempt ``n`` (1-based), by ``LECTR_TRACE_PROPAGATION``:
  ``lectr`` (default) names attempt n's own span, so the provider's spans (if
  it traces) hang under Lectr's; ``client`` returns the client's header
  unchanged (``None`` if it sent none): the provider sees what it would see
  without Lectr; ``none`` returns ``None``: no trace context leaves Lectr.
  ``tracestate`` is forwarded as the client sent it unless the value is None,
  or (``lectr``) a new trace was started: the client sent no valid parent.
- ``finish(ctx, summary)``: queues the request for export (an append to a
  bounded list) and returns. Spans are built from the summary and exported in
  a background thread, never on the reactor. Call it exactly once per
  ``begin``; ``ctx`` must not be used afterwards.

Spans: one SERVER span per request (``{gen_ai.operation.name}
{gen_ai.request.model}``, e.g. ``chat gpt-4o``, or ``{method} {provider}``
for endpoints that are not GenAI operations), child of the client's span when
it sent a ``traceparent``; one CLIENT child span per upstream attempt, with
its outcome. Attributes: ``gen_ai.operation.name``, ``gen_ai.system`` (and
``gen_ai.provider.name``), ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens``/``output_tokens``, ``lectr.streamed``,
``lectr.time_to_first_token`` (seconds), ``http.request.method``,
``url.path``, ``http.response.status_code``, ``error.type``,
``lectr.request_id``, ``lectr.org_id``, ``lectr.route``, ``lectr.attempts``,
``lectr.service_tier`` (the tier the provider says served it), ``lectr.cost_usd``
(the request's cost, exact decimal text, when priced on the request);
on attempts ``lectr.attempt``, ``lectr.outcome``. Never message content,
never a key, never a query string: only what :class:`RequestSummary` holds.

The admin API traces itself (:meth:`Tracing.begin` + :func:`activate` +
:meth:`Tracing.finish_server`): one SERVER span per call (health checks and
/metrics excepted) and one CLIENT child per database operation, named by its
description (``lectr.db.database``).

**Design.** Spans are not built through the SDK's Tracer (its span objects,
locks and processors would run on the reactor): :meth:`begin` allocates the
ids itself (so the ``traceparent`` sent upstream names the span that will be
exported), and the export thread turns each summary into
``opentelemetry.sdk.trace.ReadableSpan`` objects with those explicit ids and
timestamps, then hands the batch to the SDK's ``OTLPSpanExporter``. The queue
is bounded (``OTEL_BSP_MAX_QUEUE_SIZE`` traces): when the collector is slow or
down, new traces are dropped and counted
(``lectr_trace_spans_dropped_total{reason="queue_full"}``), as are batches the
collector refused (``reason="export_failed"``); requests never wait. The
export thread is a daemon: a hung collector cannot hold up shutdown.
"""

from __future__ import annotations

import os
import queue
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr.genai import operation_name
from lectr.http.headers import HeaderList

PROPAGATION_MODES = ("lectr", "client", "none")

# ids need to be unique, not secret (as the OpenTelemetry SDK's own generator)
_getrandbits = random.getrandbits
_TRACEPARENT_RE = re.compile(
    rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S
)
_current: ContextVar[TraceContext | None] = ContextVar("lectr_trace", default=None)


# --- what the proxy reports ------------------------------------------------------------


# not frozen: a frozen dataclass costs the proxy a microsecond more per
# request to build; treat them as immutable all the same
@dataclass(slots=True)
class Attempt:
    """One upstream call."""

    number: int  # 1-based; the n given to attempt_traceparent
    provider: str
    model: str | None  # the model sent upstream
    started: float  # seconds since the epoch (reactor.seconds())
    ended: float
    outcome: str  # "ok", or why it failed: "429", "5xx", "auth", "timeout", "connect", ...
    status: int | None = None  # the provider's HTTP status, None without an answer


@dataclass(slots=True)
class RequestSummary:
    """A finished proxied request, as its span shows it."""

    ended: float  # seconds since the epoch, when the answer was complete (or abandoned)
    status: int  # the status the client got (499: it went away)
    method: str = "POST"
    path: str = ""  # the provider path, e.g. /v1/chat/completions, never the query string
    provider: str | None = None
    operation: str | None = None  # gen_ai.operation.name; None: from the path
    request_model: str | None = None
    response_model: str | None = None
    streamed: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    time_to_first_token: float | None = None  # seconds from the start to the first byte sent
    org_id: str | None = None
    request_id: str | None = None
    route: str | None = None
    error_type: str | None = None  # Lectr's error code when Lectr refused or failed it
    attempts: Sequence[Attempt] = ()
    service_tier: str | None = None  # the service tier the provider says served it
    cost_usd: str | None = None  # the request's cost (exact decimal text; None: unpriced)


# --- W3C trace context ------------------------------------------------------------------


def parse_traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``, or None
    when it is not a valid one (https://www.w3.org/TR/trace-context/)."""
    m = _TRACEPARENT_RE.fullmatch(value)
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


class Sampler:
    """The standard ``OTEL_TRACES_SAMPLER`` choices."""

    NAMES = (
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    )

    def __init__(self, name: str = "parentbased_always_on", ratio: float = 1.0) -> None:
        if name not in self.NAMES:
            raise ValueError(f"expected one of {', '.join(self.NAMES)}, got {name!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the ratio must be from 0 to 1, got {ratio}")
        self.name = name
        self._parent_based = name.startswith("parentbased_")
        self._root = name.removeprefix("parentbased_")
        self._bound = round(ratio * 2**64)

    def sample(self, trace_id: int, parent_sampled: bool | None) -> bool:
        if parent_sampled is not None and self._parent_based:
            return parent_sampled
        if self._root == "always_on":
            return True
        if self._root == "always_off":
            return False
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self._bound


class TraceContext:
    """One traced request, from :meth:`Tracing.begin` to its finish."""

    __slots__ = (
        "_tracing",
        "trace_id",
        "span_id",
        "parent_span_id",
        "sampled",
        "started",
        "_client_traceparent",
        "_attempt_ids",
        "_children",
        "_finished",
    )

    def __init__(
        self,
        tracing: Tracing,
        trace_id: int,
        span_id: int,
        parent_span_id: int | None,
        sampled: bool,
        started: float,
        client_traceparent: bytes | None,
    ) -> None:
        self._tracing = tracing
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.sampled = sampled
        self.started = started
        self._client_traceparent = client_traceparent
        self._attempt_ids: dict[int, int] | None = None
        self._children: list[tuple[str, float, float, str | None]] | None = None
        self._finished = False

    @property
    def traceparent(self) -> bytes:
        """The ``traceparent`` naming this request's own span."""
        return format_traceparent(self.trace_id, self.span_id, self.sampled)

    def attempt_span_id(self, n: int) -> int:
        ids = self._attempt_ids
        if ids is None:
            ids = self._attempt_ids = {}
        span_id = ids.get(n)
        if span_id is None:
            span_id = ids[n] = _getrandbits(64) or 1
        return span_id

    def attempt_traceparent(self, n: int) -> bytes | None:
        """The ``traceparent`` to send upstream with attempt ``n``; None:
        send none (see the module docstring)."""
        mode = self._tracing.propagation
        if mode == "lectr":
            return format_traceparent(self.trace_id, self.attempt_span_id(n), self.sampled)
        if mode == "client":
            return self._client_traceparent
        return None

    def now(self) -> float:
        return self._tracing.clock.seconds()

    def child(self, name: str, started: float, ended: float, error: str | None = None) -> None:
        """Record a finished child operation (a database call)."""
        if not self.sampled or self._finished:
            return
        if self._children is None:
            self._children = []
        if len(self._children) < 256:
            self._children.append((name, started, ended, error))


def current() -> TraceContext | None:
    """The traced admin request this code runs for, if any."""
    return _current.get()


def activate(ctx: TraceContext | None) -> Token:
    """Make ``ctx`` the current trace of this coroutine (and of the
    Deferreds it starts): database operations become its children."""
    return _current.set(ctx)


def deactivate(token: Token) -> None:
    _current.reset(token)


# --- the exporter side ------------------------------------------------------------------


class _ExportThread:
    """One daemon thread running export jobs in order; results come back to
    the reactor."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __call__(self, fn: Callable, *args: Any) -> Deferred:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="lectr-otlp", daemon=True)
            self._thread.start()
        d: Deferred = Deferred()
        self._jobs.put((fn, args, d))
        return d

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, d = job
            try:
                result = fn(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)


@dataclass(frozen=True)
class TraceSettings:
    """What the OTEL_* variables ask for (:func:`trace_settings`)."""

    endpoint: str
    sampler: Sampler
    max_queue: int
    interval: float  # seconds
    batch_size: int
    service_name: str


def trace_settings(environ: Mapping[str, str]) -> TraceSettings | None:
    """The standard OpenTelemetry variables read and checked, without
    starting anything: None when tracing is off (no OTLP endpoint, or turned
    off). Raises ValueError, naming the variable and never a header's value,
    for a malformed one; :func:`lectr.config.load_config` calls it, so they
    are refused with Lectr's own settings, before anything is bound or made."""
    endpoint = _env(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env(
        environ, "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if (
        not endpoint
        or (_env(environ, "OTEL_SDK_DISABLED") or "").lower() == "true"
        or (_env(environ, "OTEL_TRACES_EXPORTER") or "otlp").lower() == "none"
    ):
        return None
    protocol = (
        _env(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or _env(environ, "OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: Lectr exports "
            "OTLP over HTTP (http/protobuf, port 4318)"
        )
    try:
        sampler = Sampler(
            (_env(environ, "OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower(),
            float(_env(environ, "OTEL_TRACES_SAMPLER_ARG") or "1.0"),
        )
    except ValueError as e:
        raise ValueError(f"OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG: {e}") from None
    sizes = {}
    for name, default in (
        ("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        ("OTEL_BSP_SCHEDULE_DELAY", 5000),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
    ):
        raw = _env(environ, name)
        try:
            sizes[name] = int(raw) if raw else default
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
        if sizes[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {sizes[name]}")
    # (the exporter reads the traces variable, else the general one)
    for name in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        if environ.get(name):
            _check_headers(name, environ[name])
            break
    return TraceSettings(
        endpoint=endpoint,
        sampler=sampler,
        max_queue=sizes["OTEL_BSP_MAX_QUEUE_SIZE"],
        interval=sizes["OTEL_BSP_SCHEDULE_DELAY"] / 1000.0,
        batch_size=min(sizes["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"], sizes["OTEL_BSP_MAX_QUEUE_SIZE"]),
        service_name=_env(environ, "OTEL_SERVICE_NAME") or "lectr",
    )


class Tracing:
    """The service's tracer (see the module docstring). Build it with
    :meth:`from_environ`, or :meth:`disabled`."""

    _log = Logger()

    def __init__(
        self,
        exporter,
        *,
        reactor,
        metrics,
        service_name: str = "lectr",
        propagation: str = "lectr",
        sampler: Sampler | None = None,
        max_queue: int = 2048,
        batch_size: int = 512,
        interval: float = 5.0,
        stop_timeout: float = 5.0,
        description: str = "",
        run_in_thread: Callable[..., Deferred] | None = None,
    ) -> None:
        if propagation not in PROPAGATION_MODES:
            raise ValueError(f"propagation must be one of {PROPAGATION_MODES}")
        self.enabled = exporter is not None
        self.propagation = propagation
        self.clock = reactor
        self._exporter = exporter
        self._sampler = sampler or Sampler()
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._interval = interval
        self._stop_timeout = stop_timeout
        self._description = description
        self._service_name = service_name
        self._queue: list[tuple] = []
        self._exporting: Deferred | None = None
        self._early = None
        self._failing = False
        self._stopped = False
        self._builder: _SpanBuilder | None = None  # made in the export thread
        self._thread = None
        if run_in_thread is None and exporter is not None:
            self._thread = _ExportThread(reactor)
            run_in_thread = self._thread
        self._in_thread = run_in_thread
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        if self.enabled:
            self._m_exported = metrics.counter(
                "lectr_trace_spans_exported_total", "Spans the OTLP collector accepted"
            )
            self._m_dropped = metrics.counter(
                "lectr_trace_spans_dropped_total",
                "Spans lost: queue_full (the collector is slow or down), export_failed",
                ["reason"],
            )
            metrics.callback_gauge(
                "lectr_trace_queue", "Traces waiting to be exported", lambda: len(self._queue)
            )

    @classmethod
    def disabled(cls, *, reactor=None) -> Tracing:
        return cls(None, reactor=reactor, metrics=None)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], *, reactor, metrics, propagation: str = "lectr"
    ) -> Tracing:
        """A Tracing configured by the standard OpenTelemetry variables;
        disabled when no OTLP endpoint is set. Raises ValueError (with the
        variable's name) for a malformed value (:func:`trace_settings`)."""
        settings = trace_settings(environ)
        if settings is None:
            return cls.disabled(reactor=reactor)
        import logging

        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # the exporter logs every failed attempt; Lectr counts them and logs
        # when export starts and stops failing. The headers' parser prints a
        # malformed entry whole, the collector's API key in it (refused by
        # trace_settings)
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
        logging.getLogger("opentelemetry.util.re").setLevel(logging.CRITICAL)
        exporter = OTLPSpanExporter()  # endpoint, headers, timeout, TLS: OTEL_EXPORTER_OTLP_*
        return cls(
            exporter,
            reactor=reactor,
            metrics=metrics,
            service_name=settings.service_name,
            propagation=propagation,
            sampler=settings.sampler,
            max_queue=settings.max_queue,
            interval=settings.interval,
            batch_size=settings.batch_size,
            description=_loggable_url(getattr(exporter, "_endpoint", settings.endpoint)),
        )

    # --- the request path ------------------------------------------------------------

    def begin(self, headers) -> TraceContext | None:
        """Start tracing a request (see the module docstring). ``headers``:
        the client's request headers (the proxy's
        :class:`lectr.http.headers.HeaderList`, or Twisted's ``Headers``)."""
        if not self.enabled:
            return None
        if headers is None:
            raw = None
        elif isinstance(headers, HeaderList):
            raw = headers.get(b"traceparent")
        else:
            raw = headers.getRawHeaders(b"traceparent")
        client = raw[0] if raw else None
        # several traceparent headers: invalid, like a malformed one
        parent = parse_traceparent(client) if client is not None and len(raw) == 1 else None
        if parent is not None:
            trace_id, parent_span_id, parent_sampled = parent
            sampled = self._sampler.sample(trace_id, parent_sampled)
        else:
            trace_id = _getrandbits(128) or 1
            parent_span_id = None
            sampled = self._sampler.sample(trace_id, None)
        return TraceContext(
            self,
            trace_id,
            _getrandbits(64) or 1,
            parent_span_id,
            sampled,
            self.clock.seconds(),
            client,
        )

    def finish(self, ctx: TraceContext | None, summary: RequestSummary) -> None:
        """The request is over: queue its spans for export. Never raises."""
        if ctx is None or not ctx.sampled or ctx._finished:
            return
        ctx._finished = True
        ctx._client_traceparent = None  # up to the header limit: not held while queued
        self._enqueue(("proxy", ctx, summary), 1 + len(summary.attempts))

    def finish_server(
        self,
        ctx: TraceContext | None,
        *,
        name: str,
        status: int,
        attributes: Mapping[str, Any],
    ) -> None:
        """An admin API call is over (its database children recorded)."""
        if ctx is None or not ctx.sampled or ctx._finished:
            return
        ctx._finished = True
        ctx._client_traceparent = None  # up to the header limit: not held while queued
        ended = self.clock.seconds()
        self._enqueue(
            ("server", ctx, name, ended, status, dict(attributes)), 1 + len(ctx._children or ())
        )

    def _enqueue(self, item: tuple, spans: int) -> None:
        if self._stopped or len(self._queue) >= self._max_queue:
            self._m_dropped.inc(spans, "queue_full")
            return
        self._queue.append(item)
        if (
            len(self._queue) >= self._batch_size
            and self._exporting is None
            and self._early is None
            and self._loop.running
        ):
            self._early = self.clock.callLater(0, self._early_tick)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._loop.running:
            return
        self._log.info(
            "tracing on: OTLP/HTTP to {endpoint}, service {service}, sampler {sampler}, "
            "traceparent to providers: {propagation}",
            endpoint=self._description,
            service=self._service_name,
            sampler=self._sampler.name,
            propagation=self.propagation,
        )
        d = self._loop.start(self._interval, now=False)
        d.addErrback(lambda f: self._log.failure("trace exporter loop stopped", f))

    async def stop(self) -> None:
        """Export what is queued (for up to ``stop_timeout`` seconds), then
        shut the exporter down."""
        if not self.enabled or self._stopped:
            return
        if self._loop.running:
            self._loop.stop()
        if self._early is not None and self._early.active():
            self._early.cancel()
        self._early = None
        deadline = self.clock.seconds() + self._stop_timeout
        while (self._queue or self._exporting is not None) and self.clock.seconds() < deadline:
            if self._exporting is None:
                self._export_batch()
            if self._exporting is not None:
                if not await _wait(self._exporting, deadline - self.clock.seconds(), self.clock):
                    break
        self._stopped = True
        if self._queue:
            self._m_dropped.inc(sum(_span_count(i) for i in self._queue), "queue_full")
            self._queue.clear()
        try:
            self._exporter.shutdown()  # ends retry waits; the daemon thread may linger
        except Exception:
            self._log.failure("trace exporter shutdown failed")
        if self._thread is not None:
            self._thread.close()

    # --- exporting -----------------------------------------------------------------------

    def _early_tick(self) -> None:
        self._early = None
        self._tick()

    def _tick(self) -> None:
        try:
            if self._exporting is None and self._queue:
                self._export_batch()
        except Exception:
            self._log.failure("trace export tick failed")

    def _export_batch(self) -> None:
        batch = self._queue[: self._batch_size]
        del self._queue[: self._batch_size]
        spans = sum(_span_count(i) for i in batch)
        d = self._in_thread(self._export_in_thread, batch)
        self._exporting = d

        def done(ok: object) -> None:
            self._exporting = None
            if ok is True:
                self._m_exported.inc(spans)
                if self._failing:
                    self._failing = False
                    self._log.info(
                        "trace export works again ({endpoint})", endpoint=self._description
                    )
            else:
                self._m_dropped.inc(spans, "export_failed")
                if not self._failing:
                    self._failing = True
                    self._log.warn(
                        "trace export to {endpoint} failed; spans are dropped and counted "
                        "(lectr_trace_spans_dropped_total) until it works again",
                        endpoint=self._description,
                    )
            if len(self._queue) >= self._batch_size and self._loop.running:
                if self._early is None:
                    self._early = self.clock.callLater(0, self._early_tick)

        def failed(failure: Failure) -> bool:
            self._log.failure("trace export failed unexpectedly", failure)
            return False

        d.addErrback(failed)
        d.addCallback(done)

    def _export_in_thread(self, batch: list[tuple]) -> bool:
        """In the export thread: build the spans, send them. True on success."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        if self._builder is None:
            self._builder = _SpanBuilder(self._service_name)
        spans = []
        for item in batch:
            if item[0] == "proxy":
                spans.extend(self._builder.request(item[1], item[2]))
            else:
                spans.extend(self._builder.admin_call(*item[1:]))
        return self._exporter.export(spans) is SpanExportResult.SUCCESS


class _SpanBuilder:
    """Turns finished requests into ``ReadableSpan`` objects with the ids
    and timestamps recorded on the reactor (export thread only)."""

    def __init__(self, service_name: str) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import ReadableSpan

        self._api = trace
        self._span_class = ReadableSpan
        self._resource, self._scope = _resource_and_scope(service_name)
        self._flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)

    def _context(self, trace_id: int, span_id: int, remote: bool = False):
        return self._api.SpanContext(trace_id, span_id, is_remote=remote, trace_flags=self._flags)

    def _span(self, name, context, parent, kind, attributes, started, ended, error):
        return self._span_class(
            name=name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes={k: v for k, v in attributes.items() if v is not None},
            kind=kind,
            status=self._api.Status(
                self._api.StatusCode.ERROR if error else self._api.StatusCode.UNSET
            ),
            start_time=_ns(started),
            end_time=_ns(ended),
            instrumentation_scope=self._scope,
        )

    def _own_and_parent(self, ctx: TraceContext):
        own = self._context(ctx.trace_id, ctx.span_id)
        parent = (
            self._context(ctx.trace_id, ctx.parent_span_id, remote=True)
            if ctx.parent_span_id
            else None
        )
        return own, parent

    def request(self, ctx: TraceContext, s: RequestSummary) -> list:
        """A proxied request: its SERVER span and one CLIENT span per attempt."""
        own, parent = self._own_and_parent(ctx)
        op = s.operation or operation_name(s.path)
        model = _cut(s.request_model)
        attributes = {
            "gen_ai.operation.name": op,
            "gen_ai.system": s.provider,
            "gen_ai.provider.name": s.provider,
            "gen_ai.request.model": model,
            "gen_ai.response.model": _cut(s.response_model),
            "gen_ai.usage.input_tokens": s.input_tokens,
            "gen_ai.usage.output_tokens": s.output_tokens,
            "lectr.streamed": s.streamed,
            "lectr.time_to_first_token": s.time_to_first_token,
            "http.request.method": s.method,
            "url.path": _cut(s.path, 512),
            "http.response.status_code": s.status,
            "error.type": s.error_type or (str(s.status) if s.status >= 400 else None),
            "lectr.request_id": s.request_id,
            "lectr.org_id": s.org_id,
            "lectr.route": _cut(s.route),
            "lectr.attempts": len(s.attempts),
            "lectr.service_tier": s.service_tier,
            "lectr.cost_usd": s.cost_usd,
        }
        name = f"{op} {model}" if op and model else f"{s.method} {s.provider or 'lectr'}"
        kind = self._api.SpanKind
        out = [
            self._span(
                name, own, parent, kind.SERVER, attributes, ctx.started, s.ended, s.status >= 500
            )
        ]
        for a in s.attempts:
            attempt_model = _cut(a.model)
            ok = a.outcome == "ok"
            out.append(
                self._span(
                    f"{op} {attempt_model}" if op and attempt_model else f"{s.method} {a.provider}",
                    self._context(ctx.trace_id, ctx.attempt_span_id(a.number)),
                    own,
                    kind.CLIENT,
                    {
                        "gen_ai.operation.name": op,
                        "gen_ai.system": a.provider,
                        "gen_ai.provider.name": a.provider,
                        "gen_ai.request.model": attempt_model,
                        "lectr.attempt": a.number,
                        "lectr.outcome": a.outcome,
                        "http.response.status_code": a.status,
                        "error.type": None if ok else a.outcome,
                    },
                    a.started,
                    a.ended,
                    not ok,
                )
            )
        return out

    def admin_call(
        self, ctx: TraceContext, name: str, ended: float, status: int, attributes: dict
    ) -> list:
        """An admin API call: its SERVER span and one CLIENT span per
        database operation."""
        own, parent = self._own_and_parent(ctx)
        attributes["http.response.status_code"] = status
        if status >= 400:
            attributes["error.type"] = str(status)
        kind = self._api.SpanKind
        out = [
            self._span(
                name, own, parent, kind.SERVER, attributes, ctx.started, ended, status >= 500
            )
        ]
        for child, started, child_ended, error in ctx._children or ():
            out.append(
                self._span(
                    child,
                    self._context(ctx.trace_id, _getrandbits(64) or 1),
                    own,
                    kind.CLIENT,
                    {
                        "db.system.name": "postgresql",
                        "db.query.summary": child,
                        "error.type": error,
                    },
                    started,
                    child_ended,
                    error is not None,
                )
            )
        return out


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value.strip() if value and value.strip() else None


# an entry of OTEL_EXPORTER_OTLP_HEADERS as the exporter takes it: a name,
# "=", a value URL-encoded or written as is in printable ASCII but '"', ','
# ';' and a backslash (opentelemetry.util.re's "liberal" format); entries split on ","
_HEADER_ENTRY_RE = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*=[ \t]*"
    r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*"
)
_HEADER_SPLIT_RE = re.compile(r"[ \t]*,[ \t]*")


def _check_headers(name: str, value: str) -> None:
    """ValueError naming ``name`` and the entry's place when an entry of
    ``value`` is not one the exporter takes: it would drop that header (the
    collector then refuses every export) and print the entry, an API key
    with it. The message never shows the value."""
    for n, entry in enumerate(_HEADER_SPLIT_RE.split(value), 1):
        entry = entry.strip()
        if entry and not _HEADER_ENTRY_RE.fullmatch(entry):  # (blank ones: skipped)
            raise ValueError(
                f"{name}: entry {n} is not name=value with a printable ASCII value "
                "(URL-encode '\"', ',', ';', '\\' and other characters; the value is not shown)"
            )


def _loggable_url(url: str) -> str:
    """The collector's URL for log lines: credentials in it (HTTP basic
    auth, which the exporter honours) and its query string masked. An ``@``
    past the authority (credentials typed with a ``/``, ``?`` or ``#``
    unescaped: the authority ends inside them), or a URL that is not
    ``http(s)://``, is not shown at all."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if parts.scheme not in ("http", "https") or url.count("@") != netloc.count("@"):
        return "<URL not shown>"
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _cut(value: str | None, limit: int = 256) -> str | None:
    return value[:limit] if value is not None else None


def _span_count(item: tuple) -> int:
    if item[0] == "proxy":
        return 1 + len(item[2].attempts)
    return 1 + len(item[1]._children or ())


def _resource_and_scope(service_name: str):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from lectr import __version__

    resource = Resource.create(
        {
            "service.name": service_name,
            "service.version": __version__,
            "service.instance.id": f"{os.uname().nodename}:{os.getpid()}",
        }
    )
    return resource, InstrumentationScope("lectr", __version__)


async def _wait(d: Deferred, timeout: float, clock) -> bool:
    """Wait for ``d`` (without consuming its result) up to ``timeout``
    seconds; True when it fired."""
    waiter: Deferred[bool] = Deferred()

    def fired(result: object) -> object:
        if not waiter.called:
            waiter.callback(True)
        return result

    d.addBoth(fired)
    timer = clock.callLater(max(timeout, 0), lambda: waiter.called or waiter.callback(False))
    result = await waiter
    if timer.active():
        timer.cancel()
    return result


def synchronous(fn: Callable, *args: Any) -> Deferred:
    """A ``run_in_thread`` that runs in the caller's thread (tests)."""
    return maybeDeferred(fn, *args)
