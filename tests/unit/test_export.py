"""The ONNX export and the parity check that guards registration."""

from __future__ import annotations

import pytest
import torch

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import export, runtime
from mnist_pipeline.ml.model import build
from mnist_pipeline.tracking import loader
from tests.helpers import tiny_model_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build(tiny_model_config(conv_channels=(8, 16), hidden=32)).eval()


def test_argmax_disagreement_fails_even_within_tolerance(model):
    x = torch.rand(8, 1, 28, 28)

    def swapped(inputs):
        return model(torch.from_numpy(inputs)).roll(1, dims=1)  # the right logits under the wrong digits

    parity = export.check_parity(model, swapped, x, tolerance=1e9, fmt="test")
    assert parity.argmax_mismatches > 0 and not parity.ok


def test_onnx_matches_eager_model_and_a_broken_one_is_refused(tmp_path, model):
    x = torch.rand(300, 1, 28, 28)  # also a batch size the export never saw: the batch dimension is dynamic
    export.save_onnx(model, x[:2], tmp_path / "m.onnx")
    onnx_model = loader.load_model(tmp_path / "m.onnx")
    parity = export.check_parity(model, onnx_model, x, 1e-4, "ONNX")
    assert parity.ok and parity.samples == 300 and parity.max_abs_diff <= 1e-5
    with torch.no_grad():
        model.features[0].weight.mul_(1.01)  # the model moved on; the file did not
    broken = export.check_parity(model, onnx_model, x, 1e-4, "ONNX")
    with pytest.raises(PipelineError, match=r"^ONNX export differs from the trained model on 300 test digits"):
        runtime.require_parity(broken)


def test_the_onnx_file_answers_probabilities_and_the_digit_and_describes_itself(tmp_path, model):
    """Every client gets the probabilities and the digit beside the logits, and learns from the file itself what
    pixels it takes and what its outputs mean: before, it answered logits only and carried no metadata."""
    import onnx
    import onnxruntime

    export.save_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "model.onnx")
    about = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert "[0, 1]" in about["input"] and "light digit on a dark background" in about["input"]
    assert about["labels"].split(",") == [str(d) for d in range(10)]
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 28, 28)
    logits, probabilities, digit = session.run(["logits", "probabilities", "digit"], {"pixels": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(probabilities), torch.softmax(model(x), 1), atol=1e-5, rtol=0)
    assert digit.tolist() == model(x).argmax(1).tolist()
