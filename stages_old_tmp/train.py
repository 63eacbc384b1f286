"""Stage train: train the CNN; save the checkpoint, the per-epoch history and the training's record.

The stage does not talk to MLflow: it writes files, and the export stage records them in the pipeline's MLflow
run. Its record (``models/training.json``) holds what only the training can know: when it ran, where (the
``env.*`` tags: packages, CPU, threads, device), the data's fingerprint, every epoch's metrics at full precision
with the time each was measured, and the CPU and memory it used (see ``mnist_pipeline.ml.system``).

With train.nproc > 1 the stage starts its script again in that many processes under torchrun's launcher (or
runs under a torchrun you started, e.g. across machines): every process trains on its part of each batch, and
rank 0 alone writes the outputs. After every epoch rank 0 saves a resumable state, removed once the stage has
succeeded: its presence means a training that did not finish, which the next run continues.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config, names
from mnist_pipeline.files import write_atomic
from mnist_pipeline.stages import code_deps, main, path
from mnist_pipeline.tracking import store


@dataclass(frozen=True)
class Paths:
    data: Path = path("folder written by the download stage")
    checkpoint: Path = path("the trained model (weights and the model params)")
    history: Path = path("per-epoch metrics CSV (a DVC plot)")
    record: Path = path("the training's record for the export stage to log (JSON)")
    resume_state: Path = path("the last completed epoch's state, while a training is unfinished")


def run(params: config.Params, paths: Paths) -> None:
    """Train and write ``paths``."""
    # A tracking server that cannot be reached fails the pipeline now, in seconds, not after the training.
    store.check_server(store.tracking_uri())
    _train(params, paths)


def _train(params: config.Params, paths: Paths) -> None:
    from mnist_pipeline.ml import distributed, system, training
    from mnist_pipeline.ml.data import load_split, verify_folder
    from mnist_pipeline.ml.model import save_checkpoint

    cluster = distributed.from_env()
    model_cfg, train_cfg = params.model, params.train
    if not cluster.distributed:  # a torchrun started by hand spans machines: each checks its own GPUs
        distributed.check_processes(train_cfg.nproc, train_cfg.device)
    data_md5 = verify_folder(paths.data)  # a corrupt or truncated file stops the stage here
    if train_cfg.nproc > 1 and not cluster.distributed:
        sys.exit(distributed.launch(train_cfg.nproc, __spec__.name, sys.argv[1:]))  # this stage again
    started = time.time()
    device = training.resolve_device(train_cfg.device, cluster)
    threads = training.configure_threads(train_cfg.threads, cluster)
    train_data = training.Tensors.from_split(load_split(paths.data, "train"), device)
    validation_data = None
    if train_cfg.validation:
        train_data, validation_data = train_data.hold_out(train_cfg.validation, train_cfg.seed)
    test_data = training.Tensors.from_split(load_split(paths.data, "test"), device)
    state_key = training.state_fingerprint(model_cfg, train_cfg, data_md5, code_deps("train"))

    with distributed.process_group(cluster, device):
        resume = resumable_state(paths.resume_state, state_key, train_cfg.resume) if cluster.is_main else None
        resume = distributed.broadcast(resume, cluster)

        def checkpoint(state: dict) -> None:
            training.save_state(paths.resume_state, {**state, "fingerprint": state_key, "started": started})

        try:
            with system.Sampler(device) as usage:
                result = training.train(model_cfg, train_cfg, train_data, test_data, device, cluster=cluster,
                                        resume=resume, on_checkpoint=checkpoint if cluster.is_main else None,
                                        validation_data=validation_data)  # fmt: skip
        except training.TrainingDiverged:
            paths.resume_state.unlink(missing_ok=True)  # the epochs before led here: resuming would diverge again
            raise
        except KeyboardInterrupt:
            if cluster.is_main and paths.resume_state.exists():
                print(f"the last completed epoch is saved in {paths.resume_state}; `dvc repro` continues from it"
                      + ("" if train_cfg.resume else " with train.resume: true"), file=sys.stderr)  # fmt: skip
            raise
        samples = distributed.gather_objects(usage.samples, cluster)  # every rank's, on rank 0
    if not cluster.is_main:
        return
    save_checkpoint(paths.checkpoint, result.model, model_cfg, {"train_config": train_cfg.to_dict()})
    training.write_history(paths.history, result.history)
    record = _record(result, cluster, device, threads, data_md5, (resume or {}).get("started", started), samples)
    write_atomic(paths.record, json.dumps(record, indent=1) + "\n")
    paths.resume_state.unlink(missing_ok=True)  # finished: nothing left to resume


def _record(result, cluster, device, threads: int, data_md5: str, started: float, samples) -> dict:
    """What only the training knows, for the export stage to log (see the module's docstring)."""
    from mnist_pipeline.tracking import environment

    metrics = {names.TRAIN_SECONDS: result.seconds}
    if cluster.distributed:
        metrics[names.DDP_WEIGHT_SPREAD] = result.weight_spread
        metrics.update({f"{names.TRAIN_SECONDS}_rank{r}": s for r, s in enumerate(result.rank_seconds)})
        print(f"{cluster.world_size} ranks, training seconds per rank {[round(s, 2) for s in result.rank_seconds]}, "
              f"largest weight difference between ranks {result.weight_spread:g}", file=sys.stderr)  # fmt: skip
    return {
        "id": uuid.uuid4().hex,  # tells the runs that record this training from those of another
        "started": started,
        "ended": time.time(),
        "tags": {
            **environment.tags(device, threads, Path.cwd()),
            names.DATA_MD5: data_md5,
            names.WORLD_SIZE: str(cluster.world_size),
            names.NODES: str(cluster.nodes),
        },  # fmt: skip
        "metrics": metrics,
        "history": [vars(m) for m in result.history],
        "system": [sample for rank_samples in samples for sample in rank_samples],
    }


def resumable_state(path: Path, key: str, wanted: bool) -> dict | None:
    """The state saved at ``path`` when resuming is ``wanted`` and the state belongs to this very training (params,
    data, code). Any other state is set aside."""
    from mnist_pipeline.ml import training

    state = training.load_state(path)
    if state is None:
        return None
    if wanted and state.get("fingerprint") == key:
        return state
    why = "from another training (params, data or code changed)" if wanted else "not resumed (train.resume: false)"
    print(f"{path} is {why}: starting over", file=sys.stderr)
    return None


if __name__ == "__main__":  # dvc.yaml runs python -m mnist_pipeline.stages.train
    main(sys.modules[__name__])
