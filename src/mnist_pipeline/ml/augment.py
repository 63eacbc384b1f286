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
    return any(
        (
            cfg.augment_rotation,
            cfg.augment_scale,
            cfg.augment_shear,
            cfg.augment_elastic,
            cfg.augment_stroke,
            cfg.augment_noise,
            cfg.augment_clutter,
        )
    )


@dataclass(frozen=True)
class Draw:
    """The amounts for a batch of digits, one entry per digit."""

    degrees: torch.Tensor
    scale: torch.Tensor
    shear: torch.Tensor
    field: torch.Tensor | None  # (N, 2, 28, 28) for the elastic warp
    stroke: torch.Tensor  # -1, 0 or 1
    noise: torch.Tensor | None  # (N, 1, 28, 28): sigma times a standard normal
    clutter: Clutter | None = None

    def __getitem__(self, index) -> Draw:
        return Draw(
            self.degrees[index],
            self.scale[index],
            self.shear[index],
            None if self.field is None else self.field[index],
            self.stroke[index],
            None if self.noise is None else self.noise[index],
            None if self.clutter is None else self.clutter[index],
        )


# What pages add, for the training: a line across the digit (straight or a scribble, 1 to 3 pixels wide, 30 to 100%
# ink), specks (up to 5% of the pixels), fog or uneven light (up to 0.6), one of the four per chosen digit. The
# robustness report also measures what this never draws: dotted lines, 5-pixel stripes, outlines, motion blur,
# 8% specks, fog and uneven light at 0.8 (docs/pipeline.md).
CLUTTER_KINDS = 4
MAX_LINE_WIDTH, MAX_WAVE, MAX_SPECKS, MAX_FADE = 3.0, 3.0, 0.05, 0.6


@dataclass(frozen=True)
class Clutter:
    """Per digit, as images, what pages add: ``max(x, ink) * keep + add`` (a line is ink; a speck keeps nothing
    and adds full ink or none; fog and uneven light keep 1 - fade and add fade times their grey)."""

    ink: torch.Tensor  # (N, 1, 28, 28)
    keep: torch.Tensor  # (N, 1, 28, 28)
    add: torch.Tensor  # (N, 1, 28, 28)

    def __getitem__(self, index) -> Clutter:
        return Clutter(self.ink[index], self.keep[index], self.add[index])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.ink.to(x.device)) * self.keep.to(x.device) + self.add.to(x.device)


def draw_clutter(n: int, fraction: float, generator: torch.Generator) -> Clutter:
    """The clutter of ``n`` digits, ``fraction`` of them given one kind (see CLUTTER_KINDS), with the report's own
    functions (`distortions.line`, `specks`, `fog`, `uneven_light`) on a blank frame, each for its own digits only."""
    device = generator.device

    def uniform(count: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator, device=device)

    chosen = uniform(n, 0, 1) < fraction
    kind = torch.where(chosen, torch.randint(1, CLUTTER_KINDS + 1, (n,), generator=generator, device=device), 0)
    ink, add = torch.zeros(n, 1, 28, 28, device=device), torch.zeros(n, 1, 28, 28, device=device)
    keep = torch.ones(n, 1, 28, 28, device=device)
    lines, speckled, fogged, lit = ((kind == k).nonzero().squeeze(1) for k in range(1, CLUTTER_KINDS + 1))
    if len(lines):
        m = len(lines)
        wave = torch.where(uniform(m, 0, 1) < 0.5, uniform(m, 0, MAX_WAVE), 0.0)
        ink[lines] = distortions.line(
            ink[lines], uniform(m, 1, MAX_LINE_WIDTH), generator, brightness=uniform(m, 0.3, 1.0), wave=wave
        )
    if len(speckled):  # on a frame of 0.5, a speck is 1 (full ink) or 0 (none)
        flipped = distortions.specks(
            torch.full((len(speckled), 1, 28, 28), 0.5, device=device), uniform(len(speckled), 0, MAX_SPECKS), generator
        )
        keep[speckled] = (flipped == 0.5).float()
        add[speckled] = (flipped == 1).float()
    for chosen_digits, fade_to, distort in ((fogged, 0.5, distortions.fog), (lit, 0.4, distortions.uneven_light)):
        if len(chosen_digits):  # on a blank frame each gives fade * its grey: the fade itself, 0..strength
            fade = distort(add[chosen_digits] * 0, uniform(len(chosen_digits), 0, MAX_FADE), generator) / fade_to
            keep[chosen_digits], add[chosen_digits] = 1 - fade, fade * fade_to
    return Clutter(ink, keep, add)


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
    clutter = draw_clutter(n, cfg.augment_clutter, generator) if cfg.augment_clutter else None
    return Draw(
        uniform(-cfg.augment_rotation, cfg.augment_rotation),
        uniform(1 - cfg.augment_scale, 1 + cfg.augment_scale),
        uniform(-cfg.augment_shear, cfg.augment_shear),
        field,
        stroke,
        noise,
        clutter,
    )


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
    if amounts.clutter is not None:
        x = amounts.clutter.apply(x)
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
