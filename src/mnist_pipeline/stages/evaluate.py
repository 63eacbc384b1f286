"""Stage evaluate: measure the trained model on the test digits; metrics, per-class table, figures.

It writes files only; the export stage logs them into the pipeline's MLflow run."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config
from mnist_pipeline.files import write_atomic
from mnist_pipeline.stages import main, path


@dataclass(frozen=True)
class Paths:
    data: Path = path("folder written by the download stage")
    checkpoint: Path = path("the trained model")
    metrics: Path = path("JSON for `dvc metrics`")
    per_class: Path = path("per-digit precision/recall/F1 (CSV)")
    per_class_md: Path = path("the same table in Markdown")
    confusion: Path = path("actual,predicted per digit (a DVC plot)")
    confusion_png: Path = path("the confusion matrix as a figure")
    predictions_png: Path = path("random test digits and the most confident mistakes, titled with predictions")


def run(params: config.Params, paths: Paths) -> None:
    """Evaluate and write ``paths``."""
    import torch

    from mnist_pipeline.ml import evaluation
    from mnist_pipeline.ml.data import load_split, verify_folder
    from mnist_pipeline.ml.model import load_checkpoint, to_pixels

    eval_cfg = params.evaluate
    model, _ = load_checkpoint(paths.checkpoint)
    verify_folder(paths.data)
    test = load_split(paths.data, "test")

    labels = torch.from_numpy(test.labels.astype("int64"))
    logits = evaluation.predict_logits(model, to_pixels(torch.from_numpy(test.images)), eval_cfg.batch_size)
    result = evaluation.evaluate(logits, labels)
    report = evaluation.per_class_report(result.confusion)

    write_atomic(paths.metrics, json.dumps(result.metrics(), indent=2) + "\n")
    evaluation.write_report_tables(report, paths.per_class, paths.per_class_md)
    evaluation.write_confusion_pairs(test.labels, result.predicted, paths.confusion)
    evaluation.plot_confusion_matrix(result.confusion, paths.confusion_png)
    evaluation.plot_predictions(
        test.images, result.predicted, test.labels, result.confidence, paths.predictions_png,
        count=eval_cfg.examples, mistakes=eval_cfg.mistakes, seed=params.train.seed,
    )  # fmt: skip
    wrong = int((result.predicted != test.labels).sum())
    print(f"test accuracy {100 * result.accuracy:.2f}%  test loss {result.loss:.4f}  "
          f"({wrong:,} of {len(labels):,} test digits wrong)")  # fmt: skip


if __name__ == "__main__":  # dvc.yaml runs python -m mnist_pipeline.stages.evaluate
    main(sys.modules[__name__])
