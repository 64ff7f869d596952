"""Prometheus metrics: one registry per daemon, plus pull-time sources from services."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# A source yields (name, kind, help, value, labels); kind is "counter" or "gauge".
Sample = tuple[str, str, str, float, dict[str, str]]
Source = Callable[[], Iterable[Sample]]

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
LAG_WINDOW = 600  # recent loop-lag samples kept for the p99 in /api/v1/status


class _SourceCollector:
    def __init__(self, sources: list[Source]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for source in list(self._sources):
            for name, kind, help_, value, labels in source():
                fam = families.get(name)
                if fam is None:
                    cls: type[CounterMetricFamily | GaugeMetricFamily] = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    fam = cls(name.removesuffix("_total") if kind == "counter" else name, help_, labels=list(labels))
                    families[name] = fam
                fam.add_metric(list(labels.values()), value)
        yield from families.values()  # type: ignore[misc]

    def describe(self) -> list[Metric]:
        return []


class Metrics:
    """Hold the daemon's registry and its always-present metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # type: ignore[no-untyped-call]
        self.http_requests = Counter(
            "mongarsd_http_requests", "HTTP requests by route, method and status.", ["route", "method", "status"], registry=self.registry
        )
        self.http_latency = Histogram(
            "mongarsd_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "mongarsd_event_loop_lag_seconds", "Event loop scheduling lag.", buckets=LAG_BUCKETS_S, registry=self.registry
        )
        self.service_up = Gauge("mongarsd_service_up", "1 when the service is started.", ["service"], registry=self.registry)
        self.ready = Gauge("mongarsd_ready", "1 when every service has started.", registry=self.registry)
        self.unclean_exits = Counter(
            "mongarsd_unclean_exits",
            "Runs on this state dir that ended without a clean stop (crash, kill, power loss); persisted across restarts.",
            registry=self.registry,
        )
        self._sources: list[Source] = []
        self.registry.register(_SourceCollector(self._sources))  # type: ignore[arg-type]
        self._lags: deque[float] = deque(maxlen=LAG_WINDOW)

    def add_source(self, source: Source) -> None:
        self._sources.append(source)

    def remove_source(self, source: Source) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def observe_loop_lag(self, lag_s: float) -> None:
        self.loop_lag.observe(lag_s)
        self._lags.append(lag_s)

    def loop_lag_summary(self) -> dict[str, Any]:
        if not self._lags:
            return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        data = sorted(self._lags)

        def pick(q: float) -> float:
            return round(data[min(len(data) - 1, int(q * len(data)))] * 1000, 3)

        return {"samples": len(data), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(data[-1] * 1000, 3)}

    def render(self) -> bytes:
        return generate_latest(self.registry)
