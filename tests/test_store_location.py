"""A project that is moved, renamed or copied keeps its store: artifacts are found where the project is now, and new
runs land in its own `mlruns/`, never another copy's. A read-only store is read, and refused to writers in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import mlflow.artifacts
import pytest
from mlflow.tracking import MlflowClient

from conftest import user_env
from mnist_pipeline.tracking import store
from mnist_pipeline.errors import PipelineError


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder whose local store holds one run with one artifact."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = tmp_path / "project"
    root.mkdir()
    store.configure(root)
    with mlflow.start_run() as run:
        mlflow.log_text("seven", "note.txt")
    yield root, run.info.run_id
    mlflow.set_tracking_uri(None)


def reopen(root: Path, monkeypatch) -> None:
    """What a new command started in ``root`` does (MLflow exports the URI it was given to the environment)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    store.configure(root)


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def test_a_moved_project_reads_its_artifacts_where_it_is_now(project, tmp_path, monkeypatch):
    root, run_id = project
    moved = tmp_path / "renamed"
    root.rename(moved)  # `mv project renamed`
    reopen(moved, monkeypatch)
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/note.txt") == "seven"
    assert MlflowClient().get_run(run_id).info.artifact_uri.startswith(str(moved / "mlruns"))


def test_a_copy_logs_into_its_own_store_and_leaves_the_original_alone(project, tmp_path, monkeypatch):
    root, run_id = project
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)  # `cp -a project copy`
    original_files = files_under(root / "mlruns")
    reopen(copy, monkeypatch)
    with mlflow.start_run() as run:
        mlflow.log_text("eight", "note.txt")
    assert mlflow.get_run(run.info.run_id).info.artifact_uri.startswith(str(copy / "mlruns"))
    assert files_under(root / "mlruns") == original_files  # nothing of the copy's run in the original
    assert (copy / "mlruns" / "mnist-pipeline" / run.info.run_id).is_dir()
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/note.txt") == "seven"  # the copy's own files


def read_only_mount(folder: Path, command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``command`` with ``folder`` mounted read-only over itself, in a user and mount namespace of its own (no
    privilege needed, nothing left mounted afterwards)."""
    script = f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' '{folder}' && {command}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=cwd, env=user_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_a_read_only_store_is_read_and_refused_to_writers_in_one_line(project, tmp_path):
    root, run_id = project
    probe = read_only_mount(root / "mlruns", "touch mlruns/x", root)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"no read-only mount here (unshare -rm: {probe.stderr.strip()[:200]})")
    moved = tmp_path / "mounted-elsewhere"
    root.rename(moved)  # a shared copy is rarely mounted where it was made
    mlflow.set_tracking_uri(None)
    read = read_only_mount(moved / "mlruns", "mnist-pipeline compare --csv", moved)
    assert read.returncode == 0, read.stderr
    assert run_id[:8] in read.stdout and "read-only: reading it, changing nothing" in read.stderr
    loads = (f"python -c \"from mnist_pipeline import store; import mlflow.artifacts; store.configure(writes=False); "
             f"print(mlflow.artifacts.load_text('runs:/{run_id}/note.txt'))\"")  # fmt: skip
    loaded = read_only_mount(moved / "mlruns", loads, moved)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "seven", loaded.stderr
    write = read_only_mount(moved / "mlruns", "python -c 'from mnist_pipeline import store, errors; "
                            "errors.run_main(store.configure)'", moved)  # fmt: skip
    assert write.returncode == 1
    assert write.stderr.strip().splitlines() == [
        f"error: the MLflow store in {moved / 'mlruns'} is read-only, and this command records runs or models in "
        "it; run it in a writable copy of the project, or set MLFLOW_TRACKING_URI to a store you can write"
    ]


def test_a_writer_on_a_read_only_store_is_refused_before_touching_it(tmp_path, monkeypatch):
    """The decision itself, without a mount: a store folder this process may not write."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)
    (tmp_path / "mlruns").mkdir()
    with pytest.raises(PipelineError, match=r"is read-only, and this command records runs or models in it"):
        store.configure(tmp_path)
    with pytest.raises(PipelineError, match=r"is read-only and holds no database"):
        store.configure(tmp_path, writes=False)
