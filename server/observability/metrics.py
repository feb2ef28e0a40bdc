"""Counters, gauges and histograms, and their Prometheus text exposition (format 0.0.4).

A small registry of our own rather than ``prometheus-client``: the hub needs three metric
types, labels and the text format, nothing more. Metrics are updated from the event loop's
thread only (no locks).

Counters and histograms that instrumented code updates live in the process-wide
``REGISTRY`` (one hub per process; hubs started side by side in one test process share them).
Values that exist anyway - open connections, queue lengths - are read when scraped, from the
hub that serves the scrape (``server.observability.runtime``).
"""

from __future__ import annotations

import gc
import math
import os
import re
import resource
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(slots=True)
class Family:
    """One metric as exposed: its ``# HELP``, its ``# TYPE`` and its samples."""

    name: str
    help: str
    type: str  # counter, gauge, histogram, untyped
    samples: list[Sample] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append(Sample(self.name, tuple(labels.items()), float(value)))
        return self


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")


class _Labelled:
    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        _check_name(name)
        for label in labelnames:
            if not _LABEL.fullmatch(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {labels}")
        try:
            return tuple(str(labels[name]) for name in self.labelnames)
        except KeyError:
            raise ValueError(
                f"{self.name} takes the labels {self.labelnames}, got {labels}"
            ) from None

    def _pairs(self, key: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.labelnames, key, strict=True))


class Counter(_Labelled):
    """Only goes up. Its name ends in ``_total``."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total: {name!r}")
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter cannot go down")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def touch(self, **labels: str) -> None:
        """Expose this label set at 0 before anything happened (no gap in the series)."""
        self._values.setdefault(self._key(labels), 0.0)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        return sum(self._values.values())

    def collect(self) -> Family:
        family = Family(self.name, self.help, "counter")
        for key, value in sorted(self._values.items()):
            family.samples.append(Sample(self.name, self._pairs(key), value))
        return family


class Gauge(_Labelled):
    """Goes up and down."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def collect(self) -> Family:
        family = Family(self.name, self.help, "gauge")
        for key, value in sorted(self._values.items()):
            family.samples.append(Sample(self.name, self._pairs(key), value))
        return family


class Histogram(_Labelled):
    """Observations counted in cumulative buckets, with their sum and count."""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("a histogram needs distinct finite bucket bounds")
        self.bounds = (*bounds, math.inf)
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._series(())

    def _series(self, key: tuple[str, ...]) -> list[int]:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * len(self.bounds)
            self._sums[key] = 0.0
        return counts

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        counts = self._series(key)
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                counts[index] += 1  # per bucket here; cumulated when exposed
                break
        self._sums[key] += value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), ()))

    def collect(self) -> Family:
        family = Family(self.name, self.help, "histogram")
        for key, counts in sorted(self._counts.items()):
            pairs = self._pairs(key)
            cumulative = 0
            for bound, count in zip(self.bounds, counts, strict=True):
                cumulative += count
                le = (("le", format_value(bound)),)
                family.samples.append(Sample(f"{self.name}_bucket", pairs + le, cumulative))
            family.samples.append(Sample(f"{self.name}_sum", pairs, self._sums[key]))
            family.samples.append(Sample(f"{self.name}_count", pairs, cumulative))
        return family


Metric = Counter | Gauge | Histogram


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def register(self, metric: Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered already")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help, labelnames)
        self.register(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help, labelnames)
        self.register(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help, labelnames, buckets)
        self.register(metric)
        return metric

    def collect(self) -> list[Family]:
        return [metric.collect() for metric in self._metrics.values()]


# exposition ------------------------------------------------------------------------------------


def format_value(value: float) -> str:
    """As Prometheus' own clients write numbers (Go's float format): ``1.0``, ``+Inf``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    """The text exposition format 0.0.4: ``# HELP``, ``# TYPE``, then the samples."""
    lines: list[str] = []
    seen: set[str] = set()
    for family in families:
        _check_name(family.name)
        if family.name in seen:
            raise ValueError(f"metric {family.name} exposed twice")
        seen.add(family.name)
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            if sample.labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels)
                lines.append(f"{sample.name}{{{inner}}} {format_value(sample.value)}")
            else:
                lines.append(f"{sample.name} {format_value(sample.value)}")
    return "\n".join(lines) + "\n"


# the process -----------------------------------------------------------------------------------


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def resident_memory_bytes() -> int | None:
    """Resident set size, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _page_size()
    except (OSError, IndexError, ValueError):
        return None


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _process_start_time() -> float:
    """When this process started (seconds since the epoch), from /proc; else module load."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()


PROCESS_START_TIME = _process_start_time()


def process_families() -> list[Family]:
    """The standard ``process_*`` metrics, as far as this system tells them."""
    families: list[Family] = []
    times = os.times()
    families.append(
        Family("process_cpu_seconds_total", "User and system CPU time spent", "counter").add(
            times.user + times.system
        )
    )
    families.append(
        Family("process_start_time_seconds", "Start of the process since the epoch", "gauge").add(
            PROCESS_START_TIME
        )
    )
    rss = resident_memory_bytes()
    if rss is not None:
        families.append(
            Family("process_resident_memory_bytes", "Resident memory size", "gauge").add(rss)
        )
    fds = open_fds()
    if fds is not None:
        families.append(Family("process_open_fds", "Open file descriptors", "gauge").add(fds))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        families.append(
            Family("process_max_fds", "Limit on open file descriptors", "gauge").add(soft)
        )
    return families + gc_families()


def gc_families() -> list[Family]:
    """Python's garbage collector, under the names prometheus_client gives it, and the objects
    frozen out of its passes at start-up (``portalhub serve``)."""
    collections = Family(
        "python_gc_collections_total", "Times this generation was collected", "counter"
    )
    collected = Family(
        "python_gc_objects_collected_total", "Objects collected during gc", "counter"
    )
    for generation, stats in enumerate(gc.get_stats()):
        collections.add(stats["collections"], generation=str(generation))
        collected.add(stats["collected"], generation=str(generation))
    frozen = Family(
        "python_gc_objects_frozen", "Objects the collector no longer looks at", "gauge"
    ).add(gc.get_freeze_count())
    return [collections, collected, frozen]
