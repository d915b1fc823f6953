"""Prometheus metrics with vLLM's names (so RHOAI/Grafana vLLM dashboards work) plus `dllm:*`.

`ServerMetrics` is the engine's `EngineObserver`: per-step and per-request histograms are fed from
the engine's worker thread (prometheus_client is thread-safe); the state gauges (running, waiting,
occupancy, KV-cache bytes) are read from `engine.stats()` at scrape time by a custom collector, so
they are never stale. Every series carries `model_name`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dllm_runtime.engine.stats import EngineStats, RequestStats, StepStats

# latency buckets: CPU tiny models (ms) up to long GPU generations (minutes)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_TPF_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: `dllm:request_errors_total{reason}` values
ERROR_REASONS = ("validation", "queue_full", "aborted", "engine_error")
#: finish reasons that count as a success (vLLM counts stop/length/abort in request_success)
SUCCESS_REASONS = ("stop", "length")


class _StateCollector(Collector):
    """Gauges computed from the engine's snapshot at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.stats = stats

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(self.stats()))

    def _families(self, s: EngineStats | None) -> list[GaugeMetricFamily]:
        values = {
            "vllm:num_requests_running": ("Requests in the running batch.", s.num_running if s else 0),
            "vllm:num_requests_waiting": ("Requests queued for a batch slot.", s.num_waiting if s else 0),
            "dllm:batch_occupancy": ("Running requests / max_num_seqs.", s.batch_occupancy if s else 0.0),
            "dllm:kv_cache_bytes": ("Block KV-cache bytes held by running sequences.", s.cache_bytes if s else 0),
        }
        families = []
        for name, (doc, value) in values.items():
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            families.append(family)
        return families


class ServerMetrics:
    """All metrics of one served model; also the engine observer that feeds them."""

    def __init__(self, model_name: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.model_name = model_name
        self.registry = registry
        self._engine_stats: Callable[[], EngineStats | None] = lambda: None
        label = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=registry)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", label, registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label, registry=registry)
        self.request_success = Counter(
            "vllm:request_success", "Requests finished successfully.", label + ["finished_reason"], registry=registry
        )
        self.forwards = Counter("dllm:forwards", "Batched model forwards (engine steps with a forward).", label,
                                registry=registry)
        self.request_errors = Counter(
            "dllm:request_errors", "Requests that failed or were aborted.", label + ["reason"], registry=registry
        )
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to the first finalised token.", _LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", _LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Time waiting for a batch slot.", _LATENCY_BUCKETS)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt length per request.", _TOKEN_BUCKETS)
        self.request_generation_tokens = hist(
            "vllm:request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS
        )
        self.request_forwards = hist("dllm:request_forwards", "Model forwards per request (NFE).", _TOKEN_BUCKETS)
        self.tokens_per_forward = hist(
            "dllm:tokens_per_forward", "Generated tokens per forward, per request (parallel decoding gain).",
            _TPF_BUCKETS,
        )
        self.step_latency = hist("dllm:step_latency_seconds", "Latency of one engine step.", _STEP_BUCKETS)
        self.batch_size = hist("dllm:batch_size", "Sequences per batched forward.", _BATCH_BUCKETS)
        # create the labelled children now so every series is exported (at 0) from the first scrape
        for metric in (self.prompt_tokens, self.generation_tokens, self.forwards, self.ttft, self.e2e,
                       self.queue_time, self.request_prompt_tokens, self.request_generation_tokens,
                       self.request_forwards, self.tokens_per_forward, self.step_latency, self.batch_size):
            metric.labels(model_name)
        for reason in ERROR_REASONS:
            self.request_errors.labels(model_name, reason)
        for reason in SUCCESS_REASONS:
            self.request_success.labels(model_name, reason)
        self._collector = _StateCollector(model_name, lambda: self._engine_stats())
        registry.register(self._collector)

    def bind_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Read the scrape-time gauges from this callable (the engine's `stats`)."""
        self._engine_stats = stats

    def count_error(self, reason: str) -> None:
        if reason not in ERROR_REASONS:
            raise ValueError(f"unknown error reason {reason!r}")
        self.request_errors.labels(self.model_name, reason).inc()

    # ---------------------------------------------------------------- EngineObserver
    def on_step(self, stats: StepStats) -> None:
        m = self.model_name
        self.forwards.labels(m).inc()
        self.step_latency.labels(m).observe(stats.latency_s)
        self.batch_size.labels(m).observe(stats.batch_size)

    def on_request_finished(self, stats: RequestStats) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(stats.prompt_tokens)
        self.generation_tokens.labels(m).inc(stats.completion_tokens)
        self.e2e.labels(m).observe(stats.e2e_s)
        self.queue_time.labels(m).observe(stats.queue_time_s)
        if stats.ttft_s is not None:
            self.ttft.labels(m).observe(stats.ttft_s)
        self.request_prompt_tokens.labels(m).observe(stats.prompt_tokens)
        self.request_generation_tokens.labels(m).observe(stats.completion_tokens)
        self.request_forwards.labels(m).observe(stats.nfe)
        if stats.nfe:
            self.tokens_per_forward.labels(m).observe(stats.completion_tokens / stats.nfe)
        if stats.finish_reason in SUCCESS_REASONS:
            self.request_success.labels(m, stats.finish_reason).inc()
        elif stats.finish_reason == "error":
            self.count_error("engine_error")
        # "abort" is counted by the server, which knows why (client disconnect, drain timeout)

    def unregister(self) -> None:
        """Remove every metric of this model from its registry (tests, model reload)."""
        for collector in (
            self.prompt_tokens, self.generation_tokens, self.request_success, self.forwards, self.request_errors,
            self.ttft, self.e2e, self.queue_time, self.request_prompt_tokens, self.request_generation_tokens,
            self.request_forwards, self.tokens_per_forward, self.step_latency, self.batch_size, self._collector,
        ):
            self.registry.unregister(collector)
