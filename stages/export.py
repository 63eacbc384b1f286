"""Stage export: TorchScript and ONNX files, each checked against the trained model, then log + register in MLflow."""

import argparse
import json
import tempfile
from pathlib import Path

from mnist_pipeline import config, tracker
from mnist_pipeline.errors import run_main
from mnist_pipeline.files import write_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--run-file", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="the evaluate stage's metrics JSON")
    parser.add_argument("--torchscript", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="parity figures and registered version (JSON)")
    args = parser.parse_args()

    export_cfg = config.load(args.params).export
    run_id = tracker.read_run_file(args.run_file)
    with tracker.Tracker.start() as tracking, tempfile.TemporaryDirectory(prefix="mnist-export-") as tmp:
        import numpy as np
        import torch

        from mnist_pipeline import export
        from mnist_pipeline.data import load_split, verify_folder
        from mnist_pipeline.model import load_checkpoint, to_pixels

        model, _ = load_checkpoint(args.checkpoint)
        verify_folder(args.data)
        test_accuracy = json.loads(args.metrics.read_text())["test_accuracy"]
        test = load_split(args.data, "test")
        digits = to_pixels(torch.from_numpy(test.images[: export_cfg.parity_samples].copy()))  # (N, 1, 28, 28)

        def parity(result: export.Parity) -> export.Parity:
            export.require_parity(result)  # a failed check stops here: nothing more is logged or registered
            print(f"{result.format} parity on {result.samples} test digits: max |logit diff| "
                  f"{result.max_abs_diff:.2e}")  # fmt: skip
            return result

        def check(exported, fmt: str) -> export.Parity:
            return parity(export.check_parity(model, exported, digits, export_cfg.parity_tolerance, fmt))

        export.save_torchscript(export.to_torchscript(model, digits[:2]), args.torchscript)
        export.save_onnx(model, digits[:2], args.onnx)
        checks = {
            "torchscript": check(export.load_torchscript(args.torchscript), "TorchScript"),
            "onnx": check(export.load_onnx(args.onnx), "ONNX"),
        }
        # The registered model is the ONNX file, checked again as users load it: through mlflow.pyfunc.
        example, digits_file = Path(tmp) / "example.npy", Path(tmp) / "digits.npy"
        np.save(example, digits[:4].numpy())
        np.save(digits_file, digits.numpy())

        tracking.configure()
        with tracker.run(tracking, run_id=run_id, resume=True):
            tracking.call("log_params", config.flatten([export_cfg]))
            tracking.call("log_artifacts", [str(args.torchscript), str(args.onnx)], "exported")
            model_uri = tracking.call("log_onnx_model", str(args.onnx), str(example))
            logged = torch.tensor(tracking.call("predict_with_logged_model", model_uri, str(digits_file)))
            checks["mlflow_model"] = check(lambda _: logged, "MLflow model (ONNX, loaded through pyfunc)")
            tracking.call("log_metrics", {f"{name}_max_abs_logit_diff": c.max_abs_diff for name, c in checks.items()})
            registration = tracking.call(
                "register", model_uri, export_cfg.model_name, test_accuracy, export_cfg.promote_min_delta
            )
    report = {**{name: check.to_dict() for name, check in checks.items()}, "registered": registration}
    write_atomic(args.report, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
