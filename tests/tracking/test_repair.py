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
        whole = registry.register(uri, "m", registry.Scores(0.9))
        half = int(mlflow.register_model(uri, "m", tags={names.REGISTERING: "1"}).version)  # as if killed here
    done = repair(client, experiment)
    assert len(done) == 3
    status = {name: client.get_run(run_id).info.status for name, run_id in runs_.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert client.get_logged_model(pending).status == LoggedModelStatus.FAILED
    assert [int(v.version) for v in client.search_model_versions("name='m'")] == [whole.version] != [half]
    assert repair(client, experiment) == []  # nothing left to do


def test_a_registration_by_another_machine_or_a_live_process_is_left_alone(local_store, tmp_path):
    """Versions marked by a process of another host (sharing a tracking server), or by a live process here, are
    being registered: repair leaves them; one marked by a dead process here is deleted."""
    from mnist_pipeline import names
    from mnist_pipeline.tracking.repair import owner, registration, repair

    client = MlflowClient()
    experiment = client.get_experiment_by_name(names.EXPERIMENT).experiment_id
    with mlflow.start_run():
        uri = log_onnx(build(tiny_model_config()).eval(), tmp_path)
        marks = {"elsewhere": "another-host:1:1", "alive": owner(), "dead": f"{socket.gethostname()}:{2**22 + 7}:1"}
        versions = {k: mlflow.register_model(uri, "m", tags={names.REGISTERING: v}) for k, v in marks.items()}
        states = {k: registration(client, v) for k, v in versions.items()}
        assert states == {"elsewhere": "live", "alive": "live", "dead": "abandoned"}
        repair(client, experiment)
    left = sorted(int(v.version) for v in client.search_model_versions("name='m'"))
    assert left == [int(versions["elsewhere"].version), int(versions["alive"].version)]


def test_a_version_waits_for_an_earlier_one_registered_elsewhere_then_decides_after_it(local_store, tmp_path):
    """Two machines register at once: the later version gets its aliases only once the earlier has decided, so
    `candidate` ends on the newest and `champion` follows the rule in version order."""
    import io
    import threading
    import time

    from mnist_pipeline import names

    client = MlflowClient()
    with mlflow.start_run() as run:
        uri = log_onnx(build(tiny_model_config()).eval(), tmp_path)
        # Version 1, "on another machine": created and tagged, not yet decided.
        first = mlflow.register_model(uri, "m", tags={names.REGISTERING: "another-host:1:1"}).version
        client.set_model_version_tag("m", first, names.RUN_ID, run.info.run_id)
        client.set_model_version_tag("m", first, names.TEST_ACCURACY, "0.990000")
        log = io.StringIO()

        def register_version_2() -> None:  # MLflow's active run is per thread: this one resumes it
            with mlflow.start_run(run_id=run.info.run_id):
                registry.register(uri, "m", registry.Scores(0.95), log=log)

        later = threading.Thread(target=register_version_2)
        later.start()
        deadline = time.monotonic() + 60
        while "waits for version(s) [1]" not in log.getvalue():  # version 2 is waiting for version 1
            assert later.is_alive() and time.monotonic() < deadline, log.getvalue()
            time.sleep(0.05)
        assert client.get_registered_model("m").aliases == {}
        # Version 1 decides: it becomes champion and candidate.
        client.delete_model_version_tag("m", first, names.REGISTERING)
        client.set_registered_model_alias("m", names.ALIAS_CANDIDATE, first)
        client.set_registered_model_alias("m", names.ALIAS_CHAMPION, first)
        client.set_model_version_tag("m", first, names.PROMOTION, "no champion yet")
        later.join(timeout=60)
    assert not later.is_alive()
    aliases = client.get_registered_model("m").aliases
    assert {k: str(v) for k, v in aliases.items()} == {names.ALIAS_CANDIDATE: "2", names.ALIAS_CHAMPION: "1"}
    assert "kept champion v1" in client.get_model_version("m", "2").tags[names.PROMOTION]
