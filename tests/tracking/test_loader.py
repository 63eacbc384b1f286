"""The one model loader: a model that would run code it carries is refused unless allowed, before any loader that
unpickles reads it."""

from __future__ import annotations

import logging
import shutil

import mlflow
import numpy as np
import pytest

from mnist_pipeline.commands import predict
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml.model import build
from mnist_pipeline.tracking import loader
from tests.helpers import PT2_CARRIERS, log_onnx, pt2_with_payload, tiny_model_config

DIGITS = np.zeros((2, 1, 28, 28), np.float32)


def test_a_pickled_model_is_refused_unless_allowed(local_store, tmp_path):
    """The pipeline logs ONNX models (earlier versions: torch.export ones); a model stored with pickle, or as a
    torch.export archive (which torch unpickles in part), could run any code when loaded."""
    model = build(tiny_model_config()).eval()
    example = np.zeros((4, 1, 28, 28), np.float32)  # as the export stage: a batch of more than one
    with mlflow.start_run():
        pickled = mlflow.pytorch.log_model(model, name="pickled", serialization_format="pickle").model_uri
        earlier = mlflow.pytorch.log_model(
            model, name="pt2", serialization_format="pt2", input_example=example, pip_requirements=["torch"]
        ).model_uri
        safe = log_onnx(model, tmp_path)
    for uri, why in [(pickled, "its PyTorch model is pickled"), (earlier, "a torch.export archive")]:
        with pytest.raises(PipelineError, match=rf"would run code it carries .*{why}.* pass --allow-pickle only if"):
            loader.load_model(uri)
    assert loader.load_model(safe)(DIGITS).shape == (2, 10)
    assert loader.load_model(earlier, allow_pickle=True)(DIGITS).shape == (2, 10)
    assert loader.load_model(pickled, allow_pickle=True)(DIGITS).shape == (2, 10)


@pytest.fixture(autouse=True)
def quiet_torch_export():
    logging.disable(logging.WARNING)  # torch.export.load's warnings about the legacy format and its pickle retries
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("carrier", PT2_CARRIERS)
def test_code_in_a_torch_export_archive_never_runs_unless_allowed(carrier, local_store, tmp_path, files):
    """A real .pt2 whose ``carrier`` is a pickle that writes a file: refused as a file, as an MLflow model folder
    of the pytorch flavor, and once registered, by predict and by serve's check; it runs with --allow-pickle (so
    the payload is real)."""
    marker = tmp_path / "payload-ran"
    archive = pt2_with_payload(build(tiny_model_config()), tmp_path / "evil.pt2", carrier, marker)
    folder = tmp_path / "mlflow-model"
    mlflow.pytorch.save_model(build(tiny_model_config()).eval(), folder, serialization_format="pt2",
                              input_example=DIGITS, pip_requirements=["torch"])  # fmt: skip
    shutil.copy(archive, folder / "data" / "model.pt2")
    with mlflow.start_run():
        mlflow.log_artifacts(str(folder), "model")
        source = mlflow.get_artifact_uri("model")
    version = mlflow.register_model(source, "evil").version

    for reference in (archive, folder, f"models:/evil/{version}", "models:/evil/1"):
        with pytest.raises(PipelineError, match=r"would run code it carries .*--allow-pickle") as refused:
            loader.load_model(reference)
        assert "\n" not in str(refused.value)
        with pytest.raises(PipelineError, match=r"--allow-pickle"):
            predict.main([files / "grey.png"], str(reference))
    for reference in (folder, "models:/evil/1"):
        with pytest.raises(PipelineError, match=r"would run code it carries .*--allow-pickle"):
            loader.fetch_model(str(reference), loader="python_function")  # what serve loads
    assert not marker.exists(), "the archive's pickle ran"

    try:
        loader.load_model(archive, allow_pickle=True)
    except PipelineError:
        pass  # the legacy weights' payload runs, then the archive is found inconsistent
    assert marker.exists(), "the payload is not one: allowed, it should have run"


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "weights.PT2"])
def test_a_pytorch_pickle_file_is_refused_by_name_without_being_opened(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04anything at all")
    with pytest.raises(PipelineError, match=r"would run code it carries .*pass --allow-pickle"):
        loader.load_model(path)
