"""Export the trained model to TorchScript and prove the export computes what the eager model computes."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic


def to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace the model (its forward has no data-dependent control flow, so tracing is exact)."""
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, yet it is still the format most C++/Java/mobile
        # runtimes load; the MLflow model is the torch.export one.
        warnings.simplefilter("ignore", FutureWarning)
        # check_trace=False: the trace's own re-run check costs a second; check_parity below is stricter.
        return torch.jit.trace(model, example, check_trace=False)


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


ONNX_OPSET = 18  # the torch.export-based exporter's default; onnxruntime >= 1.14 runs it
ONNX_INPUT, ONNX_OUTPUT = "pixels", "logits"


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export with the torch.export-based ONNX exporter, the batch dimension dynamic; atomic."""
    model.eval()
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
    write_atomic(path, program.model_proto.SerializeToString())  # one self-contained file


def load_onnx(path: Path):
    """An onnxruntime session wrapped as a callable on a (N, 1, 28, 28) tensor, returning logits as a tensor."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0])

    return run


def save_torchscript(module: torch.jit.ScriptModule, path: Path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; it stays here as the no-Python format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, buffer)
    write_atomic(path, buffer.getvalue())


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
    """Compare the logits of ``exported`` (any callable on a tensor) with the eager ``reference`` on ``x``."""
    reference.eval()
    want = reference(x)  # (N, 10)
    got = torch.as_tensor(exported(x))
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
