"""Stage evaluate: export the trained model to ONNX once, check the file against it, and measure the file on the
test digits: metrics, per-class table, confusion matrix, predictions figure and the robustness report (the first
``evaluate.robustness_samples`` test digits rotated, shifted, thinned, blurred, noised, faded, photographed...).

Every figure it reports is that of the ONNX file, the artifact the export stage registers and users run. It
writes files only; the export stage logs them into the pipeline's MLflow run.
"""

import json

from mnist_pipeline import names, stage
from mnist_pipeline.files import write_atomic


@stage.command
@stage.path("--data", "folder written by the download stage")
@stage.path("--checkpoint", "the trained model")
@stage.path("--onnx", "the model exported to ONNX: measured here, registered by the export stage")
@stage.path("--parity", "the ONNX file against the trained model on test digits (JSON)")
@stage.path("--metrics", "JSON for `dvc metrics`")
@stage.path("--per-class", "per-digit precision/recall/F1 (CSV)")
@stage.path("--per-class-md", "the same table in Markdown")
@stage.path("--confusion", "actual,predicted per digit (a DVC plot)")
@stage.path("--confusion-png", "the confusion matrix as a figure")
@stage.path("--predictions-png", "random test digits and the most confident mistakes, titled with predictions")
@stage.path("--robustness", "the robustness report: distortion, strength, accuracy (CSV)")
@stage.path("--robustness-plot", "the same, a column per distortion by strength level (a DVC plot)")
@stage.path("--robustness-metrics", "one metric per distortion and strength (JSON, logged with the run)")
@stage.path("--robustness-png", "the robustness report as a figure")
def main(
    params,
    data,
    checkpoint,
    onnx,
    parity,
    metrics,
    per_class,
    per_class_md,
    confusion,
    confusion_png,
    predictions_png,
    robustness,
    robustness_plot,
    robustness_metrics,
    robustness_png,
):
    import torch

    from mnist_pipeline.ml import evaluation, export
    from mnist_pipeline.ml import robustness as robust
    from mnist_pipeline.ml.data import load_split, verify_folder
    from mnist_pipeline.ml.model import load_checkpoint, to_pixels

    cfg = params.evaluate
    model, _ = load_checkpoint(checkpoint)
    verify_folder(data)
    test = load_split(data, "test")
    pixels, labels = to_pixels(torch.from_numpy(test.images)), torch.from_numpy(test.labels.astype("int64"))
    shipped, check = export.save_checked(
        model, pixels[: params.export.parity_samples], onnx, params.export.parity_tolerance
    )
    write_atomic(parity, json.dumps(check.to_dict(), indent=2) + "\n")

    result = evaluation.evaluate(evaluation.predict_logits(shipped, pixels.numpy(), cfg.batch_size), labels)
    n = cfg.robustness_samples
    table = robust.report(shipped, pixels[:n], labels[:n], cfg.robustness_seed, cfg.batch_size)
    robust.write(table, result.accuracy, robustness, robustness_plot, robustness_metrics, robustness_png)
    scores = {**result.metrics(), **({names.ROBUST_ACCURACY: robust.robust_accuracy(table)} if n else {})}
    write_atomic(metrics, json.dumps(scores, indent=2) + "\n")
    evaluation.write_report_tables(evaluation.per_class_report(result.confusion), per_class, per_class_md)
    evaluation.write_confusion_pairs(test.labels, result.predicted, confusion)
    evaluation.plot_confusion_matrix(result.confusion, confusion_png)
    evaluation.plot_predictions(
        test.images,
        result.predicted,
        test.labels,
        result.confidence,
        predictions_png,
        count=cfg.examples,
        mistakes=cfg.mistakes,
        seed=params.train.seed,
    )
    print(evaluation.summary(result) + (f"  robust accuracy {100 * scores[names.ROBUST_ACCURACY]:.2f}%" if n else ""))


if __name__ == "__main__":
    main()
