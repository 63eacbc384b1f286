"""The pipeline's runs in MLflow, against a real store."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from mnist_pipeline import names
from mnist_pipeline.tracking import runs


def test_every_run_is_drawn_in_a_colour_none_of_its_19_latest_neighbours_has(local_store):
    """MLflow's UI colours a run by its id unless told: two of three runs could read alike in every chart."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(names.EXPERIMENT).experiment_id
    colours = []
    for n in range(25):
        colours.append(runs.colour(client, experiment))
        client.create_run(experiment, start_time=1_000 * (n + 1), tags={runs.MLFLOW_RUN_COLOR: colours[-1]})
    assert all(len(set(colours[i : i + 20])) == 20 for i in range(len(colours) - 19))
