"""An exported model run without torch: the ONNX file in onnxruntime (the evaluate stage, the export stage's check,
`predict` and `serve` all run it so), and how two models' logits are compared (`Parity`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_pipeline.errors import PipelineError, interrupts_held


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX file at ``path`` in onnxruntime (CPU), as a function from (N, 1, 28, 28) float32 pixels to logits.

    A run goes on in a thread of its own while this thread waits, so that Ctrl-C or SIGTERM, raised here, stops it:
    onnxruntime does not return to Python on a signal, but ends a run whose ``RunOptions.terminate`` is set. An
    error of the model's graph at run time (an allocation it cannot make, an input it does not take) is one line.
    """
    import onnxruntime

    settings = onnxruntime.SessionOptions()
    settings.log_severity_level = QUIET
    try:
        session = onnxruntime.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own errors have no common base
        raise PipelineError(f"model {path}: not an ONNX model ({_first_line(exc)})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise PipelineError(f"model {path}: takes {len(inputs)} inputs; expected one batch of digits")
    outputs = [output.name for output in session.get_outputs()]
    logits = ["logits" if "logits" in outputs else outputs[0]]  # a file of ours answers more beside its logits

    def run(x: np.ndarray) -> np.ndarray:
        options = onnxruntime.RunOptions()
        options.log_severity_level = QUIET  # its failure is worded below, in one line
        feed = {inputs[0].name: np.ascontiguousarray(x, dtype=np.float32)}
        answer: list = []
        done = threading.Event()  # not Thread.join: an interrupted join may return at once the next time
        worker = threading.Thread(target=_run_into, args=(session, logits, feed, options, answer, done), daemon=True)
        try:
            with interrupts_held():  # a stop while it starts is acted on once it has
                worker.start()
            done.wait()  # a signal's handler runs here, raising KeyboardInterrupt
        except BaseException:
            options.terminate = True  # the run ends at its next operator
            done.wait(TERMINATE_WAIT_S)
            raise
        (result,) = answer
        if isinstance(result, Exception):
            raise PipelineError(f"model {path}: failed on its input ({_first_line(result)})") from None
        return result

    return run


TERMINATE_WAIT_S = 5  # how long an interrupted run is waited for before the command ends without it
QUIET = 4  # onnxruntime's log level FATAL: its errors would print a line of their own each


def _run_into(session, outputs: list[str], feed: dict, options, answer: list, done: threading.Event) -> None:
    try:
        answer.append(session.run(outputs, feed, options)[0])
    except Exception as exc:  # handed to the waiting thread, which words it
        answer.append(exc)
    finally:
        done.set()


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


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
