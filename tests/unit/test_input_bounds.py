"""Every input of `predict` has a bound: memory follows the command's chunk, not the images' size; an image whose
metadata or header is hostile, a device, a FIFO or an empty array is that input's one line, and the others are
answered. (The pickle side of the inputs: tests/tracking/test_loader.py.)"""

from __future__ import annotations

import gzip
import os
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnist_pipeline.commands import predict
from mnist_pipeline.errors import PipelineError
from tests.helpers import digit

IDX_MAGIC = b"\x00\x00\x08\x03"


def idx_header(n: int, h: int, w: int) -> bytes:
    return IDX_MAGIC + struct.pack(">III", n, h, w)


def peak_bytes_reading(path: Path) -> tuple[int, int]:
    """(images read, peak bytes allocated) reading every image of ``path`` as predict does."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in predict.read_inputs(path))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_array_is_read_in_chunks_of_bounded_memory(tmp_path):
    """400 MB of images (sparse on disk) read with a few chunks' memory: never the whole array, nor a chunk of
    CHUNK images when the images are large."""
    path = tmp_path / "large.npy"
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.uint8))
    header["shape"] = (100, 2000, 2000)
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + 100 * 2000 * 2000)
    count, peak = peak_bytes_reading(path)
    assert count == 100
    assert peak < predict.CHUNK_BYTES + 4 * 2000 * 2000 * 4  # a chunk and an image or two as float32, not 400 MB


def test_a_large_gzipped_idx_file_is_read_in_chunks_of_bounded_memory(tmp_path):
    path = tmp_path / "large-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(idx_header(100, 2000, 2000))
        for _ in range(100):
            f.write(bytes(2000 * 2000))
    count, peak = peak_bytes_reading(path)
    assert count == 100
    assert peak < 2 * predict.CHUNK_BYTES + 4 * 2000 * 2000 * 4  # gzip inflates a chunk, then copies it


def test_an_idx_header_that_claims_gigabytes_is_refused_before_any_is_read(tmp_path):
    path = tmp_path / "liar-idx3-ubyte"
    path.write_bytes(idx_header(1000, 5000, 5000) + bytes(100))  # 116 bytes claiming 25 GB
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError, match=r"says 1000x5000x5000 \(25,000,000,016 bytes\) but the file has 116"):
            list(predict.read_inputs(path))
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


def test_a_gzipped_idx_header_that_claims_gigabytes_ends_where_its_data_does(tmp_path):
    path = tmp_path / "liar-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(1000, 5000, 5000) + bytes(100)))
    with pytest.raises(PipelineError, match=r"says 1000x5000x5000 but the data ends after item 0"):
        list(predict.read_inputs(path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.npy", None, r"the array holds no images \(shape \(0, 28, 28\)\)"),
        ("empty-idx3-ubyte", idx_header(0, 28, 28), r"the IDX file holds no images"),
        ("empty-idx3-ubyte.gz", gzip.compress(idx_header(0, 28, 28)), r"the IDX file holds no images"),
    ],
)
def test_an_input_with_no_images_is_an_error_not_silence(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((0, 28, 28), np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(PipelineError, match=message):
        list(predict.read_inputs(path))


def test_a_device_and_a_fifo_are_not_regular_files_and_are_never_opened(tmp_path):
    fifo = tmp_path / "digits.png"
    os.mkfifo(fifo)  # opening it would wait for a writer for ever
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(PipelineError, match=r"not a regular file \(a device, FIFO or socket\)"):
            list(predict.read_inputs(path))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize(
    "chunk",
    [
        png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(bytes(8 * 2**20), 9)),
        png_chunk(b"iTXt", b"Comment\0\1\0\0\0" + zlib.compress(bytes(8 * 2**20), 9)),
        png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(bytes(64 * 2**20), 9)),
    ],
    ids=["zTXt", "iTXt", "iCCP"],
)
def test_png_metadata_that_inflates_past_the_limit_is_that_files_one_line(tmp_path, capsys, model_file, chunk):
    good = tmp_path / "good.png"
    Image.fromarray(digit()).save(good)
    raw = good.read_bytes()
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(raw[:33] + chunk + raw[33:])  # after the IHDR chunk
    status = predict.main([bomb, good], str(model_file))
    out, err = capsys.readouterr()
    assert status == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good)]
    assert err.startswith(f"error: {bomb}: not a readable image (") and len(err.splitlines()) == 1, err


def jpeg_with_bogus_exif(path: Path, tags: int = 5000) -> Path:
    # each a LONG array of 100,000 values at an offset past the data: Pillow warns once per tag
    entries = b"".join(struct.pack("<HHII", 0x9000 + i, 4, 100_000, 2**20) for i in range(tags))
    ifd = struct.pack("<H", tags) + entries + struct.pack("<I", 0)
    Image.fromarray(255 - digit(100)).save(path, exif=b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd)
    return path


def test_a_jpeg_with_thousands_of_bogus_exif_tags_is_read_without_a_warning(tmp_path, capsys, model_file):
    path = jpeg_with_bogus_exif(tmp_path / "exif.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning Pillow gave would fail here
        status = predict.main([path], str(model_file))
    out, err = capsys.readouterr()
    assert status == 0 and out.startswith(str(path)) and err == ""


def test_a_file_name_holding_an_escape_code_is_shown_escaped(tmp_path, capsys, model_file):
    path = tmp_path / "\x1b]0;owned\x07\x1b[2J.png"
    path.write_bytes(b"not an image")
    assert predict.main([path], str(model_file)) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;owned\\x07\\x1b[2J.png" in err


PNG_HEAD = b"\x89PNG\r\n\x1a\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2000), suffix=st.sampled_from([".png", ".jpg", ".gif", ".tif", ".bin"]))
def test_any_bytes_as_an_image_are_an_answer_or_one_line(tmp_path, body, suffix):
    """Whatever follows an image's signature, reading it ends in a 2-D image or one PipelineError."""
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes((PNG_HEAD if suffix == ".png" else b"") + body)
    try:
        ((_, image),) = predict.read_inputs(path)
        assert image.ndim == 2
    except PipelineError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("show", [Path("/dev/null"), "a-file"])
def test_show_naming_something_that_is_not_a_folder_is_one_line_before_anything_runs(tmp_path, model_file, show):
    if show == "a-file":
        show = tmp_path / "a-file"
        show.write_text("mine")
    with pytest.raises(PipelineError, match=r"--show .*: not a folder; name a folder for the images"):
        predict.main([tmp_path / "none.png"], str(model_file), predict.Options(show=show))
