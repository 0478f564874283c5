"""Prometheus metrics of the reward service, in the text exposition format (no client library needed).

Counters, gauges and histograms are thread-safe (the engine thread and the event loop both record).
Names follow Prometheus conventions: ``cmerl_<what>_<unit>`` with ``_total`` on counters.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _fmt_value(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read at scrape time from a callable, or set explicitly."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float] | None = None):
        super().__init__(name, help)
        self._read = read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def add(self, delta: float) -> None:
        with self._lock:
            self._value += delta

    def value(self) -> float:
        return float(self._read()) if self._read is not None else self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt_value(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, list[float]] = {}  # per label set: bucket counts..., +Inf count, sum

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            s = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            s[i] += 1
            s[-1] += value

    def count(self, **labels: str) -> int:
        s = self._series.get(tuple(sorted(labels.items())))
        return int(sum(s[:-1])) if s else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, s in items:
            cumulative = 0.0
            for bound, n in zip(list(self.buckets) + [float("inf")], s[:-1]):
                cumulative += n
                lines.append(f"{self.name}_bucket{_fmt_labels(key, ('le', _fmt_value(bound)))} {_fmt_value(cumulative)}")
            lines.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(s[-1])}")
            lines.append(f"{self.name}_count{_fmt_labels(key)} {_fmt_value(cumulative)}")
        return lines


class ServiceMetrics:
    """All metrics of one server process (one replica)."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0):
        self.requests = Counter("cmerl_requests_total", "HTTP requests answered, by route and status code.")
        self.items = Counter("cmerl_items_total", "Items (pairs or prompts) scored, by route.")
        self.tokens = Counter("cmerl_tokens_total", "Tokens run through the verifier engine.")
        self.latency = Histogram("cmerl_request_latency_seconds", "Request latency in seconds, by route.",
                                 LATENCY_BUCKETS)
        self.batch_size = Histogram("cmerl_batch_size_items", "Items per engine batch.", BATCH_BUCKETS)
        self.engine_seconds = Histogram("cmerl_engine_batch_seconds", "Engine time per batch in seconds.",
                                        LATENCY_BUCKETS)
        self.queue_depth = Gauge("cmerl_queue_depth_items", "Items waiting for the engine.", queue_depth)
        self.inflight = Gauge("cmerl_inflight_requests", "HTTP requests being handled.")
        self.rejected = Counter("cmerl_rejected_total", "Requests refused before scoring, by reason.")

    def render(self) -> str:
        metrics = (self.requests, self.items, self.tokens, self.latency, self.batch_size, self.engine_seconds,
                   self.queue_depth, self.inflight, self.rejected)
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
