"""Check the NVML collector on a real GPU: read it idle and under a matmul load.

Run on a GPU machine: `python bench/gpu_metrics_check.py` (needs torch with CUDA,
nvidia-ml-py and prometheus-client). Prints the model_gateway_gpu_* samples it read.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from prometheus_client import CollectorRegistry

from app.gpu import register_gpu_collector


def read(registry: CollectorRegistry) -> dict[str, float]:
    return {
        f"{s.name}{{gpu={s.labels['gpu']}}}": s.value
        for family in registry.collect()
        for s in family.samples
    }


def main() -> None:
    import torch

    registry = CollectorRegistry()
    gpus = register_gpu_collector(registry)
    print(f"GPUs seen by NVML: {gpus}")
    print("idle:", read(registry))
    stop = threading.Event()

    def load() -> None:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        while not stop.is_set():
            for _ in range(20):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for second in (2, 4, 6, 8):
            time.sleep(2)
            print(f"under load, {second} s:", read(registry))
    finally:
        stop.set()
        worker.join()
    loaded = read(registry)
    assert all(v > 0 for k, v in loaded.items() if "temperature" in k or "total" in k)


if __name__ == "__main__":
    main()
