"""`mnist-pipeline predict`: preprocessing, input formats, bad files, output formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mnist_pipeline.commands import predict
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import export
from mnist_pipeline.ml.model import build
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


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    seven = digit()
    Image.fromarray(seven).save(folder / "grey.png")
    Image.fromarray(255 - seven).convert("RGB").save(folder / "inverted_rgb.png")
    Image.fromarray(255 - digit(100)).save(folder / "big.jpg", quality=95)
    np.save(folder / "one.npy", seven)
    np.save(folder / "batch.npy", np.stack([seven, seven]).astype(np.float32) / 255)
    (folder / "digits-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28)) + np.stack([seven] * 2).tobytes()
    )
    (folder / "text.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "short-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10)
    return folder


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


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An exported model, as the export stage writes it (ONNX)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export.save_onnx(build(tiny_model_config()).eval(), torch.rand(2, 1, 28, 28), path)
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.cli", "predict", *args], capture_output=True, text=True
    )


def test_cli_predicts_good_inputs_reports_bad_ones_and_exits_non_zero(files, model_file):
    out = cli(
        str(files / "grey.png"), str(files / "text.png"), str(files / "big.jpg"), "--model", str(model_file)
    )
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(files / "grey.png"), str(files / "big.jpg")]
    digit_, probability = lines[0].split("\t")[1:]
    assert 0 <= int(digit_) <= 9 and 0 < float(probability) <= 1
    assert (
        out.stderr.strip() == f"error: {files / 'text.png'}: not a readable image (cannot identify image file "
        f"'{files / 'text.png'}')"
    )


def test_cli_json_and_top_k(files, model_file):
    out = cli(str(files / "batch.npy"), "--json", "--top-k", "3", "--model", str(model_file))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["input"] for r in rows] == [f"{files / 'batch.npy'}[0]", f"{files / 'batch.npy'}[1]"]
    assert len(rows[0]["top_k"]) == 3 and rows[0]["top_k"][0]["digit"] == rows[0]["digit"]
    probabilities = [t["probability"] for t in rows[0]["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_onnx_and_torch_export_files_predict_alike(files, tmp_path, model_file):
    torch.manual_seed(0)
    model = build(tiny_model_config()).eval()
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 28, 28),)), tmp_path / "m.pt2")
    x = torch.from_numpy(np.stack([predict.preprocess(digit(), "a"), predict.preprocess(digit(60), "b")]))
    a = predict.predict(loader.load_model(model_file), ["a", "b"], x.numpy(), 10)
    b = predict.predict(loader.load_model(tmp_path / "m.pt2"), ["a", "b"], x.numpy(), 10)
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


def test_a_reader_that_stops_early_gets_no_traceback(files, model_file):
    """`mnist-pipeline predict ... | head -1`: the pipe closes while predictions are still printed."""
    cmd = [sys.executable, "-m", "mnist_pipeline.cli", "predict", "--model", str(model_file),
           *[str(files / "batch.npy")] * 3000]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith(str(files / "batch.npy"))
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""
