"""Stage evaluate: measure the trained model on the test digits; metrics, per-class table, figures."""

import argparse
import json
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
    parser.add_argument("--metrics", type=Path, required=True, help="JSON for `dvc metrics`")
    parser.add_argument("--per-class", type=Path, required=True, help="per-digit precision/recall/F1 (CSV)")
    parser.add_argument("--per-class-md", type=Path, required=True, help="the same table in Markdown")
    parser.add_argument("--confusion", type=Path, required=True, help="actual,predicted per digit (DVC plot)")
    parser.add_argument("--confusion-png", type=Path, required=True)
    parser.add_argument("--predictions-png", type=Path, required=True)
    args = parser.parse_args()

    params = config.load(args.params)
    eval_cfg = params.evaluate
    run_id = tracker.read_run_file(args.run_file)
    with tracker.Tracker.start() as tracking:  # MLflow starts up in its own process while this one works
        import torch

        from mnist_pipeline import evaluation
        from mnist_pipeline.data import load_split, verify_folder
        from mnist_pipeline.model import load_checkpoint, to_pixels

        model, _ = load_checkpoint(args.checkpoint)
        verify_folder(args.data)
        test = load_split(args.data, "test")

        labels = torch.from_numpy(test.labels.astype("int64"))
        logits = evaluation.predict_logits(model, to_pixels(torch.from_numpy(test.images)), eval_cfg.batch_size)
        result = evaluation.evaluate(logits, labels)
        report = evaluation.per_class_report(result.confusion)

        write_atomic(args.metrics, json.dumps(result.metrics(), indent=2) + "\n")
        evaluation.write_report_tables(report, args.per_class, args.per_class_md)
        evaluation.write_confusion_pairs(test.labels, result.predicted, args.confusion)
        evaluation.plot_confusion_matrix(result.confusion, args.confusion_png)
        evaluation.plot_predictions(
            test.images, result.predicted, test.labels, args.predictions_png, eval_cfg.examples, params.train.seed
        )
        print(f"test accuracy {100 * result.accuracy:.2f}%  test loss {result.loss:.4f}  ({len(labels)} digits)")

        # The store is opened last: by now the tracking process has started, so this stage never waits for it. If
        # the store cannot be used, the stage fails here and `dvc repro` runs it again.
        tracking.configure()
        with tracker.run(tracking, run_id=run_id, resume=True):
            tracking.call("log_params", config.flatten([eval_cfg]))
            tracking.call("log_metrics", {f"final_{k}": v for k, v in result.metrics().items()})
            figures = [args.confusion_png, args.predictions_png, args.per_class, args.per_class_md]
            tracking.call("log_artifacts", [str(path) for path in figures], "evaluation")


if __name__ == "__main__":
    run_main(main)
