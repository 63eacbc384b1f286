"""Metrics, the confusion matrix, the per-class table and the figures of the evaluate stage."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.files import write_atomic
from mnist_pipeline.model import NUM_CLASSES


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, 1, 28, 28) pixels -> (N, 10) logits, in batches."""
    model.eval().to(memory_format=torch.channels_last)  # the layout the convolutions are fastest in
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predicted: np.ndarray  # (N,) predicted digit per test image
    confusion: np.ndarray  # (10, 10) counts, rows = actual, columns = predicted

    def metrics(self) -> dict[str, float]:
        return {"test_loss": self.loss, "test_accuracy": self.accuracy}


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts with rows = actual class, columns = predicted class."""
    flat = actual.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def evaluate(logits: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    predicted = logits.argmax(dim=1)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (predicted == labels).double().mean().item()
    actual_np, predicted_np = labels.cpu().numpy(), predicted.cpu().numpy()
    return Evaluation(loss, accuracy, predicted_np, confusion_matrix(actual_np, predicted_np))


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    write_atomic(path, buffer.getvalue())


def plot_confusion_matrix(confusion: np.ndarray, path: Path) -> None:
    plt = _pyplot()
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
    _save_png(fig, path)


def plot_predictions(
    images: np.ndarray, predicted: np.ndarray, actual: np.ndarray, path: Path, count: int, seed: int
) -> None:
    """Random test digits titled "predicted / actual"; misclassified ones in red with a red frame.

    The digits are laid out in one image with a label above each (one Axes, not one per digit: a tenth of the
    drawing time).
    """
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=min(count, len(images)), replace=False)
    cols = min(8, len(chosen))
    rows = -(-len(chosen) // cols)
    size, label, gap = images.shape[1], 12, 6  # pixels: a digit, the label above it, the space beside it
    cell_h, cell_w = size + label, size + gap
    mosaic = np.zeros((rows * cell_h + gap // 2, cols * cell_w), dtype=np.uint8)  # white in gray_r
    fig = plt.figure(figsize=(1.4 * cols, 1.6 * rows + 0.4))
    ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.5 / (1.6 * rows + 0.4)))
    for n, i in enumerate(chosen):
        top, left = (n // cols) * cell_h + label, (n % cols) * cell_w + gap // 2
        mosaic[top : top + size, left : left + size] = images[i]
        wrong = predicted[i] != actual[i]
        ax.text(left + size / 2, top - 2, f"{predicted[i]} / {actual[i]}", ha="center", va="bottom", fontsize=10,
                color="red" if wrong else "black")  # fmt: skip
        if wrong:
            ax.add_patch(Rectangle((left - 1, top - 1), size + 1, size + 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    errors = int((predicted[chosen] != actual[chosen]).sum())
    fig.suptitle(f"predicted / actual ({errors} of {len(chosen)} wrong, in red)", fontsize=10)
    _save_png(fig, path)
