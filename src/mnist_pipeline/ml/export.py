"""Export the trained model to ONNX and prove the export computes what the eager model computes."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic

ONNX_OPSET = 18  # the torch.export-based exporter's default; onnxruntime >= 1.14 runs it
ONNX_INPUT, ONNX_OUTPUT = "pixels", "logits"


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export to one self-contained ONNX file, the batch dimension dynamic; atomic.

    The TorchScript-based exporter traces this model in 0.2 s; the torch.export-based one, torch's default since
    2.9, takes 3 s, most of it importing torch._dynamo and onnxscript. Both give the same graph here (the parity
    check below holds either to the same tolerance), so the first is used while torch still ships it.
    """
    model.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Its deprecation notices: the exporter is kept on purpose (above), and the torch.export one takes over
        # by itself once it is gone.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            )
            data = buffer.getvalue()
        except (TypeError, ValueError, RuntimeError, NotImplementedError):  # a torch without the legacy exporter
            data = _export_with_torch_export(model, example)
    write_atomic(path, data)


def _export_with_torch_export(model: nn.Module, example: torch.Tensor) -> bytes:
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        external_data=False,  # one self-contained file
        verbose=False,
    )
    return program.model_proto.SerializeToString()


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


@torch.inference_mode()
def check_parity(reference: nn.Module, exported, x: torch.Tensor, tolerance: float, fmt: str) -> Parity:
    """Compare the logits of ``exported`` (a callable from NumPy pixels to logits) with the eager ``reference``'s
    on ``x``."""
    reference.eval()
    want = reference(x)  # (N, 10)
    got = torch.as_tensor(exported(x.numpy()))
    if got.shape != want.shape:
        raise PipelineError(f"{fmt} export returns shape {tuple(got.shape)}, the model {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    mismatches = int((got.argmax(dim=1) != want.argmax(dim=1)).sum().item())
    return Parity(fmt, len(x), diff, mismatches, tolerance)


def require_parity(parity: Parity) -> None:
    if not parity.ok:
        raise PipelineError(
            f"{parity.format} export differs from the trained model on {parity.samples} test digits: "
            f"max |logit difference| {parity.max_abs_diff:.3g} (tolerance {parity.tolerance:g}), "
            f"{parity.argmax_mismatches} different predictions; nothing was registered"
        )
