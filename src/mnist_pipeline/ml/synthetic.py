"""Synthetic data sets in MNIST's exact file format, learnable enough for training to mean something.

The tests use small ones; the benchmark uses a full-size one when real MNIST is not at hand.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x08 = unsigned byte, then big-endian dimensions)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images and (n,) labels: each class is a fixed random stroke pattern plus noise."""
    templates = np.random.default_rng(1234).random((10, 28, 28)) > 0.8  # the same classes in every split
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    noise = rng.standard_normal(size=(n, 28, 28), dtype=np.float32) * 50
    images = np.clip(templates[labels] * 200 + noise, 0, 255).astype(np.uint8)
    return images, labels


def idx_files(n_train: int, n_test: int):
    """Yield (file name, IDX bytes) for the four files."""
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = digits(n, seed)
        for name, array in zip(FILES[split], (images, labels), strict=True):
            yield name, idx_bytes(array)


def write_mirror(folder: Path, n_train: int = 1000, n_test: int = 300) -> dict[str, str]:
    """Write the four gzipped IDX files into ``folder``; return {file name: MD5 of the decompressed content}."""
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, raw in idx_files(n_train, n_test):
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
        md5[name] = hashlib.md5(raw).hexdigest()
    return md5


def write_raw(folder: Path, n_train: int, n_test: int) -> None:
    """Write the four IDX files decompressed, as the download stage leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in idx_files(n_train, n_test):
        (folder / name).write_bytes(raw)
