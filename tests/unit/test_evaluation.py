"""Metric math and the evaluate stage's figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist_pipeline.ml import evaluation


def test_confusion_matrix_rows_are_actual():
    cm = evaluation.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


def test_per_class_report_matches_hand_computation():
    # actual 0: 8 right, 2 called 1; actual 1: 5 right; class 2 never predicted nor present
    cm = np.zeros((3, 3), dtype=int)
    cm[0, 0], cm[0, 1], cm[1, 1] = 8, 2, 5
    report = evaluation.per_class_report(cm)
    p1, r1 = 5 / 7, 1.0
    assert report.loc[0, "precision"] == 1.0 and report.loc[0, "recall"] == 0.8
    assert report.loc[1, "precision"] == pytest.approx(p1) and report.loc[1, "recall"] == r1
    assert report.loc[1, "f1"] == pytest.approx(2 * p1 * r1 / (p1 + r1))
    assert report.loc[2, ["precision", "recall", "f1"]].tolist() == [0.0, 0.0, 0.0]
    assert report["support"].tolist() == [10, 5, 0]


def test_evaluate_loss_and_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    result = evaluation.evaluate(logits, labels)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert result.metrics() == {"test_loss": result.loss, "test_accuracy": result.accuracy, "test_errors": 1}


def test_figures_and_tables_are_written(tmp_path):
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 10, 200)
    predicted = np.where(rng.random(200) < 0.9, actual, (actual + 1) % 10)
    cm = evaluation.confusion_matrix(actual, predicted)
    evaluation.plot_confusion_matrix(cm, tmp_path / "cm.png")
    images = rng.integers(0, 255, (200, 28, 28), dtype=np.uint8)
    confidence = rng.random(200)
    evaluation.plot_predictions(images, predicted, actual, confidence, tmp_path / "pred.png", 24, mistakes=8, seed=0)
    evaluation.write_report_tables(evaluation.per_class_report(cm), tmp_path / "t.csv", tmp_path / "t.md")
    evaluation.write_confusion_pairs(actual, predicted, tmp_path / "pairs.csv")
    for name in ("cm.png", "pred.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "t.csv").read_text().startswith("digit,precision,recall,f1,support")
    assert (tmp_path / "t.md").read_text().startswith("|   digit |")
    assert len((tmp_path / "pairs.csv").read_text().splitlines()) == 201


def test_the_predictions_figure_picks_the_most_confident_mistakes():
    actual = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    predicted = np.array([0, 2, 2, 4, 4, 6, 6, 0])  # wrong at 1, 3, 5 and 7
    confidence = np.array([0.9, 0.6, 0.99, 0.95, 0.5, 0.8, 0.7, 0.99])
    sample, worst = evaluation.figure_digits(predicted, actual, confidence, count=4, mistakes=3, seed=0)
    assert worst.tolist() == [7, 3, 5]  # wrong ones only, most confident first, at most 3
    assert len(set(sample)) == 4 and set(sample) <= set(range(8))
    _, none = evaluation.figure_digits(actual, actual, confidence, count=4, mistakes=3, seed=0)
    assert len(none) == 0


def _red_pixels(png) -> int:
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).sum())


def test_mistakes_are_drawn_in_red_and_only_when_there_are_some(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (300, 28, 28), dtype=np.uint8)
    actual = rng.integers(0, 10, 300)
    confidence = rng.random(300)
    right = tmp_path / "right.png"
    evaluation.plot_predictions(images, actual, actual, confidence, right, 16, mistakes=8, seed=0)
    assert _red_pixels(right) == 0
    # Three mistakes among 300: a random sample of 16 would most likely show none; the figure still shows all three.
    predicted = actual.copy()
    predicted[[10, 20, 30]] = (actual[[10, 20, 30]] + 1) % 10
    wrong = tmp_path / "wrong.png"
    evaluation.plot_predictions(images, predicted, actual, confidence, wrong, 16, mistakes=8, seed=0)
    assert _red_pixels(wrong) > 3 * 4 * 28  # at least the frames of three digits
