"""Stage export: TorchScript file, parity check against the trained model, then log + register in MLflow."""

import argparse
import json
from pathlib import Path

import torch

from mnist_pipeline import config, export, tracking
from mnist_pipeline.data import load_split
from mnist_pipeline.errors import run_main
from mnist_pipeline.model import load_checkpoint, to_pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--run-file", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="the evaluate stage's metrics JSON")
    parser.add_argument("--torchscript", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="parity figures and registered version (JSON)")
    args = parser.parse_args()

    configs = config.load(args.params, *config.SECTIONS)
    export_cfg = configs[4]
    model, _ = load_checkpoint(args.checkpoint)
    run_id = tracking.read_run_file(args.run_file)
    test_accuracy = json.loads(args.metrics.read_text())["test_accuracy"]
    test = load_split(args.data, "test")
    digits = to_pixels(torch.from_numpy(test.images[: export_cfg.parity_samples].copy()))  # (N, 1, 28, 28)
    tracking.configure()

    export.save_torchscript(export.to_torchscript(model, digits[:2]), args.torchscript)
    parity = export.check_parity(
        model, export.load_torchscript(args.torchscript), digits, export_cfg.parity_tolerance, "TorchScript"
    )
    export.require_parity(parity)  # a failed check stops here: nothing is logged or registered
    print(f"TorchScript parity on {parity.samples} test digits: max |logit diff| {parity.max_abs_diff:.2e}")

    with tracking.resume_run(run_id):
        tracking.log_params(config.flatten([export_cfg]))
        tracking.log_artifacts([args.torchscript], "torchscript")
        model_uri = tracking.log_model(model, digits[:4].numpy(), [f"torch>={torch.__version__.split('+')[0]}"])
        logged = export.check_parity(
            model, tracking.load_model(model_uri), digits, export_cfg.parity_tolerance, "MLflow (torch.export)"
        )
        export.require_parity(logged)
        print(f"MLflow model parity: max |logit diff| {logged.max_abs_diff:.2e}")
        tracking.log_metrics(
            {
                "torchscript_max_abs_logit_diff": parity.max_abs_diff,
                "mlflow_model_max_abs_logit_diff": logged.max_abs_diff,
            }
        )
        registration = tracking.register(model_uri, export_cfg.model_name, test_accuracy)
    report = {"torchscript": parity.to_dict(), "mlflow_model": logged.to_dict(), "registered": registration.to_dict()}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
