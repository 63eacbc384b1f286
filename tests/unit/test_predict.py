"""`mnist-pipeline predict`: preprocessing, input formats, bad files, output formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from mnist_pipeline.commands import predict
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml.model import build
from mnist_pipeline.ml.tensors import Tensors
from mnist_pipeline.tracking import loader
from tests.helpers import REPO_ROOT, digit, tiny_model_config


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    total = image.sum()
    return (image.sum(1) * np.arange(28)).sum() / total, (image.sum(0) * np.arange(28)).sum() / total


def test_28x28_light_on_dark_is_kept_and_dark_on_light_is_inverted():
    image = digit()
    kept = predict.preprocess(image, "x")
    np.testing.assert_allclose(kept, image / 255.0)
    np.testing.assert_allclose(predict.preprocess(255 - image, "x"), kept)


def test_other_sizes_are_cropped_scaled_to_20_pixels_and_centred_by_mass():
    out = predict.preprocess(255 - digit(100), "big")  # 100x100, dark on light
    assert out.shape == (28, 28) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    rows, cols = np.flatnonzero((out > 0.2).any(1)), np.flatnonzero((out > 0.2).any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def test_blank_and_wrong_shape_are_refused():
    with pytest.raises(PipelineError, match="blank"):
        predict.preprocess(np.full((28, 28), 255, np.uint8), "white.png")
    with pytest.raises(PipelineError, match="expected a 2-D image"):
        predict.preprocess(np.zeros((3, 28, 28)), "x")


def test_every_format_reads_as_the_same_digit(files):
    reference = predict.preprocess(digit(), "ref")
    for name in ("grey.png", "inverted_rgb.png", "one.npy", "batch.npy", "digits-idx3-ubyte"):
        for label, image in predict.read_inputs(files / name):
            np.testing.assert_allclose(predict.preprocess(image, label), reference, atol=1 / 255, err_msg=label)
    labels = [label for label, _ in predict.read_inputs(files / "digits-idx3-ubyte")]
    assert labels == [f"{files / 'digits-idx3-ubyte'}[0]", f"{files / 'digits-idx3-ubyte'}[1]"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("text.png", "text.png: not a readable image"),
        ("empty.jpg", "empty.jpg: the file is empty"),
        ("objects.npy", "objects.npy: not a readable .npy array"),
        ("short-idx3-ubyte", "short-idx3-ubyte: IDX header says 5x5x5"),
        ("missing.png", "missing.png: no such file"),
    ],
)
def test_bad_inputs_get_one_line_naming_the_file(files, name, message):
    with pytest.raises(PipelineError) as exc:
        list(predict.read_inputs(files / name))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_onnx_and_torch_export_files_predict_alike(files, tmp_path, model_file):
    torch.manual_seed(0)
    model = build(tiny_model_config()).eval()
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 28, 28),)), tmp_path / "m.pt2")
    x = torch.from_numpy(np.stack([predict.preprocess(digit(), "a"), predict.preprocess(digit(60), "b")]))
    a = predict.predict(loader.load_model(model_file), ["a", "b"], x.numpy(), 10)
    b = predict.predict(loader.load_model(tmp_path / "m.pt2", allow_pickle=True), ["a", "b"], x.numpy(), 10)
    for pa, pb in zip(a, b, strict=True):
        assert pa.digit == pb.digit and pa.probability == pytest.approx(pb.probability, abs=1e-5)


def test_the_default_model_is_the_champion_of_the_name_params_yaml_gives(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["export"]["model_name"] = "digits"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert loader.champion() == "models:/digits@champion"
    (tmp_path / "params.yaml").unlink()
    with pytest.raises(PipelineError, match="no params.yaml in .*: run this in the project, or name a model"):
        loader.champion()


def test_show_writes_what_the_model_saw_and_low_probabilities_are_flagged(files, tmp_path, model_file, capsys):
    from PIL import Image

    status = predict.main([files / "big.jpg", files / "batch.npy"], str(model_file),
                          predict.Options(as_json=True, show=tmp_path / "seen", uncertain_below=1.01))  # fmt: skip
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(line["uncertain"] for line in lines)  # no probability reaches 1.01
    seen = sorted(p.name for p in (tmp_path / "seen").iterdir())
    assert seen == ["batch.npy_0_.png", "batch.npy_1_.png", "big.jpg.png"]
    image = np.asarray(Image.open(tmp_path / "seen" / "big.jpg.png"))
    assert image.shape == (224, 224) and image.max() > 200 and image[0].max() == 0  # light digit, black border
    predict.main([files / "big.jpg"], str(model_file), predict.Options(uncertain_below=0.0))
    assert "uncertain" not in capsys.readouterr().out


def test_show_writes_nothing_when_the_model_cannot_be_loaded(files, tmp_path):
    """The model is loaded before any input is read: `--show seen/` wrote its images, then failed for want of a
    model."""
    with pytest.raises(PipelineError, match="no-such-model.onnx"):
        predict.main([files / "big.jpg"], str(tmp_path / "no-such-model.onnx"), predict.Options(show=tmp_path / "seen"))
    assert not (tmp_path / "seen").exists()


def test_the_help_names_the_model_files_predict_loads():
    from click.testing import CliRunner

    from mnist_pipeline import cli

    text = CliRunner().invoke(cli.main, ["predict", "--help"]).output
    assert "TorchScript" not in text and ".onnx" in text and ".pt2" in text


def glyphs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic handwritten-like digits (Pillow's own font at random sizes, slants and stroke widths), made
    28x28 the way `predict` makes any larger image, and their labels: digits where real MNIST is absent."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = []
    for label in labels:
        canvas = Image.new("L", (64, 64), 0)
        font = ImageFont.load_default(size=int(rng.integers(34, 46)))
        ImageDraw.Draw(canvas).text((32, 32), str(label), fill=255, font=font, anchor="mm",
                                    stroke_width=int(rng.integers(0, 3)), stroke_fill=255)  # fmt: skip
        canvas = canvas.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR)
        images.append(predict.preprocess(np.asarray(canvas), "glyph"))
    return torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(labels)


@pytest.fixture(scope="module")
def glyph_model(tmp_path_factory):
    """A small model trained on synthetic glyphs and exported as the pipeline exports it, with 200 test glyphs:
    (the ONNX file, test images as (200, 1, 28, 28) floats, labels)."""
    from mnist_pipeline.ml import export, training
    from tests.unit.test_training import TRAIN

    split = [glyphs(n, seed) for n, seed in ((2000, 1), (200, 2))]
    train, test = (Tensors((x * 255).round().to(torch.uint8), y) for x, y in split)
    model = training.train(tiny_model_config(input_norm="per_image"), TRAIN.replace(epochs=3), train, test,
                           torch.device("cpu"), log=None).model.eval()  # fmt: skip
    path = tmp_path_factory.mktemp("glyph-model") / "model.onnx"
    export.save_onnx(model, torch.rand(2, 1, 28, 28), path)
    return path, test.x(slice(0, 200)), test.y[:200]


def test_photos_of_200_test_digits_are_read_through_predict_as_well_as_the_digits(glyph_model, tmp_path, capsys):
    """200 test digits rendered as photos (dark ink on uneven grey paper, noise, JPEG), saved as files and read by
    `predict` with an exported model: nearly as many right as the clean digits. Before the background was removed,
    a grey paper survived the inversion and the digit arrived as a small mark inside a grey box."""
    from PIL import Image

    from mnist_pipeline.ml import runtime
    from mnist_pipeline.ml.distortions import render_photos
    from mnist_pipeline.ml.evaluation import predict_logits

    model, x, labels = glyph_model
    clean = float((predict_logits(runtime.onnx_runner(model), x.numpy(), 200).argmax(1) == labels).float().mean())
    files = []
    for i, photo in enumerate(render_photos(x, torch.Generator().manual_seed(0))):
        Image.fromarray(photo).save(tmp_path / f"{i:03}.jpg", quality=90)
        files.append(tmp_path / f"{i:03}.jpg")
    assert predict.main(files, str(model), predict.Options(as_json=True)) == 0
    digits = [json.loads(line)["digit"] for line in capsys.readouterr().out.splitlines()]
    photos = float((torch.tensor(digits) == labels).float().mean())
    print(f"\n200 test digits: {100 * clean:.1f}% right as they are, {100 * photos:.1f}% as photos through predict")
    assert clean > 0.9 and photos >= clean - 0.05


@pytest.mark.parametrize("kind", ["scans", "thin strokes", "mouse-drawn"])
def test_inputs_that_are_not_photos_read_as_well_as_before_the_photo_path(glyph_model, kind):
    """Small scans enlarged, thin pen strokes and mouse drawings (`input_kinds`) read as well as through the
    preprocessing of commit 1ad3493, before the photo path: a flat paper is not a photo's. The photo path cost
    thin strokes 5.7 points and scans 4.8 on real MNIST (`python -m benchmarks.inputs`): it dropped the pieces of
    ink away from the largest one and broke strokes wider than its background window."""
    from benchmarks.inputs import preprocess_1ad3493
    from mnist_pipeline.ml import runtime
    from mnist_pipeline.ml.input_kinds import KINDS

    model, x, labels = glyph_model
    images = KINDS[kind]((x[:, 0].numpy() * 255).round().astype(np.uint8), np.random.default_rng(0))
    run = runtime.onnx_runner(model)
    right = {}
    for name, prepare in (("1ad3493", preprocess_1ad3493), ("now", lambda image: predict.preprocess(image, kind))):
        prepared = np.stack([prepare(image) for image in images]).astype(np.float32)[:, None]
        right[name] = float((run(prepared).argmax(1) == labels.numpy()).mean())
    print(f"\n{kind}: {100 * right['1ad3493']:.1f}% right through 1ad3493's preprocessing, {100 * right['now']:.1f}%"
          " now")  # fmt: skip
    assert right["now"] >= right["1ad3493"] - 0.01


def test_a_portrait_photo_is_read_the_right_way_up(tmp_path):
    """A phone stores a portrait photo's pixels sideways and says so in EXIF (orientation 6: turn 90 degrees
    clockwise to view): the digit is read as it is seen, not as it is stored."""
    from PIL import Image

    upright = (255 - digit(size=96)).astype(np.uint8)  # dark ink on light paper, as photographed
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    stored = Image.fromarray(np.rot90(upright).copy())  # the pixels as the phone writes them
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "portrait.jpg", quality=95, exif=exif)
    ((_, seen),) = predict.read_inputs(tmp_path / "portrait.jpg")
    ((_, reference),) = predict.read_inputs(tmp_path / "upright.jpg")
    assert seen.shape == reference.shape and np.abs(seen.astype(float) - reference).mean() < 2


def test_an_input_the_arithmetic_overflows_on_is_refused_in_one_line_and_json_stays_json(tmp_path, model_file,
                                                                                           capsys):  # fmt: skip
    """A float64 .npy with one image scaled by 1e300 (beyond float32), and one of 3e38 (within float32, but its
    arithmetic overflows): each is refused in one line, no NumPy warning, every --json line is valid JSON."""
    import warnings

    good = digit().astype(np.float64) / 255
    np.save(tmp_path / "huge.npy", np.stack([good, good * 1e300]))
    np.save(tmp_path / "large.npy", (good * 3e38).astype(np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = predict.main([tmp_path / "huge.npy", tmp_path / "large.npy", tmp_path / "huge.npy"],
                              str(model_file), predict.Options(as_json=True))  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 1 and not caught, [str(w.message) for w in caught]
    lines = err.splitlines()
    assert all(line.startswith("error: ") for line in lines) and len(lines) == 2, err  # huge.npy, twice
    assert "huge.npy[1]: holds values beyond float32's range" in err

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    for line in out.splitlines():
        answer = json.loads(line, parse_constant=no_constant)
        assert 0 <= answer["probability"] <= 1


def test_a_folder_and_a_name_with_a_newline_get_their_own_lines(tmp_path, model_file, capsys):
    with pytest.raises(PipelineError, match=r"is a folder; give the files in it"):
        list(predict.read_inputs(tmp_path))
    odd = tmp_path / "two\nlines.npy"
    np.save(odd, digit().astype(np.float32) / 255)
    assert predict.main([odd], str(model_file)) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split("\t")[0] == f"{tmp_path}/two\\nlines.npy"  # the name on one line, its newline shown as \n


def test_an_answer_that_is_not_a_number_is_refused_not_printed(tmp_path, capsys, monkeypatch):
    """Whatever makes a model's logits NaN (here a model that answers NaN), no NaN reaches the output."""
    np.save(tmp_path / "one.npy", digit().astype(np.float32) / 255)
    monkeypatch.setattr(loader, "load_model", lambda *args: lambda x: np.full((len(x), 10), np.nan, np.float32))
    assert predict.main([tmp_path / "one.npy"], "any", predict.Options(as_json=True)) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "one.npy: the model answered NaN or infinity for it; no digit" in err
