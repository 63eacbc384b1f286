"""The system metrics a training samples: CPU and memory, and on CUDA every GPU through MLflow's own monitor."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mnist_pipeline.ml import system


class FakeNvml:
    """NVIDIA's management library as MLflow's GPU monitor calls it, for two GPUs (no driver here)."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=(handle + 1) * 1e9, total=10e9)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=40 + handle)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 100_000

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 400_000


def test_on_cuda_every_gpu_is_sampled_under_mlflows_names(monkeypatch):
    """Before, the run's system metrics held no GPU figure: only torch's own, which needs the library too."""
    from mlflow.system_metrics.metrics import gpu_monitor

    monkeypatch.setitem(__import__("sys").modules, "pynvml", FakeNvml())
    monkeypatch.setattr(gpu_monitor, "pynvml", FakeNvml(), raising=False)
    sampler = system.Sampler(torch.device("cuda"))
    first = sampler.sample()["values"]
    assert first["gpu_0_utilization_percentage"] == 40 and first["gpu_1_utilization_percentage"] == 41
    assert first["gpu_1_memory_usage_megabytes"] == 2000 and first["gpu_0_memory_usage_percentage"] == 10
    assert first["gpu_0_power_usage_watts"] == 100 and first["gpu_0_power_usage_percentage"] == 25
    assert "cpu_utilization_percentage" in first


def test_on_the_cpu_no_gpu_is_read():
    values = system.Sampler(torch.device("cpu")).sample()["values"]
    assert not any(key.startswith("gpu_") for key in values) and values["process_memory_rss_megabytes"] > 0


def test_the_system_cpu_counter_is_started_in_the_thread_that_reads_it(monkeypatch):
    """psutil keeps the system's CPU counter per thread, and a thread's first reading is meaningless (0.0 as a
    rule): started in another thread, the runs' first `cpu_utilization_percentage` read 0.0 while the process read
    90%. Every thread that samples calls it once before the reading it keeps."""
    import threading

    calls, real = [], system.psutil.cpu_percent
    monkeypatch.setattr(system.psutil, "cpu_percent", lambda: calls.append(threading.get_ident()) or real())
    with system.Sampler(torch.device("cpu"), interval_s=0.05) as sampler:
        while not sampler.samples:
            threading.Event().wait(0.01)
    assert calls.count(sampler._thread.ident) == len(sampler.samples) + 1  # started, then once per sample
