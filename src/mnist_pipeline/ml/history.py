"""A training's history, epoch by epoch: what each epoch measured (`EpochMetrics`) and the CSV DVC plots from it.

No torch here: the export stage reads the history back from the training's record to log it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import names
from mnist_pipeline.files import write_atomic


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    test_loss: float | None  # None when training without the test split (the tuner)
    test_accuracy: float | None
    seconds: float  # wall time since training started, at the end of this epoch (time before a resume included)
    val_loss: float | None = None  # on the held-out training digits, when train.validation > 0
    val_accuracy: float | None = None
    measured_at: float | None = None  # when the epoch ended (Unix time, s): MLflow's timestamp of its metrics

    def metrics(self) -> dict[str, float]:
        """What each epoch logs to MLflow: the figures it has."""
        named = {
            names.TRAIN_LOSS: self.train_loss,
            names.TEST_LOSS: self.test_loss,
            names.TEST_ACCURACY: self.test_accuracy,
            names.VAL_LOSS: self.val_loss,
            names.VAL_ACCURACY: self.val_accuracy,
        }
        return {name: value for name, value in named.items() if value is not None}

    def summary(self) -> str:
        """The epoch's figures as the console shows them."""
        parts = [f"train loss (epoch mean) {self.train_loss:.4f}"]
        if self.val_loss is not None:
            parts.append(f"validation loss {self.val_loss:.4f}  validation accuracy {100 * self.val_accuracy:.2f}%")
        if self.test_loss is not None:
            parts.append(f"test loss {self.test_loss:.4f}  test accuracy {100 * self.test_accuracy:.2f}%")
        return "  ".join(parts)


def write_history(path: Path, history: list[EpochMetrics]) -> None:
    """Per-epoch metrics as CSV, the file DVC plots as the training curves (six significant digits); the
    validation columns only when there was a validation split. No times: git holds the file, and the same training
    on the same hardware must write the same bytes (the times are in the training's record, and in MLflow)."""
    columns = [
        f.name
        for f in dataclasses.fields(EpochMetrics)
        if f.name not in ("seconds", "measured_at") and any(getattr(m, f.name) is not None for m in history)
    ]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for m in history:
        writer.writerow([_number(getattr(m, name)) for name in columns])
    write_atomic(path, text.getvalue())


def _number(value) -> str:
    return "" if value is None else str(value) if isinstance(value, int) else f"{value:.6g}"
