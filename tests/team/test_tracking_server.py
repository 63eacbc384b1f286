"""The team's tracking server (PostgreSQL, served artifacts, logins): two machines at once, logins refused,
a reader that cannot write, the server killed mid-run, and no secret in any run."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from mnist_pipeline import names
from tests.helpers import make_repo, ran_stages, run, start
from tests.team.conftest import MACHINES, READER, ROUNDS, at_once

pytestmark = [pytest.mark.team, pytest.mark.e2e]


def rest(server, endpoint: str, body: dict | None = None, login: tuple[str, str] | None = None) -> int:
    """A raw REST call, as any HTTP client makes it; the status it got."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def state(client, model: str) -> dict:
    """What a fault must not change or lose: the model's runs by status, its versions and aliases."""
    experiment = client.get_experiment_by_name(names.EXPERIMENT)
    query = f"params.`export.model_name` = '{model}'"
    runs = client.search_runs([experiment.experiment_id], query, max_results=1000) if experiment else []
    by_status: dict[str, int] = {}
    for r in runs:
        by_status[r.info.status] = by_status.get(r.info.status, 0) + 1
    try:
        versions = client.search_model_versions(f"name = '{model}'")
        aliases = client.get_registered_model(model).aliases
    except MlflowException:
        versions, aliases = [], {}
    return {"runs": by_status, "versions": sorted(int(v.version) for v in versions), "aliases": dict(aliases)}


def check_registry(client, model: str, min_delta: float = 0.0) -> list:
    """Every version complete and decided; `candidate` on the newest; `champion` where the promotion rule, applied
    to the versions in the order they were numbered, puts it. Returns the versions."""
    versions = sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version))
    assert versions
    for v in versions:
        assert names.REGISTERING not in v.tags and names.PROMOTION in v.tags, v.tags
        assert client.get_run(v.run_id).info.status == "FINISHED"
    champion = None
    for v in versions:
        accuracy = float(v.tags[names.TEST_ACCURACY])
        if champion is None or accuracy >= float(champion.tags[names.TEST_ACCURACY]) + min_delta:
            champion = v
    aliases = client.get_registered_model(model).aliases
    assert aliases == {names.ALIAS_CANDIDATE: versions[-1].version, names.ALIAS_CHAMPION: champion.version}
    return versions


# --- logins ---------------------------------------------------------------------------------------------------


def test_requests_without_a_login_or_with_a_wrong_password_are_refused_and_change_nothing(team_server, as_user):
    admin = as_user("admin")
    before = len(admin.search_experiments()), len(admin.search_registered_models())
    for login in (None, ("alice", "not-her-password"), ("mallory", "any-password-at-all")):
        assert rest(team_server, "experiments/create", {"name": "intruder"}, login) == 401
        assert rest(team_server, "registered-models/create", {"name": "intruder"}, login) == 401
        assert rest(team_server, "experiments/search?max_results=1", login=login) == 401
    after = len(admin.search_experiments()), len(admin.search_registered_models())
    print(f"\n(experiments, registered models) before {before}, after 9 refused requests {after}")
    assert after == before
    assert admin.get_experiment_by_name("intruder") is None
    assert rest(team_server, "experiments/search?max_results=1", login=("alice", team_server.password("alice"))) == 200


def test_a_reader_reads_but_cannot_register_or_move_an_alias(team_server, as_user, tmp_path):
    import mlflow

    from mnist_pipeline.ml.model import build
    from mnist_pipeline.tracking import registry, store
    from tests.helpers import log_onnx, tiny_model_config

    alice = as_user("alice")
    store.configure(tmp_path)
    with mlflow.start_run() as logged:
        uri = log_onnx(build(tiny_model_config()).eval(), tmp_path)
        registry.register(uri, "reader-test", registry.Scores(0.9))
    before = state(alice, "reader-test")

    carol = as_user(READER)
    assert carol.get_model_version_by_alias("reader-test", names.ALIAS_CHAMPION).version == "1"  # reads
    attempts = {
        "register": lambda: carol.create_model_version("reader-test", uri, logged.info.run_id),
        "move an alias": lambda: carol.set_registered_model_alias("reader-test", names.ALIAS_CHAMPION, "1"),
        "drop an alias": lambda: carol.delete_registered_model_alias("reader-test", names.ALIAS_CHAMPION),
        "log to a run": lambda: carol.log_metric(logged.info.run_id, "forged", 1.0),
    }
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.get_http_status_code() == 403, what
    after = state(alice, "reader-test")
    print(f"\na reader's 4 refused changes: before {before}, after {after}")
    assert after == before


def test_a_wrong_password_stops_the_pipeline_in_one_line_before_it_trains(tmp_path, team_server, http_mirror,
                                                                         mirror_md5, as_user):  # fmt: skip
    repo = make_repo(tmp_path, mirror_md5, export={"model_name": "wrong-password-test"})
    admin = as_user("admin")
    before = state(admin, "wrong-password-test"), len(admin.search_experiments())
    out = run(repo, http_mirror, "dvc", "repro", **{**team_server.env("alice"), "MLFLOW_TRACKING_PASSWORD": "guess"})
    after = state(admin, "wrong-password-test"), len(admin.search_experiments())
    print(f"\na wrong password: (state, experiments) before {before}, after {after}")
    assert after == before
    assert out.returncode != 0
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line == (f"error: the MLflow tracking server {team_server.url} refused the login 'alice' "
                    "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) (401: no valid login); set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or give the server a `machine` entry in "
                    "~/.netrc (never in params.yaml)")  # fmt: skip
    assert "guess" not in out.stdout + out.stderr and not (repo / "models/model.pt").exists()


# --- two machines at once ----------------------------------------------------------------------------------------

MODEL = "team-cnn"


def _log_one_dataset_at_once(experiment_id: str, barrier) -> None:
    """One machine's export stage at the moment it logs the data its run used: a dataset new to the experiment,
    the same on every machine; then the next round's."""
    import mlflow

    from mnist_pipeline.tracking import runs

    for number in range(ROUNDS):
        with mlflow.start_run(experiment_id=experiment_id, tags={"round": str(number)}):
            data = runs.dataset(f"data-{number}", f"digest-{number}", "https://example.org/mnist/")
            barrier.wait()
            runs.log_inputs({"testing": data})


def test_machines_logging_one_new_dataset_at_the_same_moment_all_link_their_runs_to_it(as_user):
    """A dataset is one row of the experiment for all the runs that used the same data; on a SQL server two inserts
    of one new dataset at once used to fail the later machine's export stage (UniqueViolation on `dataset_pk`)."""
    client = as_user("alice")
    experiment_id = client.create_experiment("dataset-race")

    at_once(_log_one_dataset_at_once, experiment_id)

    for number in range(ROUNDS):
        runs = client.search_runs([experiment_id], f"tags.round = '{number}'")
        assert len(runs) == MACHINES
        for logged in runs:
            (used,) = logged.inputs.dataset_inputs
            assert (used.dataset.name, used.dataset.digest) == (f"data-{number}", f"digest-{number}")
            assert {tag.key: tag.value for tag in used.tags}["mlflow.data.context"] == "testing"


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, team_server, http_mirror, mirror_md5):
    """Two clones, two users, at the same time: alice runs `dvc repro` with her login in the environment, bob runs
    `dvc exp run` with another seed and his login in a netrc file. Returns the two clones."""
    clones = [make_repo(tmp_path_factory.mktemp(user), mirror_md5, export={"model_name": MODEL})
              for user in ("alice", "bob")]  # fmt: skip
    netrc = clones[1].parent / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login bob password {team_server.password('bob')}\n")
    netrc.chmod(0o600)
    processes = [
        start(clones[0], http_mirror, "dvc", "repro", **team_server.env("alice")),
        start(clones[1], http_mirror, "dvc", "exp", "run", "-S", "train.seed=1", "-S", "train.lr=0.02",
              MLFLOW_TRACKING_URI=team_server.url, NETRC=str(netrc)),
    ]  # fmt: skip
    for process, log in processes:
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    return clones


def test_two_machines_at_once_each_land_a_whole_run_and_version(two_machines, as_user):
    alice = as_user("alice")
    versions = check_registry(alice, MODEL)
    runs = [json.loads((clone / "reports/last_run.json").read_text())["run_id"] for clone in two_machines]
    assert sorted(v.run_id for v in versions) == sorted(runs)  # one version each, from its own run
    for run_id in runs:
        finished = alice.get_run(run_id)
        assert finished.data.metrics[names.TEST_ACCURACY] > 0 and finished.data.params["train.seed"] in ("0", "1")
        folders = ("evaluation", "exported")
        logged = {Path(a.path).name for folder in folders for a in alice.list_artifacts(run_id, folder)}
        assert {"confusion_matrix.png", "predictions.png", "model.onnx"} <= logged, logged
        query = f"source_run_id = '{run_id}'"
        (model,) = alice.search_logged_models([finished.info.experiment_id], filter_string=query)
        assert model.status.name == "READY"
    users = {alice.get_run(r).info.user_id for r in runs}
    assert users == {"alice", "bob"}  # each ran as the user who logged in


def test_no_password_in_any_param_tag_or_artifact_of_the_runs(two_machines, as_user, team_server, postgres,
                                                              tmp_path, monkeypatch):  # fmt: skip
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    alice = as_user("alice")
    secrets = [team_server.password(user) for user in ("admin", "alice", "bob")] + [postgres.password]
    experiment = alice.get_experiment_by_name(names.EXPERIMENT)
    runs = alice.search_runs([experiment.experiment_id], max_results=1000)
    assert len(runs) >= 2
    searched = 0
    for r in runs:
        text = json.dumps([r.data.params, r.data.tags, r.info.run_name])
        folder = tmp_path / r.info.run_id
        mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(folder))
        for file in folder.rglob("*"):
            if file.is_file():
                text += file.read_bytes().decode("latin-1")
                searched += 1
        assert not [s for s in secrets if s in text], r.info.run_id
    for version in alice.search_model_versions(f"name = '{MODEL}'"):
        assert not [s for s in secrets if s in json.dumps([version.tags, version.description, version.source])]
    assert searched > 10


# --- the server killed mid-run ---------------------------------------------------------------------------------


def test_the_server_killed_during_export_fails_the_stage_in_one_line_and_the_rerun_repairs(
    tmp_path, team_server, http_mirror, mirror_md5, as_user
):
    """kill -9 of the server once the export stage has opened its run (params logged, artifacts and model on their
    way): the stage fails in one line naming the server; once the server is back, `dvc repro` reruns the export,
    ends the dead run KILLED and registers one complete version."""
    model = "killed-test"
    repo = make_repo(tmp_path, mirror_md5, export={"model_name": model})
    admin = as_user("admin")
    before = state(admin, model)
    process, log = start(repo, http_mirror, "dvc", "repro", **team_server.env("alice"))
    experiment = None
    deadline = time.monotonic() + 300
    while True:  # until the export stage's run is open on the server
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        experiment = experiment or admin.get_experiment_by_name(names.EXPERIMENT)
        query = f"params.`export.model_name` = '{model}' and attributes.status = 'RUNNING'"
        if experiment and admin.search_runs([experiment.experiment_id], query):
            break
        time.sleep(0.1)
    team_server.kill()
    try:
        assert process.wait(timeout=300) != 0
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and team_server.url in errors[0], log.read_text()[-3000:]
    finally:
        team_server.start()
    during = state(admin, model)
    out = run(repo, http_mirror, "dvc", "repro", **team_server.env("alice"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert ran_stages(out) == ["export"]
    after = state(admin, model)
    print(
        f"\nserver killed during export: {errors[0]}\nbefore {before}; after the kill {during}; after the rerun "
        f"{after}; the rerun said: {[line for line in out.stderr.splitlines() if 'repaired' in line]}"
    )
    check_registry(admin, model)
    assert len(after["versions"]) == len(before["versions"]) + 1
    assert during["runs"] == {"RUNNING": 1} and after["runs"] == {"KILLED": 1, "FINISHED": 1}
