"""Stage train: train the CNN, save the checkpoint and the per-epoch history, start the pipeline's MLflow run.

With train.nproc > 1 the stage starts its script again in that many processes under torchrun's launcher (or
runs under a torchrun you started, e.g. across machines): every process trains on its part of each batch, and
rank 0 alone logs to MLflow and writes the outputs. After every epoch rank 0 saves a resumable state, removed
once the stage has succeeded: its presence means a training that did not finish, which the next run continues.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config, names, tracker
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.stages import code_deps, path


@dataclass(frozen=True)
class Paths:
    data: Path = path("folder written by the download stage")
    checkpoint: Path = path("the trained model (weights and the model params)")
    history: Path = path("per-epoch metrics CSV (a DVC plot)")
    run_file: Path = path("where to write the MLflow run id for the next stages")
    resume_state: Path = path("the last completed epoch's state, while a training is unfinished")


def run(params: config.Params, paths: Paths, start_tracker: Callable[[], tracker.Tracker] = tracker.Tracker.start):
    """Train and write ``paths``; rank 0 logs the run to MLflow through a tracking process (``start_tracker``)."""
    # torchrun gives each process its RANK (a process on its own has none). Rank 0's tracking process starts
    # before torch is imported here, so that MLflow and torch start up side by side.
    if os.environ.get("RANK", "0") != "0":
        _train(params, paths, None)
        return
    with start_tracker() as tracking:
        _train(params, paths, tracking)


def _train(params: config.Params, paths: Paths, tracking: tracker.Tracker | None) -> None:
    import torch

    from mnist_pipeline import distributed, training
    from mnist_pipeline.data import load_split, verify_folder
    from mnist_pipeline.model import save_checkpoint

    cluster = distributed.from_env()
    model_cfg, train_cfg = params.model, params.train
    if not cluster.distributed:  # a torchrun started by hand spans machines: each checks its own GPUs
        distributed.check_processes(train_cfg.nproc, train_cfg.device)
    data_md5 = verify_folder(paths.data)  # a corrupt or truncated file stops the stage here
    # The optimizer's first step imports torch's compiler (1.7 s on a 2-core CPU) whether or not anything is
    # compiled; imported now, that happens while the tracking process is still starting MLflow.
    import torch._dynamo  # noqa: F401

    if tracking is not None:
        uri = tracking.configure()  # an unreachable store fails here, before any training
    if train_cfg.nproc > 1 and not cluster.distributed:
        tracking.close()
        sys.exit(distributed.launch(train_cfg.nproc, sys.argv[0], sys.argv[1:]))  # this stage's script again
    device = training.resolve_device(train_cfg.device, cluster)
    threads = training.configure_threads(train_cfg.threads, cluster)
    train_data = training.Tensors.from_split(load_split(paths.data, "train"), device)
    validation_data = None
    if train_cfg.validation:
        train_data, validation_data = train_data.hold_out(train_cfg.validation, train_cfg.seed)
    test_data = training.Tensors.from_split(load_split(paths.data, "test"), device)
    state_key = training.state_fingerprint(model_cfg, train_cfg, data_md5, code_deps("train"))

    with distributed.process_group(cluster, device):
        resume = None
        if cluster.is_main:
            resume = resumable_state(tracking, paths.resume_state, state_key, train_cfg.resume)
        resume = distributed.broadcast(resume, cluster)
        if not cluster.is_main:
            training.train(model_cfg, train_cfg, train_data, test_data, device, cluster=cluster, resume=resume,
                           validation_data=validation_data)  # fmt: skip
            return

        tags = {**tracker.run_tags(device, threads), names.DATA_MD5: data_md5,
                "world_size": str(cluster.world_size)}  # fmt: skip
        with tracker.run(tracking, config.flatten(params.sections()), tags, resume and resume["run_id"]) as run_id:
            logger = tracker.EpochLogger(tracking, tracking.call("logged_epochs", run_id) if resume else 0)

            def log_epoch(m: training.EpochMetrics) -> None:
                logger.log(m.epoch, m.metrics())

            def checkpoint(state: dict) -> None:
                training.save_state(paths.resume_state, {**state, "run_id": run_id, "fingerprint": state_key})

            try:
                result = training.train(model_cfg, train_cfg, train_data, test_data, device, on_epoch=log_epoch,
                                        cluster=cluster, resume=resume, on_checkpoint=checkpoint,
                                        validation_data=validation_data)  # fmt: skip
            except training.TrainingDiverged:
                paths.resume_state.unlink(missing_ok=True)  # the epochs before led here: resuming would diverge again
                raise
            except KeyboardInterrupt:
                if paths.resume_state.exists():
                    print(
                        f"the last completed epoch is saved in {paths.resume_state}; `dvc repro` continues "
                        "from it" + ("" if train_cfg.resume else " with train.resume: true"),
                        file=sys.stderr,
                    )
                raise
            save_checkpoint(paths.checkpoint, result.model, model_cfg, {"train_config": train_cfg.to_dict()})
            training.write_history(paths.history, result.history)
            for m in result.history:  # after a resume: epochs trained earlier but never logged
                log_epoch(m)
            if logger.lost is not None:
                raise PipelineError(
                    f"lost the MLflow store {uri} ({logger.lost}); the trained model is saved in "
                    f"{paths.resume_state}: once the store answers again, `dvc repro` logs the missing epochs "
                    "without training again"
                )
            tracking.call("log_metrics", {names.TRAIN_SECONDS: result.seconds})
            if cluster.distributed:
                per_rank = {f"{names.TRAIN_SECONDS}_rank{r}": s for r, s in enumerate(result.rank_seconds)}
                tracking.call("log_metrics", {"ddp_weight_spread": result.weight_spread, **per_rank})
                print(f"{cluster.world_size} ranks, training seconds per rank "
                      f"{[round(s, 2) for s in result.rank_seconds]}, largest weight difference between ranks "
                      f"{result.weight_spread:g}", file=sys.stderr)  # fmt: skip
            tracker.write_run_file(paths.run_file, run_id, uri)
        paths.resume_state.unlink(missing_ok=True)  # finished: nothing left to resume


def resumable_state(tracking: tracker.Tracker, path: Path, key: str, wanted: bool) -> dict | None:
    """The state saved at ``path`` when resuming is ``wanted`` and the state belongs to this very training (params,
    data, code) and its MLflow run is in the store. Any other state is set aside; its run, if a killed process
    left it RUNNING, is marked KILLED."""
    from mnist_pipeline import training

    state = training.load_state(path)
    if state is None:
        return None
    status = tracking.call("run_status", state.get("run_id", ""))
    if wanted and state.get("fingerprint") == key and status is not None:
        return state
    if status == "RUNNING":
        tracking.call("mark_killed", state["run_id"])
    why = "from another training (params, data or code changed)" if wanted else "not resumed (train.resume: false)"
    print(f"{path} is {why}: starting over", file=sys.stderr)
    return None
