"""Download, verify and read the MNIST IDX files.

The download stage stores the four files decompressed in ``data/raw/`` so later stages read them without
unzipping. A file is accepted only when it matches a known checksum: the MD5 of the published ``.gz``, or else
the MD5 of its decompressed content (mirrors often recompress, which changes the ``.gz`` bytes but not the data).

Not torchvision's, measured against ours: ``MNIST(download=True)`` accepts only the published ``.gz`` bytes (a
recompressed mirror is refused), its ``download_url`` cannot read a ``file://`` mirror, has no time or size limit
and retries a failed ``https://`` address over plain ``http://``; and reading even its list of mirrors imports torch
and torchvision, 5 s where this stage starts in 0.2 s.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from mnist_pipeline import network
from mnist_pipeline.datasets import (  # noqa: F401  (the catalogue, read through this module too)
    DATASETS,
    DEFAULT_MIRRORS,
    FILE_NAMES,
    TEST_FILE_NAMES,
    TRAIN_FILE_NAMES,
    IdxFile,
)
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic

MIRROR_ENV = "MNIST_MIRROR"


DOWNLOAD_TIMEOUT_S = 30  # for a mirror to answer, and between two pieces of a file
# For the whole exchange of one file (connecting, headers, body; MNIST's largest is 9.9 MB): a mirror slower than
# that is skipped, however it trickles.
DOWNLOAD_DEADLINE_S = 300
MAX_GZ_BYTES = 64 * 2**20  # the largest MNIST .gz is under 10 MiB; refuse anything absurd
# The decompressed size of each file of MNIST, Fashion-MNIST and KMNIST (60,000 and 10,000 28x28 images); a file of
# one's own in MNIST's format (data.expected_md5) may be up to MAX_IDX_BYTES. Nothing is inflated beyond these: a
# .gz that would (a "decompression bomb", 2.6 MB that inflates to 2.5 GB) is refused without using the memory.
IDX_BYTES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
MAX_IDX_BYTES = 256 * 2**20


def inflate(gz_bytes: bytes, limit: int, name: str) -> bytes:
    """The content of a gzip file, refused with PipelineError as soon as it would exceed ``limit`` bytes.

    A gzip file may hold many members, one after another. Each is fed to its decompressor in pieces that start
    small and double, read through a view of the file: what a member leaves unread is at most twice its own size,
    so time and memory stay linear in the file's size however many members it holds (handing each member the
    whole rest of the file, as ``unused_data`` does, is quadratic)."""
    view, out, size, pos = memoryview(gz_bytes), [], 0, 0
    try:
        while pos < len(view):  # a new member starts here
            member, piece = zlib.decompressobj(wbits=31), 64
            while not member.eof and pos < len(view):
                chunk = view[pos : pos + piece]
                out.append(member.decompress(chunk, limit - size + 1))
                size += len(out[-1])
                if size > limit:
                    raise PipelineError(
                        f"{name} inflates to more than {limit:,} bytes, more than the file can be: refused"
                    )
                pos += len(chunk) - len(member.unused_data)
                piece = min(2 * piece, 2**20)
            if not member.eof:
                raise PipelineError(f"{name} is not a complete gzip file (it ends inside compressed data)")
    except zlib.error as exc:
        raise PipelineError(f"{name} is not a complete gzip file ({exc})") from None
    return b"".join(out)


def expected_files(dataset: str = "mnist", md5_overrides: Mapping[str, str] | None = None) -> tuple[IdxFile, ...]:
    """The dataset's four files; an override replaces a file's content MD5 (and drops its gz MD5)."""
    overrides = md5_overrides or {}
    return tuple(
        IdxFile(f.name, "", overrides[f.name], dataset) if f.name in overrides else f for f in DATASETS[dataset].files
    )


def mirrors(dataset: str = "mnist", environ: Mapping[str, str] = os.environ) -> list[str]:
    """Mirrors in the order they are tried: ``$MNIST_MIRROR`` first when set, then the dataset's public ones."""
    local = environ.get(MIRROR_ENV, "").strip()
    return ([local] if local else []) + list(DATASETS[dataset].mirrors)


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def verify(file: IdxFile, gz_bytes: bytes) -> bytes:
    """Return the decompressed content of ``gz_bytes`` if it is the expected file, else raise PipelineError."""
    content = inflate(
        gz_bytes, IDX_BYTES.get(file.name, MAX_IDX_BYTES) if file.gz_md5 else MAX_IDX_BYTES, f"{file.name}.gz"
    )
    if file.gz_md5 and md5_of(gz_bytes) == file.gz_md5:
        return content
    if file.md5 and md5_of(content) == file.md5:
        return content
    expected = file.md5 or f"the published .gz MD5 {file.gz_md5}"
    raise PipelineError(
        f"{file.name}.gz is not {file.dataset}'s file: wrong content (MD5 {md5_of(content)}, expected {expected})"
    )


def is_valid(path: Path, file: IdxFile) -> bool:
    return bool(file.md5) and path.is_file() and md5_of(path.read_bytes()) == file.md5


def fetch(mirror: str, filename: str) -> bytes:
    """Read ``filename`` from a mirror: a local folder, a ``file://`` URL or an HTTP(S) URL."""
    if "://" not in mirror:
        path = Path(mirror).expanduser() / filename
        if not path.is_file():
            raise PipelineError(f"{path} does not exist")
        with path.open("rb") as f:  # read at most one byte past the limit, whatever the file's size
            data = f.read(MAX_GZ_BYTES + 1)
        if len(data) > MAX_GZ_BYTES:
            raise PipelineError(f"{path} is larger than {MAX_GZ_BYTES} bytes")
        return data
    url = mirror.rstrip("/") + "/" + filename
    request = urllib.request.Request(url, headers={"User-Agent": "mnist-pipeline"})
    chunks, size = [], 0
    try:
        with network.time_limit(DOWNLOAD_DEADLINE_S, url):
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                while chunk := response.read1(2**16):  # whatever has arrived: a trickle cannot hold a read open
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_GZ_BYTES:
                        raise PipelineError(f"{url} is larger than {MAX_GZ_BYTES} bytes")
    except (OSError, http.client.HTTPException) as exc:
        raise OSError(_reason(exc)) from None
    except network.DeadlinePassed:
        raise PipelineError(f"{url} is too slow: {size:,} bytes of the answer in {DOWNLOAD_DEADLINE_S} s") from None
    return b"".join(chunks)


def _reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def download(
    out_dir: Path,
    files: tuple[IdxFile, ...],
    mirror_list: list[str] | None = None,
    log: TextIO | None = None,
) -> None:
    """Make ``out_dir`` hold every file of ``files``, verified; files already there and valid are kept."""
    mirror_list = mirrors(files[0].dataset) if mirror_list is None else mirror_list
    log = log or sys.stderr
    for file in files:
        target = out_dir / file.name
        if is_valid(target, file):
            print(f"{file.name}: present and valid", file=log)
            continue
        failures = []
        for mirror in mirror_list:
            start = time.perf_counter()
            try:
                content = verify(file, fetch(mirror, file.name + ".gz"))
            except (PipelineError, OSError, ValueError) as exc:
                failures.append(f"{mirror} ({_reason(exc)})")
                continue
            write_atomic(target, content)
            print(
                f"{file.name}: {len(content) / 1e6:.1f} MB from {mirror} in {time.perf_counter() - start:.1f} s",
                file=log,
            )
            break
        else:
            raise PipelineError(
                f"could not get {file.name}.gz from any mirror: {'; '.join(failures)}. "
                f"Set {MIRROR_ENV} to a folder or URL holding the four {files[0].dataset} .gz files to use another "
                "source."
            )
    write_checksums(out_dir)


# IDX format: 2 zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one big-endian
# uint32 per dimension, then the data.
_IDX_UBYTE = 0x08


def idx_shape(stream: BinaryIO, name: str, ndim: int) -> tuple[int, ...]:
    """Read an IDX header of ``ndim``-D unsigned bytes from ``stream``; return the shape it announces."""
    header = stream.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or header[:4] != bytes((0, 0, _IDX_UBYTE, ndim)):
        raise PipelineError(f"{name}: not an IDX file of {ndim}-D unsigned bytes (bad header)")
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def idx_chunks(stream: BinaryIO, name: str, shape: tuple[int, ...], size: int | None, per_chunk: int):
    """The data after an IDX header of ``shape``, ``per_chunk`` items at a time as uint8 arrays: memory stays
    bounded whatever the file announces. ``size``: the file's length when known (not for a gzip stream),
    checked against the header before anything is read."""
    shown = "x".join(map(str, shape))
    item = math.prod(shape[1:])  # exact: np.prod wraps around past 2**63
    expected = 4 + 4 * len(shape) + shape[0] * item
    if size is not None and size != expected:
        raise PipelineError(f"{name}: IDX header says {shown} ({expected:,} bytes) but the file has {size:,}")
    for start in range(0, shape[0], per_chunk):
        count = min(per_chunk, shape[0] - start)
        if size is None:  # a gzip stream: read() inflates into a new buffer, where readinto() would copy it again
            buffer = stream.read(count * item)
            got = len(buffer)
        else:  # a plain file: read straight into a writable buffer (tensors can share its memory)
            buffer = bytearray(count * item)
            got = stream.readinto(buffer)
        if got != count * item:
            raise PipelineError(f"{name}: IDX header says {shown} but the data ends after item {start}")
        yield np.frombuffer(buffer, dtype=np.uint8).reshape(count, *shape[1:])
    if stream.read(1):
        raise PipelineError(f"{name}: IDX header says {shown} but the file holds more data")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with ``ndim`` dimensions into a (writable) uint8 array."""
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run the download stage (`dvc repro download`)") from None
    with stream:
        shape = idx_shape(stream, str(path), ndim)
        chunks = list(idx_chunks(stream, str(path), shape, path.stat().st_size, max(shape[0], 1)))
    return chunks[0] if chunks else np.zeros(shape, dtype=np.uint8)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) uint8


def load_split(data_dir: Path, split: str) -> Split:
    """Read the ``train`` or ``test`` split from a folder written by the download stage."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(data_dir / f"{prefix}-images-idx3-ubyte", 3)
    labels = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte", 1)
    if len(images) != len(labels):
        raise PipelineError(f"{data_dir}: {split} split has {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise PipelineError(f"{data_dir}: {split} labels must be digits 0-9, found {labels.max()}")
    return Split(images, labels)


# Written by the download stage beside the four files, in md5sum's format (`md5sum -c MD5SUMS` checks by hand).
CHECKSUMS_FILE = "MD5SUMS"


def write_checksums(data_dir: Path) -> None:
    lines = "".join(f"{md5_of((data_dir / name).read_bytes())}  {name}\n" for name in FILE_NAMES)
    write_atomic(data_dir / CHECKSUMS_FILE, lines)


def verify_folder(data_dir: Path, only: tuple[str, ...] = FILE_NAMES) -> str:
    """Check the four files (or ``only`` those) against the checksums the download stage recorded; return the
    data's fingerprint.

    Every stage that reads the data calls this first, so a flipped byte or a truncated file (a failing disk, an
    edit by hand) stops it with the file's name and the way back, before any training or evaluation.
    """
    recover = f"restore it with `dvc checkout {data_dir}` or download it again with `dvc repro -f download`"
    recorded = recorded_checksums(data_dir)
    actual = {}
    for name in only:
        path = data_dir / name
        if not path.is_file():
            raise PipelineError(f"{path} is missing; {recover}")
        actual[name] = md5_of(path.read_bytes())
        if actual[name] != recorded.get(name):
            raise PipelineError(
                f"{path} is corrupt or was changed after download (MD5 {actual[name]}, recorded "
                f"{recorded.get(name, 'none')}); {recover}"
            )
    return fingerprint(actual)


def recorded_checksums(data_dir: Path) -> dict[str, str]:
    """File name -> MD5, as the download stage recorded them in ``MD5SUMS``."""
    try:
        return dict(reversed(line.split("  ", 1)) for line in (data_dir / CHECKSUMS_FILE).read_text().splitlines())
    except FileNotFoundError:
        raise PipelineError(
            f"{data_dir / CHECKSUMS_FILE} is missing, so the data cannot be checked; run `dvc repro -f download`"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise PipelineError(
            f"{data_dir / CHECKSUMS_FILE} is damaged; restore it with `dvc checkout {data_dir}` or download it again "
            "with `dvc repro -f download`"
        ) from None


def fingerprint(md5s: Mapping[str, str]) -> str:
    """One MD5 for the four files, or those of them given (from their MD5s): tells whether two runs saw the same
    data."""
    return md5_of("".join(md5s[name] for name in FILE_NAMES if name in md5s).encode())
