"""A small metrics registry with Prometheus text exposition (format 0.0.4).

One :class:`Registry` is made by the composition root and handed to the
components that measure something; ``GET /metrics`` on the admin port renders
it. Updating a metric is a dict operation: cheap enough for the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

_DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not labelnames:
            self._values[()] = 0.0

    def _key(self, labelvalues: Sequence[str]) -> tuple[str, ...]:
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        return tuple(labelvalues)

    def value(self, *labelvalues: str) -> float:
        return self._values.get(self._key(labelvalues), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.labelnames, key)} {_fmt(value)}"


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, *labelvalues: str) -> None:
        key = self._key(labelvalues) if labelvalues or self.labelnames else ()
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, *labelvalues: str) -> None:
        self._values[self._key(labelvalues)] = float(value)

    def inc(self, amount: float = 1.0, *labelvalues: str) -> None:
        key = self._key(labelvalues)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, *labelvalues: str) -> None:
        self.inc(-amount, *labelvalues)


class CallbackGauge(_Metric):
    """A gauge read from a function when /metrics is rendered."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self._read = read

    def value(self, *labelvalues: str) -> float:
        return float(self._read())

    def render(self) -> Iterable[str]:
        self._values[()] = self.value()
        return super().render()


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = _DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help, labelnames)
        self._values.clear()
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *labelvalues: str) -> None:
        key = self._key(labelvalues)
        series = self._series.get(key)
        if series is None:
            # bucket counts..., sum, count
            series = self._series[key] = [0.0] * (len(self.buckets) + 2)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                series[i] += 1
                break
        series[-2] += value
        series[-1] += 1

    def count(self, *labelvalues: str) -> float:
        series = self._series.get(self._key(labelvalues))
        return series[-1] if series else 0.0

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for key, series in sorted(self._series.items()):
            cumulative = 0.0
            for bound, n in zip(self.buckets, series, strict=False):
                cumulative += n
                le = f'le="{_fmt(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_fmt(cumulative)}"
            yield f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(series[-2])}"
            yield f"{self.name}_count{_labels(self.labelnames, key)} {_fmt(series[-1])}"


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _get(self, cls: type, name: str, *args, **kwargs):
        existing = self._metrics.get(name)
        if existing is not None:
            if not isinstance(existing, cls):
                raise ValueError(f"metric {name} already registered as {existing.kind}")
            return existing
        metric = self._metrics[name] = cls(name, *args, **kwargs)
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._get(Counter, name, help, labelnames)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, help, labelnames)

    def callback_gauge(self, name: str, help: str, read: Callable[[], float]) -> CallbackGauge:
        metric = self._get(CallbackGauge, name, help, read)
        metric._read = read  # the newest owner wins (a restarted component)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = _DEFAULT_BUCKETS,
    ) -> Histogram:
        return self._get(Histogram, name, help, labelnames, buckets)

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self._metrics):
            lines.extend(self._metrics[name].render())
        return "\n".join(lines) + "\n"
