"""Writing outputs: every file appears whole or not at all, and a failed write is one line naming the file.

A stage writes each output to a temporary file beside it and renames it into place, so a crash, a signal or a
full disk never leaves a half-written file under an output's name: the file holds its previous content or the
new one. An OSError (disk full, quota, read-only file system, a file where a folder should be) becomes a
PipelineError that names the path and what to do.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mnist_pipeline.errors import PipelineError

_HINTS = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some space within your disk quota",
    errno.EFBIG: "the file is over a size limit (`ulimit -f`) or free space",
    errno.EROFS: "the file system is read-only: write the outputs elsewhere",
    errno.EACCES: "make the folder writable for this user",
    errno.EPERM: "make the folder writable for this user",
    errno.ENOTDIR: "a file stands where a folder should be: move it away",
    errno.EEXIST: "a file stands where a folder should be: move it away",
    errno.EISDIR: "a folder stands where the file should be: move it away",
}


def cannot_write(path: Path, exc: OSError) -> PipelineError:
    hint = _HINTS.get(exc.errno, "check the path")
    return PipelineError(
        f"cannot write {path}: {exc.strerror or exc}; {hint}, then rerun (the previous {path.name}, if any, is "
        "unchanged)"
    )


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer to fill; it replaces ``path`` when the block succeeds and is
    removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: concurrent writers don't collide
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise cannot_write(path, exc) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    with suppress(OSError):  # it may never have been created, or its folder may be what failed
        tmp.unlink()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` whole, or not at all."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def check_dvc_lock(root: Path) -> None:
    """Stop with one line when ``dvc.lock`` is empty: DVC writes it in place, so a DVC command killed while writing
    leaves it at 0 bytes, and every later `dvc` command then fails with "validation failed"."""
    lock = Path(root) / "dvc.lock"
    if lock.is_file() and not lock.read_text(errors="replace").strip():
        raise PipelineError(
            f"{lock} is empty (a DVC command was stopped while writing it), so DVC cannot read the pipeline's state: "
            "`git checkout dvc.lock` brings back the last committed one; or delete it, and the next `dvc repro` "
            "runs every stage again"
        )
