"""What determines a run's digits besides the code, params and data: the installed packages and the hardware.

The train stage records these as run tags; `reproduce` compares them with the original run's and, when the
digits differ, names the ones that differ. The same lock, params and hardware give the same digits on the CPU;
another CPU (AVX-512 or not), another torch or another thread count may change the last digits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

# The tags, in the order `reproduce` reports them.
PACKAGES_HASH = "env.packages_sha256"  # every installed distribution and its version
LOCK_HASH = "env.lock_sha256"  # the project's lock file, as committed
TORCH = "env.torch"
CUDA = "env.cuda"  # the CUDA version torch was built with ("none": a CPU build)
CUDNN = "env.cudnn"
CPU = "env.cpu"
CPU_VECTOR = "env.cpu_vector"  # the widest vector instructions torch uses here (AVX2, AVX512, ...)
CPU_BF16 = "env.cpu_bf16"  # whether the CPU computes in bf16 natively
THREADS = "env.threads"
DEVICE = "env.device"
PRECISION = "env.precision"  # what the training computed in (train.precision auto: by the device)
TAGS = (PACKAGES_HASH, LOCK_HASH, TORCH, CUDA, CUDNN, CPU, CPU_VECTOR, CPU_BF16, THREADS, DEVICE, PRECISION)

LOCK_FILE = Path("requirements") / "lock.txt"


def packages_hash() -> str:
    """SHA-256 (first 16 hex digits) of the sorted ``name==version`` of every installed distribution."""
    pins = sorted({f"{d.metadata['Name'].lower()}=={d.version}" for d in importlib.metadata.distributions()})
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]


def lock_hash(root: Path) -> str:
    try:
        return hashlib.sha256((root / LOCK_FILE).read_bytes()).hexdigest()[:16]
    except OSError:
        return "none"


def cpuinfo(field: str) -> str:
    """A field of /proc/cpuinfo's first processor ("" where there is none: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def tags(device, threads: int, root: Path, precision: str) -> dict[str, str]:
    """The tags of a training on ``device`` (a torch.device) with ``threads`` CPU threads, computing in
    ``precision`` ("bf16" or "fp32")."""
    import torch

    cuda = torch.version.cuda  # the build's, also for a training on the CPU
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" and torch.backends.cudnn.is_available() else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        PACKAGES_HASH: packages_hash(),
        LOCK_HASH: lock_hash(root),
        TORCH: torch.__version__,
        CUDA: str(cuda or "none"),
        CUDNN: str(cudnn or "none"),
        CPU: cpu_model(),
        CPU_VECTOR: torch.backends.cpu.get_cpu_capability(),
        CPU_BF16: str("avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()).lower(),
        THREADS: str(threads),
        DEVICE: name,
        PRECISION: precision,
    }


def differences(original: dict[str, str], reproduced: dict[str, str]) -> list[str]:
    """``"env.cpu: 'A' then 'B'"`` for each tag the two runs recorded differently (a run made before these tags
    existed has none: those are reported as unknown)."""
    return [
        f"{tag}: {original.get(tag, 'unknown')!r} then {reproduced.get(tag, 'unknown')!r}"
        for tag in TAGS
        if original.get(tag) != reproduced.get(tag)
    ]
