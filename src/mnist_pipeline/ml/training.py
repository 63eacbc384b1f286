"""The training loop: the data set resident on the device (`tensors`), batched by a seeded permutation.

Data parallel (see ``distributed``): every rank draws the same permutation and takes its own slice of each global
batch of ``batch_size`` digits, so N processes take the same optimisation steps as one process with that batch.

Resume: after each epoch the loop hands out its whole state (weights, optimizer, schedule, random generators,
history; saved by `resume`); ``train(resume=state)`` continues from it and, on the CPU, ends with the very same
weights as a run that was never interrupted.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.config import ModelConfig, TrainConfig
from mnist_pipeline.errors import PipelineError, interrupts_held
from mnist_pipeline.ml import augment, distributed
from mnist_pipeline.ml.distributed import SINGLE, Cluster
from mnist_pipeline.ml.history import EpochMetrics
from mnist_pipeline.ml.model import ConvNet, build
from mnist_pipeline.ml.tensors import Tensors

EVAL_BATCH_SIZE = 1000  # inference needs no gradients, so large batches are cheap


def resolve_device(name: str, cluster: Cluster = SINGLE) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA on a machine without it is an error.

    Under torchrun each process on a machine takes the GPU of its local rank.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PipelineError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if cluster.local_world_size > torch.cuda.device_count():
        raise PipelineError(
            f"{cluster.local_world_size} processes per machine but only {torch.cuda.device_count()} GPUs; "
            "set train.nproc to at most the number of GPUs"
        )
    return torch.device("cuda", cluster.local_rank)


def configure_threads(threads: int, cluster: Cluster = SINGLE) -> int:
    """Set torch's CPU thread count and return it; 0 = the machine's cores shared out among its processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = threads or max(1, cores // cluster.local_world_size)
    torch.set_num_threads(n)
    return n


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the training autocasts to (None: fp32). ``auto``: bf16 where the device computes in it natively,
    fp32 elsewhere; see `native_bf16`."""
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 pays on ``device``, by torch's own capability queries: on CUDA, a GPU with bf16 arithmetic
    (Ampere and later); on the CPU, AMX tiles or AVX-512 BF16 instructions. One training step of the default model
    (batch 256, channels_last, 2 threads) took 20-22 ms in fp32 and 10-11 ms under bf16 autocast on an AMD EPYC
    "Zen 5" (AVX-512 BF16), 26.5-27.3 ms and 9.6-10.2 ms on an Intel Xeon with AMX. Without those instructions
    bf16 is emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def precision_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


@torch.inference_mode()
def evaluate_loss_accuracy(
    model: nn.Module, data: Tensors, batch_size: int = EVAL_BATCH_SIZE, cluster: Cluster = SINGLE
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (each rank measures its shard; the sums are shared)."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=data.y.device)  # loss, correct: summed on the device
    part = cluster.shard(len(data))
    for start in range(part.start, part.stop, batch_size):
        batch = slice(start, min(start + batch_size, part.stop))
        logits = model(data.x(batch))  # (B, 10)
        target = data.y[batch]
        sums[0] += F.cross_entropy(logits, target, reduction="sum")
        sums[1] += (logits.argmax(dim=1) == target).sum()
    loss_sum, correct = distributed.sum_over_ranks(sums, cluster).tolist()
    return loss_sum / len(data), correct / len(data)


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


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite: the training is stopped and its saved state is worthless."""


@dataclass(frozen=True)
class TrainResult:
    model: ConvNet
    history: list[EpochMetrics]
    device: torch.device
    precision: str  # what the training computed in: "bf16" (autocast) or "fp32"
    seconds: float  # this process's training time, time before a resume included
    rank_seconds: list[float]  # the same for every rank, in rank order
    weight_spread: float  # largest |weight difference| between ranks at the end: 0.0 when in lockstep


class OutOfMemory(PipelineError):
    """The model and its batch need more memory than the device has."""


def train(model_cfg: ModelConfig, cfg: TrainConfig, *args, **kwargs) -> TrainResult:
    """`_train`, with an allocation the device cannot make worded as one line: the model's sizes and the batch
    are params, each valid alone, that together may not fit (a traceback after minutes, otherwise)."""
    try:
        return _train(model_cfg, cfg, *args, **kwargs)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError on CUDA; a RuntimeError on the CPU
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        detail = " ".join(str(exc).split())[:160]
        raise OutOfMemory(
            f"model.conv_channels {list(model_cfg.conv_channels)}, model.hidden {model_cfg.hidden} and "
            f"train.batch_size {cfg.batch_size} need more memory than the device has ({detail}); make them smaller"
        ) from None


def _train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    train_data: Tensors,
    test_data: Tensors | None,
    device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    log: TextIO | None = None,
    cluster: Cluster = SINGLE,
    resume: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    validation_data: Tensors | None = None,
    log_every: int = 100,
) -> TrainResult:
    """Train a fresh model, or continue the state ``resume`` (from ``on_checkpoint``) where it stopped, printing
    the running loss every ``log_every`` steps.

    After each epoch: measure the model on the validation digits (if any) and the test split (if given: the tuner
    gives none), call ``on_epoch`` with the metrics, then hand the resumable state to ``on_checkpoint`` (rank 0).
    Only rank 0 prints; every rank must call this.
    """
    log = (log or sys.stderr) if cluster.is_main else None
    torch.manual_seed(cfg.seed)  # weight init and dropout
    # channels_last keeps conv and max-pool on their vectorised paths (on CPU and on CUDA tensor cores);
    # with a single input channel the input tensor's layout is the same either way.
    model = build(model_cfg).to(device=device, memory_format=torch.channels_last)
    if cluster.distributed:
        torch.manual_seed(cfg.seed + cluster.rank)  # same initial weights, a dropout stream of its own per rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = distributed.wrap(model, device, cluster)
    optimizer = make_optimizer(model, cfg)
    if cfg.batch_size > len(train_data):
        raise PipelineError(
            f"train.batch_size {cfg.batch_size} is larger than the training set "
            f"({len(train_data)} digits); expected at most that"
        )
    steps_per_epoch = -(-len(train_data) // cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # batch order and shifts: alike on all ranks
    amp_dtype = autocast_dtype(cfg.precision, device)
    _say(log, f"training in {precision_name(amp_dtype)} (train.precision: {cfg.precision})")
    history: list[EpochMetrics] = []
    if resume is not None:
        history = _restore(resume, model, optimizer, scheduler, generator, rng=cluster.is_main)
        _say(log, f"resuming after epoch {len(history)}/{cfg.epochs} from the last checkpoint")

    start = time.perf_counter() - (history[-1].seconds if history else 0.0)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        train_loss = _one_epoch(
            net, optimizer, scheduler, generator, train_data, cfg, epoch, amp_dtype, cluster, log, log_every
        )
        (val_loss, val_accuracy), (test_loss, test_accuracy) = (
            evaluate_loss_accuracy(model, split, cluster=cluster) if split is not None else (None, None)
            for split in (validation_data, test_data)
        )  # fp32, like the evaluate stage
        metrics = EpochMetrics(
            epoch,
            train_loss,
            test_loss,
            test_accuracy,
            time.perf_counter() - start,
            val_loss,
            val_accuracy,
            time.time(),
        )
        history.append(metrics)
        _say(log, f"epoch {epoch}/{cfg.epochs} done: {metrics.summary()}  ({metrics.seconds:.1f} s of training so far)")
        # The epoch's metrics are logged and its state saved as one step: a Ctrl-C or SIGTERM in between waits
        # until both are done, so what the store holds and what a rerun resumes from always agree.
        with interrupts_held():
            if on_epoch is not None:
                on_epoch(metrics)
            if on_checkpoint is not None and cluster.is_main:
                on_checkpoint(_state(model, optimizer, scheduler, generator, history))
    model.eval()
    seconds = time.perf_counter() - start
    rank_seconds = distributed.gather_floats(seconds, cluster, device)
    return TrainResult(
        model,
        history,
        device,
        precision_name(amp_dtype),
        seconds,
        rank_seconds,
        distributed.weight_spread(model, cluster),
    )


def _one_epoch(
    net,
    optimizer,
    scheduler,
    generator: torch.Generator,
    train_data: Tensors,
    cfg: TrainConfig,
    epoch: int,
    amp_dtype: torch.dtype | None,
    cluster: Cluster,
    log: TextIO | None,
    log_every: int,
) -> float:
    """One pass over the training digits in the generator's order; the mean training loss over every rank."""
    device = train_data.y.device
    steps_per_epoch = -(-len(train_data) // cfg.batch_size)
    net.train()
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per batch
    seen = 0
    order = torch.randperm(len(train_data), generator=generator, device=device)
    for step, first in enumerate(range(0, len(train_data), cfg.batch_size), start=1):
        batch = order[first : first + cfg.batch_size]  # the global batch, the same on every rank
        offsets = augment.random_offsets(len(batch), cfg.augment_shift, generator) if cfg.augment_shift else None
        amounts = augment.draw(len(batch), cfg, generator) if augment.active(cfg) else None
        mine = cluster.shard(len(batch))
        idx = batch[mine]
        x = train_data.x(idx, cfg.augment_shift, offsets[:, mine] if offsets is not None else None)
        if amounts is not None:
            x = augment.apply(x, amounts[mine], cfg)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            batch_loss = F.cross_entropy(
                net(x), train_data.y[idx], reduction="sum", label_smoothing=cfg.label_smoothing
            )
        # DDP averages the ranks' gradients, so each rank scales its sum by world/global batch: the average
        # is then the gradient of the mean loss over the global batch, whatever the shards' sizes.
        loss = batch_loss * (cluster.world_size / len(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += batch_loss.detach()
        seen += len(batch)
        # A non-finite loss stays in the sum, so checking the sum is enough. One process on the CPU checks every
        # step (it costs nothing); on a GPU a check waits for the GPU, and across ranks all must agree, so there
        # it happens with the progress line and at the end of the epoch: at most log_every steps later.
        if (not cluster.distributed and device.type != "cuda") or step % log_every == 0 or step == steps_per_epoch:
            _stop_if_diverged(loss_sum, cfg, epoch, step, steps_per_epoch, cluster)
        if step % log_every == 0 and log is not None:
            _say(
                log,
                f"epoch {epoch}/{cfg.epochs}  batch {step}/{steps_per_epoch}  "
                f"[{seen}/{len(train_data)}]  batch loss {loss.item():.4f}",
            )
    return distributed.sum_over_ranks(loss_sum, cluster).item() / seen


def _stop_if_diverged(
    loss_sum: torch.Tensor, cfg: TrainConfig, epoch: int, step: int, steps: int, cluster: Cluster
) -> None:
    """Raise TrainingDiverged, on every rank at once, when any rank's loss is no longer finite."""
    bad = (~torch.isfinite(loss_sum)).to(torch.float32).reshape(1)
    if distributed.sum_over_ranks(bad, cluster).item() > 0:
        raise TrainingDiverged(
            f"training diverged: the loss is {loss_sum.item()} at epoch {epoch}, batch {step}/{steps} (train.lr "
            f"{cfg.lr:g}, train.optimizer {cfg.optimizer}, train.weight_decay {cfg.weight_decay:g}, train.precision "
            f"{cfg.precision}); lower train.lr first. Nothing was saved"
        )


def _say(log: TextIO | None, line: str) -> None:
    if log is not None:
        print(line, file=log, flush=True)


def _state(model, optimizer, scheduler, generator: torch.Generator, history: list[EpochMetrics]) -> dict:
    """Everything the loop needs to go on exactly where it is (tensors and plain values: loads without pickle)."""
    return {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),  # dropout
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": [vars(m) for m in history],
    }


def _restore(state: dict, model, optimizer, scheduler, generator: torch.Generator, rng: bool) -> list[EpochMetrics]:
    """Load ``state`` into the loop's objects; ``rng``: also the dropout generators (saved by rank 0 only, so the
    other ranks keep streams of their own)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    if rng:
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    return [EpochMetrics(**m) for m in state["history"]]
