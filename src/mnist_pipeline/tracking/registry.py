"""The model registry: the logged model, its registered versions and their aliases, and loading a model back.

The registered model is the ONNX file, logged with MLflow's ``onnx`` flavor: it loads through ``mlflow.pyfunc``
with onnxruntime alone, without pickle, torch or this project, on a machine with or without a GPU. Each new
version becomes ``candidate``; ``champion`` moves to it when it is at least as accurate (see `promotion`).
"""

from __future__ import annotations

import os
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import store


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
        champion = client.get_model_version_by_alias(name, names.ALIAS_CHAMPION)
    except MlflowException:
        return None
    return int(champion.version), float(champion.tags.get(names.TEST_ACCURACY, "nan"))


ONNX_REQUIREMENTS = ("onnx", "onnxruntime")


def log_onnx_model(onnx_path: str | Path, example: np.ndarray, name: str):
    """Log the ONNX file as the run's MLflow model ``name``, with signature and input example (a batch of
    digits); return MLflow's ``ModelInfo`` (``model_id``, ``model_uri``)."""
    import importlib.metadata

    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: example})[0]
    return mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name=name,
        signature=infer_signature(example, output),
        input_example=example,
        # The CPU provider everywhere: the model is small, and a machine with CUDA but onnxruntime's CPU build
        # (the usual install) then loads it exactly as one without.
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,  # one self-contained model.onnx
        pip_requirements=[f"{name}=={importlib.metadata.version(name)}" for name in ONNX_REQUIREMENTS],
    )


def predict_with_logged_model(model_uri: str, digits: np.ndarray) -> list[list[float]]:
    """Logits of the logged model, loaded as users load it (``mlflow.pyfunc``), for ``digits``."""
    import mlflow.pyfunc

    output = mlflow.pyfunc.load_model(model_uri).predict(digits)
    return np.asarray(output["logits"] if isinstance(output, dict) else output).tolist()


PICKLE_REFUSED = (
    "loading it would run code it carries ({why}); pass --allow-pickle only if you trust where it came from"
)


def fetch_model(model_uri: str, allow_pickle: bool = False, loader: str = "predict") -> Path:
    """Download an MLflow model and check that what ``loader`` will load of it is data, not code; return its folder.

    ``loader``: ``"predict"`` (`load_model` below: the ``onnx`` flavor's file in onnxruntime, else the ``pytorch``
    flavor's ``torch.export`` archive) or ``"python_function"`` (what ``mlflow.pyfunc.load_model`` and the scoring
    server load: the module its ``loader_module`` names, with its ``code`` folder first on ``sys.path``). A flavor
    list that looks safe is not enough: a folder may carry an ``onnx`` flavor beside a ``python_function`` flavor
    that unpickles ``python_model.pkl``. Unless ``allow_pickle``, anything but ONNX or ``torch.export`` is refused.
    """
    import yaml

    # MLflow draws a progress bar for every download: noise before a command's own first line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    try:
        flavors = yaml.safe_load((local / "MLmodel").read_text()).get("flavors") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        raise PipelineError(f"model {model_uri}: no readable MLmodel file; not an MLflow model") from None
    why = _code_it_would_run(local, flavors, loader)
    if why and not allow_pickle:
        raise PipelineError(f"model {model_uri}: " + PICKLE_REFUSED.format(why=why))
    return local


def _code_it_would_run(local: Path, flavors: dict, loader: str) -> str | None:
    """Why loading this model with ``loader`` could run code it carries, or None when it loads as data only."""
    if loader == "python_function":
        pyfunc = flavors.get("python_function") or {}
        module = pyfunc.get("loader_module")
        if pyfunc.get("code"):
            return f"its python_function flavor puts its own code folder {pyfunc['code']!r} on the import path"
        if module == "mlflow.onnx":
            return None
        if module == "mlflow.pytorch" and _is_export_archive(local, flavors.get("pytorch")):
            return None
        return f"its python_function flavor loads with {module or 'no loader'!r}, which unpickles"
    if "onnx" in flavors:
        return None
    if _is_export_archive(local, flavors.get("pytorch")):
        return None
    return "it is neither ONNX nor a torch.export archive; " + (
        "its PyTorch model is pickled" if "pytorch" in flavors else f"its flavors are {', '.join(flavors) or 'none'}"
    )


def _is_export_archive(local: Path, pytorch: dict | None) -> bool:
    return bool(pytorch) and (local / pytorch.get("model_data", "data") / "model.pt2").is_file()


def load_model(model_uri: str, allow_pickle: bool = False):
    """A callable from (N, 1, 28, 28) float32 pixels (NumPy) to (N, 10) logits (NumPy), on the CPU.

    ONNX models run in onnxruntime, without importing torch; PyTorch ones (registered by earlier versions) need it.
    """
    import yaml

    local = fetch_model(model_uri, allow_pickle)
    flavors = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    if "onnx" in flavors:
        from mnist_pipeline.ml.onnx_runtime import load_onnx

        onnx_file = (local / flavors["onnx"]["data"]).resolve()
        if not onnx_file.is_relative_to(local.resolve()):
            raise PipelineError(f"model {model_uri}: its onnx flavor names a file outside the model's folder")
        return load_onnx(onnx_file)
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
    with store.lock(mlflow.get_tracking_uri()):  # versions get their aliases in the order they were created
        return _register(client, model_uri, name, test_accuracy, min_delta, log)


def _new_version(model_uri: str, name: str, tags: dict[str, str]):
    """``mlflow.register_model``, which also tells the logged model its version (the experiment's Models tab shows
    it), without the two lines it prints: the caller prints one that says more."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return mlflow.register_model(model_uri, name, tags=tags)


def _register(client: MlflowClient, model_uri: str, name: str, test_accuracy: float, min_delta: float,
              log: TextIO) -> Registration:  # fmt: skip
    champion = _champion_accuracy(client, name)  # before registering: the new version must not compete with itself
    run = mlflow.active_run()
    # Marked until it has all its tags: a registration that dies half-way leaves a version `repair` recognises.
    version = int(_new_version(model_uri, name, tags={names.REGISTERING: "1"}).version)
    print(f"registering {name} version {version}: tags, then aliases", file=log, flush=True)
    try:
        promote, reason = promotion(test_accuracy, champion, min_delta)
        tags = {
            names.TEST_ACCURACY: f"{test_accuracy:.6f}",
            "run_id": run.info.run_id,
            names.GIT_COMMIT: run.data.tags.get(names.GIT_COMMIT, "unknown"),
            names.DVC_EXP_NAME: run.data.tags.get(names.DVC_EXP_NAME, ""),
            "promotion": reason,
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        client.update_model_version(
            name,
            str(version),
            description=f"MNIST CNN, test accuracy {100 * test_accuracy:.2f}%, run {run.info.run_id}",
        )
        client.delete_model_version_tag(name, str(version), names.REGISTERING)  # complete: now it may get aliases
        client.set_registered_model_alias(name, names.ALIAS_CANDIDATE, str(version))
        aliases = [names.ALIAS_CANDIDATE]
        if promote:
            client.set_registered_model_alias(name, names.ALIAS_CHAMPION, str(version))
            aliases.append(names.ALIAS_CHAMPION)
    except BaseException:  # interrupted or failed half-way: no version without its tags and aliases
        with suppress(Exception):
            client.delete_model_version(name, str(version))
        raise
    print(f"registered {name} version {version} ({', '.join(aliases)}): {reason}", file=log)
    return Registration(name, version, f"models:/{name}/{version}", tuple(aliases), reason)
