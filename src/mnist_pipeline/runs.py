"""The pipeline's MLflow run, shared by the train, evaluate and export stages.

The train stage starts the run and hands its id to the evaluate and export stages in a small JSON file (a DVC
out); they reopen it. The stages call these functions through their tracking process (``tracker``), so the ones
it may call take and return plain JSON values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError


def begin_run(params: Mapping[str, Any], tags: Mapping[str, str], run_id: str | None = None,
              must_exist: bool = False) -> str:  # fmt: skip
    """Start the pipeline's MLflow run with its params and tags, or reopen ``run_id``; return the run id.

    ``must_exist``: reopening a run the store does not have is an error (the evaluate and export stages), rather
    than a new run under that id.
    """
    if run_id is not None and run_status(run_id) is None and must_exist:
        raise PipelineError(
            f"MLflow run {run_id} is not in the store {mlflow.get_tracking_uri()}; "
            "was MLFLOW_TRACKING_URI changed? Rerun the whole pipeline with `dvc repro -f train`"
        )
    from mnist_pipeline.repair import owner

    run = mlflow.start_run(tags=dict(tags)) if run_id is None else mlflow.start_run(run_id=run_id)
    mlflow.set_tag(names.OWNER, owner())  # whoever has it open now: if this process dies, `repair` ends the run
    if run_id is None:
        mlflow.log_params(dict(params))
    return run.info.run_id


def end_run(status: str) -> None:
    """End the active run (if any) as FINISHED, KILLED or FAILED."""
    if mlflow.active_run() is not None:
        mlflow.end_run(status)


@contextmanager
def start_run(params: Mapping[str, Any], tags: Mapping[str, str], run_id: str | None = None) -> Iterator[str]:
    """`begin_run` for the length of a block, in this process; the run ends FINISHED, KILLED or FAILED."""
    started = begin_run(params, tags, run_id)
    with _ending():
        yield started


@contextmanager
def resume_run(run_id: str) -> Iterator[str]:
    """Reopen a run the store holds for the length of a block, in this process."""
    begin_run({}, {}, run_id, must_exist=True)
    with _ending():
        yield run_id


def run_status(run_id: str) -> str | None:
    """RUNNING, FINISHED, FAILED or KILLED; None when the store has no such run."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def mark_killed(run_id: str) -> None:
    """End a run left RUNNING by a process that was killed outright (kill -9, power loss)."""
    MlflowClient().set_terminated(run_id, "KILLED")


@contextmanager
def _ending() -> Iterator[None]:
    """End the active run with the status the block earned."""
    try:
        yield
    except KeyboardInterrupt:
        _end_quietly("KILLED")
        raise
    except BaseException:
        _end_quietly("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _end_quietly(status: str) -> None:
    try:
        mlflow.end_run(status)
    except Exception:  # the store itself may be what failed; the error on its way out says what happened
        pass


def log_params(params: Mapping[str, Any]) -> None:
    """Log params into the active run, keeping earlier values: MLflow forbids changing a logged param.

    A stage rerun alone (say, export after an export param changed) logs into the run that trained the model;
    a value that differs from the one logged at training is recorded as a tag ``rerun.<key>`` instead.
    """
    run = mlflow.active_run()
    logged = MlflowClient().get_run(run.info.run_id).data.params
    new = {k: v for k, v in params.items() if k not in logged}
    changed = {f"{names.RERUN}{k}": str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
    if new:
        mlflow.log_params(new)
    if changed:
        mlflow.set_tags(changed)


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    """One batched call per epoch: tracking stays a small fraction of training time."""
    now = int(time.time() * 1000)
    run_id = mlflow.active_run().info.run_id
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])


def logged_epochs(run_id: str) -> int:
    """The last epoch whose metrics the run holds (0 for none): what a resumed training need not log again."""
    return max((m.step for m in MlflowClient().get_metric_history(run_id, names.TEST_ACCURACY)), default=0)


def log_metrics(metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
