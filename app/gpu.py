"""NVML collector: per-GPU utilization, memory, power and temperature at scrape time.

Where there is no NVIDIA driver or no GPU it registers nothing and says so once in the log:
the same image serves on CPU and GPU machines.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.metrics import PREFIX

logger = logging.getLogger(__name__)


class NvmlCollector(Collector):
    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        families = {
            "utilization": GaugeMetricFamily(
                PREFIX + "gpu_utilization_ratio",
                "Fraction of the last sample period in which a kernel ran on the GPU.",
                labels=["gpu"],
            ),
            "used": GaugeMetricFamily(
                PREFIX + "gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]
            ),
            "total": GaugeMetricFamily(
                PREFIX + "gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"]
            ),
            "power": GaugeMetricFamily(
                PREFIX + "gpu_power_watts", "GPU power draw.", labels=["gpu"]
            ),
            "temperature": GaugeMetricFamily(
                PREFIX + "gpu_temperature_celsius", "GPU core temperature.", labels=["gpu"]
            ),
        }
        for index, handle in enumerate(self._handles):
            gpu = [str(index)]
            # Each reading on its own: a GPU may not support one of them (power on some
            # virtualised GPUs); the others are still worth reporting.
            readings: dict[str, Callable[[Any], float]] = {
                "utilization": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100,
                "used": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used,
                "total": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total,
                "power": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
                "temperature": lambda h: nvml.nvmlDeviceGetTemperature(
                    h, nvml.NVML_TEMPERATURE_GPU
                ),
            }
            for key, read in readings.items():
                with contextlib.suppress(nvml.NVMLError):
                    families[key].add_metric(gpu, read(handle))
        yield from families.values()


def register_gpu_collector(registry: CollectorRegistry) -> int:
    """Register the NVML collector if there are GPUs; return how many."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    except Exception as exc:  # no library, no driver, no device: all mean "no GPU metrics"
        logger.info("no GPU metrics: NVML is not available (%s)", exc)
        return 0
    if not handles:
        logger.info("no GPU metrics: NVML sees no GPU")
        return 0
    registry.register(NvmlCollector(nvml, handles))
    logger.info("GPU metrics for %d GPU(s)", len(handles))
    return len(handles)
