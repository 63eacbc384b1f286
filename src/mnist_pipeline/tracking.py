"""Every MLflow call of the project: where the store is, the run shared by the stages, and the registry.

Store: ``MLFLOW_TRACKING_URI`` when set; otherwise an embedded SQLite database ``mlruns/mlflow.db`` with
artifacts in ``mlruns/artifacts``, both resolved to absolute paths from the project root. ``dvc exp run
--temp/--queue`` runs stages in a copy under ``<root>/.dvc/tmp/exps/``; the root is found from that copy, so
those experiments still log to the user's store rather than into a copy that is deleted afterwards.

Run handoff: the train stage starts the run and writes its id to a small JSON file (a DVC out) that the
evaluate and export stages read to log into the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
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
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic

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


def configure(root: Path | None = None) -> str:
    """Point MLflow at the store (see the module docstring), make sure the experiment exists, return the URI."""
    uri = tracking_uri(root)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # The embedded store; MLflow keeps the artifacts beside the database, in mlruns/<experiment id>/.
        (project_root(root) / STORE_DIR).mkdir(exist_ok=True)
    _check_sqlite_path(uri)
    _check_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_init_lock(uri):
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
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening a local SQLite store between processes.

    Two pipelines starting at once on a store that does not exist yet (queued experiments with ``-j 2``) would
    both run MLflow's schema migrations and one would fail ("duplicate column name"); a file lock beside the
    database makes the second wait until the first has created it.
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


def git_commit() -> str:
    """The commit the code ran from: the experiment's baseline under `dvc exp run`, else HEAD."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(device: str, torch_version: str) -> dict[str, str]:
    commit = git_commit()
    tags = {
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "device": device,
        "torch_version": torch_version,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        tags["mlflow.runName"] = os.environ["DVC_EXP_NAME"]
    return tags


# --- the run shared by the train, evaluate and export stages ---------------------------------------------


def write_run_file(path: Path, run_id: str, tracking_uri: str) -> None:
    write_atomic(path, json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}, indent=2) + "\n")


def read_run_file(path: Path) -> str:
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run the train stage first (`dvc repro train`)") from None
    except (ValueError, KeyError, TypeError):
        raise PipelineError(
            f"{path} is not a run file written by the train stage; rerun `dvc repro -f train`"
        ) from None


@contextmanager
def start_run(params: Mapping[str, Any], tags: Mapping[str, str], run_id: str | None = None) -> Iterator[str]:
    """Start the pipeline's MLflow run (train stage), or reopen ``run_id`` to go on with an interrupted one.

    The run ends FINISHED, KILLED when interrupted (Ctrl-C, SIGTERM) or FAILED on an error, so no run stays
    RUNNING after a signal that can be caught.
    """
    run = mlflow.start_run(tags=dict(tags)) if run_id is None else mlflow.start_run(run_id=run_id)
    with _ending():
        if run_id is None:
            mlflow.log_params(dict(params))
        yield run.info.run_id


@contextmanager
def resume_run(run_id: str) -> Iterator[str]:
    """Reopen the run the train stage started (evaluate and export stages)."""
    if run_status(run_id) is None:
        raise PipelineError(
            f"MLflow run {run_id} is not in the store {mlflow.get_tracking_uri()}; "
            "was MLFLOW_TRACKING_URI changed? Rerun the whole pipeline with `dvc repro -f train`"
        )
    mlflow.start_run(run_id=run_id)
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


class EpochLogger:
    """Logs each epoch's metrics into the active run, once. If the store stops answering, training goes on: the
    epochs not logged are noted (``lost``), and a resumed run logs them later with `log` again."""

    def __init__(self, logged: int = 0):
        self.logged = logged  # epochs the run already holds
        self.lost: str | None = None  # what went wrong, once the store stopped answering

    def log(self, epoch: int, metrics: Mapping[str, float], log: TextIO | None = None) -> None:
        if self.lost is not None or epoch <= self.logged:
            return
        try:
            log_epoch(epoch, metrics)
        except Exception as exc:
            self.lost = f"{type(exc).__name__} at epoch {epoch}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(f"warning: could not log epoch {epoch} to MLflow; training goes on ({self.lost})",
                  file=log or sys.stderr)  # fmt: skip
            return
        self.logged = epoch


def log_metrics(metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


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


def log_model(model, input_example: np.ndarray, pip_requirements: list[str]) -> str:
    """Log ``model`` to the active run with signature and input example; returns its ``models:/<id>`` URI."""
    import mlflow.pytorch  # heavy; only the export stage needs it
    from mlflow.models import infer_signature

    with torch.inference_mode():
        output = model(torch.from_numpy(input_example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(input_example, output),
        input_example=input_example,
        serialization_format="pt2",  # torch.export: loads without pickle and without this project's code
        pip_requirements=pip_requirements,
    )
    return info.model_uri


def fetch_model(model_uri: str, allow_pickle: bool = False) -> Path:
    """Download an MLflow PyTorch model and return its folder; refuse one stored with pickle unless allowed.

    The pipeline logs models in the torch.export format, which loads as data. A model saved with pickle (MLflow's
    other format) runs whatever code its author put in it when it is loaded, so it needs the user's explicit
    ``allow_pickle``.
    """
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavor = yaml.safe_load((local / "MLmodel").read_text()).get("flavors", {}).get("pytorch")
    if flavor is None:
        raise PipelineError(f"model {model_uri} is not a PyTorch model logged with MLflow")
    if not (local / flavor.get("model_data", "data") / "model.pt2").is_file() and not allow_pickle:
        raise PipelineError(
            f"model {model_uri} is stored with pickle, and loading it would run any code it contains; pass "
            "--allow-pickle only if you trust where it came from"
        )
    return local


def load_model(model_uri: str, allow_pickle: bool = False):
    """Load an MLflow PyTorch model for inference on the CPU (see `fetch_model` for the pickle rule)."""
    import mlflow.pytorch

    return mlflow.pytorch.load_model(str(fetch_model(model_uri, allow_pickle)), map_location="cpu")


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
