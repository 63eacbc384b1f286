"""`mnist-pipeline tune` in a copy of the project: a real search, its runs, --apply, shared studies, Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mnist_pipeline import config, names
from mnist_pipeline.ml.data import FILE_NAMES, TRAIN_FILE_NAMES
from mnist_pipeline.tracking import studies
from tests.helpers import REPO_ROOT, make_repo, run, user_env

ROOT = REPO_ROOT
BASE = config.read_params(ROOT / "params.yaml")


# --- the space, checked before anything exists -------------------------------------------------------------------


# Two learning rates, one hopeless: with the sampler's seed 0 the first trial draws 0.003 and the second 1e-6,
# which falls below the first's validation accuracy after its first epoch and is pruned there.
SPACE = {
    "validation": 200,
    "space": {"train.lr": [1.0e-6, 0.003], "train.epochs": [3]},
    "pruner": {"startup_trials": 1, "warmup_epochs": 0},
}


def tune_cmd(*args: str) -> list[str]:
    return ["mnist-pipeline", "tune", "--space", "space.yaml", "--seed", "0", *args]


def mlflow(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo}/mlruns/mlflow.db")


def study_of(repo: Path, name: str = "mnist-tune", storage: str | None = None):
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{repo}/tuning/optuna.db")


def in_study(run, name: str = "mnist-tune") -> bool:
    return run.data.tags.get(names.TUNE_STUDY) == name


def tuner_runs(repo: Path):
    client = mlflow(repo)
    experiment = client.get_experiment_by_name(studies.EXPERIMENT)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def study_runs(repo: Path, study: str):
    return [r for r in tuner_runs(repo) if r.data.tags.get(names.TUNE_STUDY) == study]


def until_the_third_trial_logs_an_epoch(proc: subprocess.Popen, repo: Path, study: str) -> None:
    """Wait (3 minutes at most) until the running search's third trial has logged an epoch to MLflow."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        runs = study_runs(repo, study)
        if any(r.data.tags.get(names.TUNE_TRIAL) == "2" and r.data.metrics for r in runs):
            return
        time.sleep(0.3)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, http_mirror, mirror_md5):
    """A copy of the project with its data downloaded and then its test files deleted (the tuner must not need
    them), searched with 3 trials and then resumed up to 5."""
    repo = make_repo(tmp_path_factory.mktemp("tune"), mirror_md5)
    download = run(repo, http_mirror, "dvc", "repro", "download")
    assert download.returncode == 0, download.stderr
    (repo / "space.yaml").write_text(yaml.safe_dump(SPACE))
    for name in set(FILE_NAMES) - set(TRAIN_FILE_NAMES):
        (repo / "data" / "raw" / name).unlink()
    first = run(repo, http_mirror, *tune_cmd("--trials", "3"))
    second = run(repo, http_mirror, *tune_cmd("--trials", "5"))
    assert not list((repo / "data" / "raw").glob("t10k-*"))  # both searches ran without the test split
    return repo, first, second


@pytest.mark.e2e
def test_a_search_prunes_resumes_and_never_reads_the_test_split(searched):
    repo, first, second = searched
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "the study has 3 finished trials; 2 to go" in second.stderr
    trials = study_of(repo).get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 5 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert trials[1].params["train.lr"] == 1.0e-6 and trials[1].state == TrialState.PRUNED
    assert trials[1].last_step == 1  # stopped after its first epoch
    assert "pruned" in first.stderr and "best " in first.stderr  # the progress line of each trial
    said = first.stderr.index  # no silence before the first epoch ends: what it does, then each trial as it starts
    assert (
        said("reading the training digits")
        < said("trial 0: training [train.epochs=3, train.lr=")
        < said("trial 0: epoch 1/")
    )
    for trial in trials[:3]:  # and a line at every epoch of every trial, as it ends
        assert all(f"trial {trial.number}: epoch {e}/" in first.stderr for e in range(1, trial.last_step + 1))
    assert "Warning" not in first.stderr + second.stderr  # no library's warning reaches the user
    assert second.stdout.startswith("dvc exp run -n mnist-tune-trial-")


@pytest.mark.e2e
def test_each_trial_is_a_child_run_of_the_studys_run_with_its_figures(searched):
    repo, _, _ = searched
    runs = [r for r in tuner_runs(repo) if in_study(r)]  # other tests of this module make studies of their own
    (parent,) = [r for r in runs if r.data.tags.get(names.TUNE_ROLE) == "study"]
    children = [r for r in runs if r.data.tags.get(names.TUNE_ROLE) == "trial"]
    assert parent.data.tags[names.TUNE_STUDY] == "mnist-tune" and parent.info.status == "FINISHED"
    assert len(children) == 5 and {r.data.tags[names.PARENT_RUN] for r in children} == {parent.info.run_id}
    by_trial = {t.number: t for t in study_of(repo).get_trials()}
    client = mlflow(repo)
    for child in children:
        trial = by_trial[int(child.data.tags["tune.trial"])]
        assert child.data.tags[names.TUNE_STATE] == trial.state.name.lower()
        assert child.data.params["train.lr"] == str(trial.params["train.lr"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert steps == list(range(1, trial.last_step + 1))
        assert "test_accuracy" not in child.data.metrics
    assert parent.data.metrics["best_val_accuracy"] == max(t.value for t in by_trial.values() if t.value is not None)
    steps = {m.step for m in client.get_metric_history(parent.info.run_id, "best_val_accuracy")}
    assert steps >= {3, 4, 5}  # logged as the search went (step: trials finished), so the study's row shows it
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/parallel_coordinate.png"} <= figures


@pytest.mark.slow  # a whole pipeline after the search
@pytest.mark.e2e
def test_apply_runs_the_pipeline_once_with_the_winner(searched, http_mirror):
    repo, _, _ = searched
    applied = run(repo, http_mirror, *tune_cmd("--trials", "5", "--apply"))
    assert applied.returncode == 0, applied.stderr
    assert len(study_of(repo).get_trials()) == 5  # the search was done: nothing more was tried
    client = mlflow(repo)
    pipeline_runs = client.search_runs([client.get_experiment_by_name("mnist-pipeline").experiment_id])
    (applied_run,) = pipeline_runs
    best = study_of(repo).best_trial
    assert applied_run.data.tags[names.TUNE_STUDY] == "mnist-tune"
    assert applied_run.data.tags["dvc_exp_name"] == f"mnist-tune-trial-{best.number}"
    assert applied_run.data.params["train.lr"] == str(best.params["train.lr"])
    assert "final_test_accuracy" in applied_run.data.metrics  # the pipeline's own evaluate stage
    (parent,) = [r for r in tuner_runs(repo) if r.data.tags.get(names.TUNE_ROLE) == "study" and in_study(r)]
    assert parent.data.tags["tune.applied_run"] == applied_run.info.run_id
    version = client.get_model_version_by_alias("mnist-cnn", "candidate")
    assert version.run_id == applied_run.info.run_id


@pytest.mark.slow  # two searches at once
@pytest.mark.e2e
def test_two_processes_share_one_study(searched, http_mirror, tmp_path):
    repo, _, _ = searched
    # Trials long enough (a few seconds each) that the second process is up before the first could finish them all.
    (repo / "shared.yaml").write_text(
        yaml.safe_dump({**SPACE, "space": {"train.lr": [0.001, 0.003], "train.epochs": [40]}})
    )
    storage = f"sqlite:///{tmp_path}/shared.db"
    cmd = [
        "mnist-pipeline",
        "tune",
        "--space",
        "shared.yaml",
        "--trials",
        "6",
        "--storage",
        storage,
        "--study",
        "shared",
    ]
    procs = [subprocess.Popen(cmd, cwd=repo, env=user_env(MNIST_MIRROR=http_mirror), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    trials = study_of(repo, "shared", storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 6 <= len(finished) <= 7, errors  # each process stops once the study has 6 (the other may be mid-trial)
    assert len({t.user_attrs["worker"] for t in trials}) == 2, errors  # both took part
    runs = [r for r in tuner_runs(repo) if r.data.tags.get(names.TUNE_STUDY) == "shared"]
    parents = [r for r in runs if r.data.tags[names.TUNE_ROLE] == "study"]
    assert len(parents) == 1 and len(runs) == len(trials) + 1


@pytest.mark.slow  # a third search
@pytest.mark.e2e
def test_ctrl_c_keeps_the_finished_trials_and_marks_the_running_one(searched, http_mirror):
    repo, _, _ = searched
    # With the sampler's seed 6 the first two trials draw 2 epochs and the third 1000: that one is interrupted.
    long_space = {"validation": 200, "space": {"train.epochs": [2, 1000]}, "pruner": {"startup_trials": 100}}
    (repo / "long.yaml").write_text(yaml.safe_dump(long_space))
    storage = f"sqlite:///{repo}/tuning/interrupted.db"
    cmd = ["mnist-pipeline", "tune", "--space", "long.yaml", "--seed", "6", "--trials", "3", "--storage", storage,
           "--study", "cut"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=repo, env=user_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    until_the_third_trial_logs_an_epoch(proc, repo, "cut")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    trials = study_of(repo, "cut", storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[2].params["train.epochs"] == 1000
    runs = {r.data.tags.get("tune.trial", "study"): r for r in study_runs(repo, "cut")}
    assert [runs[n].data.tags[names.TUNE_STATE] for n in ("0", "1", "2")] == ["complete", "complete", "killed"]
    assert runs["2"].info.status == "KILLED" and runs["2"].info.run_id == trials[2].user_attrs["mlflow_run_id"]
    assert runs["study"].info.status == "KILLED"
    assert "Traceback" not in err


@pytest.mark.slow  # a command that loads the training data
@pytest.mark.e2e
def test_a_bad_storage_is_one_line_and_creates_nothing(searched, http_mirror, tmp_path):
    repo, _, _ = searched
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"not a database" * 100)
    runs_before = len(tuner_runs(repo))
    for storage in (f"sqlite:///{tmp_path}/missing/folder/optuna.db", "nosuchdb://host/x", f"sqlite:///{damaged}"):
        out = run(repo, http_mirror, *tune_cmd("--trials", "1", "--storage", storage))
        assert out.returncode == 1, out.stderr
        said, error = out.stderr.strip().splitlines()  # what it set out to do, then why it cannot
        assert said == "reading the training digits and opening the study", out.stderr
        assert error.startswith(f"error: --storage {storage}: cannot open"), out.stderr
    assert not (tmp_path / "missing").exists()
    assert damaged.read_bytes() == b"not a database" * 100
    assert len(tuner_runs(repo)) == runs_before  # no MLflow run either


@pytest.mark.slow  # two more searches
@pytest.mark.e2e
def test_a_trial_killed_with_sigkill_is_marked_failed_when_the_study_resumes(searched, http_mirror):
    repo, _, _ = searched
    # As in the Ctrl-C test: with the sampler's seed 6 the third trial draws 1000 epochs; it is killed mid-way.
    (repo / "long.yaml").write_text(
        yaml.safe_dump({"validation": 200, "space": {"train.epochs": [2, 1000]}, "pruner": {"startup_trials": 100}})
    )
    storage = f"sqlite:///{repo}/tuning/killed.db"

    def cmd(trials: int) -> list[str]:
        return ["mnist-pipeline", "tune", "--space", "long.yaml", "--seed", "6", "--trials", str(trials),
                "--storage", storage, "--study", "killed"]  # fmt: skip

    proc = subprocess.Popen(cmd(3), cwd=repo, env=user_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    until_the_third_trial_logs_an_epoch(proc, repo, "killed")
    proc.kill()
    proc.communicate(timeout=60)
    assert study_of(repo, "killed", storage).get_trials()[2].state == TrialState.RUNNING  # what kill -9 leaves

    again = run(repo, http_mirror, *cmd(2))  # the same study; 2 trials finished already: no new one
    assert again.returncode == 0, again.stderr
    assert "trial 2 was left running by a process that is gone: marked failed" in again.stderr
    trials = study_of(repo, "killed", storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    child = {r.data.tags.get("tune.trial"): r for r in study_runs(repo, "killed")}["2"]
    assert child.info.status == "KILLED" and child.data.tags[names.TUNE_STATE] == "killed"
