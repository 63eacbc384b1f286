"""The robustness report: the model's accuracy on test digits under the distortions real inputs have, each at a
few strengths, seeded so that the report is the same on every run; `robust_accuracy` is the mean over all.

The "photo" distortion renders each digit as a photo (`distortions.render_photos`) and reads it back through
`predict`'s own preprocessing (`preprocess`): it measures what a user photographing a digit gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mnist_pipeline.ml import distortions as d

Distort = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _photo(x: torch.Tensor, quality: float, generator: torch.Generator) -> torch.Tensor:
    from mnist_pipeline.ml.preprocess import preprocess

    photos = d.render_photos(x, generator, quality=int(quality))
    return torch.from_numpy(np.stack([preprocess(p, "photo") for p in photos]))[:, None]


def _shift(x: torch.Tensor, pixels: float, generator: torch.Generator) -> torch.Tensor:
    signs = torch.stack([d.random_signs(len(x), generator), d.random_signs(len(x), generator)], dim=1)
    return d.affine(x, shift=signs * pixels)


@dataclass(frozen=True)
class Distortion:
    name: str
    strengths: tuple[float, ...]  # the milder first
    unit: str
    apply: Distort


DISTORTIONS = (
    Distortion("rotation", (10, 20), "degrees, either way", lambda x, s, g: d.affine(x, s * d.random_signs(len(x), g))),
    Distortion("scale", (0.7, 1.3), "times the size", lambda x, s, g: d.affine(x, scale=s)),
    Distortion("shift", (3, 6), "pixels across and down, either way (no re-centring)", _shift),
    Distortion("thinner", (1, 2), "pixels of erosion", lambda x, s, g: d.stroke(x, -int(s))),
    Distortion("thicker", (1, 2), "pixels of dilation", lambda x, s, g: d.stroke(x, int(s))),
    Distortion("blur", (1.0, 1.5), "Gaussian sigma, pixels", lambda x, s, g: d.blur(x, s)),
    Distortion("noise", (0.2, 0.4), "Gaussian sigma, of the pixel range", lambda x, s, g: d.noise(x, s, g)),
    Distortion("elastic", (2.0, 3.0), "pixels of largest move", lambda x, s, g: d.elastic(x, s, 3.0, g)),
    Distortion("contrast", (0.5, 0.25), "of the full range", lambda x, s, g: d.contrast(x, s)),
    # One strength: the photo's paper, light, ink and noise are drawn per digit, and the JPEG quality barely matters
    # (75 and 35 scored alike): a second strength would double the report's slowest part and say nothing more.
    Distortion("photo", (50,), "JPEG quality, through predict's preprocessing", _photo),
    # What pages add. A line through the digit's middle, as ink: a ruled line (near horizontal), a faint stripe (any
    # angle), a scribble (a wavy pen stroke) and a dotted line, each by its width in pixels.
    Distortion(
        "ruled_line",
        (1, 2),
        "pixels wide, within 5 degrees of horizontal, 70% ink",
        lambda x, s, g: d.line(x, s, g, brightness=0.7, max_angle=5),
    ),
    Distortion("stripe", (3, 5), "pixels wide, any angle, 40% ink", lambda x, s, g: d.line(x, s, g, brightness=0.4)),
    Distortion(
        "scribble", (1, 2), "pixels wide, a sine wave of 3 pixels, full ink", lambda x, s, g: d.line(x, s, g, wave=3.0)
    ),
    Distortion("dotted_line", (1, 2), "pixels wide, 2-pixel dots, full ink", lambda x, s, g: d.line(x, s, g, dash=2.0)),
    Distortion("outline", (2, 1), "pixels of edge kept (an edge image)", lambda x, s, g: d.outline(x, int(s))),
    Distortion("specks", (0.03, 0.08), "of the pixels set to full ink or none", lambda x, s, g: d.specks(x, s, g)),
    Distortion("motion_blur", (3, 5), "pixels of motion, any direction", lambda x, s, g: d.motion_blur(x, int(s), g)),
    Distortion("fog", (0.5, 0.8), "of grey haze at its densest", lambda x, s, g: d.fog(x, s, g)),
    Distortion("uneven_light", (0.5, 0.8), "of fading at the darker side", lambda x, s, g: d.uneven_light(x, s, g)),
)


COLUMNS = ("distortion", "strength", "level", "unit", "accuracy")  # a row of the report


def metric_name(distortion: str, strength: float) -> str:
    """The MLflow metric of one distortion at one strength: ``robust_rotation_10``, ``robust_scale_0.7``."""
    return f"robust_{distortion}_{strength:g}"


@torch.inference_mode()
def report(
    model: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int = 2000
) -> pd.DataFrame:
    """One row per distortion and strength: (distortion, strength, level, unit, accuracy). ``model``: NumPy pixels
    to logits (the exported model, `runtime.onnx_runner`); ``x``: (N, 1, 28, 28) pixels in [0, 1]. Each distortion
    draws from a generator of its own seeded from ``seed``, so adding one changes none of the others."""
    if len(x) == 0:  # the report is off (evaluate.robustness_samples: 0)
        return pd.DataFrame(columns=COLUMNS)
    rows = []
    for index, distortion in enumerate(DISTORTIONS):
        for level, strength in enumerate(distortion.strengths, start=1):
            generator = torch.Generator().manual_seed(seed * 1000 + index * 10 + level)
            correct = 0
            for start in range(0, len(x), batch_size):
                batch = distortion.apply(x[start : start + batch_size], strength, generator).float()
                predicted = model(batch.numpy()).argmax(axis=1)
                correct += int((predicted == labels[start : start + batch_size].numpy()).sum())
            rows.append(
                {
                    "distortion": distortion.name,
                    "strength": strength,
                    "level": level,
                    "unit": distortion.unit,
                    "accuracy": correct / len(x),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def metrics(table: pd.DataFrame) -> dict[str, float]:
    """One metric per distortion and strength (see `metric_name`)."""
    return {metric_name(r.distortion, r.strength): float(r.accuracy) for r in table.itertuples()}


def robust_accuracy(table: pd.DataFrame) -> float:
    """The mean accuracy over every distortion and strength: ``robust_accuracy``."""
    return float(table.accuracy.mean())


def by_level(table: pd.DataFrame, clean_accuracy: float) -> pd.DataFrame:
    """A row per distortion and strength level (0: none, the clean accuracy), in the report's order: DVC's chart
    (template ``by_distortion``) draws a line per distortion the report has, with no list of them to keep."""
    clean = pd.DataFrame({"level": 0, "distortion": list(dict.fromkeys(table.distortion)), "accuracy": clean_accuracy})
    rows = pd.concat([clean, table[["level", "distortion", "accuracy"]]])
    order = {name: i for i, name in enumerate(clean.distortion)}
    return rows.sort_values(["distortion", "level"], key=lambda c: c.map(order) if c.name == "distortion" else c)


def plot(table: pd.DataFrame, path: Path) -> None:
    """Accuracy per distortion, a bar for each strength (the PNG logged with the run): nineteen lines in ten
    colours could not be told apart."""
    from mnist_pipeline.ml.evaluation import pyplot, save_png

    names = list(dict.fromkeys(table.distortion))
    figure, axes = pyplot().subplots(figsize=(7, 1.2 + 0.34 * max(len(names), 1)), dpi=100)
    clean = table.attrs.get("clean_accuracy")
    for level, colour, offset in ((1, "#6baed6", -0.2), (2, "#08519c", 0.2)):
        rows = table[table.level == level].set_index("distortion")
        shown = [name for name in names if name in rows.index]
        positions = [names.index(name) + offset for name in shown]
        axes.barh(
            positions,
            [rows.accuracy[name] for name in shown],
            height=0.38,
            color=colour,
            label=("milder" if level == 1 else "stronger"),
        )
        for y, name in zip(positions, shown, strict=True):
            strength = f"{rows.strength[name]:g}"
            axes.text(
                rows.accuracy[name] + 0.005,
                y,
                f"{100 * rows.accuracy[name]:.1f}% ({strength})",
                va="center",
                fontsize=7,
            )
    if clean is not None:
        axes.axvline(clean, color="grey", linestyle="--", linewidth=1, label=f"clean {100 * clean:.2f}%")
    axes.set(
        yticks=range(len(names)),
        yticklabels=names,
        xlim=(0, 1.12),
        xlabel="test accuracy",
        title="Robustness: test accuracy under distortions (strength in brackets)",
    )
    axes.invert_yaxis()
    axes.grid(axis="x", alpha=0.3)
    if table.empty:
        axes.text(0.5, 0.5, "no report: evaluate.robustness_samples is 0", ha="center", transform=axes.transAxes)
    else:
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncols=3, frameon=False)
    figure.tight_layout()
    save_png(figure, path)


def write(table: pd.DataFrame, clean_accuracy: float, csv: Path, plot_csv: Path, metrics_json: Path, png: Path) -> None:
    """The report's files: its table, a column per distortion by strength level (DVC's plot), one metric per
    distortion and strength (JSON), and its figure. An empty report writes them empty."""
    import json

    from mnist_pipeline.files import write_atomic

    table.attrs["clean_accuracy"] = clean_accuracy  # the figure's level 0
    write_atomic(csv, table.drop(columns="level").to_csv(index=False))
    write_atomic(plot_csv, by_level(table, clean_accuracy).to_csv(index=False))
    write_atomic(metrics_json, json.dumps(metrics(table), indent=2) + "\n")
    plot(table, png)
