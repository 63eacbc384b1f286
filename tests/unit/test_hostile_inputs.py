"""Inputs an attacker or a careless user can send: decompression bombs, huge images, non-finite pixels, params
that cannot work. Each is refused in one line naming it, within bounded memory, and the other inputs still go."""

from __future__ import annotations

import http.server
import struct
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_pipeline import config
from mnist_pipeline.commands import predict
from mnist_pipeline.config import TrainConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import data, training
from mnist_pipeline.ml.tensors import Tensors
from tests.helpers import AUGMENTATION_OFF, REPO_ROOT, digit, serving, tiny_model_config, trickle

BOMB_BYTES = 128 * 2**20  # what the bomb below inflates to


def gzip_bomb(size: int = BOMB_BYTES, head: bytes = b"") -> bytes:
    """A small .gz (about 1/1000 of ``size``) that inflates to ``size`` bytes: ``head``, then zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(2**20)
    parts = [packer.compress(head)]
    for _ in range((size - len(head)) // len(chunk)):
        parts.append(packer.compress(chunk))
    return b"".join([*parts, packer.flush()])


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb()


def test_a_decompression_bomb_is_refused_without_inflating_it(bomb):
    file = data.expected_files("mnist")[2]  # t10k-images: 7,840,016 bytes decompressed
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError, match=r"t10k-images-idx3-ubyte.gz inflates to more than 7,840,016 bytes"):
            data.verify(file, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(bomb) < 2**20 and peak < 32 * 2**20  # what it held: the expected size and change, not 128 MB


def test_the_download_stage_skips_a_mirror_serving_a_bomb_and_takes_the_next(tmp_path, bomb, mirror_dir, mirror_md5,
                                                                             monkeypatch):  # fmt: skip
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 64 * 2**20)  # the limit for a data set of one's own (256 MiB)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for name in data.FILE_NAMES:
        (hostile / f"{name}.gz").write_bytes(bomb)
    files = data.expected_files("mnist", mirror_md5)  # the synthetic set's checksums: at most MAX_IDX_BYTES a file
    data.download(tmp_path / "raw", files, mirror_list=[str(hostile), str(mirror_dir)])
    assert data.verify_folder(tmp_path / "raw")
    with pytest.raises(PipelineError, match=r"inflates to more than 67,108,864 bytes, more than the file can be"):
        data.download(tmp_path / "raw2", files, mirror_list=[str(hostile)])
    assert not (tmp_path / "raw2" / data.FILE_NAMES[0]).exists()


def png_claiming(width: int, height: int, path: Path) -> Path:
    """A 1x1 PNG whose header says width x height: a decoder would allocate for the header's size."""
    Image.new("L", (1, 1), 255).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def test_huge_images_nan_pixels_and_idx_bombs_are_refused_by_name_the_rest_is_predicted(tmp_path, capsys):
    good = tmp_path / "seven.png"
    Image.fromarray(digit()).save(good)
    huge = png_claiming(20_000, 20_000, tmp_path / "huge.png")
    nan = np.stack([digit(), digit()]).astype(np.float32) / 255
    nan[1, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "inf.npy", np.full((28, 28), np.inf, np.float32))
    header = b"\x00\x00\x08\x03" + struct.pack(">III", 10**9, 28, 28)  # a billion images, claims the header
    (tmp_path / "bomb-idx3-ubyte.gz").write_bytes(gzip_bomb(64 * 2**20, header))  # blank digits: first refused
    model = tmp_path / "model.onnx"
    _save_onnx(model)
    inputs = [huge, tmp_path / "nan.npy", good, tmp_path / "inf.npy", tmp_path / "bomb-idx3-ubyte.gz"]
    capsys.readouterr()  # what exporting the model printed
    status = predict.main(inputs, str(model))
    out, err = capsys.readouterr()
    assert status == 1 and [line.split("\t")[0] for line in out.splitlines()] == [str(good)]
    errors = err.splitlines()
    assert errors[0] == f"error: {huge}: an image of 20000x20000 pixels; refused (at most 25,000,000)"
    assert errors[1].startswith(f"error: {tmp_path / 'nan.npy'}[1]: holds NaN or infinite values; refused")
    assert errors[2].startswith(f"error: {tmp_path / 'inf.npy'}: holds NaN or infinite values")
    assert errors[3] == f"error: {tmp_path / 'bomb-idx3-ubyte.gz'}[0]: the image is blank (every pixel is 0)"


def _save_onnx(path: Path) -> None:
    from mnist_pipeline.ml import export
    from mnist_pipeline.ml.model import build

    torch.manual_seed(0)
    export.save_onnx(build(tiny_model_config()).eval(), torch.rand(2, 1, 28, 28), path)


def test_white_strokes_on_a_transparent_background_are_a_digit(tmp_path):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere; only the strokes are opaque
    rgba[..., 3] = digit()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "white-on-transparent.png")
    ((_, image),) = predict.read_inputs(tmp_path / "white-on-transparent.png")
    np.testing.assert_allclose(predict.preprocess(image, "x"), digit() / 255.0, atol=1 / 255)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "batch_size",
            1_000_000_000,
            "train.batch_size = 1000000000 is not allowed: input should be less than or equal to 60000",
        ),  # noqa: E501
        (
            "epochs",
            1_000_000_000,
            "train.epochs = 1000000000 is not allowed: input should be less than or equal to 1000",
        ),  # noqa: E501
        ("weight_decay", float("inf"), "train.weight_decay = inf is not allowed: input should be a finite number"),
        ("lr", float("nan"), "train.lr = nan is not allowed"),
    ],
)
def test_params_that_cannot_work_on_mnist_are_refused_in_one_line(key, value, message):
    raw = config.read_params(REPO_ROOT / "params.yaml")["train"]
    with pytest.raises(config.ConfigError) as exc:
        TrainConfig.from_dict({**raw, key: value})
    assert message in str(exc.value) and "\n" not in str(exc.value)


class NonFinitePixels(Tensors):
    """Training data whose batches carry one NaN pixel: the loss is NaN from the first step, on any CPU."""

    def x(self, index, shift=0, offsets=None):
        pixels = super().x(index, shift, offsets)
        pixels[0, 0, 0, 0] = float("nan")
        return pixels


def test_a_diverging_training_stops_at_once_naming_the_step(raw_dir):
    cpu = torch.device("cpu")
    train = Tensors.from_split(data.load_split(raw_dir, "train"), cpu)
    test = Tensors.from_split(data.load_split(raw_dir, "test"), cpu)
    params = config.read_params(REPO_ROOT / "params.yaml")["train"]
    cfg = TrainConfig.from_dict({**params, **AUGMENTATION_OFF, "epochs": 2, "batch_size": 100})
    epochs, checkpoints = [], []
    with pytest.raises(training.TrainingDiverged, match=r"the loss is nan at epoch 1, batch 1/10 .* lower train.lr"):
        training.train(tiny_model_config(), cfg, NonFinitePixels(train.images, train.y), test, cpu,
                       on_epoch=epochs.append, on_checkpoint=checkpoints.append)  # fmt: skip
    assert epochs == [] and checkpoints == []  # stopped at its first step: nothing logged or saved


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Answers at once, then sends its body one byte every 0.2 s."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        trickle(self.wfile, bytes(1000))

    def log_message(self, *args):
        pass


def test_a_mirror_that_trickles_is_given_up_after_the_deadline(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "DOWNLOAD_DEADLINE_S", 1)
    try:
        with pytest.raises(PipelineError, match=r"/x.gz is too slow: [\d,]+ bytes of the answer in 1 s"):
            data.fetch(f"http://127.0.0.1:{server.server_address[1]}/", "x.gz")
    finally:
        server.shutdown()
        server.server_close()


class _TrickleHeaders(http.server.BaseHTTPRequestHandler):
    """Sends its status line, then its headers one byte every 0.2 s (for at most a minute)."""

    def do_GET(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self.wfile.flush()
        trickle(self.wfile, b"X-Slow: " + b"a" * 300)

    def log_message(self, *args):
        pass


@pytest.fixture
def trickling_headers():
    with serving(_TrickleHeaders) as url:
        yield url


def test_a_mirror_that_trickles_its_headers_is_given_up_after_the_deadline(monkeypatch, trickling_headers):
    """The deadline covers the whole exchange: connecting, the headers and the body."""
    monkeypatch.setattr(data, "DOWNLOAD_DEADLINE_S", 1)
    with pytest.raises(PipelineError, match=r"/x.gz is too slow: 0 bytes of the answer in 1 s"):
        data.fetch(trickling_headers + "/", "x.gz")


def test_a_tracking_server_that_trickles_its_headers_is_named_in_one_line(monkeypatch, trickling_headers):
    from mnist_pipeline.tracking import server

    monkeypatch.setattr(server, "PROBE_TIMEOUT_S", 1)
    with pytest.raises(PipelineError, match=r"tracking server http://127.0.0.1:\d+ does not answer \(no whole answer"):
        server.check(trickling_headers)


def test_a_mirror_folder_holding_a_huge_file_is_refused_without_reading_it(tmp_path):
    with (tmp_path / "train-images-idx3-ubyte.gz").open("wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB, sparse
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError, match=r"is larger than \d+ bytes"):
            data.fetch(str(tmp_path), "train-images-idx3-ubyte.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * data.MAX_GZ_BYTES


def test_16_bit_and_float_images_are_read_with_their_real_range(tmp_path):
    """A 16-bit PNG (0-65535) and a float TIFF ([0, 1]) of the same digit give the same 28x28 input as its 8-bit
    PNG; clipped to 8 bits, the 16-bit one would be almost all white."""
    seven = digit()
    Image.fromarray(seven).save(tmp_path / "8bit.png")
    Image.fromarray(seven.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    Image.fromarray(seven.astype(np.float32) / 255).save(tmp_path / "float.tif")
    seen = {}
    for name in ("8bit.png", "16bit.png", "float.tif"):
        ((label, image),) = predict.read_inputs(tmp_path / name)
        seen[name] = predict.preprocess(image, label)
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I;16")
    np.testing.assert_allclose(seen["16bit.png"], seen["8bit.png"], atol=1e-6)
    np.testing.assert_allclose(seen["float.tif"], seen["8bit.png"], atol=1e-6)
