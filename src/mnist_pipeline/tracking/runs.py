"""The pipeline's MLflow run: one per pipeline result, recorded by the export stage from the files the stages wrote.

The train and evaluate stages write files (the training's record, the history, the metrics, the figures); the
export stage opens one run and logs all of it, with the params of every section as they are now: a run's params
are always the ones that made its results. When the train stage did not run again (an evaluate or export param
changed), the new run still carries the training's epochs and tags, and names the run that first recorded that
training (``pipeline.training_run``); its start time is then its own, not the training's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_USER

from mnist_pipeline import config, names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import credentials, server, store


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def run_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The run's tags: the training's (``env.*``, data fingerprint), the commit, the DVC experiment, who has it open."""
    from mnist_pipeline.tracking.repair import owner

    commit = git_commit()
    tags = {
        **record["tags"],
        names.GIT_COMMIT: commit,
        names.GIT_COMMIT_MLFLOW: commit,
        names.OWNER: owner(),
        names.TRAINING_ID: record["id"],
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags[names.DVC_EXP_NAME] = os.environ["DVC_EXP_NAME"]
    return tags


def git_commit() -> str:
    """The commit the code ran from: the experiment's baseline under `dvc exp run`, else HEAD."""
    import subprocess

    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def param_value(value: Any) -> str:
    """A param as MLflow shows it: a list as its items ("16, 32"), a mapping as "key: value" pairs."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "{}"
    return str(value)


# The colours the UI draws runs in (MLflow's run colour tag; unset, it picks one by the run's id, and two of three
# runs may share one): the 20 of Vega's category20, each new run one its 19 latest runs do not have.
RUN_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)
MLFLOW_RUN_COLOR = "mlflow.runColor"


def colour(client: MlflowClient, experiment_id: str) -> str:
    """The colour of a new run: the first of RUN_COLOURS none of the experiment's latest 19 runs is drawn in."""
    latest = client.search_runs(
        [experiment_id], max_results=len(RUN_COLOURS) - 1, order_by=["attributes.start_time DESC"]
    )
    taken = {run.data.tags.get(MLFLOW_RUN_COLOR) for run in latest}
    return next(c for c in RUN_COLOURS if c not in taken)


@contextmanager
def pipeline_run(params: config.Params, record: Mapping[str, Any]) -> Iterator[str]:
    """A new run of the pipeline's experiment for the length of the block, with every param and the training's
    tags; it ends FINISHED, KILLED when interrupted, or FAILED (its models still PENDING marked FAILED)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(names.EXPERIMENT)
    tags = run_tags(record)
    first = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{names.TRAINING_ID}` = '{record['id']}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if first:
        tags[names.TRAINING_RUN] = first[0].info.run_id
    start = None if first else _ms(record["started"])  # the training is part of this run's time only the first time
    tags[MLFLOW_RUN_COLOR] = colour(client, experiment.experiment_id)
    run = client.create_run(
        experiment.experiment_id,
        start_time=start,
        tags=with_context(tags),
        run_name=os.environ.get("DVC_EXP_NAME") or None,
    )
    run_id = run.info.run_id
    if experiment.tags.get(RUNS_VIEW_TAG) != runs_view():
        client.set_experiment_tag(experiment.experiment_id, RUNS_VIEW_TAG, runs_view())
    mlflow.start_run(run_id=run_id)
    try:
        mlflow.log_params({key: param_value(value) for key, value in flat_params(params).items()})
        yield run_id
    except KeyboardInterrupt:
        _end(client, run_id, "KILLED")
        raise
    except BaseException:
        _end(client, run_id, "FAILED")
        raise
    mlflow.end_run("FINISHED")


def with_context(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` over MLflow's own context tags (source: this script, user, git), as `mlflow.start_run` adds them.
    On a server with logins the run's user is the one logged in (say, from a netrc), not the machine's."""
    from mlflow.tracking.context.registry import resolve_tags

    uri = mlflow.get_tracking_uri()
    login = credentials.user(uri) if server.is_server(uri) else None
    return resolve_tags(dict(tags)) | ({MLFLOW_USER: login} if login else {})


def flat_params(params: config.Params) -> dict[str, Any]:
    return {
        f"{s.SECTION}.{key}": value for s in params.sections() if s.SHAPES_RESULTS for key, value in s.to_dict().items()
    }


END_DEADLINE_S = 10  # to end a failed run on a server that may be what failed


def _end(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run that did not finish, and fail the models it left half-logged, within a few seconds. The store
    itself may be what failed: then the next command that opens it repairs both (`repair`)."""
    from mnist_pipeline import network

    try:
        with server.exchange(mlflow.get_tracking_uri()), network.time_limit(END_DEADLINE_S, "ending the run"):
            experiment = client.get_run(run_id).info.experiment_id
            for model in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
                if model.status == LoggedModelStatus.PENDING:
                    client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            mlflow.end_run(status)
    except (Exception, network.DeadlinePassed):  # noqa: BLE001 - the error on its way out says what happened
        pass


def log_training(record: Mapping[str, Any]) -> None:
    """The training's epochs (step = epoch, at the time each was measured), its timing and the system metrics
    sampled while it ran (``system/...``, per rank under torchrun)."""
    from mnist_pipeline.ml.history import EpochMetrics

    run_id = mlflow.active_run().info.run_id
    metrics = []
    for values in record["history"]:
        epoch = EpochMetrics(**values)
        at = _ms(epoch.measured_at or record["ended"])
        metrics += [Metric(key, float(value), at, epoch.epoch) for key, value in epoch.metrics().items()]
    ended = _ms(record["ended"])
    metrics += [Metric(key, float(value), ended, 0) for key, value in record["metrics"].items()]
    ranks = sorted({(sample.get("node", 0), sample["rank"]) for sample in record["system"]})
    nodes = {node for node, _ in ranks}
    for node, rank in ranks:  # as MLflow's own monitor names them: system/<metric>, or system/<node>/<metric>
        prefix = "system/" if len(ranks) == 1 else f"system/rank_{rank}/"
        prefix = f"system/node_{node}_rank_{rank}/" if len(nodes) > 1 else prefix
        samples = [sample for sample in record["system"] if sample["rank"] == rank]
        for step, sample in enumerate(samples):
            at = _ms(sample["time"])
            metrics += [Metric(prefix + key, float(value), at, step) for key, value in sample["values"].items()]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
        MlflowClient().log_batch(run_id, metrics=metrics[start : start + 1000])


def dataset(name: str, digest: str, source_url: str):
    """The data as MLflow records it: a name, a digest of its files and where it is published (no copy of it)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    return MetaDataset(HTTPDatasetSource(source_url), name=name, digest=digest)


def log_test_metrics(metrics: Mapping[str, float], model_id: str, test_data) -> None:
    """The evaluate stage's figures, against the run, its logged model and the test data: the Models tab and
    `mlflow.search_logged_models(order_by=...)` rank models by them. Each accuracy also in percent
    (``final_test_accuracy_percent``): the UI's charts round to two places, where 99.16% and 98.99% both read
    0.99."""
    for key, value in metrics.items():
        mlflow.log_metric(names.FINAL + key, float(value), model_id=model_id, dataset=test_data)
        if "accuracy" in key:  # to two places, as the charts label it (the fraction keeps every digit)
            mlflow.log_metric(
                names.FINAL + key + names.PERCENT, round(100 * float(value), 2), model_id=model_id, dataset=test_data
            )


# The runs table as `mnist-pipeline ui` opens it: MLflow's own shared view (the experiment tag
# mlflow.sharedViewState.<key>, opened by the address's viewStateShareKey). Best run first; the figures that tell
# runs apart, then the params users change.
RUNS_VIEW_KEY = "runs-apart"
RUNS_VIEW_TAG = "mlflow.sharedViewState." + RUNS_VIEW_KEY
RUNS_VIEW_METRICS = [
    names.FINAL + names.TEST_ACCURACY + names.PERCENT,
    names.FINAL + names.TEST_ERRORS,
    names.FINAL + names.ROBUST_ACCURACY + names.PERCENT,
    names.FINAL + names.TEST_LOSS,
]
RUNS_VIEW_PARAMS = [
    "train.epochs",
    "train.lr",
    "train.batch_size",
    "train.optimizer",
    "train.lr_schedule",
    "train.seed",
    "model.conv_channels",
    "model.hidden",
    "model.dropout",
    "data.dataset",
]


def runs_view() -> str:
    """The runs table's view (see RUNS_VIEW_KEY), as MLflow's "Share" button stores it."""
    import json

    columns = [f"tags.`{names.CHAMPION}`"]
    columns += [f"metrics.`{m}`" for m in RUNS_VIEW_METRICS] + [f"params.`{p}`" for p in RUNS_VIEW_PARAMS]
    return json.dumps(
        {
            "orderByKey": f"metrics.`{names.FINAL + names.TEST_ACCURACY}`",
            "orderByAsc": False,
            # Reproductions repeat a run's figures (MLflow nests them under it only in a table sorted by time): the
            # filter, shown in the search box, leaves them out; clearing it shows them.
            "searchFilter": f"tags.`{names.REPRODUCES}` IS NULL",
            "selectedColumns": columns,
            "columnOrder": columns,  # as listed, not alphabetically
        }
    )


def log_inputs(datasets: Mapping[str, Any]) -> None:
    """The data the run used, one input per context (``training``, ``testing``): the runs table's Dataset column.

    A dataset is one row of the experiment, shared by every run that used the same data; two machines logging a new
    one at once both insert it, and the later is refused (`store.despite_insert_races` logs it again)."""
    for context, data in datasets.items():
        store.despite_insert_races(partial(mlflow.log_input, data, context=context))


def model_name() -> str:
    """The logged model's name: the run's (the DVC experiment's when there is one), so that the Models tab says which
    run each model came from."""
    return mlflow.active_run().info.run_name


def log_metrics(metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def read_record(path: Path, times: Path | None = None) -> dict[str, Any]:
    """The train stage's record of its training with its ``times`` (`mnist_pipeline.ml.trainer.split_record`).
    Times of another training, or none (DVC restored the train stage from its run cache, which holds no times),
    leave the run its epochs and tags without times or usage, and say so."""
    import json
    import sys
    import time

    try:
        record = json.loads(Path(path).read_text())
        record["id"], record["history"], record["tags"]  # noqa: B018 - present, or the file is not a record
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run the train stage first (`dvc repro train`)") from None
    except (ValueError, KeyError, TypeError):
        raise PipelineError(
            f"{path} is not a training record written by the train stage; rerun `dvc repro -f train`"
        ) from None
    varying = _times_of(record, times) if times else None
    if varying is None:
        print(f"note: {times} holds no times of this training: the run records it without times", file=sys.stderr)
        now = time.time()
        varying = {"started": now, "ended": now, "metrics": {}, "system": [], "epochs": [{}] * len(record["history"])}
    for epoch, epoch_times in zip(record["history"], varying["epochs"], strict=True):
        epoch.update({key: epoch_times.get(key) for key in ("seconds", "measured_at")})
    return {**record, **{key: varying[key] for key in ("started", "ended", "metrics", "system")}}


def _times_of(record: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    """The times in ``path`` when they are whole and this record's own (``of`` is its id), else None: the file is
    not read by DVC, so anything may be there (another training's, a damaged or a hand-made one)."""
    import json

    try:
        varying = json.loads(Path(path).read_text())
        whole = (
            varying["of"] == record["id"]
            and all(isinstance(varying[key], (int, float)) for key in ("started", "ended"))
            and all(isinstance(value, (int, float)) for value in varying["metrics"].values())
            and all(isinstance(s["time"], (int, float)) and isinstance(s["values"], dict) for s in varying["system"])
            and all(isinstance(s["rank"], int) for s in varying["system"])
            and len(varying["epochs"]) == len(record["history"])
            and all(isinstance(epoch, dict) for epoch in varying["epochs"])
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return varying if whole else None
