"""The CNN's shapes and its checkpoint."""

from __future__ import annotations

import pytest
import torch

from mnist_pipeline.config import ModelConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml.model import build, load_checkpoint, save_checkpoint


@pytest.mark.parametrize(("channels", "kernel"), [((32,), 3), ((16, 32), 5), ((8, 16), 3), ((4,), 5)])
def test_output_is_logits_per_digit(channels, kernel):
    model = build(
        ModelConfig(
            conv_channels=channels, kernel_size=kernel, hidden=64, dropout=0.1, batch_norm=False, input_norm="mnist"
        )
    )
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_classic_lesson_shape():
    """One 3x3 conv of 32 channels, pooled: (B, 32, 13, 13) -> 5408 features, as in the lesson."""
    model = build(
        ModelConfig(conv_channels=(32,), kernel_size=3, hidden=128, dropout=0.0, batch_norm=False, input_norm="mnist")
    )
    assert model.features(torch.rand(2, 1, 28, 28)).shape == (2, 32, 13, 13)
    assert model.classifier[1].in_features == 5408


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    cfg = ModelConfig(
        conv_channels=(8, 16), kernel_size=3, hidden=32, dropout=0.0, batch_norm=False, input_norm="mnist"
    )
    model = build(cfg).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, cfg, {"train_config": {"lr": 0.01}})
    payload = torch.load(path, weights_only=True)  # no pickle of arbitrary objects needed
    assert payload["model_config"]["conv_channels"] == [8, 16]
    loaded, _ = load_checkpoint(path)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="bad.pt is not a valid checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(PipelineError, match="missing: run the train stage"):
        load_checkpoint(tmp_path / "none.pt")
