"""A training as the train stage runs it: from the data folder to the trained model, its history and its record.

Around the loop (`training`) it settles where the training runs (device, threads, the processes torchrun started),
resumes an interrupted training (`resume`), samples the CPU and memory it uses (`system`), and writes down what
only the training can know (`record`): when it ran, where (the ``env.*`` tags: packages, CPU, threads, device), the
data's fingerprint, every epoch's metrics at full precision with the time each was measured, and its usage.

With train.nproc > 1 the stage's script is started again in that many processes under torchrun's launcher (or
runs under a torchrun you started, e.g. across machines): every process trains on its part of each batch, and
rank 0 alone gets the result to write. After every epoch rank 0 saves a resumable state, removed once the stage
has succeeded: its presence means a training that did not finish, which the next run continues.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import names
from mnist_pipeline.config import ModelConfig, RuntimeConfig, TrainConfig
from mnist_pipeline.ml import distributed, environment, resume, system, training
from mnist_pipeline.ml.data import load_split, verify_folder
from mnist_pipeline.ml.tensors import Tensors


@dataclass(frozen=True)
class Trained:
    result: training.TrainResult
    record: dict  # for the export stage to log (see the module's docstring)


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    runtime: RuntimeConfig,
    data_dir: Path,
    resume_path: Path,
    code: list[Path],
) -> Trained | None:
    """Train on the data in ``data_dir``, continuing the state at ``resume_path`` when it belongs to this very
    training (params, data and the ``code`` files) and ``runtime.resume`` allows. None on every rank but rank 0."""
    cluster = distributed.from_env()
    if not cluster.distributed:  # a torchrun started by hand spans machines: each checks its own GPUs
        distributed.check_processes(train_cfg.nproc, train_cfg.device)
    data_md5 = verify_folder(data_dir)  # a corrupt or truncated file stops the stage here
    if train_cfg.nproc > 1 and not cluster.distributed:
        sys.exit(distributed.launch(train_cfg.nproc, sys.argv[0], sys.argv[1:]))  # the stage's script again
    started = time.time()
    device = training.resolve_device(train_cfg.device, cluster)
    threads = training.configure_threads(train_cfg.threads, cluster)
    train_data = Tensors.from_split(load_split(data_dir, "train"), device)
    validation_data = None
    if train_cfg.validation:
        train_data, validation_data = train_data.hold_out(train_cfg.validation, train_cfg.seed)
    test_data = Tensors.from_split(load_split(data_dir, "test"), device)
    key = resume.fingerprint(model_cfg, train_cfg, data_md5, code)

    with distributed.process_group(cluster, device):
        state = resume.resumable(resume_path, key, runtime.resume) if cluster.is_main else None
        state = distributed.broadcast(state, cluster)

        def checkpoint(loop_state: dict) -> None:
            resume.save(resume_path, {**loop_state, "fingerprint": key, "started": started})

        try:
            with system.Sampler(device) as usage:
                result = training.train(
                    model_cfg,
                    train_cfg,
                    train_data,
                    test_data,
                    device,
                    cluster=cluster,
                    resume=state,
                    on_checkpoint=checkpoint if cluster.is_main else None,
                    validation_data=validation_data,
                    log_every=runtime.log_every,
                )
        except training.TrainingDiverged:
            resume_path.unlink(missing_ok=True)  # the epochs before led here: resuming would diverge again
            raise
        except KeyboardInterrupt:
            if cluster.is_main and resume_path.exists():
                print(
                    f"the last completed epoch is saved in {resume_path}; `dvc repro` continues from it"
                    + ("" if runtime.resume else " with runtime.resume: true"),
                    file=sys.stderr,
                )
            raise
        samples = distributed.gather_objects(usage.samples, cluster)  # every rank's, on rank 0
    if not cluster.is_main:
        return None
    begun = (state or {}).get("started", started)
    return Trained(result, record(result, cluster, device, threads, data_md5, begun, samples))


def record(result: training.TrainResult, cluster, device, threads: int, data_md5: str, started: float, samples) -> dict:
    """What only the training knows, for the export stage to log (see the module's docstring)."""
    metrics = {names.TRAIN_SECONDS: result.seconds}
    if cluster.distributed:
        metrics[names.DDP_WEIGHT_SPREAD] = result.weight_spread
        metrics.update({f"{names.TRAIN_SECONDS}_rank{r}": s for r, s in enumerate(result.rank_seconds)})
        print(
            f"{cluster.world_size} ranks, training seconds per rank {[round(s, 2) for s in result.rank_seconds]}, "
            f"largest weight difference between ranks {result.weight_spread:g}",
            file=sys.stderr,
        )
    return {
        "started": started,
        "ended": time.time(),
        "tags": {
            **environment.tags(device, threads, Path.cwd(), result.precision),
            names.DATA_MD5: data_md5,
            names.WORLD_SIZE: str(cluster.world_size),
            names.NODES: str(cluster.nodes),
        },
        "metrics": metrics,
        "history": [vars(m) for m in result.history],
        "system": [sample for rank_samples in samples for sample in rank_samples],
    }


# What differs from one run of the same training to the next (times, usage): kept out of the record that DVC hashes,
# so that dvc.lock stays as committed where the training gives the same digits, in a file beside it that names the
# record it belongs to (`runs.read_record` puts the two together again).
TIMES = ("started", "ended", "metrics", "system")
EPOCH_TIMES = ("seconds", "measured_at")


def split_record(record: dict) -> tuple[dict, dict]:
    """(what the same training on the same hardware always records, its times). The first's ``id``, a digest of it,
    tells the runs that record this training from those of another; the second names it in ``of``."""
    fixed = {key: value for key, value in record.items() if key not in TIMES}
    fixed["history"] = [{k: v for k, v in epoch.items() if k not in EPOCH_TIMES} for epoch in record["history"]]
    fixed = {"id": hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:32], **fixed}
    times = {key: record[key] for key in TIMES}
    times["epochs"] = [{k: epoch[k] for k in EPOCH_TIMES} for epoch in record["history"]]
    return fixed, {"of": fixed["id"], **times}
