"""One Optuna study for the team: `mnist-pipeline tune` on two machines at once, the study in PostgreSQL, the
trials as child runs of one parent on the team's tracking server."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mnist_pipeline import names
from mnist_pipeline.tracking import studies
from tests.helpers import make_repo, run, start
from tests.team.conftest import ROUNDS, at_once

pytestmark = [pytest.mark.team, pytest.mark.e2e]

# Trials long enough (a few seconds each) that both machines are searching at the same time.
SPACE = {
    "validation": 200,
    "space": {"train.lr": [0.001, 0.003], "train.epochs": [15]},
    "pruner": {"startup_trials": 1, "warmup_epochs": 0},
}


def test_two_machines_take_trials_from_one_study_under_one_parent_run(tmp_path, postgres, team_server, http_mirror,
                                                                      mirror_md5, as_user):  # fmt: skip
    storage = postgres.create_database("optuna")
    users, clones = ("alice", "bob"), []
    for user in users:
        repo = make_repo(tmp_path / user, mirror_md5)
        download = run(repo, http_mirror, "dvc", "repro", "download")
        assert download.returncode == 0, download.stderr
        (repo / "space.yaml").write_text(yaml.safe_dump(SPACE))
        clones.append(repo)
    cmd = ["mnist-pipeline", "tune", "--space", "space.yaml", "--trials", "4", "--storage", storage, "--study",
           "team-search"]  # fmt: skip
    pairs = zip(clones, users, strict=True)
    searches = [start(repo, http_mirror, *cmd, **team_server.env(user)) for repo, user in pairs]
    for process, log in searches:
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]

    trials = optuna.load_study(study_name="team-search", storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5  # each stops once the study has 4 (the other may be mid-trial)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both machines took trials

    client = as_user("carol")  # anyone on the team can read the search
    experiment = client.get_experiment_by_name(studies.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{names.TUNE_STUDY}` = 'team-search'")
    (parent,) = [r for r in runs if r.data.tags[names.TUNE_ROLE] == "study"]
    children = [r for r in runs if r.data.tags[names.TUNE_ROLE] == "trial"]
    assert sorted(int(r.data.tags[names.TUNE_TRIAL]) for r in children) == sorted(t.number for t in trials)
    assert {r.data.tags[names.PARENT_RUN] for r in children} == {parent.info.run_id}
    assert {r.info.user_id for r in children} == {"alice", "bob"}
    assert parent.data.tags[names.TUNE_STORAGE] == storage.replace(postgres.password, "***")
    assert postgres.password not in json.dumps([[r.data.params, r.data.tags] for r in runs])


def _finish_at_once(storage: str, barrier) -> None:
    """One machine at the end of each study's search: finds the study's parent run, waits for the others, writes the
    summary; then the next study."""
    for number in range(ROUNDS):
        study = optuna.load_study(study_name=f"summary-race-{number}", storage=storage)
        tracking = studies.Tracking(study.study_name, storage)
        barrier.wait()
        tracking.finish(study, "FINISHED", {"train.lr": "0.002"})  # the best trial's params, as tune gives them


def test_machines_ending_one_study_at_the_same_moment_all_write_its_summary(tmp_path, as_user):
    """The parent run's summary tags are new keys written by every machine as it ends; on a SQL server two inserts
    of one key at once used to fail the later machine's whole search (UniqueViolation) after all its trials."""
    client = as_user("alice")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    lr = optuna.distributions.FloatDistribution(0.001, 0.01)
    for number in range(ROUNDS):
        study = optuna.create_study(study_name=f"summary-race-{number}", storage=storage, direction="maximize")
        study.add_trial(optuna.trial.create_trial(params={"train.lr": 0.002}, distributions={"train.lr": lr},
                                                  value=0.9))  # fmt: skip

    at_once(_finish_at_once, storage)

    experiment = client.get_experiment_by_name(studies.EXPERIMENT)
    for number in range(ROUNDS):
        query = f"tags.`{names.TUNE_STUDY}` = 'summary-race-{number}'"
        (parent,) = client.search_runs([experiment.experiment_id], query)  # one parent, though all began at once
        assert parent.data.tags[names.TUNE_BEST_TRIAL] == "0"
        assert parent.data.tags[names.TUNE_BEST + "train.lr"] == "0.002"
        assert parent.data.metrics["best_val_accuracy"] == 0.9
