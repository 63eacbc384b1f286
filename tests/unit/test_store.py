"""Where the store is: the project's root from inside a DVC experiment, the default SQLite store, a damaged,
moved, copied or read-only store."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import store
from tests.helpers import user_env


def test_project_root_escapes_dvc_experiment_copies(monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert store.project_root(Path("/home/u/proj")) == Path("/home/u/proj")
    assert store.project_root(Path("/home/u/proj/.dvc/tmp/exps/tmpab12cd")) == Path("/home/u/proj")
    assert store.project_root(Path("/home/u/proj/.dvc/tmp/exps/run/x/y")) == Path("/home/u/proj")


def test_default_store_is_absolute_sqlite_under_mlruns(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp123"
    assert store.tracking_uri(copy) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.tracking_uri(copy) == "http://127.0.0.1:5000"


def test_unreachable_store_is_one_clear_line(monkeypatch, tmp_path):
    (tmp_path / "mlflow.db").mkdir()  # a folder where the database file should be
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(PipelineError) as exc:
        store.configure(tmp_path)
    assert "MLFLOW_TRACKING_URI" in str(exc.value) and "\n" not in str(exc.value)


def test_a_damaged_local_store_is_named_without_blaming_a_variable_nobody_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").write_bytes(b"SQLite format 3\0" + b"\x07" * 200)  # truncated, garbled
    try:
        with pytest.raises(PipelineError) as exc:
            store.configure(tmp_path)
    finally:
        mlflow.set_tracking_uri(None)
    message = str(exc.value)
    assert "MLFLOW_TRACKING_URI" not in message and "\n" not in message
    assert f"the local store {tmp_path}/mlruns/mlflow.db is damaged" in message


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
    loads = (f"python -c \"from mnist_pipeline.tracking import store; import mlflow.artifacts; store."
             f"configure(writes=False); print(mlflow.artifacts.load_text('runs:/{run_id}/note.txt'))\"")  # noqa: E501
    loaded = read_only_mount(moved / "mlruns", loads, moved)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "seven", loaded.stderr
    write = read_only_mount(moved / "mlruns", "python -c 'from mnist_pipeline import errors; from mnist_pipeline."
                            "tracking import store; errors.run_main(store.configure)'", moved)  # fmt: skip
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
