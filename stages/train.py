"""Stage train: train the CNN, save the checkpoint and the per-epoch history, start the pipeline's MLflow run.

Run by torchrun (see dvc.yaml): with train.nproc > 1 each process trains on its shard of every batch; rank 0 alone
logs to MLflow and writes the outputs. After every epoch rank 0 saves a resumable state; it is removed once the
stage has succeeded, so its presence means a training that did not finish.
"""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from mnist_pipeline import config, distributed, tracking, training
from mnist_pipeline.data import fingerprint, load_split
from mnist_pipeline.errors import PipelineError, run_main
from mnist_pipeline.model import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True, help="folder written by the download stage")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="per-epoch metrics CSV (a DVC plot)")
    parser.add_argument("--run-file", type=Path, required=True, help="where to write the MLflow run id")
    parser.add_argument("--resume-state", type=Path, required=True, help="the last completed epoch's state")
    args = parser.parse_args()

    params = config.load(args.params)
    model_cfg, train_cfg = params.model, params.train
    cluster = distributed.from_env()
    device = training.resolve_device(train_cfg.device, cluster)
    threads = training.configure_threads(train_cfg.threads, cluster)
    data_md5 = fingerprint(args.data)
    train_data = training.Tensors.from_split(load_split(args.data, "train"), device)
    test_data = training.Tensors.from_split(load_split(args.data, "test"), device)
    state_key = training.state_fingerprint(model_cfg, train_cfg, data_md5)

    with distributed.process_group(cluster, device):
        resume = None
        if cluster.is_main:
            uri = tracking.configure()  # an unreachable store fails here, before any training
            resume = resumable_state(args.resume_state, state_key) if train_cfg.resume else None
        resume = distributed.broadcast(resume, cluster)
        tags = {**tracking.run_tags(device.type, torch.__version__), "cpu_threads": str(threads),
                "data_md5": data_md5, "world_size": str(cluster.world_size)}  # fmt: skip
        run = (
            tracking.start_run(config.flatten(params.sections()), tags, resume and resume["run_id"])
            if cluster.is_main
            else nullcontext(None)
        )
        with run as run_id:
            logger = EpochLogger(resume["logged_epochs"] if resume else 0)

            def checkpoint(state: dict) -> None:
                logged = {"logged_epochs": logger.logged, "run_id": run_id, "fingerprint": state_key}
                training.save_state(args.resume_state, {**state, **logged})

            try:
                result = training.train(
                    model_cfg, train_cfg, train_data, test_data, device, cluster=cluster, resume=resume,
                    on_epoch=logger.log if cluster.is_main else None, on_checkpoint=checkpoint,
                )  # fmt: skip
            except KeyboardInterrupt:
                if cluster.is_main and args.resume_state.exists():
                    print(f"interrupted: the last completed epoch is saved in {args.resume_state}; "
                          "`dvc repro` continues from it (train.resume: true)", file=sys.stderr)  # fmt: skip
                raise
            if not cluster.is_main:
                return
            save_checkpoint(args.checkpoint, result.model, model_cfg, {"train_config": train_cfg.to_dict()})
            training.write_history(args.history, result.history)
            logger.catch_up(result.history)
            if logger.lost is not None:
                raise PipelineError(
                    f"lost the MLflow store {uri} ({logger.lost}); training finished and is saved in "
                    f"{args.resume_state}: once the store answers again, `dvc repro` logs the epochs without "
                    "training again"
                )
            tracking.log_metrics({"train_seconds": result.seconds})
            if cluster.distributed:
                per_rank = {f"train_seconds_rank{r}": s for r, s in enumerate(result.rank_seconds)}
                tracking.log_metrics({"ddp_weight_spread": result.weight_spread, **per_rank})
                print(f"{cluster.world_size} ranks, training seconds per rank "
                      f"{[round(s, 2) for s in result.rank_seconds]}, largest weight difference between ranks "
                      f"{result.weight_spread:g}", file=sys.stderr)  # fmt: skip
            tracking.write_run_file(args.run_file, run_id, uri)
        args.resume_state.unlink(missing_ok=True)  # done: nothing left to resume


def resumable_state(path: Path, key: str) -> dict | None:
    """The saved state at ``path`` if it belongs to this very training (params, data, code) and its MLflow run is
    still in the store; a state that does not is set aside (its run marked KILLED if it was left RUNNING)."""
    state = training.load_state(path)
    if state is None:
        return None
    if state.get("fingerprint") == key and tracking.run_exists(state.get("run_id", "")):
        return state
    if tracking.run_status(state.get("run_id", "")) == "RUNNING":
        tracking.mark_killed(state["run_id"])
    print(f"{path} is from another training (params, data or code changed): starting over", file=sys.stderr)
    return None


class EpochLogger:
    """Logs each epoch's metrics to MLflow; if the store stops answering, training goes on and the epochs not
    logged are counted, so that a rerun logs them (`catch_up`) without training again."""

    def __init__(self, logged: int):
        self.logged = logged  # epochs already in the MLflow run
        self.lost: str | None = None

    def log(self, m: training.EpochMetrics) -> None:
        if self.lost is not None or m.epoch <= self.logged:
            return
        try:
            tracking.log_epoch(m.epoch, {"train_loss": m.train_loss, "test_loss": m.test_loss,
                                         "test_accuracy": m.test_accuracy})  # fmt: skip
        except Exception as exc:
            self.lost = f"{type(exc).__name__} at epoch {m.epoch}"
            print(f"warning: could not log epoch {m.epoch} to MLflow ({exc!s:.200}); training goes on",
                  file=sys.stderr)  # fmt: skip
            return
        self.logged = m.epoch

    def catch_up(self, history: list[training.EpochMetrics]) -> None:
        """Log the epochs trained before an interruption but not logged then (a resumed run)."""
        for m in history:
            self.log(m)


if __name__ == "__main__":
    run_main(main)
