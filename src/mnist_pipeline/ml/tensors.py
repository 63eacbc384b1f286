"""A split of the data set resident on the training device: the whole split as one tensor, batched by slicing.

A per-sample DataLoader spends most of an MNIST epoch in Python; slicing one preloaded tensor with a seeded
``randperm`` keeps the cores on arithmetic and makes a run repeatable from its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml.augment import shift_images
from mnist_pipeline.ml.data import Split


@dataclass(frozen=True)
class Tensors:
    """One split resident on the training device, kept as uint8 (a quarter of the memory of float32)."""

    images: torch.Tensor  # (N, 1, 28, 28) uint8
    y: torch.Tensor  # (N,) int64 labels

    @classmethod
    def from_split(cls, split: Split, device: torch.device) -> Tensors:
        images = torch.from_numpy(split.images).unsqueeze(1)
        return cls(images.to(device), torch.from_numpy(split.labels.astype(np.int64)).to(device))

    def x(self, index: torch.Tensor | slice, shift: int = 0, offsets: torch.Tensor | None = None):
        """Float pixels in [0, 1] of the selected images (shifted by ``offsets`` when ``shift``), the model's input."""
        images = self.images[index]
        if shift:
            images = shift_images(images, shift, offsets)
        return images.float().div_(255.0)

    def __len__(self) -> int:
        return len(self.y)

    def hold_out(self, count: int, seed: int) -> tuple[Tensors, Tensors]:
        """(the rest, ``count`` digits drawn with ``seed``): a validation split that is the same on every machine."""
        if not 0 < count < len(self):
            raise PipelineError(
                f"train.validation {count} must leave digits to train on (the training set has {len(self)})"
            )
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).to(self.y.device)
        held, kept = order[:count].sort().values, order[count:].sort().values
        return Tensors(self.images[kept], self.y[kept]), Tensors(self.images[held], self.y[held])
