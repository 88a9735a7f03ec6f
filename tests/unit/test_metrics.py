"""Metric names and label sets are a contract with dashboards and alerts: a rename breaks
this test before it breaks a dashboard."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from app.gpu import NvmlCollector
from app.metrics import Metrics

EXPECTED = {
    "model_gateway_requests": ("counter", {"variant", "endpoint", "status"}),
    "model_gateway_request_duration_seconds": ("histogram", {"variant", "endpoint", "status"}),
    "model_gateway_requests_in_flight": ("gauge", {"endpoint"}),
    "model_gateway_time_to_first_token_seconds": ("histogram", {"variant", "backend"}),
    "model_gateway_inter_token_latency_seconds": ("histogram", {"variant", "backend"}),
    "model_gateway_prompt_tokens": ("counter", {"variant", "backend"}),
    "model_gateway_generation_tokens": ("counter", {"variant", "backend"}),
    "model_gateway_engine_sequences": ("counter", {"variant", "outcome"}),
    "model_gateway_queue_wait_seconds": ("histogram", {"variant"}),
    "model_gateway_batch_size": ("histogram", {"variant"}),
    "model_gateway_queue_depth": ("gauge", {"variant"}),
    "model_gateway_cache_requests": ("counter", {"variant", "result"}),
    "model_gateway_cache_coalesced": ("counter", {"variant"}),
}


def families(registry: CollectorRegistry) -> dict[str, Any]:
    return {f.name: f for f in registry.collect()}


def test_metric_names_types_and_labels() -> None:
    metrics = Metrics()
    # Touch every labelled metric once so that it has a sample to read labels from.
    metrics.requests_total.labels("v", "/e", "200").inc()
    metrics.request_duration_seconds.labels("v", "/e", "200").observe(0.1)
    metrics.requests_in_flight.labels("/e").inc()
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        getattr(metrics, name).labels("v", "ctranslate2").observe(0.01)
    metrics.prompt_tokens_total.labels("v", "ctranslate2").inc()
    metrics.generation_tokens_total.labels("v", "ctranslate2").inc()
    metrics.engine_sequences_total.labels("v", "finished").inc()
    metrics.queue_wait_seconds.labels("v").observe(0.01)
    metrics.batch_size.labels("v").observe(4)
    metrics.queue_depth.labels("v").set(1)
    metrics.cache_requests_total.labels("v", "hit").inc()
    metrics.cache_coalesced_total.labels("v").inc()

    found = families(metrics.registry)
    for name, (kind, labels) in EXPECTED.items():
        assert name in found, name
        family = found[name]
        assert family.type == kind, name
        sample_labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert sample_labels == labels, name
    assert "process_cpu_seconds" in found
    assert "process_resident_memory_bytes" in found


def test_ttft_and_itl_buckets_span_llm_latencies() -> None:
    metrics = Metrics()
    ttft = metrics.time_to_first_token_seconds.labels("v", "b")
    itl = metrics.inter_token_latency_seconds.labels("v", "b")
    ttft.observe(0.0005)
    itl.observe(0.0004)
    samples = families(metrics.registry)
    ttft_bounds = [float(s.labels["le"]) for s in
                   samples["model_gateway_time_to_first_token_seconds"].samples
                   if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]  # fmt: skip
    itl_bounds = [float(s.labels["le"]) for s in
                  samples["model_gateway_inter_token_latency_seconds"].samples
                  if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]  # fmt: skip
    assert min(ttft_bounds) <= 0.001
    assert max(ttft_bounds) >= 30
    assert min(itl_bounds) <= 0.0005


class FakeNvml:
    """Stands in for NVML, which needs an NVIDIA GPU and driver (none here). The real
    collector was checked on the GPU machine (BENCHMARKS.md)."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=42)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=1_000, total=80_000)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise self.NVMLError("not supported")
        return 250_000  # milliwatts

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 61


def test_gpu_collector_names_units_and_unsupported_readings() -> None:
    registry = CollectorRegistry()
    registry.register(NvmlCollector(FakeNvml(), [0, 1]))
    values = {(s.name, s.labels["gpu"]): s.value for f in registry.collect() for s in f.samples}
    assert values[("model_gateway_gpu_utilization_ratio", "0")] == 0.42
    assert values[("model_gateway_gpu_memory_used_bytes", "1")] == 1_000
    assert values[("model_gateway_gpu_memory_total_bytes", "0")] == 80_000
    assert values[("model_gateway_gpu_power_watts", "0")] == 250.0
    assert ("model_gateway_gpu_power_watts", "1") not in values  # unsupported: left out
    assert values[("model_gateway_gpu_temperature_celsius", "1")] == 61
