"""The stage layer (``mnist_pipeline.stages``) called directly: the train stage's resume, a store lost in the middle
of a training, and what rank 0 does that other ranks do not. Real training on the synthetic data, a real MLflow
SQLite store, the real tracking process; a fault is injected into one call of it where a test says so."""

from __future__ import annotations

import dataclasses
import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT
from mnist_pipeline import config, tracker
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.stages import train

pytestmark = pytest.mark.e2e  # each test runs the stage with its tracking process, twice


@pytest.fixture
def params() -> config.Params:
    p = config.load(REPO_ROOT / "params.yaml")
    return dataclasses.replace(
        p,
        model=dataclasses.replace(p.model, conv_channels=[4], kernel_size=3, hidden=16),
        train=dataclasses.replace(p.train, epochs=2, batch_size=100, log_every=5),
    )


@pytest.fixture
def paths(tmp_path, raw_dir, monkeypatch) -> train.Paths:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return train.Paths(data=raw_dir, checkpoint=tmp_path / "model.pt", history=tmp_path / "history.csv",
                       run_file=tmp_path / "run.json", resume_state=tmp_path / "resume" / "state.pt")  # fmt: skip


def failing_at_epoch(epoch: int, error: BaseException):
    """A tracking process whose ``log_epoch`` raises ``error`` from ``epoch`` on; every other call is real."""

    class Failing(tracker.Tracker):
        def call(self, name, *args):
            if name == "log_epoch" and args[0] >= epoch:
                raise error
            return super().call(name, *args)

    return Failing.start


def the_run(paths: train.Paths):
    client = MlflowClient()
    run_id = json.loads(paths.run_file.read_text())["run_id"]
    return client.get_run(run_id), [m.step for m in client.get_metric_history(run_id, "test_accuracy")]


def test_an_interrupted_training_continues_in_the_same_run(params, paths, capsys):
    with pytest.raises(KeyboardInterrupt):
        train.run(params, paths, failing_at_epoch(2, KeyboardInterrupt()))
    assert "the last completed epoch is saved in" in capsys.readouterr().err
    assert paths.resume_state.exists() and not paths.checkpoint.exists()
    interrupted = MlflowClient().search_runs(MlflowClient().get_experiment_by_name("mnist-pipeline").experiment_id)
    assert [r.info.status for r in interrupted] == ["KILLED"]

    train.run(params, paths)
    assert "resuming after epoch 1/2" in capsys.readouterr().err
    run, steps = the_run(paths)
    assert run.info.run_id == interrupted[0].info.run_id and run.info.status == "FINISHED" and steps == [1, 2]
    assert paths.checkpoint.exists() and not paths.resume_state.exists()
    assert len(paths.history.read_text().splitlines()) == 3  # header + both epochs, the first one restored


def test_a_changed_param_starts_over_instead_of_resuming(params, paths, capsys):
    with pytest.raises(KeyboardInterrupt):
        train.run(params, paths, failing_at_epoch(2, KeyboardInterrupt()))
    train.run(dataclasses.replace(params, train=dataclasses.replace(params.train, lr=0.02)), paths)
    assert "from another training (params, data or code changed): starting over" in capsys.readouterr().err
    run, steps = the_run(paths)
    assert run.data.params["train.lr"] == "0.02" and steps == [1, 2]


def test_a_store_lost_mid_training_keeps_the_model_and_the_rerun_only_logs(params, paths, capsys):
    with pytest.raises(PipelineError, match="lost the MLflow store .* without training again"):
        train.run(params, paths, failing_at_epoch(2, PipelineError("MLflow: OperationalError: disk I/O error")))
    assert "could not log epoch 2 to MLflow; training goes on" in capsys.readouterr().err
    assert paths.resume_state.exists() and not paths.run_file.exists()

    train.run(params, paths)
    err = capsys.readouterr().err
    assert "resuming after epoch 2/2" in err and "batch" not in err  # nothing trained again
    run, steps = the_run(paths)
    assert run.info.status == "FINISHED" and steps == [1, 2]
    assert not paths.resume_state.exists()


def test_only_rank_0_logs_and_writes_the_outputs(params, paths, monkeypatch):
    def no_tracker():
        raise AssertionError("a rank other than 0 started a tracking process")

    # Rank 1 as torchrun describes it, in a world of one so that it needs no peer: it trains and writes nothing.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    train.run(params, paths, no_tracker)
    assert not any(p.exists() for p in (paths.checkpoint, paths.history, paths.run_file, paths.resume_state))

    monkeypatch.setenv("RANK", "0")
    train.run(params, paths)
    run, steps = the_run(paths)
    assert paths.checkpoint.exists() and paths.history.exists() and steps == [1, 2]
    assert run.data.tags["env.threads"] and run.data.tags["data_md5"]
