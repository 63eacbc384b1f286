"""An exported model run without torch: the ONNX file in onnxruntime (the evaluate stage, the export stage's check,
`predict` and `serve` all run it so), and how two models' logits are compared (`Parity`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_pipeline.errors import PipelineError


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX file at ``path`` in onnxruntime (CPU), as a function from (N, 1, 28, 28) float32 pixels to logits."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own errors have no common base
        raise PipelineError(f"model {path}: not an ONNX model ({str(exc).splitlines()[0][:200]})") from None
    (model_input,) = session.get_inputs()
    outputs = [output.name for output in session.get_outputs()]
    logits = ["logits" if "logits" in outputs else outputs[0]]  # a file of ours answers more beside its logits

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(logits, {model_input.name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


@dataclass(frozen=True)
class Parity:
    format: str
    samples: int
    max_abs_diff: float
    argmax_mismatches: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.argmax_mismatches == 0 and self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "max_abs_logit_diff": self.max_abs_diff,
            "argmax_mismatches": self.argmax_mismatches,
            "tolerance": self.tolerance,
        }


def compare(want: np.ndarray, got: np.ndarray, tolerance: float, fmt: str) -> Parity:
    """The logits ``got`` of an export (``fmt``) against the reference logits ``want``, both (N, 10)."""
    got = np.asarray(got)
    if got.shape != want.shape:
        raise PipelineError(f"{fmt} export returns shape {got.shape}, the model {want.shape}")
    diff = float(np.abs(got.astype(np.float64) - want).max()) if len(want) else 0.0
    mismatches = int((got.argmax(axis=1) != want.argmax(axis=1)).sum())
    return Parity(fmt, len(want), diff, mismatches, tolerance)


def require_parity(parity: Parity) -> None:
    if not parity.ok:
        raise PipelineError(
            f"{parity.format} export differs from the trained model on {parity.samples} test digits: "
            f"max |logit difference| {parity.max_abs_diff:.3g} (tolerance {parity.tolerance:g}), "
            f"{parity.argmax_mismatches} different predictions; nothing was registered"
        )
