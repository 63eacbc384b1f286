"""Stage train: train the CNN, save the checkpoint and the per-epoch history, start the pipeline's MLflow run."""

import argparse
from pathlib import Path

import torch

from mnist_pipeline import config, tracking, training
from mnist_pipeline.data import fingerprint, load_split
from mnist_pipeline.errors import run_main
from mnist_pipeline.model import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True, help="folder written by the download stage")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="per-epoch metrics CSV (a DVC plot)")
    parser.add_argument("--run-file", type=Path, required=True, help="where to write the MLflow run id")
    args = parser.parse_args()

    params = config.load(args.params)
    model_cfg, train_cfg = params.model, params.train
    threads = training.configure_threads(train_cfg.threads)
    device = training.resolve_device(train_cfg.device)
    train_data = training.Tensors.from_split(load_split(args.data, "train"), device)
    test_data = training.Tensors.from_split(load_split(args.data, "test"), device)
    uri = tracking.configure()

    tags = {**tracking.run_tags(device.type, torch.__version__), "cpu_threads": str(threads),
            "data_md5": fingerprint(args.data)}  # fmt: skip
    with tracking.start_run(config.flatten(params.sections()), tags) as run_id:
        result = training.train(
            model_cfg,
            train_cfg,
            train_data,
            test_data,
            device,
            on_epoch=lambda m: tracking.log_epoch(
                m.epoch, {"train_loss": m.train_loss, "test_loss": m.test_loss, "test_accuracy": m.test_accuracy}
            ),
        )
        tracking.log_metrics({"train_seconds": result.seconds})
        save_checkpoint(args.checkpoint, result.model, model_cfg, {"train_config": train_cfg.to_dict()})
        training.write_history(args.history, result.history)
        tracking.write_run_file(args.run_file, run_id, uri)


if __name__ == "__main__":
    run_main(main)
