"""A digit from the real world made to look like an MNIST digit: what `mnist-pipeline predict` feeds the model, and
what the robustness report's "photo" distortion goes through.

A 28x28 image is taken as already MNIST-normalised and kept as it is (inverted when its background is light).
Any other image takes one of two paths, chosen by measuring its paper (`_flat_paper`):

- **flat paper** (a scan, a drawing, a digit on a plain canvas): the ink is what differs from the paper's level;
  the digit's box is where the ink exceeds a fifth of its maximum. This is the path every input took before
  photos were read (less the paper's level, when the paper is grey): it reads small scans enlarged, thin strokes
  and mouse drawings as well as it did (`benchmarks.inputs`), where the photo path drops pieces of a thin stroke
  and breaks strokes wider than its window;
- **a photo's paper** (noise, uneven light, texture):
  1. the background is estimated and removed, whatever its level or gradient: a grey closing (opening, for a
     light digit on dark) with a window wider than a stroke erases the strokes and leaves the background, which
     is subtracted; what stands out from it is ink, dark on light or light on dark;
  2. the ink is thresholded (Otsu's threshold, never below a noise floor) and the digit is the largest connected
     piece of ink with the pieces close to it (a 5's bar, a 4's stem); specks elsewhere are dropped.

Both end in MNIST's own normalisation: the digit's box scaled so that its longer side is 20 pixels (aspect kept),
placed in a 28x28 frame with its centre of mass at the centre.
"""

from __future__ import annotations

import numpy as np

from mnist_pipeline.errors import PipelineError

IMAGE_SIZE, DIGIT_BOX = 28, 20
WORK_SIZE = 160  # a larger image is reduced to about this before the background is estimated: plenty for a digit
NOISE_FLOOR = 0.12  # of the ink's range: weaker contrast is background texture or noise, not a stroke
PAPER, FLAT = 0.15, 0.01  # of the image's range: see _flat_paper
NEAR = 0.25  # a piece of ink within this fraction of the digit's size from the largest piece belongs to the digit


def preprocess(image: np.ndarray, name: str) -> np.ndarray:
    """(H, W) greyscale 0-255 -> (28, 28) float32 in [0, 1], light digit on black, MNIST-style."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 1:
        raise PipelineError(f"{name}: expected a 2-D image, got shape {image.shape}")
    if image.max() - image.min() < 1:
        raise PipelineError(f"{name}: the image is blank (every pixel is {image.max():.0f})")
    light_background = _light_background(image)
    if image.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return (255.0 - image if light_background else image) / 255.0
    paper = _flat_paper(image, light_background)
    if paper is not None:  # a scan, a drawing: the ink is what differs from the paper
        ink = (paper - image if light_background else image - paper).clip(0, None)
        return _normalise_size(_box(ink, ink > 0.2 * ink.max())) / 255.0
    ink = ink_of(_reduced(image), light_background)
    if ink.max() <= 0:
        raise PipelineError(f"{name}: no digit stands out from the background")
    return _normalise_size(_digit(ink)) / 255.0


def _light_background(image: np.ndarray) -> bool:
    """Whether the digit is dark on a lighter background: the border, mostly background, is nearer the lightest
    pixels than the darkest (a grey paper at 85 with black ink is light; MNIST's black is not)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return bool(np.median(border) > (float(image.min()) + float(image.max())) / 2)


def _flat_paper(image: np.ndarray, light_background: bool) -> float | None:
    """The paper's level when it is flat, else None. The paper's level is the border's commonest value; flat: the
    border's pixels near that level (within PAPER of the image's range: not the strokes' soft edges where the
    digit touches the border) stray from it by less than FLAT of the range, as a scan's or a drawing's do. A
    photo's paper strays further, with sensor noise, uneven light and texture, and takes the background removal."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    contrast = float(image.max()) - float(image.min())
    level = float(np.bincount(border.round().astype(np.int64).clip(0, 255)).argmax())
    if (level > float(image.min()) + contrast / 2) != light_background:
        return None  # the commonest value is ink's, not paper's
    paper = border[np.abs(border - level) <= PAPER * contrast]
    return level if float(np.median(np.abs(paper - level))) < FLAT * contrast else None


def _box(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` cropped to the box of ``mask``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _reduced(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    factor = max(image.shape) / WORK_SIZE
    if factor <= 1:
        return image
    size = (max(1, round(image.shape[1] / factor)), max(1, round(image.shape[0] / factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), dtype=np.float32)


def ink_of(image: np.ndarray, light_background: bool) -> np.ndarray:
    """0-255 ink, light on black: the image less its background (see the module's docstring)."""
    from scipy import ndimage

    window = max(3, round(max(image.shape) / 4)) | 1  # wider than any stroke of a digit that fills the image
    if light_background:  # dark strokes: a closing (max, then min) fills them with the background around them
        background = ndimage.grey_closing(image, size=window)
        ink = background - image
    else:
        background = ndimage.grey_opening(image, size=window)
        ink = image - background
    ink = ink.clip(0, None)
    peak = float(ink.max())
    return ink * (255.0 / peak) if peak > 0 else ink


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in 0-255: the level that best splits them into two classes."""
    histogram = np.bincount(values.astype(np.int64).clip(0, 255).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    weight = np.cumsum(histogram)
    mean = np.cumsum(histogram * levels)
    total, grand = weight[-1], mean[-1]
    between = (grand * weight - total * mean) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(np.argmax(between))


def _digit(ink: np.ndarray) -> np.ndarray:
    """The digit's box of ``ink``, with only the digit's pieces in it (see the module's docstring)."""
    from scipy import ndimage

    mask = ink > max(_otsu(ink), 255 * NOISE_FLOOR)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return ink
    masses = ndimage.sum_labels(ink, labels, index=np.arange(1, count + 1))
    boxes = ndimage.find_objects(labels)
    main = int(np.argmax(masses))
    top, bottom, left, right = _edges(boxes[main])
    reach = NEAR * max(bottom - top, right - left)
    keep = np.zeros(count + 1, dtype=bool)
    keep[main + 1] = True
    for i, box in enumerate(boxes):
        t, b, lft, r = _edges(box)
        gap = max(t - bottom, top - b, lft - right, left - r, 0)
        if gap <= reach and masses[i] >= 0.02 * masses[main]:
            keep[i + 1] = True
    chosen = keep[labels]
    near = ndimage.binary_dilation(chosen, iterations=2)  # the strokes' soft edges, below the threshold
    digit = np.where(near, ink, 0.0) * (255.0 / np.percentile(ink[chosen], 90))
    digit = digit.clip(0, 255)  # the stroke cores full, as in a scan: not a noise peak
    return _box(digit, digit > 0.2 * digit.max()).astype(np.float32)  # the box as the flat path crops it


def _edges(box: tuple[slice, slice]) -> tuple[int, int, int, int]:
    return box[0].start, box[0].stop, box[1].start, box[1].stop


def _normalise_size(crop: np.ndarray) -> np.ndarray:
    from PIL import Image

    scale = DIGIT_BOX / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    digit = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.LANCZOS)).clip(0, 255)
    # centre of mass of the scaled digit -> centre of the 28x28 frame
    total = digit.sum()
    cy = (digit.sum(axis=1) * np.arange(height)).sum() / total
    cx = (digit.sum(axis=0) * np.arange(width)).sum() / total
    top = int(np.clip(round(IMAGE_SIZE / 2 - cy), 0, IMAGE_SIZE - height))
    left = int(np.clip(round(IMAGE_SIZE / 2 - cx), 0, IMAGE_SIZE - width))
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    frame[top : top + height, left : left + width] = digit
    return frame
