"""Stage evaluate: measure the trained model on the test digits; metrics, per-class table, figures.

It writes files only; the export stage logs them into the pipeline's MLflow run."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config, names
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
    robustness: Path = path("the robustness report: distortion, strength, accuracy (CSV)")
    robustness_plot: Path = path("the same, a column per distortion by strength level (a DVC plot)")
    robustness_metrics: Path = path("one metric per distortion and strength (JSON, logged with the run)")
    robustness_png: Path = path("the robustness report as a figure")


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

    robust = _robustness(model, test, eval_cfg, result.accuracy, paths)
    metrics = {**result.metrics(), **({names.ROBUST_ACCURACY: robust} if robust is not None else {})}
    write_atomic(paths.metrics, json.dumps(metrics, indent=2) + "\n")
    evaluation.write_report_tables(report, paths.per_class, paths.per_class_md)
    evaluation.write_confusion_pairs(test.labels, result.predicted, paths.confusion)
    evaluation.plot_confusion_matrix(result.confusion, paths.confusion_png)
    evaluation.plot_predictions(
        test.images, result.predicted, test.labels, result.confidence, paths.predictions_png,
        count=eval_cfg.examples, mistakes=eval_cfg.mistakes, seed=params.train.seed,
    )  # fmt: skip
    wrong = int((result.predicted != test.labels).sum())
    print(f"test accuracy {100 * result.accuracy:.2f}%  test loss {result.loss:.4f}  "
          f"({wrong:,} of {len(labels):,} test digits wrong)"
          + (f"  robust accuracy {100 * robust:.2f}%" if robust is not None else ""))  # fmt: skip


def _robustness(model, test, eval_cfg, clean_accuracy: float, paths: Paths) -> float | None:
    """The robustness report on the first ``evaluate.robustness_samples`` test digits; its mean accuracy (None
    when the report is off: its files are then written empty)."""
    import torch

    from mnist_pipeline.ml import robustness
    from mnist_pipeline.ml.model import to_pixels

    n = eval_cfg.robustness_samples
    x = to_pixels(torch.from_numpy(test.images[:n].copy()))
    table = robustness.report(model, x, torch.from_numpy(test.labels[:n].astype("int64")),
                              eval_cfg.robustness_seed, eval_cfg.batch_size)  # fmt: skip
    table.attrs["clean_accuracy"] = clean_accuracy
    write_atomic(paths.robustness, table.drop(columns="level").to_csv(index=False))
    write_atomic(paths.robustness_plot, robustness.by_level(table, clean_accuracy).to_csv(index=False))
    write_atomic(paths.robustness_metrics, json.dumps(robustness.metrics(table), indent=2) + "\n")
    robustness.plot(table, paths.robustness_png)
    return robustness.robust_accuracy(table) if n else None


if __name__ == "__main__":  # dvc.yaml runs python -m mnist_pipeline.stages.evaluate
    main(sys.modules[__name__])
