"""Outputs are written whole or not at all; a failed write names the file and leaves the previous one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic

# A child process whose files may not grow past 4 KiB (RLIMIT_FSIZE): its writes fail as on a full disk.
FULL_DISK = """
import resource, sys
from mnist_pipeline.errors import run_main
from mnist_pipeline.files import write_atomic
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
run_main(lambda: write_atomic(sys.argv[1], b"x" * 100_000))
"""


def test_a_full_disk_leaves_the_previous_file_and_names_the_path(tmp_path):
    target = tmp_path / "reports" / "metrics.json"
    write_atomic(target, '{"old": true}')
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: cannot write {target}: File too large;") and out.stderr.count("\n") == 1
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "models").write_text("not a folder")
    with pytest.raises(PipelineError, match=r"cannot write .*models/model.pt: .*a file stands where a folder"):
        write_atomic(tmp_path / "models" / "model.pt", b"weights")


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def interrupted(self, data):
        raise KeyboardInterrupt

    monkeypatch.setattr("pathlib.Path.write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]
