"""`repair`: what a killed export leaves in a real MLflow SQLite store is ended or removed, and nothing else."""

from __future__ import annotations

import socket

import mlflow
from mlflow.tracking import MlflowClient

from mnist_pipeline.ml.model import build
from mnist_pipeline.tracking import registry
from tests.helpers import log_onnx, tiny_model_config


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
        uri = log_onnx(build(tiny_model_config()).eval(), tmp_path)
        whole = registry.register(uri, "m", 0.9)
        half = int(mlflow.register_model(uri, "m", tags={names.REGISTERING: "1"}).version)  # as if killed here
    done = repair(client, experiment)
    assert len(done) == 3
    status = {name: client.get_run(run_id).info.status for name, run_id in runs_.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert client.get_logged_model(pending).status == LoggedModelStatus.FAILED
    assert [int(v.version) for v in client.search_model_versions("name='m'")] == [whole.version] != [half]
    assert repair(client, experiment) == []  # nothing left to do
