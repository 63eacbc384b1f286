"""Stage export: the ONNX file, checked against the trained model; then the pipeline's MLflow run.

This is the one stage that talks to MLflow, in its own process: it records the whole pipeline result as one run
(params, the training's record, the evaluation's metrics and figures, the data as an input, the ONNX model) and
registers the model (see ``runs`` and ``registry``).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config, names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic
from mnist_pipeline.stages import main, path


@dataclass(frozen=True)
class Paths:
    data: Path = path("folder written by the download stage")
    checkpoint: Path = path("the trained model")
    record: Path = path("the train stage's record of the training (JSON)")
    metrics: Path = path("the evaluate stage's metrics JSON (every key is logged as final_<key>)")
    robustness: Path = path("the robustness report's metrics JSON (logged as they are: robust_<distortion>_<strength>)")
    evaluation: list[Path] = path("the evaluate stage's figures and tables, logged with the run", many=True)
    onnx: Path = path("the ONNX file to write (the model that is registered)")
    report: Path = path("parity figures, the MLflow run id and the registered version (JSON)")


def run(params: config.Params, paths: Paths) -> None:
    """Export and check the ONNX file, record the run, log the ONNX model, check it through pyfunc, register it."""
    import torch

    from mnist_pipeline.ml import export
    from mnist_pipeline.ml.data import load_split, verify_folder
    from mnist_pipeline.ml.model import load_checkpoint, to_pixels
    from mnist_pipeline.tracking import loader, runs

    export_cfg = params.export
    record = runs.read_record(paths.record)
    model, _ = load_checkpoint(paths.checkpoint)
    verify_folder(paths.data)
    test_metrics = json.loads(paths.metrics.read_text())
    test = load_split(paths.data, "test")
    digits = to_pixels(torch.from_numpy(test.images[: export_cfg.parity_samples].copy()))  # (N, 1, 28, 28)

    def check(exported, fmt: str) -> export.Parity:
        result = export.check_parity(model, exported, digits, export_cfg.parity_tolerance, fmt)
        export.require_parity(result)  # a failed check stops here: nothing more is logged or registered
        print(f"{fmt} parity on {result.samples} test digits: max |logit diff| {result.max_abs_diff:.2e}")
        return result

    export.save_onnx(model, digits[:2], paths.onnx)
    checks = {"onnx": check(loader.load_file(paths.onnx), "ONNX")}
    registration, run_id = _record(params, paths, record, test_metrics, digits.numpy(), checks, check)
    report = {**{name: c.to_dict() for name, c in checks.items()}, "run_id": run_id, "registered": registration}
    write_atomic(paths.report, json.dumps(report, indent=2) + "\n")


def _record(params, paths: Paths, record, test_metrics, digits, checks, check) -> tuple[dict, str]:
    """The MLflow part: one run with everything, the logged model checked through pyfunc, then registered. A
    tracking server that stops answering, or a full disk, ends it in one line."""
    from mlflow.exceptions import MlflowException

    from mnist_pipeline import network
    from mnist_pipeline.tracking import store

    uri = store.tracking_uri()
    artifacts: list[str] = []  # where the run's artifacts go, once it has begun
    try:
        with store.exchange(uri):
            store.configure()
            return _log_and_register(params, paths, record, test_metrics, digits, checks, check, artifacts)
    except network.DeadlinePassed:
        raise PipelineError(
            f"the MLflow tracking server {uri} did not answer within {store.server_deadline_s():g} s "
            "(MLFLOW_HTTP_REQUEST_TIMEOUT); nothing was registered: check the server, then rerun `dvc repro`"
        ) from None
    except MlflowException as exc:
        if not store.is_server(uri):
            raise
        raise store.server_failure(uri, exc) from None
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        logged = [*paths.evaluation, paths.onnx, paths.onnx]
        raise disk_full(exc, artifacts[0] if artifacts else None, logged) from None


# No space on the disk, over the quota, or over the size a process may write (`ulimit -f`).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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


def _log_and_register(params, paths: Paths, record, test_metrics, digits, checks, check, artifacts: list[str]):
    import mlflow
    import numpy as np

    from mnist_pipeline.ml import data
    from mnist_pipeline.tracking import registry, runs

    dataset = params.data.dataset
    source = data.DATASETS[dataset].mirrors[0]
    with runs.pipeline_run(params, record) as run_id:
        artifacts.append(mlflow.get_artifact_uri())
        md5s = data.recorded_checksums(paths.data)  # verified when the stage began
        train_data = runs.dataset(dataset, data.fingerprint({n: md5s[n] for n in data.TRAIN_FILE_NAMES}), source)
        test_data = runs.dataset(dataset, data.fingerprint({n: md5s[n] for n in data.TEST_FILE_NAMES}), source)
        runs.log_inputs({"training": train_data, "testing": test_data})
        runs.log_training(record)
        runs.log_artifacts(paths.evaluation, "evaluation")
        runs.log_artifacts([paths.onnx], "exported")
        info = registry.log_onnx_model(paths.onnx, digits[:4], name=runs.model_name())
        runs.log_test_metrics(test_metrics, info.model_id, test_data)
        runs.log_metrics(json.loads(paths.robustness.read_text()))  # one per distortion: the run's, not in `compare`
        logged = np.asarray(registry.predict_with_logged_model(info.model_uri, digits))
        checks["mlflow_model"] = check(lambda _: logged, "MLflow model (ONNX, loaded through pyfunc)")
        runs.log_metrics({f"{name}_max_abs_logit_diff": c.max_abs_diff for name, c in checks.items()})
        if not params.export.register:
            print(f"not registered (export.register: false): the run {run_id} holds the model")
            return None, run_id
        registration = registry.register(
            info.model_uri, params.export.model_name, test_metrics[names.TEST_ACCURACY],
            params.export.promote_min_delta, robust_accuracy=test_metrics.get(names.ROBUST_ACCURACY),
            max_robust_drop=params.export.max_robust_drop,
        )  # fmt: skip
    return registration.to_dict(), run_id


if __name__ == "__main__":  # dvc.yaml runs python -m mnist_pipeline.stages.export
    main(sys.modules[__name__])
