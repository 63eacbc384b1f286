"""Where the store is: the project's root from inside a DVC experiment, the default SQLite store, a damaged,
moved, copied or read-only store."""

from __future__ import annotations

import http.server
import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import loader, store
from tests.helpers import serving, trickle


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


def test_a_writer_on_a_read_only_store_is_refused_before_touching_it(tmp_path, monkeypatch):
    """The decision itself, without a mount: a store folder this process may not write."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)
    (tmp_path / "mlruns").mkdir()
    with pytest.raises(PipelineError, match=r"is read-only, and this command records runs or models in it"):
        store.configure(tmp_path)
    with pytest.raises(PipelineError, match=r"is read-only and holds no database"):
        store.configure(tmp_path, writes=False)


def test_a_write_that_lost_an_insert_race_is_tried_again_and_any_other_error_is_not(monkeypatch):
    """The rule of `despite_insert_races`, with the write stood in for: the real races are caught by the team layer
    against PostgreSQL (tests/team)."""
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr("time.sleep", lambda _: None)
    raced = MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "x"')
    calls = []

    def write(*errors):
        """A write that fails with ``errors``, one per try, then succeeds."""
        pending = list(errors)
        calls.clear()

        def attempt():
            calls.append(attempt)
            if pending:
                raise pending.pop(0)
            return "written"

        return attempt

    assert store.despite_insert_races(write(raced)) == "written" and len(calls) == 2
    with pytest.raises(MlflowException, match="UniqueViolation"):
        store.despite_insert_races(write(*[raced] * store.RACE_ATTEMPTS))
    assert len(calls) == store.RACE_ATTEMPTS
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        store.despite_insert_races(write(MlflowException("PERMISSION_DENIED: no")))
    assert len(calls) == 1


@pytest.mark.parametrize("content", [b"", b"not a database at all"])
def test_an_empty_or_damaged_database_is_refused_not_made_a_new_store(tmp_path, monkeypatch, content):
    """MLflow takes an empty file for a new store and writes its schema into it: the runs it held (lost to a full
    disk, say) would read as "no runs yet"."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").write_bytes(content)
    for writes in (True, False):
        with pytest.raises(PipelineError, match=r"mlflow.db is not an SQLite database \(empty or damaged\): restore"):
            store.configure(tmp_path, writes=writes)
    assert (tmp_path / "mlruns" / "mlflow.db").read_bytes() == content


class _TrickleAfterHealth(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers its health check and the experiment's look-up at once, then sends every
    other answer one byte every 0.2 s: each wait for data is short, the exchange never ends."""

    EXPERIMENT = {
        "experiment": {
            "experiment_id": "1",
            "name": "mnist-pipeline",
            "artifact_location": "mlflow-artifacts:/1",
            "lifecycle_stage": "active",
            "tags": [{"key": store.EXPERIMENT_KIND[0], "value": store.EXPERIMENT_KIND[1]}],
        }
    }

    def _answer(self):
        body = b"OK" if self.path == "/health" else json.dumps(self.EXPERIMENT).encode()
        quick = self.path == "/health" or "experiments/get-by-name" in self.path
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if quick else 1000))
        self.end_headers()
        if quick:
            self.wfile.write(body)
        else:
            trickle(self.wfile, b" " * 1000)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_a_tracking_server_that_trickles_its_answers_ends_a_reading_command_at_the_deadline(monkeypatch, capsys):
    from mnist_pipeline.commands import compare

    with serving(_TrickleAfterHealth) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        with pytest.raises(PipelineError, match=rf"tracking server {url} did not answer within 2 s"):
            compare.main(None, "test_accuracy", "csv")
        with pytest.raises(PipelineError, match=rf"tracking server {url} did not answer within 2 s"):
            loader.load_model("models:/mnist-cnn/1")
    mlflow.set_tracking_uri(None)
