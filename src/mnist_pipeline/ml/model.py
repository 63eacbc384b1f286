"""The CNN: the classic lesson's conv -> max-pool -> flatten -> two linear layers, with its sizes as params."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch import nn

from mnist_pipeline.config import ModelConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic

IMAGE_SIZE = 28
NUM_CLASSES = 10

# Pixel statistics of the MNIST training set; the model normalises its own input so that every consumer
# (evaluate, the exported files, a served model) feeds it plain [0, 1] pixels.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


# A checkpoint saved before model.input_norm existed normalised as "mnist" does.
BEFORE_INPUT_NORM = {"input_norm": "mnist"}


class ConvNet(nn.Module):
    """Input (B, 1, 28, 28) float pixels in [0, 1]; output (B, 10) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.per_image = cfg.input_norm == "per_image"
        blocks: list[nn.Module] = []
        channels, size = 1, IMAGE_SIZE
        for out_channels in cfg.conv_channels:
            # Pooling before the ReLU gives the same result (both are monotonic) on a quarter of the values.
            blocks.append(nn.Conv2d(channels, out_channels, cfg.kernel_size, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                blocks.append(nn.BatchNorm2d(out_channels))
            blocks += [nn.MaxPool2d(2), nn.ReLU()]
            channels, size = out_channels, (size - cfg.kernel_size + 1) // 2
        self.features = nn.Sequential(*blocks)  # (B, C, size, size), e.g. (B, 32, 13, 13) for one 3x3 block
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image:  # each digit stretched to [0, 1] first: faded ink and grey paper look like MNIST's
            low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - low) / (high - low).clamp_min(1e-3)
        x = (x - MNIST_MEAN) / MNIST_STD
        return self.classifier(self.features(x))


def build(cfg: ModelConfig) -> ConvNet:
    return ConvNet(cfg)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32 in [0, 1], the model's input."""
    return images.unsqueeze(1).float().div_(255.0)


def save_checkpoint(path: Path, model: ConvNet, cfg: ModelConfig, extra: dict | None = None) -> None:
    """Write state_dict + the model config needed to rebuild it; atomic, loadable with weights_only=True."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"model_config": cfg.to_dict(), "state_dict": state, **(extra or {})}
    buffer = io.BytesIO()  # serialise in memory: a disk error then surfaces as an OSError naming the file
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> tuple[ConvNet, dict]:
    """Rebuild the model from a checkpoint (no pickle: weights_only=True); returns (model in eval mode, payload)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = build(ModelConfig.from_dict({**BEFORE_INPUT_NORM, **payload["model_config"]}))
        model.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run the train stage first (`dvc repro train`)") from None
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PipelineError(f"{path} is not a valid checkpoint ({detail}); rerun `dvc repro -f train`") from None
    return model.eval(), payload
