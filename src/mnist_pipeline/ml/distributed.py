"""Data-parallel training over processes started by torchrun: who this process is, the process group, checks.

torchrun (PyTorch's elastic launcher, ``torch.distributed.run``) gives each process it starts RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE, and its machine's place among the machines, GROUP_RANK of GROUP_WORLD_SIZE.
Without them the stage is one process and nothing here talks to anyone.
Gradients are averaged by ``DistributedDataParallel``; this module only shards the batches and sums the few
numbers (losses, counts) that every rank contributes to.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index on this machine: the GPU this process uses
    local_world_size: int = 1  # processes on this machine: they share its CPU cores
    node: int = 0  # this machine among the machines (torchrun's --nnodes)
    nodes: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs to MLflow, prints progress and writes the outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``range(n)``: parts are disjoint, cover all of it, and differ in size
        by at most one (the same split as ``torch.tensor_split``)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


SINGLE = Cluster()


def check_processes(nproc: int, device: str) -> None:
    """``train.nproc`` against this machine: one process per GPU on CUDA, at most one per usable core on the CPU
    (more only adds processes, each with its own copy of the data, that take turns on the same cores)."""
    from mnist_pipeline.errors import PipelineError

    if nproc == 1:
        return
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = usable_cores(), "CPU cores"
    if nproc > have:
        raise PipelineError(
            f"train.nproc = {nproc} but this machine has {have} {what} for train.device = {device!r}; "
            f"set train.nproc to at most {have} (nothing was started)"
        )


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch(nproc: int, script: str, args: list[str]) -> int:
    """Run ``python script`` with ``args`` in ``nproc`` processes on this machine under torchrun's launcher (as
    ``torchrun --standalone --nproc-per-node nproc``); return the exit status to leave with.

    A failing rank has printed its own one-line error; torchrun would add its report as a traceback, so the
    failure is turned into the rank's exit status instead.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Each rank sets its own thread count (see training.configure_threads); this keeps torchrun from warning.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The launcher logs each rank's failure again, and the signals it relays; the ranks speak for themselves.
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", script, *args]))
        return 0
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a negative code is the signal that ended the rank
    except SignalException as exc:  # Ctrl-C or SIGTERM: the ranks were stopped and have said so
        return 128 + int(exc.sigval)


def from_env() -> Cluster:
    """The cluster torchrun describes in the environment, or a single process."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return SINGLE
    return Cluster(
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        int(env["LOCAL_RANK"]),
        int(env["LOCAL_WORLD_SIZE"]),
        int(env.get("GROUP_RANK", 0)),
        int(env.get("GROUP_WORLD_SIZE", 1)),
    )


@contextmanager
def process_group(cluster: Cluster, device: torch.device) -> Iterator[None]:
    """Join the other ranks for the duration (NCCL between GPUs, gloo on CPUs); nothing for one process."""
    if not cluster.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, cluster: Cluster) -> nn.Module:
    """The module to train: DDP (gradients all-reduced, rank 0's initial weights broadcast) when distributed."""
    if not cluster.distributed:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        return nn.parallel.DistributedDataParallel(model, device_ids=[device])
    return nn.parallel.DistributedDataParallel(model)


def sum_over_ranks(values: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (every rank gets the result)."""
    if cluster.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_floats(value: float, cluster: Cluster, device: torch.device) -> list[float]:
    """``value`` from every rank, in rank order."""
    if not cluster.distributed:
        return [value]
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(cluster.world_size)]
    dist.all_gather(everyone, mine)
    return [t.item() for t in everyone]


def gather_objects(obj, cluster: Cluster) -> list:
    """``obj`` from every rank, in rank order (small Python objects, such as a rank's system metrics)."""
    if not cluster.distributed:
        return [obj]
    everyone = [None] * cluster.world_size
    dist.all_gather_object(everyone, obj)
    return everyone


def broadcast(obj, cluster: Cluster):
    """Rank 0's ``obj`` on every rank (a small Python object, such as a resume state read from rank 0's disk)."""
    if not cluster.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def weight_spread(model: nn.Module, cluster: Cluster) -> float:
    """Largest |difference| between any rank's weights and rank 0's: 0.0 when the ranks are in lockstep."""
    if not cluster.distributed:
        return 0.0
    mine = torch.cat([p.detach().flatten().double() for p in model.state_dict().values() if p.is_floating_point()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    spread = (mine - reference).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()
