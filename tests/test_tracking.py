"""Store location, run handoff and the registry's alias rule, against a real MLflow SQLite store."""

from __future__ import annotations

import socket
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mnist_pipeline.ml import export
from mnist_pipeline.tracking import registry, runs, store
from mnist_pipeline.config import ModelConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml.model import build


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


def test_a_training_record_that_is_missing_or_foreign_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PipelineError, match="not a training record written by the train stage"):
        runs.read_record(tmp_path / "bad.json")
    with pytest.raises(PipelineError, match="missing: run the train stage"):
        runs.read_record(tmp_path / "none.json")


def log_onnx(model, folder: Path) -> str:
    """Export ``model`` to ONNX as the export stage does and log it into the active run; its model URI."""
    export.save_onnx(model, torch.rand(2, 1, 28, 28), folder / "model.onnx")
    return registry.log_onnx_model(folder / "model.onnx", torch.rand(4, 1, 28, 28).numpy(), "model").model_uri


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # artifacts of this store land beside it
    uri = store.configure(tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)


def test_unreachable_store_is_one_clear_line(monkeypatch, tmp_path):
    (tmp_path / "mlflow.db").mkdir()  # a folder where the database file should be
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(PipelineError) as exc:
        store.configure(tmp_path)
    assert "MLFLOW_TRACKING_URI" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("accuracy", "champion", "delta", "promote", "reason"),
    [
        (0.95, None, 0.001, True, "no champion yet"),
        (0.97, (2, 0.96), 0.0, True, "test accuracy 0.9700 >= champion v2's 0.9600 + 0"),
        (0.96, (2, 0.96), 0.0, True, ">= champion v2's"),
        (0.95, (2, 0.96), 0.0, False, "kept champion v2: test accuracy 0.9500 < its 0.9600 + 0"),
        (0.9605, (2, 0.96), 0.001, False, "kept champion v2"),
        (0.9610, (2, 0.96), 0.001, True, ">= champion v2's 0.9600 + 0.001"),
    ],
)
def test_promotion_rule(accuracy, champion, delta, promote, reason):
    decision, why = registry.promotion(accuracy, champion, delta)
    assert decision is promote and reason in why


def test_candidate_always_moves_champion_only_when_not_worse(local_store, tmp_path):
    torch.manual_seed(0)
    model = build(ModelConfig((4,), 3, 8, 0.0, False)).eval()
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        uri = log_onnx(model, tmp_path)
        first = registry.register(uri, "m", 0.95)
        better = registry.register(uri, "m", 0.97)
        worse = registry.register(uri, "m", 0.96)
        equal = registry.register(uri, "m", 0.97)
    assert (first.version, first.aliases) == (1, ("candidate", "champion"))
    assert first.champion_reason == "no champion yet"
    assert better.aliases == ("candidate", "champion")
    assert worse.aliases == ("candidate",) and "kept champion v2" in worse.champion_reason
    assert equal.aliases == ("candidate", "champion")
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("m", "champion").version) == 4
    assert int(client.get_model_version_by_alias("m", "candidate").version) == 4
    version = client.get_model_version("m", "3")
    assert version.tags["test_accuracy"] == "0.960000" and version.tags["run_id"] == run_id
    assert version.tags["promotion"].startswith("kept champion v2") and version.tags["git_commit"]
    assert version.description.startswith("MNIST CNN, test accuracy 96.00%")
    with mlflow.start_run():
        margin = registry.register(uri, "m", 0.9705, min_delta=0.001)
    assert margin.aliases == ("candidate",)
    loaded = registry.load_model("models:/m@champion")  # ONNX, in onnxruntime
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(torch.from_numpy(loaded(x.numpy())), model(x), rtol=1e-4, atol=1e-5)


def test_a_pickled_model_is_refused_unless_allowed(local_store, tmp_path):
    """The pipeline logs ONNX models (earlier versions: torch.export ones); a model stored with pickle could run
    any code when loaded."""
    import numpy as np

    from mnist_pipeline.commands import predict

    model = build(ModelConfig((4,), 3, 16, 0.0, False)).eval()
    example = np.zeros((4, 1, 28, 28), np.float32)  # as the export stage: a batch of more than one
    with mlflow.start_run():
        pickled = mlflow.pytorch.log_model(model, name="pickled", serialization_format="pickle").model_uri
        earlier = mlflow.pytorch.log_model(model, name="pt2", serialization_format="pt2", input_example=example,
                                           pip_requirements=["torch"]).model_uri  # fmt: skip
        safe = log_onnx(model, tmp_path)
    with pytest.raises(PipelineError, match=r"would run code it carries .* pass --allow-pickle only if you trust"):
        predict.load_model(pickled)
    digits = np.zeros((2, 1, 28, 28), np.float32)
    assert predict.load_model(safe)(digits).shape == (2, 10)
    assert predict.load_model(earlier)(digits).shape == (2, 10)
    assert predict.load_model(pickled, allow_pickle=True)(digits).shape == (2, 10)


def test_servers_listen_on_127_0_0_1_unless_told_otherwise():
    from mnist_pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ui"]).host == "127.0.0.1"
    assert parser.parse_args(["serve"]).host == "127.0.0.1"
    assert (
        parser.parse_args(["serve"]).allow_pickle is False and parser.parse_args(["predict", "x"]).allow_pickle is False
    )


def test_a_registration_interrupted_half_way_leaves_no_version(local_store, monkeypatch, tmp_path):
    model = build(ModelConfig((4,), 3, 8, 0.0, False)).eval()
    with mlflow.start_run():
        uri = log_onnx(model, tmp_path)
        registry.register(uri, "m", 0.95)

        def interrupted(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", interrupted)  # Ctrl-C between two calls
        with pytest.raises(KeyboardInterrupt):
            registry.register(uri, "m", 0.97)
    versions = MlflowClient().search_model_versions("name='m'")
    assert [int(v.version) for v in versions] == [1]  # version 2 was removed again
    monkeypatch.undo()
    assert int(MlflowClient().get_model_version_by_alias("m", "champion").version) == 1


@pytest.mark.e2e  # two fresh processes
def test_two_processes_creating_a_new_store_at_once_both_succeed(tmp_path):
    """Two pipelines starting together on a store that does not exist yet (queued experiments with -j 2): without
    the file lock both ran MLflow's schema migrations and one failed with "duplicate column name"."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    code = "from mnist_pipeline import store; print(store.configure())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(out.strip() == f"sqlite:///{tmp_path}/mlruns/mlflow.db" for out, _ in results)
    experiments = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == ["mnist-pipeline"]


def test_reproduce_finds_a_run_by_a_unique_prefix_or_its_experiment_name(local_store):
    from mnist_pipeline.commands.reproduce import find_run

    client = MlflowClient()
    ids = []
    for name in ("lower-lr", "wider", "wide"):
        with mlflow.start_run(run_name=name, tags={"dvc_exp_name": name}) as run:
            ids.append(run.info.run_id)
    for run_id in ids:
        assert find_run(client, run_id[:8], local_store) == run_id  # as `compare` prints it
        assert find_run(client, run_id, local_store) == run_id
    assert find_run(client, "wider", local_store) == ids[1] and find_run(client, "wide", local_store) == ids[2]
    with pytest.raises(PipelineError, match=r"^'' matches 3 runs: .*\(lower-lr\).*; give more of the run id$"):
        find_run(client, "", local_store)
    with pytest.raises(PipelineError, match=r"no run in .* has an id starting with 'zz' or that name; .*compare"):
        find_run(client, "zz", local_store)


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


def test_repair_ends_what_dead_processes_left_and_nothing_else(local_store, tmp_path):
    from mlflow.entities import LoggedModelStatus

    from mnist_pipeline import names
    from mnist_pipeline.tracking.repair import owner, repair

    client = MlflowClient()
    experiment = client.get_experiment_by_name(names.EXPERIMENT).experiment_id
    host = socket.gethostname()
    runs_ = {
        "dead": client.create_run(experiment, tags={names.OWNER: f"{host}:{2**22 + 7}:1"}).info.run_id,  # > pid_max
        "alive": client.create_run(experiment, tags={names.OWNER: owner()}).info.run_id,
        "elsewhere": client.create_run(experiment, tags={names.OWNER: "another-host:1:1"}).info.run_id,
    }
    pending = client.create_logged_model(experiment, source_run_id=runs_["dead"]).model_id
    with mlflow.start_run():
        uri = log_onnx(build(ModelConfig((4,), 3, 16, 0.0, False)).eval(), tmp_path)
        whole = registry.register(uri, "m", 0.9)
        half = int(mlflow.register_model(uri, "m", tags={names.REGISTERING: "1"}).version)  # as if killed here
    done = repair(client, experiment)
    assert len(done) == 3
    status = {name: client.get_run(run_id).info.status for name, run_id in runs_.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert client.get_logged_model(pending).status == LoggedModelStatus.FAILED
    assert [int(v.version) for v in client.search_model_versions("name='m'")] == [whole.version] != [half]
    assert repair(client, experiment) == []  # nothing left to do


def test_compare_rounds_for_people_and_leaves_blanks_where_a_run_has_no_value():
    import pandas as pd

    from mnist_pipeline.commands.compare import for_people

    table = pd.DataFrame({"run": ["a", "b"], "train.lr": ["0.01", None], "test_accuracy": [0.99153, float("nan")],
                          "test_loss": [0.0264231, 0.5], "train_seconds": [107.1929, 16.55]})  # fmt: skip
    shown = for_people(table)
    assert shown.to_dict("list") == {"run": ["a", "b"], "train.lr": ["0.01", ""], "test_accuracy": ["99.15%", ""],
                                     "test_loss": ["0.0264", "0.5000"], "train_seconds": ["107.2", "16.6"]}  # fmt: skip
