"""`mnist-pipeline compare` against a real MLflow tracking server on 127.0.0.1 (the embedded store is covered by
the end-to-end tests)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, start_server, stop_server, wait_until_up

# Starting `mlflow server` takes half a minute on two cores: run with `pytest -m slow`.
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def tracking_server(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "artifacts")]  # fmt: skip
    server = start_server(cmd)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)


def test_compare_reads_runs_from_a_tracking_server(tracking_server):
    client = MlflowClient(tracking_server)
    experiment = client.create_experiment("mnist-pipeline")
    for lr, accuracy in ((0.003, 0.9882), (0.01, 0.9913)):
        run = client.create_run(experiment, tags={"git_commit": "0123456789abcdef", "mlflow.runName": f"lr-{lr}"})
        for key, value in {"train.lr": lr, "train.epochs": 2}.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "final_test_accuracy", accuracy)
        client.log_metric(run.info.run_id, "final_test_loss", 1 - accuracy)
        client.set_terminated(run.info.run_id)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server}
    out = subprocess.run([sys.executable, "-m", "mnist_pipeline.cli", "compare", "--csv"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(io.StringIO(out.stdout), dtype={"commit": str})
    assert list(table["run"]) == ["lr-0.01", "lr-0.003"]  # best test accuracy first
    assert list(table["train.lr"]) == [0.01, 0.003] and "train.epochs" not in table.columns  # only what differs
    assert list(table["commit"]) == ["0123456", "0123456"]
