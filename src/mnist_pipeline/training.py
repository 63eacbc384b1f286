"""The training loop: whole data set as one tensor on the device, batched by a seeded permutation.

A per-sample DataLoader spends most of an MNIST epoch in Python; slicing one preloaded tensor with a seeded
``randperm`` keeps the cores on arithmetic and makes a run repeatable from its seed alone.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.config import ModelConfig, TrainConfig
from mnist_pipeline.data import Split
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import ConvNet, build

EVAL_BATCH_SIZE = 1000  # inference needs no gradients, so large batches are cheap


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def configure_threads(threads: int) -> int:
    """Set torch's CPU thread count (0 = one per available core) and return it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = threads or cores
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class Tensors:
    """One split resident on the training device, kept as uint8 (a quarter of the memory of float32)."""

    images: torch.Tensor  # (N, 1, 28, 28) uint8
    y: torch.Tensor  # (N,) int64 labels

    @classmethod
    def from_split(cls, split: Split, device: torch.device) -> Tensors:
        images = torch.from_numpy(split.images).unsqueeze(1)
        return cls(images.to(device), torch.from_numpy(split.labels.astype(np.int64)).to(device))

    def x(self, index: torch.Tensor | slice, shift: int = 0, generator: torch.Generator | None = None):
        """Float pixels in [0, 1] of the selected images (randomly shifted when ``shift``), the model's input."""
        images = self.images[index]
        if shift:
            images = random_shift(images, shift, generator)
        return images.float().div_(255.0)

    def __len__(self) -> int:
        return len(self.y)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset of up to ``max_shift`` pixels in x and y, zero-filled.

    Runs on the images' device as one gather, so augmentation costs no trip through Python per sample.
    """
    b, _, h, w = images.shape  # (B, 1, 28, 28)
    padded = F.pad(images, (max_shift,) * 4)  # (B, 1, 28 + 2s, 28 + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator, device=images.device)
    rows = torch.arange(h, device=images.device) + offsets[0]  # (B, 28)
    cols = torch.arange(w, device=images.device) + offsets[1]  # (B, 28)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (B, 1, 28, 28)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA under ``auto`` (tensor cores); on CPU it rarely pays, so fp32 there."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@torch.inference_mode()
def evaluate_loss_accuracy(model: nn.Module, data: Tensors, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    model.eval()
    loss_sum = torch.zeros((), device=data.y.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.y.device)
    for start in range(0, len(data), batch_size):
        batch = slice(start, start + batch_size)
        logits = model(data.x(batch))  # (B, 10)
        target = data.y[batch]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    return loss_sum.item() / len(data), correct.item() / len(data)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    return None


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float  # wall time since training started, at the end of this epoch


@dataclass(frozen=True)
class TrainResult:
    model: ConvNet
    history: list[EpochMetrics]
    device: torch.device
    seconds: float


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    train_data: Tensors,
    test_data: Tensors,
    device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    log: TextIO | None = None,
) -> TrainResult:
    """Train a fresh model; after each epoch measure it on the test split and call ``on_epoch``."""
    log = log or sys.stderr
    torch.manual_seed(cfg.seed)  # weight init and dropout
    # channels_last keeps conv and max-pool on their vectorised paths (on CPU and on CUDA tensor cores);
    # with a single input channel the input tensor's layout is the same either way.
    model = build(model_cfg).to(device=device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = -(-len(train_data) // cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # batch order and shifts
    amp_dtype = autocast_dtype(cfg.precision, device)

    history: list[EpochMetrics] = []
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per batch
        seen = 0
        order = torch.randperm(len(train_data), generator=generator, device=device)
        for step, first in enumerate(range(0, len(train_data), cfg.batch_size), start=1):
            idx = order[first : first + cfg.batch_size]
            x = train_data.x(idx, cfg.augment_shift, generator)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(x), train_data.y[idx], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
            if step % cfg.log_every == 0:
                print(
                    f"epoch {epoch}/{cfg.epochs}  batch {step}/{steps_per_epoch}  "
                    f"[{seen}/{len(train_data)}]  loss {loss.item():.4f}",
                    file=log,
                    flush=True,
                )
        test_loss, test_accuracy = evaluate_loss_accuracy(model, test_data)  # in fp32, like the evaluate stage
        metrics = EpochMetrics(epoch, loss_sum.item() / seen, test_loss, test_accuracy, time.perf_counter() - start)
        history.append(metrics)
        print(
            f"epoch {epoch}/{cfg.epochs}: train loss {metrics.train_loss:.4f}  test loss {test_loss:.4f}  "
            f"test accuracy {100 * test_accuracy:.2f}%  ({metrics.seconds:.1f} s)",
            file=log,
            flush=True,
        )
        if on_epoch is not None:
            on_epoch(metrics)
    model.eval()
    return TrainResult(model, history, device, time.perf_counter() - start)


def write_history(path, history: list[EpochMetrics]) -> None:
    """Per-epoch metrics as CSV, the file DVC plots as the training curves."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([vars(m) for m in history]).to_csv(path, index=False, float_format="%.6g")
