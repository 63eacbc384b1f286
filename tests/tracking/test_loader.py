"""The one model loader: a model that would run code it carries is refused unless allowed."""

from __future__ import annotations

import mlflow
import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml.model import build
from mnist_pipeline.tracking import loader
from tests.helpers import log_onnx, tiny_model_config


def test_a_pickled_model_is_refused_unless_allowed(local_store, tmp_path):
    """The pipeline logs ONNX models (earlier versions: torch.export ones); a model stored with pickle could run
    any code when loaded."""
    import numpy as np

    model = build(tiny_model_config()).eval()
    example = np.zeros((4, 1, 28, 28), np.float32)  # as the export stage: a batch of more than one
    with mlflow.start_run():
        pickled = mlflow.pytorch.log_model(model, name="pickled", serialization_format="pickle").model_uri
        earlier = mlflow.pytorch.log_model(model, name="pt2", serialization_format="pt2", input_example=example,
                                           pip_requirements=["torch"]).model_uri  # fmt: skip
        safe = log_onnx(model, tmp_path)
    with pytest.raises(PipelineError, match=r"would run code it carries .* pass --allow-pickle only if you trust"):
        loader.load_model(pickled)
    digits = np.zeros((2, 1, 28, 28), np.float32)
    assert loader.load_model(safe)(digits).shape == (2, 10)
    assert loader.load_model(earlier)(digits).shape == (2, 10)
    assert loader.load_model(pickled, allow_pickle=True)(digits).shape == (2, 10)
