"""The data sets the pipeline knows, all in MNIST's format: their files, checksums and mirrors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdxFile:
    name: str  # decompressed file name; the mirrors serve it as ``name + ".gz"``
    gz_md5: str  # MD5 of the original .gz as published
    md5: str  # MD5 of the decompressed content ("" where only the .gz checksum is published)
    dataset: str = "mnist"


def _files(dataset: str, checksums: tuple[tuple[str, str], ...]) -> tuple[IdxFile, ...]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return tuple(IdxFile(name, gz, raw, dataset) for name, (gz, raw) in zip(names, checksums, strict=True))


@dataclass(frozen=True)
class Dataset:
    """A data set in MNIST's format: where it is published and the checksums of its four files."""

    name: str
    mirrors: tuple[str, ...]
    files: tuple[IdxFile, ...]


DATASETS = {
    "mnist": Dataset(
        "mnist",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        _files(
            "mnist",
            (
                ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
                ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
                ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
                ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
            ),
        ),
    ),
    "fashion_mnist": Dataset(
        "fashion_mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        # Content MD5s: of the files as decompressed from Debian's dataset-fashion-mnist package, which recompresses
        # the published ones (its .gz MD5s differ; the IDX files inside are the published data).
        _files(
            "fashion_mnist",
            (
                ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
                ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
                ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
                ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
            ),
        ),
    ),
    "kmnist": Dataset(
        "kmnist",
        ("https://codh.rois.ac.jp/kmnist/dataset/kmnist/", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
        _files(
            "kmnist",
            (
                ("bdb82020997e1d708af4cf47b453dcf7", ""),
                ("e144d726b3acfaa3e44228e80efcd344", ""),
                ("5c965bf0a639b31b8f53240b1b52f4d7", ""),
                ("7320c461ea6c1c855c0b718fb2a4b134", ""),
            ),
        ),
    ),
}
MNIST_FILES = DATASETS["mnist"].files
DEFAULT_MIRRORS = DATASETS["mnist"].mirrors
FILE_NAMES = tuple(f.name for f in MNIST_FILES)
TRAIN_FILE_NAMES = tuple(name for name in FILE_NAMES if name.startswith("train-"))
TEST_FILE_NAMES = tuple(name for name in FILE_NAMES if name.startswith("t10k-"))
