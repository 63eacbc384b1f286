"""Running an exported ONNX model with onnxruntime: NumPy in, NumPy out, no torch (a tenth of its start-up)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def load_onnx(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A callable from (N, 1, 28, 28) float32 pixels in [0, 1] to (N, 10) logits, on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {model_input.name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run
