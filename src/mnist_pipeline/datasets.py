"""The data sets the pipeline knows, all in MNIST's format.

Their mirrors and the MD5s of their published ``.gz`` files are torchvision's: its dataset classes list them, and
`catalogue` reads them there (importing torchvision, so only the download stage calls it). The MD5s of the
decompressed content are ours: a mirror that recompresses the files (which changes the ``.gz`` bytes, not the data)
is accepted on them.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMES = ("mnist", "fashion_mnist", "kmnist")
FILE_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_FILE_NAMES = FILE_NAMES[:2]
TEST_FILE_NAMES = FILE_NAMES[2:]
# Where each data set is published: the source its MLflow dataset entries name.
HOMEPAGES = {
    "mnist": "http://yann.lecun.com/exdb/mnist/",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "kmnist": "https://github.com/rois-codh/kmnist",
}
# MD5 of each decompressed file, in FILE_NAMES' order. Fashion-MNIST's: of the files as decompressed from Debian's
# dataset-fashion-mnist package, which recompresses the published ones. KMNIST publishes only its .gz MD5s.
CONTENT_MD5 = {
    "mnist": (
        "6bbc9ace898e44ae57da46a324031adb",
        "a25bea736e30d166cdddb491f175f624",
        "2646ac647ad5339dbf082846283269ea",
        "27ae3e4e09519cfbb04c329615203637",
    ),
    "fashion_mnist": (
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}


@dataclass(frozen=True)
class IdxFile:
    name: str  # decompressed file name; the mirrors serve it as ``name + ".gz"``
    gz_md5: str  # MD5 of the .gz as published ("" where none is known)
    md5: str  # MD5 of the decompressed content ("" where none is known)
    dataset: str = "mnist"


@dataclass(frozen=True)
class Dataset:
    """A data set in MNIST's format: where it is published and the checksums of its four files."""

    name: str
    mirrors: tuple[str, ...]
    files: tuple[IdxFile, ...]


def catalogue(name: str) -> Dataset:
    """The data set ``name`` as torchvision lists it (mirrors, published .gz MD5s), with our content MD5s."""
    from torchvision.datasets import KMNIST, MNIST, FashionMNIST

    source = {"mnist": MNIST, "fashion_mnist": FashionMNIST, "kmnist": KMNIST}[name]
    published = dict(source.resources)
    content = CONTENT_MD5.get(name, ("",) * len(FILE_NAMES))
    files = tuple(
        IdxFile(file, published[f"{file}.gz"], md5, name) for file, md5 in zip(FILE_NAMES, content, strict=True)
    )
    return Dataset(name, tuple(source.mirrors), files)
