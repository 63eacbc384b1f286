"""Metrics, the confusion matrix, the per-class table and the figures of the evaluate stage."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mnist_pipeline import names
from mnist_pipeline.files import write_atomic
from mnist_pipeline.ml.model import NUM_CLASSES


def predict_logits(model: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N, 1, 28, 28) pixels -> (N, 10) logits, in batches; ``model``: the exported model (`runtime.onnx_runner`)."""
    return torch.from_numpy(np.concatenate([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]))


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predicted: np.ndarray  # (N,) predicted digit per test image
    confidence: np.ndarray  # (N,) the model's probability for its predicted digit
    confusion: np.ndarray  # (10, 10) counts, rows = actual, columns = predicted

    def metrics(self) -> dict[str, float]:
        """What `dvc metrics` shows and the MLflow run records. The count of test digits wrong tells close runs apart
        where a view rounds (MLflow's compare view shows 0.9912, 0.9909 and 0.9908 all as 0.991)."""
        errors = int(self.confusion.sum() - np.trace(self.confusion))
        return {names.TEST_LOSS: self.loss, names.TEST_ACCURACY: self.accuracy, names.TEST_ERRORS: errors}


def summary(result: Evaluation) -> str:
    """The evaluation in one line, as the stage prints it."""
    wrong = int(result.confusion.sum() - np.trace(result.confusion))
    return (
        f"test accuracy {100 * result.accuracy:.2f}%  test loss {result.loss:.4f}  "
        f"({wrong:,} of {int(result.confusion.sum()):,} test digits wrong)"
    )


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts with rows = actual class, columns = predicted class."""
    flat = actual.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def evaluate(logits: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    confidence, predicted = F.softmax(logits.float(), dim=1).max(dim=1)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (predicted == labels).double().mean().item()
    actual_np, predicted_np = labels.cpu().numpy(), predicted.cpu().numpy()
    return Evaluation(loss, accuracy, predicted_np, confidence.cpu().numpy(), confusion_matrix(actual_np, predicted_np))


def per_class_report(confusion: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support per digit; a class never predicted gets precision 0, not NaN."""
    true_pos = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return pd.DataFrame(
        {"digit": range(len(confusion)), "precision": precision, "recall": recall, "f1": f1, "support": support}
    )


def write_report_tables(report: pd.DataFrame, csv_path: Path, markdown_path: Path) -> None:
    write_atomic(csv_path, report.to_csv(index=False, float_format="%.4f"))
    write_atomic(markdown_path, report.to_markdown(index=False, floatfmt=".4f") + "\n")


def write_confusion_pairs(actual: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    """One row per test digit (actual, predicted): the input of DVC's confusion-matrix plot template."""
    write_atomic(path, pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(index=False))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """The figure as a PNG at ``path``, written whole or not at all; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    write_atomic(path, buffer.getvalue())


def plot_confusion_matrix(confusion: np.ndarray, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # Log-scaled colour so the few off-diagonal errors are visible next to ~1,000 correct per class.
    image = ax.imshow(np.log1p(confusion), cmap="Blues")
    for (row, col), count in np.ndenumerate(confusion):
        if count:
            colour = "white" if np.log1p(count) > 0.6 * np.log1p(confusion.max()) else "black"
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="actual")
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(f"Confusion matrix: {confusion.sum()} test digits, accuracy {100 * accuracy:.2f}%")
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.1, top=0.93)
    save_png(fig, path)


def plot_predictions(
    images: np.ndarray,
    predicted: np.ndarray,
    actual: np.ndarray,
    confidence: np.ndarray,
    path: Path,
    count: int,
    mistakes: int,
    seed: int,
) -> None:
    """The lesson's "look at a few predictions", made useful: ``count`` random test digits, then the model's
    ``mistakes`` most confident mistakes (a random sample shows almost none at 99%), each titled
    "predicted / actual"; mistakes in red with a red frame; the caption says how many of all the digits were wrong.

    Each row of digits is laid out in one image with a label above each (one Axes per section, not one per digit:
    a tenth of the drawing time).
    """
    plt = pyplot()
    sample, worst = figure_digits(predicted, actual, confidence, count, mistakes, seed)
    cols = 8
    sections = [(f"{len(sample)} random test digits", sample, False)]
    if len(worst):
        sections.append(
            (f"the {len(worst)} most confident mistakes, with the model's probability for its answer", worst, True)
        )
    rows = [-(-len(indices) // cols) for _, indices, _ in sections]
    height = 1.6 * sum(rows) + 0.35 * len(sections) + 0.6  # inches: the digits, a title per section, the caption
    fig, axes = plt.subplots(
        len(sections), 1, squeeze=False, figsize=(1.4 * cols, height), gridspec_kw={"height_ratios": rows}
    )
    for ax, (title, indices, with_confidence) in zip(axes[:, 0], sections, strict=True):
        _digit_grid(ax, images, predicted, actual, indices, cols, confidence if with_confidence else None)
        ax.set_title(title, fontsize=10, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.75 / height, hspace=0.3 / 1.6)
    n_wrong, total = int((predicted != actual).sum()), len(images)
    fig.suptitle(
        f"predicted / actual: {n_wrong:,} of {total:,} test digits wrong "
        f"({100 * n_wrong / max(total, 1):.2f}%), mistakes in red",
        fontsize=11,
    )
    save_png(fig, path)


def figure_digits(
    predicted: np.ndarray, actual: np.ndarray, confidence: np.ndarray, count: int, mistakes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the predictions figure: ``count`` test digits drawn with ``seed``, and the ``mistakes`` wrong
    predictions the model was most sure of, most confident first."""
    sample = np.random.default_rng(seed).choice(len(predicted), size=min(count, len(predicted)), replace=False)
    wrong = np.flatnonzero(predicted != actual)
    return sample, wrong[np.argsort(-confidence[wrong], kind="stable")][:mistakes]


def _digit_grid(ax, images, predicted, actual, indices, cols: int, confidence: np.ndarray | None) -> None:
    from matplotlib.patches import Rectangle

    rows = -(-len(indices) // cols)
    size, label, gap = images.shape[1], 12, 6  # pixels: a digit, the label above it, the space beside it
    cell_h, cell_w = size + label, size + gap
    mosaic = np.zeros((rows * cell_h + gap // 2, cols * cell_w), dtype=np.uint8)  # white in gray_r
    for n, i in enumerate(indices):
        top, left = (n // cols) * cell_h + label, (n % cols) * cell_w + gap // 2
        mosaic[top : top + size, left : left + size] = images[i]
        wrong = predicted[i] != actual[i]
        text = f"{predicted[i]} / {actual[i]}" + (f"  {100 * confidence[i]:.1f}%" if confidence is not None else "")
        ax.text(
            left + size / 2, top - 2, text, ha="center", va="bottom", fontsize=10, color="red" if wrong else "black"
        )
        if wrong:
            ax.add_patch(Rectangle((left - 1, top - 1), size + 1, size + 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
