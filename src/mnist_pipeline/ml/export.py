"""Export the trained model to ONNX and prove the export computes what the eager model computes.

The evaluate stage exports the model once, checks it here, and measures the exported file: the figures it reports
are those of the artifact that ships. onnxruntime runs it, without torch, in the export stage and in `predict`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from mnist_pipeline.files import write_atomic
from mnist_pipeline.ml import runtime

ONNX_OPSET = 18  # the torch.export-based exporter's default; onnxruntime >= 1.14 runs it
ONNX_INPUT = "pixels"
ONNX_OUTPUTS = ("logits", "probabilities", "digit")

# What the file says of itself (ONNX metadata_props), so that a client needs nothing else to call it. The export
# stage adds the MLflow run and the training to the registered copy (`registry.log_onnx_model`).
METADATA = {
    "input": "pixels: float32 (N, 1, 28, 28), values in [0, 1], a light digit on a dark background (MNIST's "
    "polarity), its longer side 20 pixels, centred by mass; `mnist-pipeline predict` makes any image so",
    "outputs": "logits: float32 (N, 10); probabilities: float32 (N, 10), the softmax of the logits; digit: int64 "
    "(N,), the most probable digit",
    "labels": "0,1,2,3,4,5,6,7,8,9",
    "trained_on": "MNIST's 60,000 training digits (mnist-pipeline: dvc.yaml, params.yaml)",
}


class WithAnswers(nn.Module):
    """The model with what every client computes from its logits: the probabilities and the digit."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1), logits.argmax(dim=1)


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export to one self-contained ONNX file with the model's answers (`WithAnswers`) and its description
    (`METADATA`), the batch dimension dynamic; atomic.

    The TorchScript-based exporter traces this model in 0.2 s; the torch.export-based one, torch's default since
    2.9, takes 3 s, most of it importing torch._dynamo and onnxscript. Both give the same graph here (the parity
    check below holds either to the same tolerance), so the first is used while torch still ships it.
    """
    import onnx

    model = WithAnswers(model).eval()
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
                output_names=list(ONNX_OUTPUTS),
                dynamic_axes={name: {0: "batch"} for name in (ONNX_INPUT, *ONNX_OUTPUTS)},
            )
            data = buffer.getvalue()
        except (TypeError, ValueError, RuntimeError, NotImplementedError):  # a torch without the legacy exporter
            data = _export_with_torch_export(model, example)
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, METADATA)
    write_atomic(path, proto.SerializeToString())


def _export_with_torch_export(model: nn.Module, example: torch.Tensor) -> bytes:
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=[ONNX_INPUT],
        output_names=list(ONNX_OUTPUTS),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        external_data=False,  # one self-contained file
        verbose=False,
    )
    return program.model_proto.SerializeToString()


@torch.inference_mode()
def check_parity(reference: nn.Module, exported, x: torch.Tensor, tolerance: float, fmt: str) -> runtime.Parity:
    """Compare the logits of ``exported`` (a callable from NumPy pixels to logits) with the eager ``reference``'s
    on ``x``."""
    reference.eval()
    want = reference(x)  # (N, 10)
    return runtime.compare(want.numpy(), exported(x.numpy()), tolerance, fmt)


def save_checked(model: nn.Module, digits: torch.Tensor, path: Path, tolerance: float):
    """Export ``model`` to ``path`` and check the file against it on ``digits``; return (the file in onnxruntime,
    its `Parity`). A file that differs is removed and stops the stage in one line."""
    save_onnx(model, digits[:2], path)
    exported = runtime.onnx_runner(path)
    parity = check_parity(model, exported, digits, tolerance, "ONNX")
    if not parity.ok:
        path.unlink(missing_ok=True)
    runtime.require_parity(parity)
    print(f"ONNX parity on {parity.samples} test digits: max |logit diff| {parity.max_abs_diff:.2e}")
    return exported, parity
