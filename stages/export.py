"""Stage export: TorchScript and ONNX files, each checked against the trained model, then log + register in MLflow."""

import argparse
import json
from pathlib import Path

import torch

from mnist_pipeline import config, export, tracking
from mnist_pipeline.data import load_split, verify_folder
from mnist_pipeline.errors import run_main
from mnist_pipeline.files import write_atomic
from mnist_pipeline.model import load_checkpoint, to_pixels


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
    model, _ = load_checkpoint(args.checkpoint)
    run_id = tracking.read_run_file(args.run_file)
    verify_folder(args.data)
    test_accuracy = json.loads(args.metrics.read_text())["test_accuracy"]
    test = load_split(args.data, "test")
    digits = to_pixels(torch.from_numpy(test.images[: export_cfg.parity_samples].copy()))  # (N, 1, 28, 28)
    tracking.configure()

    def parity(exported, fmt: str) -> export.Parity:
        result = export.check_parity(model, exported, digits, export_cfg.parity_tolerance, fmt)
        export.require_parity(result)  # a failed check stops here: nothing more is logged or registered
        print(f"{fmt} parity on {result.samples} test digits: max |logit diff| {result.max_abs_diff:.2e}")
        return result

    export.save_torchscript(export.to_torchscript(model, digits[:2]), args.torchscript)
    export.save_onnx(model, digits[:2], args.onnx)
    checks = {
        "torchscript": parity(export.load_torchscript(args.torchscript), "TorchScript"),
        "onnx": parity(export.load_onnx(args.onnx), "ONNX"),
    }

    with tracking.resume_run(run_id):
        tracking.log_params(config.flatten([export_cfg]))
        tracking.log_artifacts([args.torchscript, args.onnx], "exported")
        model_uri = tracking.log_model(model, digits[:4].numpy(), [f"torch>={torch.__version__.split('+')[0]}"])
        checks["mlflow_model"] = parity(tracking.load_model(model_uri), "MLflow model (torch.export)")
        tracking.log_metrics({f"{name}_max_abs_logit_diff": check.max_abs_diff for name, check in checks.items()})
        registration = tracking.register(model_uri, export_cfg.model_name, test_accuracy, export_cfg.promote_min_delta)
    report = {**{name: check.to_dict() for name, check in checks.items()}, "registered": registration.to_dict()}
    write_atomic(args.report, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
