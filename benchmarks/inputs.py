"""How well `predict` reads each kind of input, against the preprocessing before the photo path (commit 1ad3493).

    python -m benchmarks.inputs [--model models/model.onnx] [--data data/raw] [--n 2000] [--seed 0]

Renders the last ``n`` MNIST test digits as each kind (`mnist_pipeline.ml.input_kinds`), prepares them with both
preprocessings and prints the share each model answer gets right, per kind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

IMAGE_SIZE, DIGIT_BOX = 28, 20


def preprocess_1ad3493(image: np.ndarray) -> np.ndarray:
    """`predict`'s preprocessing at commit 1ad3493, before the photo path: invert when the border is light, crop
    to the pixels above a fifth of the maximum, scale the box to 20 pixels, centre of mass at the centre."""
    from PIL import Image

    image = np.asarray(image, dtype=np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    if np.median(border) > 127:
        image = 255.0 - image
    if image.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return image / 255.0
    ink = image > 0.2 * image.max()
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = DIGIT_BOX / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    digit = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.LANCZOS)).clip(0, 255)
    total = digit.sum()
    cy = (digit.sum(axis=1) * np.arange(height)).sum() / total
    cx = (digit.sum(axis=0) * np.arange(width)).sum() / total
    top = int(np.clip(round(IMAGE_SIZE / 2 - cy), 0, IMAGE_SIZE - height))
    left = int(np.clip(round(IMAGE_SIZE / 2 - cx), 0, IMAGE_SIZE - width))
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    frame[top : top + height, left : left + width] = digit
    return frame / 255.0


def accuracies(run, digits: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """{kind: {"1ad3493": share right, "now": share right}} for MNIST itself and every input kind."""
    from mnist_pipeline.ml.input_kinds import KINDS
    from mnist_pipeline.ml.preprocess import preprocess

    kinds = {"MNIST": list(digits)} | {
        kind: render(digits, np.random.default_rng([seed, i])) for i, (kind, render) in enumerate(KINDS.items())
    }
    paths = {"1ad3493": preprocess_1ad3493, "now": lambda image: preprocess(image, "input")}
    result = {}
    for kind, images in kinds.items():
        result[kind] = {}
        for name, prepare in paths.items():
            x = np.stack([prepare(image) for image in images]).astype(np.float32)[:, None]
            result[kind][name] = float((run(x).argmax(1) == labels).mean())
    return result


def main(argv: list[str] | None = None) -> None:
    from mnist_pipeline.ml import runtime
    from mnist_pipeline.ml.data import load_split

    parser = argparse.ArgumentParser(prog="python -m benchmarks.inputs", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--data", type=Path, default=Path("data/raw"))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    test = load_split(args.data, "test")
    digits, labels = test.images[-args.n :], test.labels[-args.n :]
    run = runtime.onnx_runner(args.model)
    print(f"{args.n} MNIST test digits as each kind of input, {args.model}: share read right")
    print(f"{'kind':14s} {'1ad3493':>8s} {'now':>8s} {'change':>8s}")
    for kind, by in accuracies(run, digits, labels, args.seed).items():
        change = 100 * (by["now"] - by["1ad3493"])
        print(f"{kind:14s} {100 * by['1ad3493']:7.1f}% {100 * by['now']:7.1f}% {change:+7.1f}")


if __name__ == "__main__":
    main()
