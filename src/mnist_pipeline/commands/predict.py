"""`mnist-pipeline predict`: digits for image files, .npy arrays or IDX files, with any exported form of the model.

Each input is read as greyscale (RGB and RGBA are converted; .npy floats in [0, 1] are scaled to 0-255), then
made to look like an MNIST digit by `mnist_pipeline.ml.preprocess`: background removed, the digit found, scaled
and centred the way MNIST's were.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_pipeline.errors import PipelineError, printable
from mnist_pipeline.ml import data
from mnist_pipeline.ml.preprocess import preprocess
from mnist_pipeline.tracking import loader

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


MAX_PIXELS = 25_000_000  # an image larger than 5000x5000 is no handwritten digit; decoding it could take GBs
CHUNK = 1000  # images predicted at a time
CHUNK_BYTES = 2**26  # of an array or IDX file read at a time: memory stays flat whatever the images' size
FLOAT32_MAX = float(np.finfo(np.float32).max)  # pixels are float32 from here on


def _per_chunk(h: int, w: int, itemsize: int = 1) -> int:
    """How many (h, w) images one read takes: CHUNK, fewer when they are large, at least one."""
    return max(1, min(CHUNK, CHUNK_BYTES // (h * w * itemsize)))


def _idx_images(stream, name: str, size: int | None) -> Iterator[np.ndarray]:
    """The images of an IDX file, a bounded chunk at a time, from a binary stream (a gzip stream inflates as it is
    read). ``size``: the stream's length when known (a plain file), checked against the header before any read."""
    n, h, w = shape = data.idx_shape(stream, name, 3)
    if h * w > MAX_PIXELS or h * w == 0:
        raise PipelineError(f"{name}: IDX header says images of {h}x{w} pixels; refused (at most {MAX_PIXELS:,})")
    if n == 0:
        raise PipelineError(f"{name}: the IDX file holds no images")
    for chunk in data.idx_chunks(stream, name, shape, size, _per_chunk(h, w)):
        yield from chunk


def _npy_images(path: Path, name: str) -> Iterator[tuple[str, np.ndarray]]:
    """The images of a .npy array: memory-mapped by numpy's own reader (never unpickled) and read a bounded chunk
    at a time, never the whole array at once."""
    array, single = _npy_array(path, name)
    step = _per_chunk(*array.shape[1:], array.dtype.itemsize)

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(array), step):
            yield start, np.array(array[start : start + step])  # a copy: the mapped pages are let go

    scale = _float_scale(chunks(), name, single) if array.dtype.kind == "f" else 1.0
    for start, chunk in chunks():
        for i in range(len(chunk)):  # one image at a time as float32: no copy of the whole chunk
            yield (name if single else f"{name}[{start + i}]"), chunk[i].astype(np.float32) * np.float32(scale)
        del chunk  # before the next one is read


def _npy_array(path: Path, name: str) -> tuple[np.ndarray, bool]:
    """The file's array memory-mapped as (N, H, W), its dtype and shape checked; whether it holds one image."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # pickled objects, a bad header, a file shorter than it says
        raise PipelineError(f"{name}: not a readable .npy array ({str(exc).splitlines()[0][:200]})") from None
    if array.dtype.hasobject or array.dtype.kind not in "biuf":
        raise PipelineError(f"{name}: not a readable .npy array (expected numbers, got {array.dtype})")
    shape = array.shape
    if len(shape) == 4 and shape[1] == 1:
        array = array[:, 0]
    if array.ndim not in (2, 3):
        raise PipelineError(f"{name}: expected an array of shape (H, W) or (N, H, W), got {shape}")
    single = array.ndim == 2
    array = array[None] if single else array
    n, h, w = array.shape
    if h * w > MAX_PIXELS:
        raise PipelineError(f"{name}: images of {h}x{w} pixels; refused (at most {MAX_PIXELS:,})")
    if n == 0 or h * w == 0:
        raise PipelineError(f"{name}: the array holds no images (shape {shape})")
    return array, single


def _float_scale(chunks: Iterator[tuple[int, np.ndarray]], name: str, single: bool) -> float:
    """Floats are [0, 1] or 0-255, decided over the whole array (255 or 1); none may be NaN or infinite."""
    peak = 0.0
    for start, chunk in chunks:
        finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if not finite.all():
            where = name if single else f"{name}[{start + int(np.argmin(finite))}]"
            raise PipelineError(f"{where}: holds NaN or infinite values; refused (nothing of {name} is predicted)")
        largest = np.abs(chunk).reshape(len(chunk), -1).max(axis=1, initial=0)
        if (largest > FLOAT32_MAX).any():
            where = name if single else f"{name}[{start + int(np.argmax(largest > FLOAT32_MAX))}]"
            raise PipelineError(
                f"{where}: holds values beyond float32's range (|x| > {FLOAT32_MAX:.3g}); refused "
                f"(nothing of {name} is predicted)"
            )
        peak = max(peak, float(chunk.max()))
        del chunk  # before the next one is read
    return 255.0 if peak <= 1.0 else 1.0


def read_inputs(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (label, 2-D greyscale array) for each image in ``path``; PipelineError names the file on failure."""
    name = str(path)
    if path.is_dir():
        raise PipelineError(f"{name}: is a folder; give the files in it (e.g. {path / '*.png'})")
    if not path.exists():
        raise PipelineError(f"{name}: no such file")
    if not path.is_file():  # opening a FIFO waits for a writer; a device never ends
        raise PipelineError(f"{name}: not a regular file (a device, FIFO or socket); give a file")
    size = path.stat().st_size
    if size == 0:
        raise PipelineError(f"{name}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        yield from _npy_images(path, name)
        return
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b" or head == b"\x00\x00\x08\x03" or re.search(r"idx\d", path.name):
        gzipped = head[:2] == b"\x1f\x8b"
        try:
            with (gzip.open if gzipped else open)(path, "rb") as stream:
                images = _idx_images(stream, name, None if gzipped else size)
                yield from ((f"{name}[{i}]", a) for i, a in enumerate(images))
        except (OSError, EOFError, zlib.error) as exc:
            raise PipelineError(f"{name}: not a complete gzip file ({exc})") from None
        return
    yield name, _read_image(path, name, suffix)


def _read_image(path: Path, name: str, suffix: str) -> np.ndarray:
    """An image file as 0-255 greyscale. Whatever its bytes hold (a chunk that inflates past Pillow's limit, a
    broken header, thousands of bogus EXIF tags), it is this file's one-line error, never the command's end."""
    import warnings

    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = None  # PIL's own guard raises past 179 M pixels; the lower limit below is checked first
    try:
        with warnings.catch_warnings():  # Pillow warns once per corrupt EXIF tag: thousands of lines
            warnings.simplefilter("ignore")
            with Image.open(path) as image:  # reads the header only: the size is known before anything is decoded
                if image.width * image.height > MAX_PIXELS:
                    raise PipelineError(
                        f"{name}: an image of {image.width}x{image.height} pixels; refused (at most {MAX_PIXELS:,})"
                    )
                # A phone writes a portrait photo's pixels sideways with an EXIF orientation tag: upright first.
                return _greyscale(ImageOps.exif_transpose(image), name)
    except PipelineError:
        raise
    except Exception as exc:  # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error, ...
        kind = "image" if suffix in IMAGE_SUFFIXES else "image, .npy or IDX file"
        reason = " ".join(str(exc).split())[:200]
        raise PipelineError(f"{name}: not a readable {kind} ({reason})") from None


def _greyscale(image, name: str) -> np.ndarray:
    """0-255 greyscale. Transparency: the strokes are the opaque pixels, put on a background they stand out from
    (white strokes on a transparent background must not vanish on white). Deeper images are scaled from their own
    range (Pillow's ``convert("L")`` would clip a 16-bit image's 0-65535 at 255, leaving it nearly all white)."""
    from PIL import Image

    if image.mode.startswith(("I", "F")):
        return _scaled(np.asarray(image, dtype=np.float64), image.mode, name)

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        opaque = alpha > 127
        strokes_light = bool(opaque.any()) and grey[opaque].mean() > 127
        background = Image.new("RGBA", image.size, "black" if strokes_light else "white")
        return np.asarray(Image.alpha_composite(background, rgba).convert("L"))
    return np.asarray(image.convert("L"))


def _scaled(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """A 16-bit, 32-bit or floating-point greyscale image as 0-255: 16-bit modes from 0-65535; 32-bit integers from
    the smallest of 255, 65535 or 2**32-1 that holds their maximum; floats from [0, 1] when they fit, else 0-255."""
    if not np.isfinite(values).all():
        raise PipelineError(f"{name}: holds NaN or infinite values; refused")
    peak = float(values.max(initial=0))
    if mode.startswith("I;16"):
        full = 65535.0
    elif mode == "F":
        full = 1.0 if peak <= 1.0 else 255.0
    else:
        full = next(limit for limit in (255.0, 65535.0, 2.0**32 - 1) if peak <= limit)
    return (values.clip(0, full) * (255.0 / full)).astype(np.float32)


@dataclass(frozen=True)
class Prediction:
    input: str
    digit: int
    probability: float
    top_k: list[tuple[int, float]]
    uncertain: bool = False

    def line(self, show_top_k: bool) -> str:
        flag = "\tuncertain" if self.uncertain else ""
        name = self.input.encode("unicode_escape").decode()  # a newline or tab in a file name stays on its line
        if show_top_k:
            return f"{name}\t" + "  ".join(f"{d} ({p:.4f})" for d, p in self.top_k) + flag
        return f"{name}\t{self.digit}\t{self.probability:.4f}{flag}"

    def json(self) -> str:
        top = [{"digit": d, "probability": round(p, 6)} for d, p in self.top_k]
        return json.dumps(
            {
                "input": self.input,
                "digit": self.digit,
                "probability": round(self.probability, 6),
                "uncertain": self.uncertain,
                "top_k": top,
            },
            allow_nan=False,
        )


def _logits(model: loader.Model, x: np.ndarray) -> np.ndarray:
    """The model's (N, 10) logits for ``x``; a model that answers anything else is refused, not read as digits."""
    logits = np.asarray(model(x))
    if logits.shape != (len(x), 10) or logits.dtype.kind not in "fiu":
        shape = "(N, " + ", ".join(map(str, logits.shape[1:])) + ")" if logits.ndim else "a scalar"
        raise PipelineError(
            f"the model answers {shape} {logits.dtype} for N digits; expected (N, 10) numbers: a logit per digit"
        )
    return logits


def predict(
    model: loader.Model, labels: list[str], images: np.ndarray, top_k: int, uncertain_below: float = 0.0
) -> list[Prediction]:
    """images: (N, 28, 28) float32 in [0, 1]."""
    if not labels:
        return []
    x = np.ascontiguousarray(images, dtype=np.float32)[:, None]  # (N, 1, 28, 28)
    logits = np.concatenate([_logits(model, x[i : i + 1000]) for i in range(0, len(x), 1000)]).astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True)  # softmax, (N, 10)
    digits = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    values = np.take_along_axis(probabilities, digits, axis=1)
    return [
        Prediction(
            label,
            int(d[0]),
            float(v[0]),
            [(int(a), float(b)) for a, b in zip(d, v, strict=True)],
            bool(v[0] < uncertain_below),
        )
        for label, d, v in zip(labels, digits, values, strict=True)
    ]


@dataclass(frozen=True)
class Options:
    as_json: bool = False
    top_k: int = 1
    show: Path | None = None  # a folder for the 28x28 images the model saw
    uncertain_below: float = 0.0
    allow_pickle: bool = False


def write_seen(folder: Path, label: str, image: np.ndarray) -> Path:
    """The 28x28 image the model saw, 8x enlarged (nearest: the pixels stay visible), as ``<label>.png``."""
    import io

    from PIL import Image

    from mnist_pipeline.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(label).name)  # an IDX file's digits are "file[7]"
    pixels = Image.fromarray((image * 255).round().astype(np.uint8)).resize((224, 224), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")
    path = folder / f"{safe}.png"
    write_atomic(path, buffer.getvalue())
    return path


def main(inputs: list[Path], model_ref: str | None, options: Options = Options()) -> int:
    """Print one line per input; return 0, or 1 when any input could not be read."""
    if not 1 <= options.top_k <= 10:
        raise PipelineError(f"--top-k {options.top_k}: expected 1..10")
    if options.show is not None and options.show.exists() and not options.show.is_dir():
        raise PipelineError(f"--show {printable(str(options.show))}: not a folder; name a folder for the images")
    labels, images, failed = [], [], 0
    model = loader.load_model(model_ref, options.allow_pickle)  # first: a missing model leaves nothing written

    def flush() -> None:  # predict and print what has been read so far
        nonlocal failed
        if labels:
            for prediction in predict(model, labels, np.stack(images), options.top_k, options.uncertain_below):
                if not np.isfinite(prediction.probability):  # the pixels are finite in [0, 1]: the model's doing
                    name = printable(prediction.input)
                    print(f"error: {name}: the model answered NaN or infinity for it; no digit", file=sys.stderr)
                    failed += 1
                    continue
                print(prediction.json() if options.as_json else prediction.line(options.top_k > 1), flush=True)
            labels.clear()
            images.clear()

    with np.errstate(all="ignore"):  # what overflows is refused above, in one line, not as NumPy's warning
        for path in inputs:
            failed += _read(path, options, labels, images, flush)
        flush()
    return 1 if failed else 0


def _read(path: Path, options: Options, labels: list[str], images: list[np.ndarray], flush) -> int:
    """Read ``path``'s images into ``labels`` and ``images`` (predicting every CHUNK); 1 when it failed."""
    try:
        for label, image in read_inputs(path):
            images.append(preprocess(image, label))
            labels.append(label)
            if options.show is not None:
                write_seen(options.show, label, images[-1])
            if len(labels) == CHUNK:
                flush()
    except PipelineError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 1
    return 0
