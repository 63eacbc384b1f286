"""Download, verification and IDX reading."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import data
from mnist_pipeline.ml.synthetic import idx_bytes


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "f").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "f", 3), array)


def test_read_idx_rejects_bad_header_and_wrong_length(tmp_path):
    good = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    (tmp_path / "labels").write_bytes(good)
    with pytest.raises(PipelineError, match="not an IDX file of 1-D"):
        data.read_idx(tmp_path / "labels", 1)
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(PipelineError, match=r"short: IDX header says 2x28x28 \(1,584 bytes\) but the file has 1,574"):
        data.read_idx(tmp_path / "short", 3)
    with pytest.raises(PipelineError, match="missing: run the download stage"):
        data.read_idx(tmp_path / "absent", 3)


def test_load_split(raw_dir):
    split = data.load_split(raw_dir, "test")
    assert split.images.shape == (300, 28, 28) and split.images.dtype == np.uint8
    assert split.labels.shape == (300,) and split.labels.max() <= 9


def _file(content: bytes, gz_md5: str = "") -> data.IdxFile:
    return data.IdxFile("x-idx1-ubyte", gz_md5, data.md5_of(content))


def test_verify_accepts_published_gz_md5_or_recompressed_content():
    content = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03"
    original = gzip.compress(content, mtime=0)
    recompressed = gzip.compress(content, compresslevel=1, mtime=12345)
    assert original != recompressed
    spec = _file(content, gz_md5=data.md5_of(original))
    assert data.verify(spec, original) == content
    assert data.verify(spec, recompressed) == content  # gz MD5 differs, decompressed content matches


def test_verify_rejects_wrong_content_and_truncated_gz():
    spec = _file(b"expected")
    with pytest.raises(PipelineError, match=r"x-idx1-ubyte.gz is not mnist's file: wrong content \(MD5"):
        data.verify(spec, gzip.compress(b"something else"))
    truncated = gzip.compress(b"expected" * 1000)[:-20]
    with pytest.raises(PipelineError, match="x-idx1-ubyte.gz is not a complete gzip file"):
        data.verify(spec, truncated)


def test_download_from_http_mirror_then_keeps_valid_files(tmp_path, http_mirror, mirror_md5, capsys):
    files = data.expected_files("mnist", mirror_md5)
    data.download(tmp_path, files, mirror_list=[http_mirror])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*data.FILE_NAMES, "MD5SUMS"])
    for f in files:
        assert data.md5_of((tmp_path / f.name).read_bytes()) == f.md5
    capsys.readouterr()
    data.download(tmp_path, files, mirror_list=["http://127.0.0.1:9/unused/"])  # nothing to fetch
    assert capsys.readouterr().err.count("present and valid") == 4


def test_download_falls_back_to_the_next_mirror(tmp_path, mirror_dir, mirror_md5, http_mirror):
    data.download(
        tmp_path, data.expected_files("mnist", mirror_md5), mirror_list=[str(tmp_path / "nowhere"), http_mirror]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*data.FILE_NAMES, "MD5SUMS"])


def test_download_rejects_corrupt_file_and_names_every_mirror(tmp_path, mirror_dir, mirror_md5, http_mirror):
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    for name in data.FILE_NAMES:
        (bad / f"{name}.gz").write_bytes((mirror_dir / f"{name}.gz").read_bytes())
    (bad / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    out = tmp_path / "raw"
    dead_http = "http://127.0.0.1:9/mnist/"
    with pytest.raises(PipelineError) as exc:
        data.download(out, data.expected_files("mnist", mirror_md5), mirror_list=[str(bad), dead_http])
    message = str(exc.value)
    assert "\n" not in message
    assert "could not get train-images-idx3-ubyte.gz from any mirror" in message
    assert f"{bad} (train-images-idx3-ubyte.gz is not mnist's file: wrong content" in message
    assert dead_http in message and "MNIST_MIRROR" in message
    # nothing half-written: no file for the rejected download and no temp files left behind
    assert not (out / "train-images-idx3-ubyte").exists()
    assert not list(out.glob(".*tmp")) if out.exists() else True


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "kmnist"])
def test_each_dataset_refuses_files_that_are_not_its_own(tmp_path, mirror_dir, dataset):
    with pytest.raises(PipelineError) as exc:
        data.download(tmp_path, data.expected_files(dataset)[:1], mirror_list=[str(mirror_dir)])
    assert f"train-images-idx3-ubyte.gz is not {dataset}'s file: wrong content" in str(exc.value)
    assert f"the four {dataset} .gz files" in str(exc.value)
    assert not (tmp_path / "train-images-idx3-ubyte").exists()


def test_mirror_env_is_tried_first():
    assert data.mirrors("mnist", {"MNIST_MIRROR": "/srv/mnist"}) == ["/srv/mnist", *data.DEFAULT_MIRRORS]
    assert data.mirrors("mnist", {}) == list(data.DEFAULT_MIRRORS)
    assert data.mirrors("kmnist", {})[0].startswith("https://codh.rois.ac.jp/kmnist/")
    assert data.DEFAULT_MIRRORS[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist")


def test_the_recorded_checksums_catch_a_flipped_byte_a_truncation_and_a_missing_file(tmp_path, raw_dir):
    folder = tmp_path / "raw"
    shutil.copytree(raw_dir, folder)
    fingerprint = data.verify_folder(folder)
    assert fingerprint == data.verify_folder(raw_dir) and len(fingerprint) == 32
    assert "  train-images-idx3-ubyte\n" in (folder / "MD5SUMS").read_text()  # md5sum's format

    images = folder / "train-images-idx3-ubyte"
    original = images.read_bytes()
    flipped = bytearray(original)
    flipped[5000] ^= 0x01  # one bit, deep in the pixels: the IDX header still parses
    images.write_bytes(bytes(flipped))
    with pytest.raises(PipelineError) as exc:
        data.verify_folder(folder)
    message = str(exc.value)
    assert message.startswith(f"{images} is corrupt or was changed after download (MD5 ")
    assert f"`dvc checkout {folder}`" in message and "`dvc repro -f download`" in message

    images.write_bytes(original[:-100])
    with pytest.raises(PipelineError, match="train-images-idx3-ubyte is corrupt"):
        data.verify_folder(folder)
    images.unlink()
    with pytest.raises(PipelineError, match="train-images-idx3-ubyte is missing; restore it"):
        data.verify_folder(folder)
    (folder / "MD5SUMS").unlink()
    with pytest.raises(PipelineError, match="MD5SUMS is missing"):
        data.verify_folder(folder)


def test_many_tiny_gzip_members_are_inflated_in_time_linear_in_the_file(monkeypatch):
    """A .gz of 20,000 members of one byte each: every member is read whole, and the decompressors are handed a
    number of bytes proportional to the file, not to the square of its members (before: the rest of the file after
    every member, 20,000 times)."""
    members = [gzip.compress(bytes([i % 256]), mtime=0) for i in range(20_000)]
    gz = b"".join(members)
    fed = []
    real = data.zlib.decompressobj

    class Counting:
        def __init__(self, **kwargs):
            self.inner = real(**kwargs)

        def decompress(self, chunk, max_length=0):
            fed.append(len(chunk))
            return self.inner.decompress(chunk, max_length)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(data.zlib, "decompressobj", Counting)
    assert data.inflate(gz, 10**6, "many.gz") == bytes(i % 256 for i in range(20_000))
    assert sum(fed) <= 4 * len(gz), (sum(fed), len(gz))


def test_idx_dimensions_are_checked_in_exact_arithmetic(tmp_path):
    """2**31 x 2**31 x 4 images: the product wraps to 0 in int64, which a header alone would match."""
    path = tmp_path / "absurd-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big"))
    with pytest.raises(
        PipelineError,
        match=r"IDX header says 2147483648x2147483648x4 \(18,446,744,073,709,551,632 bytes\) but the file has 16",
    ):
        data.read_idx(path, 3)
