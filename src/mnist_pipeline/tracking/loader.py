"""Loading a model: from a file or from the registry, whatever its format, as one callable from pixels to logits.

``predict``, ``serve``, ``reproduce``, the export stage's checks and the tests all load models here. What loads
by default cannot run code: ONNX (the registered model) is a protobuf graph that onnxruntime runs, without torch
or MLflow when it is a local file. Anything whose loader can unpickle is refused unless ``allow_pickle``, before
that loader reads a byte of it: a ``torch.export`` archive (``.pt2``, and the ``pytorch`` flavor of versions
registered by earlier releases: ``torch.export.load`` unpickles weights marked ``use_pickle``, sample inputs,
constants and legacy weight files with ``weights_only=False``), a PyTorch pickle, a pickled pyfunc model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import runtime

Model = Callable[[np.ndarray], np.ndarray]  # (N, 1, 28, 28) float32 pixels in [0, 1] -> (N, 10) logits

PICKLE_REFUSED = (
    "loading it would run code it carries ({why}); pass --allow-pickle only if you trust where it came from"
)
# What torch reads with pickle: refused by name unless allowed, never opened to find out what is inside.
PICKLE_SUFFIXES = {".pt2": "a torch.export archive, which torch unpickles in part"}
PICKLE_SUFFIXES |= dict.fromkeys((".pt", ".pth", ".pkl", ".ckpt", ".bin"), "a PyTorch or Python pickle")


def load_model(reference: str | Path | None = None, allow_pickle: bool = False) -> Model:
    """``reference``: a local ``.onnx`` or ``.pt2`` file, a version number of the project's registered model
    (``export.model_name``), an MLflow run id, or any MLflow model URI (``models:/mnist-cnn@champion``,
    ``models:/mnist-cnn/3``, ``runs:/<id>/model``); None: the champion (`champion`)."""
    reference = str(reference or champion())
    path = Path(reference)
    if path.suffix.lower() in (".onnx", *PICKLE_SUFFIXES) or path.is_file():
        return load_file(path, allow_pickle)
    if reference.isdigit():
        reference = f"models:/{registered_name()}/{reference}"
    elif re.fullmatch(r"[0-9a-f]{32}", reference):
        reference = f"runs:/{reference}/model"
    from mnist_pipeline.tracking import store

    try:
        with store.reading():
            store.configure(writes=False)
            local = fetch_model(reference, allow_pickle)
        return load_folder(local, reference)
    except PipelineError:
        raise
    except Exception as exc:  # MlflowException and friends: say which model and why, in one line
        raise PipelineError(f"model {reference}: {str(exc).splitlines()[0][:300]}") from None


def load_file(path: Path, allow_pickle: bool = False) -> Model:
    """An ONNX file in onnxruntime (no torch), or, with ``allow_pickle``, a ``torch.export`` archive."""
    if not path.is_file():
        raise PipelineError(f"model {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise PipelineError(f"model {path}: " + PICKLE_REFUSED.format(why=f"it is {PICKLE_SUFFIXES[suffix]}"))
    if suffix in PICKLE_SUFFIXES and suffix != ".pt2":
        raise PipelineError(f"model {path}: a PyTorch pickle is no model format this loads; export it to ONNX")
    if suffix != ".pt2":
        return runtime.onnx_runner(path)  # a protobuf graph: nothing in it is executed as Python
    import torch

    try:
        module = torch.export.load(str(path)).module()
    except Exception as exc:  # torch's own errors have no common base (SpecViolationError, zip, JSON, ...)
        raise PipelineError(f"model {path}: not a torch.export archive ({str(exc).splitlines()[0]})") from None

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def load_folder(local: Path, reference: str) -> Model:
    """An MLflow model folder `fetch_model` has checked: its ``onnx`` flavor's file, else its ``torch.export``
    archive."""
    flavors = _flavors(local, reference)
    if "onnx" in flavors:
        onnx_file = (local / flavors["onnx"]["data"]).resolve()
        if not onnx_file.is_relative_to(local.resolve()):
            raise PipelineError(f"model {reference}: its onnx flavor names a file outside the model's folder")
        return load_file(onnx_file)
    archive = _export_archive(local, flavors.get("pytorch"))
    if archive:  # `fetch_model` let it through with allow_pickle only, as everything below
        return load_file(archive, allow_pickle=True)
    import mlflow.pyfunc  # anything else, as MLflow loads it

    model = mlflow.pyfunc.load_model(str(local))
    return lambda x: np.asarray(model.predict(np.ascontiguousarray(x, dtype=np.float32)))


def fetch_model(model_uri: str, allow_pickle: bool = False, loader: str = "predict") -> Path:
    """Download an MLflow model and check that what ``loader`` will load of it is data, not code; return its folder.

    ``loader``: ``"predict"`` (`load_folder`) or ``"python_function"`` (what ``mlflow.pyfunc.load_model`` and the
    scoring server load: the module its ``loader_module`` names, with its ``code`` folder first on ``sys.path``).
    A flavor list that looks safe is not enough: a folder may carry an ``onnx`` flavor beside a
    ``python_function`` flavor that unpickles ``python_model.pkl``.
    """
    import mlflow

    # MLflow draws a progress bar for every download: noise before a command's own first line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Into a folder of our own: "downloading" from a local store hands back the store's own folder, and MLflow then
    # writes its registered_model_meta file there (into the store; an error on a read-only one).
    destination = None if Path(model_uri).exists() else _temporary_folder()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=destination))
    why = _code_it_would_run(local, _flavors(local, model_uri), loader)
    if why and not allow_pickle:
        raise PipelineError(f"model {model_uri}: " + PICKLE_REFUSED.format(why=why))
    return local


def _temporary_folder() -> str:
    """A folder removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="mnist-pipeline-model-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _flavors(local: Path, reference: str) -> dict:
    import yaml

    try:
        return yaml.safe_load((local / "MLmodel").read_text()).get("flavors") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        raise PipelineError(f"model {reference}: no readable MLmodel file; not an MLflow model") from None


def _code_it_would_run(local: Path, flavors: dict, loader: str) -> str | None:
    """Why loading this model with ``loader`` could run code it carries, or None when it loads as data only."""
    if loader == "python_function":
        pyfunc = flavors.get("python_function") or {}
        module = pyfunc.get("loader_module")
        if pyfunc.get("code"):
            return f"its python_function flavor puts its own code folder {pyfunc['code']!r} on the import path"
        if module == "mlflow.onnx":
            return None
        return f"its python_function flavor loads with {module or 'no loader'!r}, which unpickles"
    if "onnx" in flavors:
        return None
    if _export_archive(local, flavors.get("pytorch")):
        return "it is not ONNX; its PyTorch model is a torch.export archive, which torch unpickles in part"
    return "it is not ONNX; " + (
        "its PyTorch model is pickled" if "pytorch" in flavors else f"its flavors are {', '.join(flavors) or 'none'}"
    )


def _export_archive(local: Path, pytorch: dict | None) -> Path | None:
    archive = local / (pytorch or {}).get("model_data", "data") / "model.pt2"
    return archive if pytorch and archive.is_file() else None


def registered_name() -> str:
    """The project's registered model name: ``export.model_name`` in the project's params.yaml."""
    from mnist_pipeline import config
    from mnist_pipeline.tracking import store

    params = store.project_root() / "params.yaml"
    if not params.is_file():
        raise PipelineError(f"no params.yaml in {params.parent}: run this in the project, or name a model with --model")
    return config.load(params).export.model_name


def champion() -> str:
    """The URI of the project's champion: what `predict` and `serve` use unless told otherwise."""
    return f"models:/{registered_name()}@{names.ALIAS_CHAMPION}"
