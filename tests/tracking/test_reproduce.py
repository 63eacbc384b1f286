"""`reproduce` finds the run it is given by id, prefix or experiment name."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_pipeline.errors import PipelineError


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


def test_a_deleted_run_is_named_deleted(local_store, tmp_path):
    from mnist_pipeline.commands.reproduce import _original, find_run

    client = MlflowClient()
    with mlflow.start_run(run_name="gone") as run:
        run_id = run.info.run_id
    client.delete_run(run_id)
    assert find_run(client, run_id[:8], local_store) == run_id
    with pytest.raises(PipelineError, match=rf"^run {run_id} is deleted; restore it to reproduce it"):
        _original(client, run_id, local_store, tmp_path, None)
