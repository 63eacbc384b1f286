"""The store as several processes see it: two creating it at once, and a read-only mount read by commands and
refused to writers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_pipeline.ml.model import build
from tests.helpers import REPO_ROOT, log_onnx, tiny_model_config, user_env

pytestmark = pytest.mark.e2e  # fresh processes


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
    loads = (
        f'python -c "from mnist_pipeline.tracking import store; import mlflow.artifacts; store.'
        f"configure(writes=False); print(mlflow.artifacts.load_text('runs:/{run_id}/note.txt'))\""
    )  # noqa: E501
    loaded = read_only_mount(moved / "mlruns", loads, moved)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "seven", loaded.stderr
    write = read_only_mount(moved / "mlruns", "python -c 'from mnist_pipeline import errors; from mnist_pipeline."
                            "tracking import store; errors.run_main(store.configure)'", moved)  # fmt: skip
    assert write.returncode == 1
    assert write.stderr.strip().splitlines() == [
        f"error: the MLflow store in {moved / 'mlruns'} is read-only, and this command records runs or models in "
        "it; run it in a writable copy of the project, or set MLFLOW_TRACKING_URI to a store you can write"
    ]


def test_predict_reads_the_champion_of_a_read_only_store_and_writes_nothing_into_it(project, files):
    """MLflow "downloads" a model of a local store as the store's own folder and writes a file into it: predict
    takes a copy of its own, so a read-only store is read and a writable one left as it was."""
    root, _ = project
    (root / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    with mlflow.start_run():
        uri = log_onnx(build(tiny_model_config()).eval(), root)
    version = mlflow.register_model(uri, "mnist-cnn").version
    MlflowClient().set_registered_model_alias("mnist-cnn", "champion", version)
    mlflow.set_tracking_uri(None)
    before = sorted(path for path in (root / "mlruns").rglob("*") if path.is_file())
    read = read_only_mount(root / "mlruns", f"mnist-pipeline predict '{files / 'grey.png'}'", root)
    if "Read-only file system" in read.stderr and "note:" not in read.stderr:
        pytest.skip(f"no read-only mount here: {read.stderr.strip()[:200]}")
    assert read.returncode == 0 and read.stdout.startswith(str(files / "grey.png")), read.stderr
    written = subprocess.run(["mnist-pipeline", "predict", str(files / "grey.png")], cwd=root, env=user_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert sorted(path for path in (root / "mlruns").rglob("*") if path.is_file()) == before


def test_two_processes_creating_a_new_store_at_once_both_succeed(tmp_path):
    """Two pipelines starting together on a store that does not exist yet (queued experiments with -j 2): without
    the file lock both ran MLflow's schema migrations and one failed with "duplicate column name"."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    code = "from mnist_pipeline.tracking import store; print(store.configure())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(out.strip() == f"sqlite:///{tmp_path}/mlruns/mlflow.db" for out, _ in results)
    experiments = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == ["mnist-pipeline"]
