"""Digits as users bring them to `predict`, other than MNIST's own: each made from a 28x28 MNIST-style digit, so
that it keeps the digit's label. They measure that one preprocessing serves every kind (`benchmarks.inputs` on
real MNIST; `tests/unit/test_predict.py` on synthetic digits).

- photos: a phone photo of ink on paper (`distortions.render_photos`);
- scans: a small, low-resolution scan enlarged, as another dataset stores it: the digit stretched to fill a 16x16
  box, grey strokes, blurred by the enlargement, no paper texture, no margin;
- thin strokes: the digit drawn large with a fine pen: its strokes' centre lines, 1-4 pixels wide on 112;
- mouse-drawn: drawn with a mouse on a web canvas: a thick pen without anti-aliasing, stair-stepped edges,
  anywhere on a 224x224 canvas.

Every kind is dark ink on white and 0-255 greyscale, as `predict` reads files. Each takes a seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _box(digit: np.ndarray, level: float = 0.2) -> np.ndarray:
    """The digit's ink box (pixels above ``level`` of its maximum)."""
    rows, cols = (
        np.flatnonzero((digit > level * digit.max()).any(axis=1)),
        np.flatnonzero((digit > level * digit.max()).any(axis=0)),
    )
    return digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _resize(image: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image.astype(np.float32)).resize(size, resample), dtype=np.float32)


def render_scans(digits: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for digit in digits.astype(np.float32):
        small = _resize(_box(digit), (16, 16), Image.Resampling.BILINEAR).clip(0, 255)  # stretched to fill
        darkness = rng.uniform(0.5, 0.9)  # grey strokes
        scan = 255.0 - darkness * small
        size = int(rng.integers(4, 9)) * 16  # enlarged 4-8 times
        out.append(_resize(scan, (size, size), Image.Resampling.BICUBIC).clip(0, 255).round().astype(np.uint8))
    return out


def render_thin_strokes(digits: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image
    from scipy import ndimage

    out = []
    for digit in digits.astype(np.float32):
        big = _resize(ndimage.gaussian_filter(digit, 0.7), (112, 112), Image.Resampling.BICUBIC) > 100
        distance = ndimage.distance_transform_edt(big)
        pen = big & (distance >= ndimage.maximum_filter(distance, size=5) - 1.0)  # the strokes' centre lines
        if rng.random() < 0.5:
            pen = ndimage.binary_dilation(pen)  # a slightly broader pen
        ink = ndimage.gaussian_filter(pen.astype(np.float32), 0.6)  # a pen's soft edge
        out.append((255.0 - rng.uniform(0.7, 0.95) * 255.0 * ink.clip(0, 1)).round().astype(np.uint8))
    return out


def render_mouse_drawn(digits: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for digit in digits.astype(np.float32):
        crop = _box(digit)
        scale = rng.uniform(4, 8)  # the digit's box: 80-160 pixels high
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        stroke = _resize(crop, size, Image.Resampling.NEAREST) > 90  # blocky, no anti-aliasing
        canvas = np.full((224, 224), 255, dtype=np.uint8)
        top = int(rng.integers(0, 224 - stroke.shape[0] + 1))
        left = int(rng.integers(0, 224 - stroke.shape[1] + 1))
        canvas[top : top + stroke.shape[0], left : left + stroke.shape[1]][stroke] = 0
        out.append(canvas)
    return out


def render_photos(digits: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    import torch

    from mnist_pipeline.ml.distortions import render_photos as photos

    x = torch.from_numpy(digits.astype(np.float32) / 255.0)[:, None]
    return photos(x, torch.Generator().manual_seed(int(rng.integers(2**31))))


KINDS: dict[str, Callable[[np.ndarray, np.random.Generator], list[np.ndarray]]] = {
    "photos": render_photos,
    "scans": render_scans,
    "thin strokes": render_thin_strokes,
    "mouse-drawn": render_mouse_drawn,
}
