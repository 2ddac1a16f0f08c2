"""Metrics: one registry per process, exposed in the Prometheus text format
by ``prometheus_client``, aggregated over every worker of ``--workers N``.

One :class:`Registry` is made by the composition root and handed to the
components that measure something; ``GET /metrics`` on the admin port renders
it. The API is small and stable (call sites never change)::

    requests = registry.counter("lectr_x_total", "help", ["provider", "status"])
    requests.inc(1, "openai", "200")
    seconds = registry.histogram("lectr_x_seconds", "help", ["provider"])
    seconds.observe(0.12, "openai")
    registry.callback_gauge("lectr_x_in_flight", "help", lambda: len(active), mode="livesum")

**Hot path.** ``inc``/``observe`` update this process's own values in a dict
(about 0.2 µs / 0.4 µs). prometheus_client's own multiprocess values take a
lock and write an mmap on every call (0.8 µs to 2.6 µs measured, with the
label lookup), so Lectr keeps its values in process and copies them to the
shared files once a second instead (``bench/metrics_bench.py`` prints both).

**One process** (``--workers 1``): :meth:`Registry.render` reports the
process's values.

**Several workers** (``--workers N``): the supervisor makes a run directory
(:class:`MetricsRunDirectory`, under ``<data-dir>/metrics/``) and hands it to
every worker (``LECTR_METRICS_DIR``). Each worker's :class:`MetricsFileSync`
writes every series into prometheus_client's multiprocess files
(``counter_<slot>.db``, ``histogram_<slot>.db``, ``gauge_<mode>_<pid>.db``)
every second and once more when it stops. A scrape, answered by whichever
worker accepts the connection, first writes that worker's values, then merges
every file with ``prometheus_client.multiprocess.MultiProcessCollector``:

- counters and histograms are summed over every worker of this run,
  including the workers that exited. Their files are named by the worker's
  *slot* (``counter_worker<index>.db``), not its pid: a restarted worker
  takes over its predecessor's files and adds what they hold to its own
  values, so a counter never goes back, nothing counts twice, and a worker
  that crash-loops does not leave a file per pid behind (the directory holds
  two such files per worker, however often they restart). A worker killed
  hard (SIGKILL, OOM) loses what it counted in its last second;
- gauges are combined by their *mode*, one per gauge: ``livesum`` (in-flight
  requests, buffered rows, pool connections: the deployment's total),
  ``livemax`` (per-process copies of one thing: cached keys), ``livemin``
  (``lectr_usage_database_writable``: 0 when any worker cannot write) or
  ``liveall`` (one series per worker, with a ``pid`` label). Only live
  workers count: the supervisor removes an exited worker's gauge files.
  Callback gauges are read by each worker when it writes its files (the
  scraping worker cannot call the others), so they are at most a second old.

The run directory is made fresh at every start of the supervisor; directories
left by earlier runs (a supervisor that was killed) are removed when no
process holds their lock, so stale files are never counted twice.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: How several workers' values of one gauge combine (prometheus_client's
#: multiprocess modes; only the "live" ones: an exited worker stops counting).
GAUGE_MODES = ("livesum", "livemax", "livemin", "liveall", "livemostrecent")

#: Environment variable that hands the run directory to the workers.
METRICS_DIR_ENV = "LECTR_METRICS_DIR"

#: The counter and histogram files this process writes (see :meth:`_Files._open`).
_OWN_FILES: set[str] = set()
#: For each of them, what the exited workers that wrote it before had counted
#: (key -> value), added to this process's own values.
_CARRIED: dict[str, dict[str, float]] = {}

# (file prefix, metric name, sample name, label names, label values, value, help)
_Sample = tuple[str, str, str, tuple[str, ...], tuple[str, ...], float, str]


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

    # --- exposition (never on the hot path) ----------------------------------------

    def _family(self) -> Metric:
        """This process's values as a prometheus_client metric family."""
        raise NotImplementedError

    def _samples(self) -> Iterator[_Sample]:
        """This process's values as multiprocess-file samples."""
        raise NotImplementedError

    def _labels(self, key: tuple[str, ...]) -> dict[str, str]:
        return {n: str(v) for n, v in zip(self.labelnames, key, strict=True)}


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end with _total")
        super().__init__(name, help, labelnames)
        self._base = name.removesuffix("_total")

    def inc(self, amount: float = 1.0, *labelvalues: str) -> None:
        key = self._key(labelvalues) if labelvalues or self.labelnames else ()
        self._values[key] = self._values.get(key, 0.0) + amount

    def _family(self) -> Metric:
        family = Metric(self._base, self.help, "counter")
        for key, value in sorted(self._values.items()):
            family.add_sample(self.name, self._labels(key), value)
        return family

    def _samples(self) -> Iterator[_Sample]:
        for key, value in list(self._values.items()):
            yield ("counter", self._base, self.name, self.labelnames, key, value, self.help)


class Gauge(_Metric):
    kind = "gauge"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), mode: str = "livesum"
    ) -> None:
        if mode not in GAUGE_MODES:
            raise ValueError(f"gauge {name}: mode must be one of {', '.join(GAUGE_MODES)}")
        super().__init__(name, help, labelnames)
        self.mode = mode

    def set(self, value: float, *labelvalues: str) -> None:
        self._values[self._key(labelvalues)] = float(value)

    def inc(self, amount: float = 1.0, *labelvalues: str) -> None:
        key = self._key(labelvalues)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, *labelvalues: str) -> None:
        self.inc(-amount, *labelvalues)

    def _current(self) -> dict[tuple[str, ...], float]:
        return self._values

    def _family(self) -> Metric:
        family = Metric(self.name, self.help, "gauge")
        for key, value in sorted(self._current().items()):
            family.add_sample(self.name, self._labels(key), value)
        return family

    def _samples(self) -> Iterator[_Sample]:
        prefix = f"gauge_{self.mode}"
        for key, value in list(self._current().items()):
            yield (prefix, self.name, self.name, self.labelnames, key, value, self.help)


class CallbackGauge(Gauge):
    """A gauge read from a function when it is rendered or written to the
    multiprocess files."""

    def __init__(
        self, name: str, help: str, read: Callable[[], float], mode: str = "livesum"
    ) -> None:
        super().__init__(name, help, (), mode)
        self._read = read

    def value(self, *labelvalues: str) -> float:
        return float(self._read())

    def _current(self) -> dict[tuple[str, ...], float]:
        return {(): self.value()}


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
        self._le = tuple(floatToGoString(b) for b in self.buckets)
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *labelvalues: str) -> None:
        key = self._key(labelvalues)
        series = self._series.get(key)
        if series is None:
            # bucket counts..., sum, count
            series = self._series[key] = [0.0] * (len(self.buckets) + 2)
        series[bisect_left(self.buckets, value)] += 1  # the first bound >= value
        series[-2] += value
        series[-1] += 1

    def observe_each(self, values: Sequence[float], *labelvalues: str) -> None:
        """``observe(v, *labelvalues)`` for each of ``values``, in order (the
        same buckets, count and sum to the last bit), with one label lookup."""
        key = self._key(labelvalues)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0] * (len(self.buckets) + 2)
        buckets = self.buckets
        total = series[-2]
        for value in values:  # (first: a value that cannot be summed changes nothing)
            total += value
        for value in values:
            series[bisect_left(buckets, value)] += 1
        series[-2] = total
        series[-1] += len(values)

    def count(self, *labelvalues: str) -> float:
        series = self._series.get(self._key(labelvalues))
        return series[-1] if series else 0.0

    def sum(self, *labelvalues: str) -> float:
        series = self._series.get(self._key(labelvalues))
        return series[-2] if series else 0.0

    def _family(self) -> Metric:
        family = Metric(self.name, self.help, "histogram")
        for key, series in sorted(self._series.items()):
            labels = self._labels(key)
            cumulative = 0.0
            for le, n in zip(self._le, series, strict=False):
                cumulative += n
                family.add_sample(self.name + "_bucket", {**labels, "le": le}, cumulative)
            family.add_sample(self.name + "_count", labels, series[-1])
            family.add_sample(self.name + "_sum", labels, series[-2])
        return family

    def _samples(self) -> Iterator[_Sample]:
        # the files hold each bucket's own count (not cumulative) and the sum;
        # the collector accumulates the buckets and derives the count
        bucket_names = (*self.labelnames, "le")
        for key, series in list(self._series.items()):
            for le, n in zip(self._le, series, strict=False):
                yield (
                    "histogram",
                    self.name,
                    self.name + "_bucket",
                    bucket_names,
                    (*key, le),
                    n,
                    self.help,
                )
            yield (
                "histogram",
                self.name,
                self.name + "_sum",
                self.labelnames,
                key,
                series[-2],
                self.help,
            )


class _LocalCollector:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        metrics = self._registry._metrics
        for name in sorted(metrics):
            try:
                family = metrics[name]._family()
            except Exception:  # a callback that fails: left out, as from the files
                self._registry._unreadable(metrics[name])
                continue
            yield family


class _SharedCollector:
    """Every worker's files, merged (sorted by name, as the local render)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = [str(p) for p in self._directory.glob("*.db")]
        return sorted(MultiProcessCollector.merge(files, accumulate=True), key=lambda m: m.name)


class _Files:
    """This process's multiprocess files (not thread-safe: the reactor
    thread is the only writer).

    Gauge files are named by pid (``gauge_<mode>_<pid>.db``): the supervisor
    removes them when that pid exits (``mark_process_dead``), so only live
    workers' gauges are reported. Counter and histogram files are named by
    ``slot`` (the worker's index, given by the supervisor; the pid when there
    is none) and outlive their writer: see :meth:`_open`."""

    def __init__(self, directory: Path, process_id: int | str, slot: int | str) -> None:
        self.directory = directory
        self._pid = process_id
        self._slot = slot
        self._files: dict[str, MmapedDict] = {}
        self._carried: dict[str, dict[str, float]] = {}  # prefix -> key -> value
        self._keys: dict[tuple, str] = {}

    def write(self, sample: _Sample, timestamp: float) -> None:
        prefix, metric_name, name, labelnames, labelvalues, value, help = sample
        cache_key = (name, labelnames, labelvalues)
        key = self._keys.get(cache_key)
        if key is None:
            key = self._keys[cache_key] = mmap_key(
                metric_name, name, list(labelnames), [str(v) for v in labelvalues], help
            )
        f = self._files.get(prefix)
        if f is None:
            f = self._files[prefix] = self._open(prefix)
        carried = self._carried.get(prefix)
        if carried:
            value += carried.get(key, 0.0)
        f.write_value(key, value, timestamp)

    def _open(self, prefix: str) -> MmapedDict:
        """``gauge_<mode>_<pid>.db``, or ``<prefix>_<slot>.db``.

        A counter or histogram file of that name that this process did not
        make is an exited worker's: the one that had this slot before (a
        restart), or that had this pid, when the pid is the slot. Its values
        keep counting: this process takes the file over and writes, for each
        series, what the file held plus its own value. So a restart never
        makes a counter go back, and the files of a worker restarted again
        and again do not pile up (one file per slot, not one per pid)."""
        if prefix.startswith("gauge_"):
            return MmapedDict(str(self.directory / f"{prefix}_{self._pid}.db"))
        path = str(self.directory / f"{prefix}_{self._slot}.db")
        f = MmapedDict(path)
        if path not in _OWN_FILES:
            # (a file this process made itself holds its own values already)
            _CARRIED[path] = {key: value for key, value, _ in f.read_all_values()}
            _OWN_FILES.add(path)
        self._carried[prefix] = _CARRIED.get(path, {})
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class Registry:
    _log = Logger()

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._files: _Files | None = None
        self._failed_reads: set[str] = set()

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

    def gauge(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, mode: str = "livesum"
    ) -> Gauge:
        return self._get(Gauge, name, help, labelnames, mode)

    def callback_gauge(
        self, name: str, help: str, read: Callable[[], float], *, mode: str = "livesum"
    ) -> CallbackGauge:
        metric = self._get(CallbackGauge, name, help, read, mode)
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

    # --- several workers -------------------------------------------------------------

    def share(
        self,
        directory: Path,
        process_id: int | str | None = None,
        *,
        slot: int | str | None = None,
    ) -> None:
        """From now on, :meth:`sync` writes this process's values to
        ``directory`` and :meth:`render` reports every process's files.
        ``slot`` names the counter and histogram files (see
        :meth:`_Files._open`): the worker's, which its restarts take over;
        the pid when not given."""
        if self._files is not None:
            self._files.close()
        pid = os.getpid() if process_id is None else process_id
        self._files = _Files(Path(directory), pid, pid if slot is None else slot)

    @property
    def shared_directory(self) -> Path | None:
        return self._files.directory if self._files is not None else None

    def sync(self) -> None:
        """Write every series to this process's multiprocess files (a no-op
        when the registry is not shared). A callback that fails is skipped
        (and logged once), never the whole write."""
        files = self._files
        if files is None:
            return
        now = time.time()
        for metric in list(self._metrics.values()):
            try:
                samples = list(metric._samples())
            except Exception:
                self._unreadable(metric)
                continue
            for sample in samples:
                files.write(sample, now)

    def _unreadable(self, metric: _Metric) -> None:
        """``metric`` (a callback gauge) raised: it is skipped, logged once."""
        if metric.name not in self._failed_reads:
            self._failed_reads.add(metric.name)
            self._log.failure("metric {name} cannot be read", name=metric.name)

    def unshare(self) -> None:
        if self._files is not None:
            self._files.close()
            self._files = None

    # --- exposition ---------------------------------------------------------------------

    def render(self) -> str:
        """Prometheus text format (0.0.4): this process's values, or, when
        shared, every worker's (after writing this one's). A callback that
        fails is left out (and logged once), never the whole answer."""
        registry = CollectorRegistry(auto_describe=False)
        if self._files is None:
            registry.register(_LocalCollector(self))
        else:
            self.sync()
            registry.register(_SharedCollector(self._files.directory))
        return generate_latest(registry).decode()


class MetricsFileSync:
    """In a worker: writes the registry to the run directory every
    ``interval`` seconds (a LoopingCall that survives failures) and once more
    at :meth:`stop`."""

    _log = Logger()

    def __init__(
        self,
        registry: Registry,
        directory: Path,
        *,
        reactor,
        interval: float = 1.0,
        slot: int | str | None = None,
    ) -> None:
        self._registry = registry
        self._directory = Path(directory)
        self._slot = slot  # the worker's (Registry.share)
        self._interval = interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        self._registry.share(self._directory, slot=self._slot)
        self._registry.sync()  # every metric is visible from the first scrape
        d = self._loop.start(self._interval, now=False)
        d.addErrback(lambda f: self._log.failure("metrics file sync stopped", f))

    def _tick(self) -> None:
        try:
            self._registry.sync()
        except Exception:
            self._log.failure("cannot write the metrics files")

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._tick()
        self._registry.unshare()


class MetricsRunDirectory:
    """The supervisor's multiprocess directory for one run:
    ``<data-dir>/metrics/run-<pid>-<random>/``, locked (``flock``) for as long
    as the supervisor lives. Making one removes the directories of earlier
    runs that nobody holds any more."""

    _log = Logger()

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, data_dir: Path) -> MetricsRunDirectory:
        root = Path(data_dir) / "metrics"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # made and locked under a name the cleanup skips, then renamed: no
        # other supervisor can take it for a stale one in between
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
        fd = os.open(staging / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = root / f"run-{os.getpid()}-{staging.name.removeprefix('.new-')}"
        staging.rename(path)
        cls._remove_stale(root, keep=path)
        return cls(path, fd)

    @classmethod
    def _remove_stale(cls, root: Path, keep: Path) -> None:
        for entry in root.iterdir():
            if entry == keep or not entry.is_dir():
                continue
            if entry.name.startswith(".new-") and time.time() - entry.stat().st_mtime < 60:
                continue  # another supervisor is making it right now
            try:
                fd = os.open(entry / "lock", os.O_RDWR)
            except FileNotFoundError:
                fd = None
            except OSError:
                continue
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live supervisor's run
                shutil.rmtree(entry, ignore_errors=True)
                cls._log.info(
                    "removed the metrics files of an earlier run ({name})", name=entry.name
                )
            finally:
                if fd is not None:
                    os.close(fd)

    def process_ended(self, pid: int) -> None:
        """A worker exited: its gauges stop counting (its counters and
        histograms keep counting, in its slot's files, which the worker
        restarted in its place takes over)."""
        mark_process_dead(pid, str(self.path))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
