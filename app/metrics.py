"""Every Prometheus metric, defined once, in a registry owned by the app (no globals).

Labels are `variant`, `backend`, `endpoint`, `status`: values come from config and routes,
never from user input.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app.domain import Generation

PREFIX = "model_gateway_"

# Seconds. From cache hits (~1 ms) to long generations under load (minutes).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
# Seconds: a gateway's own share of a request, from a fraction of a millisecond up.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests_total = Counter(
            PREFIX + "requests_total",
            "Requests answered, by outcome.",
            ["variant", "endpoint", "status"],
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from arrival to the last byte of the reply.",
            ["variant", "endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead_seconds = Histogram(
            PREFIX + "overhead_seconds",
            "Time a successful request spent in this server other than waiting on its upstream "
            "or engine (for a slot, a connection, bytes, tokens): to the last byte, per "
            "variant and endpoint. A cache hit's whole time is overhead.",
            ["variant", "endpoint"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self._overheads: dict[tuple[str, str], Histogram] = {}
        self.requests_in_flight = Gauge(
            PREFIX + "requests_in_flight",
            "Requests being answered now.",
            ["endpoint"],
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ["variant", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            ["variant", "backend"],
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            PREFIX + "prompt_tokens_total",
            "Prompt tokens of finished generations.",
            ["variant", "backend"],
            registry=r,
        )
        self.generation_tokens_total = Counter(
            PREFIX + "generation_tokens_total",
            "Generated tokens.",
            ["variant", "backend"],
            registry=r,
        )
        self.engine_sequences_total = Counter(
            PREFIX + "engine_sequences_total",
            "Sequences that left a local engine, by how: finished, cancelled (the client left; "
            "the engine stopped it), failed.",
            ["variant", "outcome"],
            registry=r,
        )
        self.cache_requests_total = Counter(
            PREFIX + "cache_requests_total",
            "Response-cache lookups of cacheable requests by result; bypass: not cacheable "
            "(sampled without a seed) or the client said Cache-Control: no-cache.",
            ["variant", "result"],
            registry=r,
        )
        self.cache_coalesced_total = Counter(
            PREFIX + "cache_coalesced_total",
            "Requests that joined an identical generation already in flight.",
            ["variant"],
            registry=r,
        )
        self.upstream_replica_healthy = Gauge(
            PREFIX + "upstream_replica_healthy",
            "1 while an upstream replica is in rotation, 0 while it is ejected.",
            ["variant", "replica"],
            registry=r,
        )
        self.upstream_waiting = Gauge(
            PREFIX + "upstream_waiting",
            "Requests waiting at the gateway while every replica of an upstream variant is at "
            "its concurrency cap.",
            ["variant"],
            registry=r,
        )
        self.route_decisions_total = Counter(
            PREFIX + "route_decisions_total",
            "Upstream replicas chosen, by routing policy and reason: least_outstanding; "
            "prefix_hit, cold, load_override (prefix); session, no_session, load_override "
            "(session).",
            ["variant", "policy", "reason"],
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time a request waited in the batcher queue before its batch started.",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size",
            "Requests per engine batch.",
            ["variant"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            PREFIX + "queue_depth",
            "Requests waiting in the batcher queue.",
            ["variant"],
            registry=r,
        )

        self.shadow_comparisons_total = Counter(
            PREFIX + "shadow_comparisons_total",
            "Shadow copies by outcome: match or mismatch (both answered; exact comparison), "
            "shadow_failed, primary_failed (or cancelled), dropped (too many copies in flight).",
            ["experiment", "shadow", "outcome"],
            registry=r,
        )
        self.shadow_similarity = Histogram(
            PREFIX + "shadow_similarity",
            "Similarity of a shadow's output to its primary's: 1 - normalized word-level "
            "Levenshtein distance (1 = identical).",
            ["experiment", "shadow"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        # Per API key: key names are configured by an operator, never chosen by clients.
        self.key_requests_total = Counter(
            PREFIX + "key_requests_total",
            "Requests admitted, by API key and served model.",
            ["key", "model"],
            registry=r,
        )
        self.key_tokens_total = Counter(
            PREFIX + "key_tokens_total",
            "Tokens used, by API key, served model and type (prompt, completion).",
            ["key", "model", "type"],
            registry=r,
        )
        self.key_rejections_total = Counter(
            PREFIX + "key_rejections_total",
            "Requests refused by tenancy, by API key (empty when none was recognised) and "
            "reason: unauthenticated, forbidden_model, requests, tokens, concurrency, "
            "daily_tokens.",
            ["key", "reason"],
            registry=r,
        )
        self.rate_limit_errors_total = Counter(
            PREFIX + "rate_limit_errors_total",
            "Rate limit checks that Redis could not answer (the request passed or was refused "
            "as rate_limits.on_redis_error says).",
            registry=r,
        )

    def overhead(self, variant: str, endpoint: str) -> Histogram:
        """`overhead_seconds` for these labels, found once (labels() takes a lock and builds
        keys)."""
        labels = (variant, endpoint)
        histogram = self._overheads.get(labels)
        if histogram is None:
            histogram = self._overheads[labels] = self.overhead_seconds.labels(*labels)
        return histogram

    def batch_observer(self, variant: str) -> BatchMetrics:
        return BatchMetrics(self, variant)

    def count_tokens(self, variant: str, backend: str, generation: Generation) -> None:
        """A finished generation's tokens; counted by the backend that generated them (a
        cache hit or a request that joined another's generation generates none)."""
        self.prompt_tokens_total.labels(variant, backend).inc(generation.prompt_tokens)
        self.generation_tokens_total.labels(variant, backend).inc(generation.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class BatchMetrics:
    """The batcher's observer for one variant."""

    def __init__(self, metrics: Metrics, variant: str) -> None:
        self._depth = metrics.queue_depth.labels(variant)
        self._wait = metrics.queue_wait_seconds.labels(variant)
        self._size = metrics.batch_size.labels(variant)

    def queued(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_started(self, size: int, queue_waits_s: list[float]) -> None:
        self._size.observe(size)
        for wait in queue_waits_s:
            self._wait.observe(wait)
