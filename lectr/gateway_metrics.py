"""Metrics of the traffic itself: GenAI semantic-convention histograms and
upstream attempts and fallbacks.

:class:`GenAIMetrics` is fed by the usage recorder's flusher with the rows
it takes out of its buffer (once a second), never by the request path::

    gen_ai_client_token_usage{gen_ai_operation_name, gen_ai_system,
        gen_ai_request_model, org_id, gen_ai_token_type="input"|"output"}
    gen_ai_server_request_duration{gen_ai_operation_name, gen_ai_system,
        gen_ai_request_model, org_id, error_type}           (seconds)
    gen_ai_server_time_to_first_token{gen_ai_operation_name, gen_ai_system,
        gen_ai_request_model, org_id}                       (seconds, streams)

:class:`UpstreamMetrics` is for the proxy core, which calls it once per
upstream attempt and once per fallback::

    lectr_upstream_attempts_total{provider, outcome}
    lectr_fallbacks_total{provider, reason}

**Bounded cardinality.** Model names come from clients and org ids grow
with the deployment, so every label runs through a :class:`LabelLimiter`:
the first N distinct values of a label are kept, later ones are reported as
``other`` (and counted in ``lectr_metrics_labels_folded_total{label}``), and
past 5000 (provider, model, org) combinations a new combination keeps only
its provider (``label="series"``); outcomes and reasons outside a fixed
vocabulary become ``other`` too. The
limits are per process: with ``--workers N`` each worker keeps its own first
N, so the merged /metrics holds at most N × the limit values per label. Org
ids are the only tenant label: never a key, a key name or a user.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.logger import Logger

from lectr.genai import DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS, operation_name
from lectr.metrics import Registry
from lectr.usage.model import COUNT_MAX, UsageRecord

OTHER = "other"
_MAX_LABEL_LENGTH = 128

#: ``outcome`` of an upstream attempt.
ATTEMPT_OUTCOMES = frozenset(
    {
        "ok",  # the provider answered (any status the client gets as is)
        "429",  # rate-limited by the provider
        "5xx",  # a provider error status
        "auth",  # the provider refused the key (401/403)
        "timeout",  # no answer (headers) in time
        "connect",  # connection refused, reset, DNS, TLS
        "cancelled",  # the client went away during the attempt
        "error",  # anything else
    }
)
#: ``reason`` of a fallback (why the next attempt was made).
FALLBACK_REASONS = frozenset({"429", "5xx", "auth", "timeout", "connect"})


class LabelLimiter:
    """Keeps the first ``limit`` distinct values of one label; any later
    value is ``other``. Values are cut to 128 characters, and made encodable."""

    def __init__(self, name: str, limit: int, folded) -> None:
        self.name = name
        self._limit = limit
        self._seen: set[str] = set()
        self._folded = folded

    def __call__(self, value: str | None) -> str:
        if value is None:
            return ""
        if value in self._seen:
            return value
        if len(value) > _MAX_LABEL_LENGTH or not value.isascii():
            value = _printable(value)
            if value in self._seen:
                return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        self._folded.inc(1, self.name)
        return OTHER


def _printable(value: str) -> str:
    """Cut to 128 characters, lone surrogates replaced (the exposition is
    UTF-8)."""
    value = value[:_MAX_LABEL_LENGTH]
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value


def _folded_counter(registry: Registry):
    return registry.counter(
        "lectr_metrics_labels_folded_total",
        "Label values reported as 'other' because the label had too many distinct values",
        ["label"],
    )


_UNSEEN = object()


def _add(series: dict[tuple, list], key: tuple, value: float) -> None:
    values = series.get(key)
    if values is None:
        series[key] = [value]
    else:
        values.append(value)


def _tokens(value: object) -> int | None:
    """A token count as its row stores it (else NULL): not observed either."""
    return value if type(value) is int and 0 <= value <= COUNT_MAX else None


class GenAIMetrics:
    _log = Logger()

    def __init__(
        self,
        registry: Registry,
        *,
        max_models: int = 200,
        max_orgs: int = 1000,
        max_providers: int = 64,
        max_series: int = 5000,
    ) -> None:
        folded = self._folded = _folded_counter(registry)
        self._max_series = max_series
        self._series: set[tuple[str, str, str]] = set()
        self._provider = LabelLimiter("gen_ai_system", max_providers, folded)
        self._model = LabelLimiter("gen_ai_request_model", max_models, folded)
        self._org = LabelLimiter("org_id", max_orgs, folded)
        common = ["gen_ai_operation_name", "gen_ai_system", "gen_ai_request_model", "org_id"]
        self.token_usage = registry.histogram(
            "gen_ai_client_token_usage",
            "Tokens per request (gen_ai.client.token.usage), input and output, as the provider "
            "reported them (or as estimated)",
            [*common, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
        )
        self.duration = registry.histogram(
            "gen_ai_server_request_duration",
            "Seconds from the request's arrival to the end of its answer "
            "(gen_ai.server.request.duration); error_type is the status when >= 400",
            [*common, "error_type"],
            buckets=DURATION_BUCKETS,
        )
        self.ttft = registry.histogram(
            "gen_ai_server_time_to_first_token",
            "Seconds to the first byte of a streamed answer (gen_ai.server.time_to_first_token)",
            common,
            buckets=TTFT_BUCKETS,
        )

    def observe(self, rows: Iterable[UsageRecord]) -> None:
        """Account for finished requests (the recorder's flusher calls this
        with each batch it takes). Requests to endpoints that are not GenAI
        operations (models, files…) are left out.

        A batch is observed series by series: each row's labels are worked
        out once per distinct (path, provider, model, org) in the batch - a
        label that was folded into ``other`` is worked out again for every
        row, so the folding counter counts rows as before - and each
        series takes its values in row order (the same sums to the bit)."""
        labelled: dict[tuple, tuple[str, ...] | None] = {}
        durations: dict[tuple, list[float]] = {}
        ttfts: dict[tuple, list[float]] = {}
        tokens: dict[tuple, list[int]] = {}
        malformed = 0
        for r in rows:
            try:
                seen = (r.path, r.provider, r.model, r.org_id)
                labels = labelled.get(seen, _UNSEEN)
                if labels is _UNSEEN:
                    op = operation_name(r.path)
                    labels = None if op is None else (op, *self._labels(r))
                    if labels is None or OTHER not in labels:
                        labelled[seen] = labels
                if labels is None:
                    continue
                status = r.status
                error = str(status) if status >= 400 else ""
                duration = r.latency_ms / 1000.0
                ttft = r.ttfb_ms / 1000.0 if r.streamed and r.ttfb_ms is not None else None
                usage = r.usage
                metered = usage.source != "none"
                prompt, completion = _tokens(usage.prompt_tokens), _tokens(usage.completion_tokens)
            except Exception:  # a malformed row (a bug upstream): the others still count
                malformed += 1
                continue
            _add(durations, (*labels, error), duration)
            if ttft is not None and status < 400:
                _add(ttfts, labels, ttft)
            if metered:
                if prompt is not None:
                    _add(tokens, (*labels, "input"), prompt)
                if completion is not None:
                    _add(tokens, (*labels, "output"), completion)
        for histogram, series in (
            (self.duration, durations),
            (self.ttft, ttfts),
            (self.token_usage, tokens),
        ):
            for labelvalues, values in series.items():
                histogram.observe_each(values, *labelvalues)
        if malformed:
            self._log.warn("GenAI metrics: {n} malformed usage rows left out", n=malformed)

    def _labels(self, r: UsageRecord) -> tuple[str, str, str]:
        """(provider, model, org); past ``max_series`` combinations, new ones
        keep only their provider."""
        key = (self._provider(r.provider), self._model(r.model), self._org(r.org_id))
        if key not in self._series:
            if len(self._series) >= self._max_series:
                self._folded.inc(1, "series")
                return (key[0], OTHER, OTHER)
            self._series.add(key)
        return key


class UpstreamMetrics:
    """For the proxy core: ``attempt(provider, outcome)`` after each upstream
    call, ``fallback(provider, reason)`` when another attempt follows
    (``provider`` being the one that failed). Both are dict updates."""

    def __init__(self, registry: Registry, *, max_providers: int = 64) -> None:
        self._provider = LabelLimiter("provider", max_providers, _folded_counter(registry))
        self._attempts = registry.counter(
            "lectr_upstream_attempts_total",
            "Upstream calls by provider and outcome (ok, 429, 5xx, auth, timeout, connect, "
            "cancelled, error)",
            ["provider", "outcome"],
        )
        self._fallbacks = registry.counter(
            "lectr_fallbacks_total",
            "Requests that moved on to another attempt, by the provider that failed and why "
            "(429, 5xx, auth, timeout, connect)",
            ["provider", "reason"],
        )

    def attempt(self, provider: str, outcome: str) -> None:
        if outcome not in ATTEMPT_OUTCOMES:
            outcome = OTHER
        self._attempts.inc(1, self._provider(provider), outcome)

    def fallback(self, provider: str, reason: str) -> None:
        if reason not in FALLBACK_REASONS:
            reason = OTHER
        self._fallbacks.inc(1, self._provider(provider), reason)
