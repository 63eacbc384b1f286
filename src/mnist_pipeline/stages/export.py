"""Stage export: TorchScript and ONNX files, each checked against the trained model, then log + register in MLflow."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config, names, tracker
from mnist_pipeline.files import write_atomic
from mnist_pipeline.stages import path


@dataclass(frozen=True)
class Paths:
    data: Path = path("folder written by the download stage")
    checkpoint: Path = path("the trained model")
    run_file: Path = path("the MLflow run id the train stage wrote")
    metrics: Path = path("the evaluate stage's metrics JSON")
    torchscript: Path = path("the TorchScript file to write")
    onnx: Path = path("the ONNX file to write (the model that is registered)")
    report: Path = path("parity figures and the registered version (JSON)")


def run(params: config.Params, paths: Paths, start_tracker: Callable[[], tracker.Tracker] = tracker.Tracker.start):
    """Export and check both formats, log the ONNX model into the run, check it through pyfunc, register it."""
    export_cfg = params.export
    run_id = tracker.read_run_file(paths.run_file)
    with start_tracker() as tracking, tempfile.TemporaryDirectory(prefix="mnist-export-") as tmp:
        import numpy as np
        import torch

        from mnist_pipeline import export
        from mnist_pipeline.data import load_split, verify_folder
        from mnist_pipeline.model import load_checkpoint, to_pixels

        model, _ = load_checkpoint(paths.checkpoint)
        verify_folder(paths.data)
        test_accuracy = json.loads(paths.metrics.read_text())[names.TEST_ACCURACY]
        test = load_split(paths.data, "test")
        digits = to_pixels(torch.from_numpy(test.images[: export_cfg.parity_samples].copy()))  # (N, 1, 28, 28)

        def check(exported, fmt: str) -> export.Parity:
            result = export.check_parity(model, exported, digits, export_cfg.parity_tolerance, fmt)
            export.require_parity(result)  # a failed check stops here: nothing more is logged or registered
            print(f"{fmt} parity on {result.samples} test digits: max |logit diff| {result.max_abs_diff:.2e}")
            return result

        export.save_torchscript(export.to_torchscript(model, digits[:2]), paths.torchscript)
        export.save_onnx(model, digits[:2], paths.onnx)
        checks = {
            "torchscript": check(export.load_torchscript(paths.torchscript), "TorchScript"),
            "onnx": check(export.load_onnx(paths.onnx), "ONNX"),
        }
        # The registered model is the ONNX file, checked again as users load it: through mlflow.pyfunc.
        example, digits_file = Path(tmp) / "example.npy", Path(tmp) / "digits.npy"
        np.save(example, digits[:4].numpy())
        np.save(digits_file, digits.numpy())

        tracking.configure()
        with tracker.run(tracking, run_id=run_id, resume=True):
            tracking.call("log_params", config.flatten([export_cfg]))
            tracking.call("log_artifacts", [str(paths.torchscript), str(paths.onnx)], "exported")
            model_uri = tracking.call("log_onnx_model", str(paths.onnx), str(example))
            logged = torch.tensor(tracking.call("predict_with_logged_model", model_uri, str(digits_file)))
            checks["mlflow_model"] = check(lambda _: logged, "MLflow model (ONNX, loaded through pyfunc)")
            tracking.call("log_metrics", {f"{name}_max_abs_logit_diff": c.max_abs_diff for name, c in checks.items()})
            registration = tracking.call(
                "register", model_uri, export_cfg.model_name, test_accuracy, export_cfg.promote_min_delta
            )
    report = {**{name: check.to_dict() for name, check in checks.items()}, "registered": registration}
    write_atomic(paths.report, json.dumps(report, indent=2) + "\n")
