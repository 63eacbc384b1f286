"""Every MLflow call of the project: where the store is, the pipeline's run, and the registry.

Store: ``MLFLOW_TRACKING_URI`` when set; otherwise an embedded SQLite database ``mlruns/mlflow.db`` with
artifacts in ``mlruns/artifacts``, both resolved to absolute paths from the project root. ``dvc exp run
--temp/--queue`` runs stages in a copy under ``<root>/.dvc/tmp/exps/``; the root is found from that copy, so
those experiments still log to the user's store rather than into a copy that is deleted afterwards.

The stages call these functions through their tracking process (``tracker``), so the ones it may call take and
return plain JSON values. The train stage starts the run and hands its id to the evaluate and export stages in
a small JSON file (a DVC out). The registered model is the ONNX file, logged with MLflow's ``onnx`` flavor: it
loads through ``mlflow.pyfunc`` with onnxruntime alone, without pickle, torch or this project, on a machine
with or without a GPU.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_pipeline.errors import PipelineError

EXPERIMENT_NAME = "mnist-pipeline"
STORE_DIR = "mlruns"
ALIAS_CANDIDATE = "candidate"
ALIAS_CHAMPION = "champion"


def project_root(cwd: Path | None = None) -> Path:
    """The user's project root, also from inside a DVC experiment's temporary copy of it."""
    root = Path(os.environ.get("DVC_ROOT") or cwd or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def warm_up(root: Path | None = None) -> None:
    """Import what `configure` will need for this store (the SQLite store's modules take a second)."""
    if tracking_uri(root).startswith("sqlite:"):
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def configure(root: Path | None = None) -> str:
    """Point MLflow at the store (see the module docstring), make sure the experiment exists, return the URI."""
    uri = tracking_uri(root)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # The embedded store; MLflow keeps the artifacts beside the database, in mlruns/<experiment id>/.
        (project_root(root) / STORE_DIR).mkdir(exist_ok=True)
    _check_sqlite_path(uri)
    _check_server(uri)
    # MLflow announces at INFO level that it creates (or upgrades) the tables of a new SQLite store: noise in a
    # pipeline whose store is created on first use as a matter of course. Its warnings and errors still show.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            client = MlflowClient()  # the first client of a new SQLite store creates its schema
            if client.get_experiment_by_name(EXPERIMENT_NAME) is None:
                client.create_experiment(EXPERIMENT_NAME)
            mlflow.set_experiment(EXPERIMENT_NAME)
    except Exception as exc:  # connection refused, unreadable database, ...
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise PipelineError(
            f"cannot use the MLflow store {uri} ({type(exc).__name__}: {first_line}); "
            "check MLFLOW_TRACKING_URI, or unset it to use the local store in mlruns/"
        ) from None
    return uri


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise a read-then-write on a local SQLite store between processes.

    Two pipelines starting at once (queued experiments with ``-j 2``, two ``dvc exp run --temp``) would both run
    MLflow's schema migrations on a new store, and one would fail ("duplicate column name"); both would register a
    version, and the one that got the older version could move ``candidate`` last. A file lock beside the database
    makes the second wait until the first is done.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock, as before
        yield
        return
    with open(uri.removeprefix("sqlite:///") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_sqlite_path(uri: str) -> None:
    """Fail at once on an unusable SQLite path; MLflow itself retries for about two minutes."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists() and not path.is_file():
        problem = "is not a file"
    elif not path.exists() and not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
        problem = "cannot be created (its folder is missing or not writable)"
    else:
        return
    raise PipelineError(f"MLflow store {uri}: {path} {problem}; check MLFLOW_TRACKING_URI")


# MLflow retries an unanswered HTTP request 7 times with a doubling back-off: minutes before an error. A pipeline
# should rather fail fast (or, mid-run, go on training without the server); values the user sets win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PROBE_TIMEOUT_S = 5


def _check_server(uri: str) -> None:
    """One quick request to a tracking server's /health before anything else; a one-line error if it is down."""
    if not uri.startswith(("http://", "https://")):
        return
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answers (perhaps asking for credentials, which MLflow's own requests carry)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PipelineError(
            f"the MLflow tracking server {uri} does not answer ({reason}); check that it is running and "
            "reachable from here, or unset MLFLOW_TRACKING_URI to use the local store in mlruns/"
        ) from None


def tracking_uri(root: Path | None = None) -> str:
    """The URI `configure` uses, without touching the store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / STORE_DIR / 'mlflow.db'}"


# --- the run shared by the train, evaluate and export stages ---------------------------------------------


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
    run = mlflow.start_run(tags=dict(tags)) if run_id is None else mlflow.start_run(run_id=run_id)
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
    changed = {f"rerun.{k}": str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
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
    return max((m.step for m in MlflowClient().get_metric_history(run_id, "test_accuracy")), default=0)


def log_metrics(metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


# --- the model registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    name: str
    version: int
    model_uri: str
    aliases: tuple[str, ...]
    champion_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model_uri": self.model_uri,
            "aliases": list(self.aliases),
            "champion_reason": self.champion_reason,
        }


def _champion_accuracy(client: MlflowClient, name: str) -> tuple[int, float] | None:
    """(version, test accuracy) of the current champion, or None when there is none."""
    try:
        champion = client.get_model_version_by_alias(name, ALIAS_CHAMPION)
    except MlflowException:
        return None
    return int(champion.version), float(champion.tags.get("test_accuracy", "nan"))


ONNX_REQUIREMENTS = ("onnx", "onnxruntime")


def log_onnx_model(onnx_path: str | Path, example_path: str | Path) -> str:
    """Log the ONNX file as the run's MLflow model, with signature and input example (a ``.npy`` of digits);
    return its ``models:/<id>`` URI."""
    import importlib.metadata

    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    example = np.load(example_path)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: example})[0]
    info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        # The CPU provider everywhere: the model is small, and a machine with CUDA but onnxruntime's CPU build
        # (the usual install) then loads it exactly as one without.
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,  # one self-contained model.onnx
        pip_requirements=[f"{name}=={importlib.metadata.version(name)}" for name in ONNX_REQUIREMENTS],
    )
    return info.model_uri


def predict_with_logged_model(model_uri: str, digits_path: str | Path) -> list[list[float]]:
    """Logits of the logged model, loaded as users load it (``mlflow.pyfunc``), for the digits in a ``.npy``."""
    import mlflow.pyfunc

    output = mlflow.pyfunc.load_model(model_uri).predict(np.load(digits_path))
    return np.asarray(output["logits"] if isinstance(output, dict) else output).tolist()


def fetch_model(model_uri: str, allow_pickle: bool = False) -> tuple[Path, dict]:
    """Download an MLflow model; return its folder and its flavors. A PyTorch model stored with pickle is refused
    unless allowed.

    The pipeline registers ONNX models (earlier versions: PyTorch ``torch.export`` archives); both load as data.
    A model saved with pickle runs whatever code its author put in it when it is loaded, so it needs the user's
    explicit ``allow_pickle``.
    """
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavors = yaml.safe_load((local / "MLmodel").read_text()).get("flavors", {})
    if "onnx" in flavors:
        return local, flavors
    pytorch = flavors.get("pytorch")
    if pytorch is None:
        raise PipelineError(f"model {model_uri} is neither an ONNX nor a PyTorch model logged with MLflow")
    if not (local / pytorch.get("model_data", "data") / "model.pt2").is_file() and not allow_pickle:
        raise PipelineError(
            f"model {model_uri} is stored with pickle, and loading it would run any code it contains; pass "
            "--allow-pickle only if you trust where it came from"
        )
    return local, flavors


def load_model(model_uri: str, allow_pickle: bool = False):
    """A callable from (N, 1, 28, 28) float32 pixels (NumPy) to (N, 10) logits (NumPy), on the CPU.

    ONNX models run in onnxruntime, without importing torch; PyTorch ones (registered by earlier versions) need it.
    """
    local, flavors = fetch_model(model_uri, allow_pickle)
    if "onnx" in flavors:
        from mnist_pipeline.onnx_runtime import load_onnx

        return load_onnx(local / flavors["onnx"]["data"])
    import mlflow.pytorch
    import torch

    module = mlflow.pytorch.load_model(str(local), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def promotion(test_accuracy: float, champion: tuple[int, float] | None, min_delta: float) -> tuple[bool, str]:
    """Should a new version with ``test_accuracy`` become champion? Returns (decision, reason in one line)."""
    if champion is None:
        return True, "no champion yet"
    version, accuracy = champion
    if test_accuracy >= accuracy + min_delta:
        return True, f"test accuracy {test_accuracy:.4f} >= champion v{version}'s {accuracy:.4f} + {min_delta:g}"
    return False, f"kept champion v{version}: test accuracy {test_accuracy:.4f} < its {accuracy:.4f} + {min_delta:g}"


def register(
    model_uri: str, name: str, test_accuracy: float, min_delta: float = 0.0, log: TextIO | None = None
) -> Registration:
    """Register a logged model as a new version of ``name`` and move the aliases.

    ``candidate`` always moves to the new version; ``champion`` moves when the new version's test accuracy is at
    least the current champion's plus ``min_delta``, or when there is no champion yet. The decision and its reason
    are printed and kept as the version's ``promotion`` tag.
    """
    log = log or sys.stderr
    client = MlflowClient()
    with _store_lock(mlflow.get_tracking_uri()):  # versions get their aliases in the order they were created
        return _register(client, model_uri, name, test_accuracy, min_delta, log)


def _register(client: MlflowClient, model_uri: str, name: str, test_accuracy: float, min_delta: float,
              log: TextIO) -> Registration:  # fmt: skip
    champion = _champion_accuracy(client, name)  # before registering: the new version must not compete with itself
    run = mlflow.active_run()
    version = int(mlflow.register_model(model_uri, name).version)
    try:
        promote, reason = promotion(test_accuracy, champion, min_delta)
        tags = {
            "test_accuracy": f"{test_accuracy:.6f}",
            "run_id": run.info.run_id,
            "git_commit": run.data.tags.get("git_commit", "unknown"),
            "dvc_exp_name": run.data.tags.get("dvc_exp_name", ""),
            "promotion": reason,
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        client.update_model_version(
            name,
            str(version),
            description=f"MNIST CNN, test accuracy {100 * test_accuracy:.2f}%, run {run.info.run_id}",
        )
        client.set_registered_model_alias(name, ALIAS_CANDIDATE, str(version))
        aliases = [ALIAS_CANDIDATE]
        if promote:
            client.set_registered_model_alias(name, ALIAS_CHAMPION, str(version))
            aliases.append(ALIAS_CHAMPION)
    except BaseException:  # interrupted or failed half-way: no version without its tags and aliases
        with suppress(Exception):
            client.delete_model_version(name, str(version))
        raise
    print(f"registered {name} version {version} ({', '.join(aliases)}): {reason}", file=log)
    return Registration(name, version, f"models:/{name}/{version}", tuple(aliases), reason)
