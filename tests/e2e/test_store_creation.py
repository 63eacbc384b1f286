"""Two processes creating the project's store at once."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.e2e  # two fresh processes
def test_two_processes_creating_a_new_store_at_once_both_succeed(tmp_path):
    """Two pipelines starting together on a store that does not exist yet (queued experiments with -j 2): without
    the file lock both ran MLflow's schema migrations and one failed with "duplicate column name"."""
    import os
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
