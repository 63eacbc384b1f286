"""The stages' tracking process, against a real MLflow SQLite store: calls, errors, how a run ends, what loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from mnist_pipeline import tracker
from mnist_pipeline.errors import PipelineError, interrupts_held

pytestmark = pytest.mark.e2e  # each test starts the real tracking process


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store of its own: the tracking process inherits this environment."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def test_calls_reach_the_store_and_a_failed_call_is_one_line(store, tmp_path):
    with tracker.Tracker.start() as tracking:
        assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing touches the store before configure
        assert tracking.configure() == store
        with tracker.run(tracking, {"train.lr": 0.01}, {"device": "cpu"}) as run_id:
            tracking.call("log_epoch", 1, {"test_accuracy": 0.5})
            tracking.call("log_metrics", {"train_seconds": 1.5})
        with pytest.raises(PipelineError, match=r"^MLflow run 0+ is not in the store .*dvc repro -f train"):
            with tracker.run(tracking, run_id="0" * 32, resume=True):
                pass
        with pytest.raises(PipelineError, match="unknown tracking call 'delete_experiment'"):
            tracking.call("delete_experiment", "0")
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.01"}
    assert run.data.metrics == {"test_accuracy": 0.5, "train_seconds": 1.5}


def test_an_error_or_an_interruption_ends_the_run_failed_or_killed(store):
    with tracker.Tracker.start() as tracking:
        tracking.configure()
        with pytest.raises(ValueError):
            with tracker.run(tracking) as failed:
                raise ValueError("boom")
        with pytest.raises(KeyboardInterrupt):
            with tracker.run(tracking) as killed:
                raise KeyboardInterrupt
    client = MlflowClient(store)
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(killed).info.status == "KILLED"


def test_a_stage_that_dies_without_a_word_leaves_its_run_killed_not_running(store):
    """kill -9 of the stage alone: the tracking process sees its input close and ends the run."""
    code = (
        "import os, signal\n"
        "from mnist_pipeline import tracker\n"
        "t = tracker.Tracker.start(); t.configure()\n"
        "print(t.call('begin_run', {}, {}, None, False), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    stage = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert stage.returncode == -signal.SIGKILL
    run_id = stage.stdout.strip()
    client = MlflowClient(store)
    for _ in range(100):  # the tracking process finishes on its own, just after its stage
        if client.get_run(run_id).info.status != "RUNNING":
            break
        time.sleep(0.1)
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_tracking_process_that_cannot_start_is_a_clear_error(store, monkeypatch):
    tracking = tracker.Tracker(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))  # fmt: skip
    with pytest.raises(PipelineError, match=r"the tracking process stopped \(exit status 3\)"):
        tracking.configure()
    tracking.close()


def test_a_signal_during_a_held_block_waits_for_its_end():
    # Python's own Ctrl-C handler, even where the suite was started with SIGINT ignored (`cmd &` in a script).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("logged")
                done.append("saved")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done == ["logged", "saved"]
