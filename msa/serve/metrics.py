"""Prometheus metrics of one server replica, in its own registry (``GET /metrics``).

Latency histograms are observed per request as its outputs stream; the engine's gauges (running
and waiting sequences, KV pages per shard) and counters (rejections; steps, the seconds spent in
them, and their prefill and decode tokens) are read from ``Engine.stats()`` at scrape time, so they
are never stale. Step seconds against wall time tell an engine that waits for work from one whose
steps got slower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from msa.cluster.protocol import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class EngineStatsCollector(Collector):
    """Gauges from ``Engine.stats()``, read at every scrape."""

    def __init__(self, stats: Callable[[], EngineStats], model: str) -> None:
        self._stats, self._model = stats, model

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = [self._model]
        for name, value, doc in (
            ("msa_requests_running", s.running, "Sequences being generated."),
            ("msa_requests_waiting", s.waiting, "Sequences waiting to be scheduled."),
            ("msa_engine_healthy", int(s.healthy), "1 while every shard answers."),
            ("msa_weight_version", s.weight_version, "Version of the served weights."),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model"])
            gauge.add_metric(labels, value)
            yield gauge
        shard_labels = ["model", "shard"]
        used = GaugeMetricFamily("msa_kv_pages_used", "KV pages in use, per shard.", labels=shard_labels)
        total = GaugeMetricFamily("msa_kv_pages_total", "KV cache pages, per shard.", labels=shard_labels)
        for shard, (u, t) in enumerate(zip(s.pages_used, s.pages_total, strict=False)):
            used.add_metric([self._model, str(shard)], u)
            total.add_metric([self._model, str(shard)], t)
        yield used
        yield total
        for name, value, doc in (
            ("msa_engine_rejected", s.rejected, "Requests the engine refused: its waiting queue was full."),
            ("msa_engine_steps", s.steps, "Engine steps run."),
            ("msa_engine_step_seconds", s.step_seconds, "Seconds the engine spent in steps (busy)."),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model"])
            counter.add_metric(labels, value)
            yield counter
        tokens = CounterMetricFamily(
            "msa_engine_tokens", "Tokens the engine's steps computed, by kind.", labels=["model", "kind"]
        )
        tokens.add_metric([self._model, "decode"], s.decode_tokens)
        tokens.add_metric([self._model, "prefill"], s.prefill_tokens)
        yield tokens


class ServeMetrics:
    """All metrics of a replica. ``track`` makes the per-request timer."""

    def __init__(self, stats: Callable[[], EngineStats], model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(stats, model))

        # The model label is fixed per replica: the per-token paths observe these children directly,
        # without a labels() lookup per streamed chunk.
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=self.registry).labels(model)

        self.ttft = histogram(
            "msa_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            _LATENCY_BUCKETS,
        )
        self.itl = histogram(
            "msa_inter_token_latency_seconds", "Between consecutive tokens of one choice.", _LATENCY_BUCKETS
        )
        self.e2e = histogram(
            "msa_e2e_request_latency_seconds",
            "From the request's arrival to its last token.",
            _REQUEST_BUCKETS,
        )
        self.queue = histogram(
            "msa_request_queue_time_seconds",
            "From the request's arrival until it is handed to the engine (prompt "
            "rendering, tokenization, waiting for the replica's event loop); the "
            "engine's own queue is msa_requests_waiting.",
            _LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "msa_requests",
            "Finished requests by endpoint and finish reason.",
            ["model", "endpoint", "finish_reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "msa_rejected_requests",
            "Requests answered with an error, by HTTP status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "msa_prompt_tokens", "Prompt tokens of admitted requests.", ["model"], registry=self.registry
        ).labels(model)
        self.generation_tokens = Counter(
            "msa_generation_tokens", "Generated tokens.", ["model"], registry=self.registry
        ).labels(model)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def reject(self, status: int) -> None:
        self.rejected.labels(self.model, str(status)).inc()

    def track(self, arrival: float, endpoint: str) -> RequestTimer:
        return RequestTimer(self, arrival, endpoint)


class RequestTimer:
    """Latencies of one request, observed as its outputs arrive."""

    def __init__(self, metrics: ServeMetrics, arrival: float, endpoint: str) -> None:
        self._m, self._arrival, self._endpoint = metrics, arrival, endpoint
        self._first: float | None = None
        self._last_by_choice: dict[int, float] = {}

    def submitted(self, num_prompt_tokens: int) -> None:
        self._m.queue.observe(time.perf_counter() - self._arrival)
        self._m.prompt_tokens.inc(num_prompt_tokens)

    def output(self, index: int, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._m.ttft.observe(now - self._arrival)
        last = self._last_by_choice.get(index)
        if last is not None:
            gap = (now - last) / num_tokens
            for _ in range(num_tokens):
                self._m.itl.observe(gap)
        self._last_by_choice[index] = now
        self._m.generation_tokens.inc(num_tokens)

    def finished(self, finish_reason: str) -> None:
        self._m.e2e.observe(time.perf_counter() - self._arrival)
        self._m.requests.labels(self._m.model, self._endpoint, finish_reason).inc()
