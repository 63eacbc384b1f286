"""What a training used: CPU and memory (and the GPUs on CUDA), sampled in a thread while it runs.

The samples use the names of MLflow's own system metrics (``cpu_utilization_percentage``, ...), which the export
stage logs under ``system/`` with the time each was taken, so the run's *System metrics* charts show the training.
On CUDA the GPUs' figures (utilization, memory, power, per GPU) come from MLflow's own GPU monitor, which reads
NVIDIA's management library (nvidia-ml-py); without a driver to read, only the memory torch reserved.
Under torchrun every rank samples its own machine and process, and its samples carry its rank and node.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

INTERVAL_S = 1.0  # a two-epoch MNIST training on a CPU lasts 15-20 s: a sample a second draws its shape


class Sampler:
    """A context manager: samples from entering to leaving, at least one."""

    def __init__(self, device, interval_s: float = INTERVAL_S):
        self.device, self.interval_s = device, interval_s
        self.rank = int(os.environ.get("RANK", "0"))
        self.node = int(os.environ.get("GROUP_RANK", "0"))
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._process = psutil.Process()
        self._gpus = gpu_monitor() if device.type == "cuda" else None

    def __enter__(self) -> Sampler:
        self._process.cpu_percent()  # the first reading of a counter is 0: start it now
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        psutil.cpu_percent()  # psutil keeps the system's counter per thread: start this thread's before it reads
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())
        if not self.samples:
            self.samples.append(self.sample())

    def sample(self) -> dict:
        memory = psutil.virtual_memory()
        values = {
            "cpu_utilization_percentage": psutil.cpu_percent(),
            "system_memory_usage_megabytes": (memory.total - memory.available) / 1e6,
            "system_memory_usage_percentage": memory.percent,
            "process_cpu_utilization_percentage": self._process.cpu_percent(),
            "process_memory_rss_megabytes": self._process.memory_info().rss / 1e6,
        }
        if self._gpus is not None:
            self._gpus.collect_metrics()
            values.update(self._gpus.aggregate_metrics())  # this sample's: the monitor holds nothing else
            self._gpus.clear_metrics()
        elif self.device.type == "cuda":
            import torch

            index = self.device.index or 0
            values[f"gpu_{index}_memory_usage_megabytes"] = torch.cuda.memory_reserved(self.device) / 1e6
        return {"time": time.time(), "rank": self.rank, "node": self.node, "values": values}


def gpu_monitor():
    """MLflow's GPU monitor, or None where NVIDIA's management library has no GPU to read."""
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        return GPUMonitor()
    except (ImportError, RuntimeError):  # nvidia-ml-py missing, or no driver (NVMLError, as MLflow re-raises it)
        return None
