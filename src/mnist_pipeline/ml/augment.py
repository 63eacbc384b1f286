"""The training's augmentation: each digit moved, warped and its strokes changed by amounts drawn for it, on the
device, a whole batch at a time (no Python loop over digits). The amounts are drawn from the training's generator
for the whole global batch, so every rank of a distributed training draws alike and takes its own digits' share,
and a seed fixes them (see `distortions` for the moves themselves)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnist_pipeline.config import TrainConfig
from mnist_pipeline.ml import distortions

ELASTIC_SIGMA = 3.0  # pixels: the smoothness of the elastic warp's field


def active(cfg: TrainConfig) -> bool:
    """Whether any augmentation but the pixel shift (`shift_images`) is on."""
    return any((cfg.augment_rotation, cfg.augment_scale, cfg.augment_shear, cfg.augment_elastic, cfg.augment_stroke,
                cfg.augment_noise))


@dataclass(frozen=True)
class Draw:
    """The amounts for a batch of digits, one entry per digit."""

    degrees: torch.Tensor
    scale: torch.Tensor
    shear: torch.Tensor
    field: torch.Tensor | None  # (N, 2, 28, 28) for the elastic warp
    stroke: torch.Tensor  # -1, 0 or 1
    noise: torch.Tensor | None  # (N, 1, 28, 28): sigma times a standard normal

    def __getitem__(self, index) -> Draw:
        return Draw(self.degrees[index], self.scale[index], self.shear[index],
                    None if self.field is None else self.field[index], self.stroke[index],
                    None if self.noise is None else self.noise[index])  # fmt: skip


def draw(n: int, cfg: TrainConfig, generator: torch.Generator) -> Draw:
    def uniform(low: float, high: float, shape=None) -> torch.Tensor:
        u = torch.rand(shape or (n,), generator=generator, device=generator.device)
        return low + (high - low) * u

    field = uniform(0, 1, (n, 2, 28, 28)) if cfg.augment_elastic else None
    changed = uniform(0, 1) < cfg.augment_stroke
    stroke = torch.where(changed, torch.where(uniform(0, 1) < 0.5, -1, 1), 0)  # a pixel thinner or thicker
    noise = None
    if cfg.augment_noise:  # each digit its own level, up to the maximum
        normal = torch.randn((n, 1, 28, 28), generator=generator, device=generator.device)
        noise = normal * uniform(0, cfg.augment_noise).view(n, 1, 1, 1)
    return Draw(uniform(-cfg.augment_rotation, cfg.augment_rotation),
                uniform(1 - cfg.augment_scale, 1 + cfg.augment_scale),
                uniform(-cfg.augment_shear, cfg.augment_shear), field, stroke, noise)  # fmt: skip


def apply(x: torch.Tensor, amounts: Draw, cfg: TrainConfig) -> torch.Tensor:
    """``x``: (N, 1, 28, 28) pixels in [0, 1], moved by ``amounts``."""
    if len(x) == 0:  # a rank's share of a batch smaller than the ranks
        return x
    if cfg.augment_stroke:
        x = distortions.stroke(x, amounts.stroke)
    if cfg.augment_rotation or cfg.augment_scale or cfg.augment_shear:
        x = distortions.affine(x, amounts.degrees, amounts.scale, shear=amounts.shear)
    if amounts.field is not None:
        x = distortions.warp(x, amounts.field, cfg.augment_elastic, ELASTIC_SIGMA)
    if amounts.noise is not None:
        x = (x + amounts.noise.to(x.device)).clamp(0, 1)
    return x


def random_offsets(n: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """(2, n, 1) random offsets in 0..2*max_shift for `shift_images`, drawn for a whole global batch, so that
    every rank consumes the generator alike and slices out its own images' offsets."""
    return torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator, device=generator.device)


def shift_images(images: torch.Tensor, max_shift: int, offsets: torch.Tensor) -> torch.Tensor:
    """Translate each image by its own offset (from `random_offsets`) of up to ``max_shift`` pixels, zero-filled.

    Runs on the images' device as one gather, so augmentation costs no trip through Python per sample.
    """
    b, _, h, w = images.shape  # (B, 1, 28, 28)
    padded = F.pad(images, (max_shift,) * 4)  # (B, 1, 28 + 2s, 28 + 2s)
    rows = torch.arange(h, device=images.device) + offsets[0]  # (B, 28)
    cols = torch.arange(w, device=images.device) + offsets[1]  # (B, 28)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (B, 1, 28, 28)
