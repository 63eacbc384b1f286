"""The distortions of the robustness report and the augmentation: each does what it is named, on whole batches,
and the same seed gives the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist_pipeline.ml import distortions as d
from mnist_pipeline.ml import robustness
from mnist_pipeline.ml.preprocess import preprocess
from tests.helpers import digit


def batch(n: int = 4) -> torch.Tensor:
    return torch.from_numpy(np.stack([digit()] * n)).float().div(255)[:, None]


def centre(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) centres of mass (column, row)."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = x[:, 0].sum(dim=(1, 2))
    return torch.stack([(x[:, 0] * cols).sum(dim=(1, 2)) / mass, (x[:, 0] * rows).sum(dim=(1, 2)) / mass], dim=1)


def extent(x: torch.Tensor) -> float:
    ink = (x[0, 0] > 0.3).nonzero()
    return float((ink.max(dim=0).values - ink.min(dim=0).values).max())


def test_rotation_turns_a_bar_and_back():
    bar = torch.zeros(1, 1, 28, 28)
    bar[0, 0, 13:15, 4:24] = 1
    upright = d.affine(bar, 90.0)
    assert upright[0, 0, 4:24, 13:15].mean() > 0.9 and upright[0, 0, 13:15, 4:10].mean() < 0.1
    there_and_back = d.affine(d.affine(batch(), 10.0), -10.0)
    assert torch.nn.functional.cosine_similarity(there_and_back.flatten(1), batch().flatten(1)).min() > 0.9


def test_scale_shift_and_strokes_change_what_they_are_named_for():
    x = batch()
    assert extent(d.affine(x, scale=0.7)) < 0.8 * extent(x) < extent(x) < extent(d.affine(x, scale=1.3))
    moved = centre(d.affine(x, shift=torch.tensor([[3.0, -3.0]] * 4))) - centre(x)
    torch.testing.assert_close(moved, torch.tensor([[3.0, -3.0]] * 4), atol=0.3, rtol=0)
    assert d.stroke(x, -1).sum() < x.sum() < d.stroke(x, 1).sum() < d.stroke(x, 2).sum()
    per_digit = d.stroke(x, torch.tensor([-1, 0, 1, 0]))
    assert per_digit[0].sum() < x[0].sum() and torch.equal(per_digit[1], x[1]) and per_digit[2].sum() > x[2].sum()


def test_blur_noise_contrast_and_elastic():
    x, generator = batch(), torch.Generator().manual_seed(0)
    blurred = d.blur(x, 1.0)
    assert blurred.max() < x.max() and blurred.sum() == pytest.approx(x.sum().item(), rel=0.05)
    noisy = d.noise(x, 0.2, generator)
    assert 0.1 < float((noisy - x).std()) < 0.2 and noisy.min() >= 0 and noisy.max() <= 1
    faded = d.contrast(x, 0.25)
    assert faded.min() == pytest.approx(0.375) and faded.max() == pytest.approx(0.625)
    warped = d.elastic(x, 2.0, 3.0, generator)
    assert not torch.equal(warped, x) and warped.sum() == pytest.approx(x.sum().item(), rel=0.1)
    assert (centre(warped) - centre(x)).abs().max() < 2.0  # moved by up to 2 pixels, not displaced


def test_a_photo_is_dark_ink_on_light_uneven_paper_and_preprocessing_recovers_the_digit():
    x = batch(2)
    photos = d.render_photos(x, torch.Generator().manual_seed(0))
    assert photos[0].shape == (d.PHOTO_SIZE, d.PHOTO_SIZE) and photos[0].dtype == np.uint8
    border = np.concatenate([photos[0][0], photos[0][-1]])
    assert np.median(border) > 120 and photos[0].min() < np.median(border) - 60  # light paper, dark ink
    assert not np.array_equal(photos[0], photos[1])  # each photo its own paper and light
    seen = torch.from_numpy(preprocess(photos[0], "photo")).flatten()
    enlarged = np.kron(digit(), np.ones((4, 4), dtype=np.uint8))  # the clean digit, normalised the same way
    original = torch.from_numpy(preprocess(enlarged, "original")).flatten()
    assert torch.nn.functional.cosine_similarity(seen, original, dim=0) > 0.8


def test_the_report_is_the_same_for_the_same_seed_and_keeps_the_labels():
    from mnist_pipeline.ml.model import build
    from tests.helpers import tiny_model_config

    torch.manual_seed(0)
    net = build(tiny_model_config()).eval()

    def model(pixels):  # the report runs the exported model: NumPy in, NumPy out
        with torch.no_grad():
            return net(torch.from_numpy(pixels)).numpy()

    x, labels = batch(6), torch.tensor([7, 7, 7, 7, 7, 7])
    first = robustness.report(model, x, labels, seed=3)
    again = robustness.report(model, x.clone(), labels.clone(), seed=3)
    assert first.equals(again) and torch.equal(labels, torch.tensor([7] * 6))
    assert list(first.distortion.unique()) == [dist.name for dist in robustness.DISTORTIONS]
    assert len(first) == sum(len(dist.strengths) for dist in robustness.DISTORTIONS)
    named = {robustness.metric_name(r.distortion, r.strength) for r in first.itertuples()}
    assert set(robustness.metrics(first)) == named


def test_a_report_on_no_digits_is_empty_and_still_draws(tmp_path):
    """evaluate.robustness_samples: 0 turns the report off: its table, chart data and figure are written empty."""
    from mnist_pipeline.ml.model import build
    from tests.helpers import tiny_model_config

    table = robustness.report(build(tiny_model_config()), batch()[:0], torch.tensor([], dtype=torch.int64), seed=0)
    assert table.empty and tuple(table.columns) == robustness.COLUMNS
    assert robustness.metrics(table) == {}
    assert list(robustness.by_level(table, 0.99).columns) == ["level", "distortion", "accuracy"]
    robustness.plot(table, tmp_path / "robustness.png")
    assert (tmp_path / "robustness.png").read_bytes().startswith(b"\x89PNG")


def test_what_pages_add_stays_in_range_changes_the_digit_and_is_the_same_for_the_same_seed():
    """Lines across the digit (ruled, stripe, scribble, dotted), outlines, specks, motion blur, fog, uneven light:
    the report's new distortions, at both strengths."""
    x = batch(8)
    pages = [dist for dist in robustness.DISTORTIONS if dist.name in
             ("ruled_line", "stripe", "scribble", "dotted_line", "outline", "specks", "motion_blur", "fog",
              "uneven_light")]  # fmt: skip
    assert len(pages) == 9 and all(len(dist.strengths) == 2 for dist in pages)
    for dist in pages:
        for strength in dist.strengths:
            out = dist.apply(x, strength, torch.Generator().manual_seed(1))
            again = dist.apply(x, strength, torch.Generator().manual_seed(1))
            assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1, dist.name
            assert torch.equal(out, again), dist.name
            assert (out - x).abs().sum(dim=(1, 2, 3)).min() > 0.5, dist.name  # every digit changed
    lines = d.line(torch.zeros(8, 1, 28, 28), 2, torch.Generator().manual_seed(0))
    assert ((lines > 0.5).sum(dim=(1, 2, 3)) >= 28).all()  # a 2-pixel line across the frame, each digit
    edge = d.outline(x, 1)
    assert (edge <= x + 1e-6).all() and edge.sum() < x.sum()  # only the strokes' edges


def test_the_clutter_augmentation_draws_what_pages_add_on_its_share_of_the_digits():
    from mnist_pipeline.ml import augment

    x = batch(64)
    none = augment.draw_clutter(64, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none.apply(x), x)
    every = augment.draw_clutter(64, 1.0, torch.Generator().manual_seed(0))
    changed = (every.apply(x) - x).abs().sum(dim=(1, 2, 3)) > 0
    assert changed.all()
    again = augment.draw_clutter(64, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(again.apply(x), every.apply(x))  # the seed fixes it
    half = every[torch.arange(32)]  # a rank's share of a global batch: the same digits' clutter
    assert torch.equal(half.apply(x[:32]), every.apply(x)[:32])
