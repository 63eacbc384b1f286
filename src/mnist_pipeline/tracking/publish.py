"""The export stage's work, all of it in MLflow: the pipeline's result recorded as one run and its model registered.

The run holds every param, the training's record (per-epoch metrics, the ``env.*`` tags, CPU and memory), the
evaluation's metrics and figures, the data as inputs and the ONNX file the evaluate stage exported and measured,
logged as the run's MLflow model. That model is loaded back through ``mlflow.pyfunc``, as users load it, and
checked against the file before it is registered (see ``registry``). No torch: the ONNX file runs in onnxruntime.
A tracking server that stops answering, or a full disk, ends it in one line.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config, names, network
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import data, runtime
from mnist_pipeline.tracking import server, store

# No space on the disk, over the quota, or over the size a process may write (`ulimit -f`).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class Result:
    """What the stages before wrote, as the export stage reads it."""

    data: Path  # the download stage's folder
    onnx: Path  # the model, exported and checked by the evaluate stage
    record: dict  # the train stage's record (`runs.read_record`)
    metrics: dict  # the evaluate stage's metrics
    robustness: dict  # the robustness report: the accuracy per distortion and strength
    parity: dict  # the ONNX file against the trained model
    evaluation: list[Path]  # figures and tables


def publish(params: config.Params, result: Result) -> dict:
    """Record the run, log and check its model, register it; return the report (parity, run id, registration)."""
    from mlflow.exceptions import MlflowException

    uri = store.tracking_uri()
    artifacts: list[str] = []  # where the run's artifacts go, once it has begun
    try:
        with server.exchange(uri):
            store.configure()
            return _log_and_register(params, result, artifacts)
    except network.DeadlinePassed:
        raise PipelineError(
            f"the MLflow tracking server {uri} did not answer within {server.deadline_s():g} s "
            "(MLFLOW_HTTP_REQUEST_TIMEOUT); nothing was registered: check the server, then rerun `dvc repro`"
        ) from None
    except MlflowException as exc:
        if not server.is_server(uri):
            raise
        raise server.failure(uri, exc) from None
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise disk_full(exc, artifacts[0] if artifacts else None, [*result.evaluation, result.onnx]) from None


def _log_and_register(params: config.Params, result: Result, artifacts: list[str]) -> dict:
    import mlflow
    import numpy as np

    from mnist_pipeline.tracking import registry, runs

    dataset = params.data.dataset
    source = data.DATASETS[dataset].mirrors[0]
    test = data.load_split(result.data, "test")
    sizes = len(data.read_idx(result.data / "train-labels-idx1-ubyte", 1)), len(test.labels)  # for the model card
    digits = (test.images[: params.export.parity_samples, None] / np.float32(255)).astype(np.float32)  # (N, 1, 28, 28)
    with runs.pipeline_run(params, result.record) as run_id:
        artifacts.append(mlflow.get_artifact_uri())
        md5s = data.recorded_checksums(result.data)  # verified when the stage began
        train_data = runs.dataset(dataset, data.fingerprint({n: md5s[n] for n in data.TRAIN_FILE_NAMES}), source)
        test_data = runs.dataset(dataset, data.fingerprint({n: md5s[n] for n in data.TEST_FILE_NAMES}), source)
        runs.log_inputs({"training": train_data, "testing": test_data})
        runs.log_training(result.record)
        runs.log_artifacts(result.evaluation, "evaluation")
        runs.log_artifacts([result.onnx], "exported")
        about = {"mlflow_run_id": run_id, "training_id": result.record["id"]}
        info = registry.log_onnx_model(result.onnx, digits[:4], runs.model_name(), about)
        runs.log_test_metrics(result.metrics, info.model_id, test_data)
        logged = np.asarray(registry.predict_with_logged_model(info.model_uri, digits))
        what = "MLflow model (ONNX, loaded through pyfunc)"
        check = runtime.compare(runtime.onnx_runner(result.onnx)(digits), logged, params.export.parity_tolerance, what)
        runtime.require_parity(check)
        print(f"{check.format} parity on {check.samples} test digits: max |logit diff| {check.max_abs_diff:.2e}")
        checks = {"onnx": result.parity, "mlflow_model": check.to_dict()}  # required to pass: not metrics to chart
        registration = None
        if not params.export.register:
            print(f"not registered (export.register: false): the run {run_id} holds the model")
        else:
            scores = registry.Scores(
                result.metrics[names.TEST_ACCURACY],
                result.metrics.get(names.ROBUST_ACCURACY),
                report_name(result.robustness, params.evaluate),
            )
            registration = registry.register(
                info.model_uri,
                params.export.model_name,
                scores,
                registry.Rule(params.export.promote_min_delta, params.export.max_robust_drop),
                card=lambda uri: model_card(uri, result, dataset, train_data.digest, run_id, sizes),
            ).to_dict()
    return {**checks, "run_id": run_id, "registered": registration}


def report_name(robustness: dict, cfg: config.EvaluateConfig) -> str:
    """What a robust accuracy was measured on, named so that equal names mean comparable figures: the report's
    distortions and strengths (a digest of them), its digits and seed."""
    digest = data.md5_of(",".join(sorted(robustness)).encode())[:8]
    return f"{len(robustness)} distortions ({digest}), {cfg.robustness_samples} digits, seed {cfg.robustness_seed}"


def model_card(uri: str, result: Result, dataset: str, digest: str, run_id: str, sizes: tuple[int, int]) -> str:
    """A registered version's description: what it saw, how it scores, what it reads worst, how to call it."""
    metrics = result.metrics
    lines = [
        f"MNIST digit classifier (CNN, ONNX) from mnist-pipeline run {run_id}.",
        f"Data: {dataset}, trained on its {sizes[0]:,} training digits (data digest {digest}), measured on its "
        f"{sizes[1]:,} test digits.",
        f"Test accuracy {100 * metrics[names.TEST_ACCURACY]:.2f}% ({metrics[names.TEST_ERRORS]:.0f} wrong), test "
        f"loss {metrics[names.TEST_LOSS]:.4f}.",
    ]
    if names.ROBUST_ACCURACY in metrics and result.robustness:
        worst = sorted(result.robustness.items(), key=lambda item: item[1])[:3]
        named = ", ".join(
            f"{key.removeprefix('robust_').replace('_', ' ')}: {100 * value:.1f}%" for key, value in worst
        )
        lines.append(
            f"Robust accuracy {100 * metrics[names.ROBUST_ACCURACY]:.2f}% (the mean of the robustness "
            f"report's {len(result.robustness)} distortions, evaluation/robustness.csv); reads worst: "
            f"{named}."
        )
    # MLflow finds the registry through MLFLOW_TRACKING_URI: unset, it would look in ./mlflow.db (and make one).
    store = mlflow_store()
    lines += [
        f"Call it, from the project folder: `MLFLOW_TRACKING_URI={store}`, then "
        f'`mlflow.pyfunc.load_model("{uri}").predict(x)`, x float32 (N, 1, 28, 28) in [0, 1], a light digit on a '
        "dark background; it answers logits, probabilities and digit. Any image: "
        f"`mnist-pipeline predict digit.png --model {uri}`. Served: `mnist-pipeline serve --model {uri}`, or by "
        f"MLflow's own server: `MLFLOW_TRACKING_URI={store} mlflow models serve -m {uri} --env-manager local`.",
    ]
    return "\n\n".join(lines)


def mlflow_store() -> str:
    """The store as a command run from the project folder names it: the project's own database by its path from
    there, any other store (a server, a database elsewhere) as it is."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    own = f"sqlite:///{store.project_root() / store.STORE_DIR / store.DATABASE}"
    return f"sqlite:///{store.STORE_DIR}/{store.DATABASE}" if uri == own else uri


def disk_full(exc: OSError, artifacts: str | None, logged: list[Path]) -> PipelineError:
    """One line: what could not be written (the file, or the run's artifact folder when the file named is a source
    MLflow was copying from), the space left there, and what the run's artifacts need."""
    folder = Path((artifacts or ".").removeprefix("file://"))
    named = Path(exc.filename) if exc.filename else None
    if named is not None and artifacts and not named.resolve().is_relative_to(folder.resolve()):
        named = None  # MLflow writes a logged model to a temporary folder, then copies it into the artifacts
    where = named or folder
    existing = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    needed = sum(p.stat().st_size for p in logged if p.exists()) + 2**20  # the files, and MLflow's own (~100 KB)
    return PipelineError(
        f"cannot write {named or f'the run artifacts in {folder}'}: {exc.strerror}; {free / 1e6:.1f} MB free "
        f"there, the run's artifacts need about {needed / 1e6:.1f} MB: free some space, then rerun `dvc repro` "
        "(the run was ended FAILED, nothing was registered)"
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run the evaluate stage first (`dvc repro evaluate`)") from None
    except ValueError:
        raise PipelineError(f"{path} is not JSON: rerun `dvc repro -f evaluate`") from None
