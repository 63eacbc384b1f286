"""End to end: the real `dvc repro` in a temporary copy of the repository, data served over HTTP on 127.0.0.1,
a real MLflow store, tiny params."""

from __future__ import annotations

import io
import json
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.helpers import (
    free_port,
    git,
    make_repo,
    queue_outcome,
    ran_stages,
    run,
    start_server,
    stop_server,
    user_env,
    wait_until_up,
)

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Baseline:
    """The repository copy after its first `dvc repro`, and what that run left, read before any other test ran:
    tests may add runs, versions and experiments to the copy, so none relies on what another one did."""

    repo: Path
    first: subprocess.CompletedProcess
    run_id: str
    export_report: dict
    params: dict  # params.yaml as that run read it (an experiment in the copy changes the file)

    def __iter__(self):  # repo, first = pipeline
        return iter((self.repo, self.first))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, http_mirror, mirror_md5) -> Baseline:
    repo = make_repo(tmp_path_factory.mktemp("e2e"), mirror_md5)
    first = run(repo, http_mirror, "dvc", "repro", **SECRETS)
    assert first.returncode == 0, first.stdout + first.stderr
    run_id = json.loads((repo / "reports/last_run.json").read_text())["run_id"]
    export_report = json.loads((repo / "reports/last_run.json").read_text())
    return Baseline(repo, first, run_id, export_report, yaml.safe_load((repo / "params.yaml").read_text()))


@pytest.fixture(scope="module")
def lower_lr(pipeline, http_mirror):
    """`dvc exp run -S train.lr=0.002 -n lower-lr` in the baseline copy: (its output, its MLflow run, the version it
    registered, the candidate right after)."""
    repo = pipeline.repo
    before = {r.info.run_id for r in runs(repo)}
    exp = run(repo, http_mirror, "dvc", "exp", "run", "-S", "train.lr=0.002", "-n", "lower-lr")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    (new,) = [r for r in runs(repo) if r.info.run_id not in before]
    registered = json.loads((repo / "reports/last_run.json").read_text())["registered"]["version"]
    candidate = int(client(repo).get_model_version_by_alias("mnist-cnn", "candidate").version)
    return exp, new, registered, candidate


def client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo}/mlruns/mlflow.db")


def runs(repo: Path):
    c = client(repo)
    experiment = c.get_experiment_by_name("mnist-pipeline")
    return c.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


# Secrets a user's shell may hold while running the pipeline: none may end up in MLflow.
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "secret-aws-7d1f",
    "MLFLOW_TRACKING_PASSWORD": "secret-mlflow-93ab",
    "GITHUB_TOKEN": "secret-gh-55c2",
    "HF_TOKEN": "secret-hf-0e4d",
    "DATABASE_URL": "postgresql://u:secret-db-1b9f@h/db",
}


def test_first_repro_runs_all_four_stages(pipeline):
    repo, first = pipeline
    assert ran_stages(first) == ["params", "download", "train", "evaluate", "export"]
    assert "epoch 2/2 done: train loss (epoch mean)" in first.stderr  # progress and per-epoch test metrics
    assert "Traceback" not in first.stderr
    # A clean run prints no library warnings, nor MLflow's notices about creating its database.
    assert not [line for line in first.stderr.splitlines() if "Warning" in line or " INFO " in line]


def test_one_mlflow_run_with_params_metrics_tags_and_artifacts(pipeline):
    repo, _ = pipeline
    run = client(repo).get_run(pipeline.run_id)
    params = pipeline.params
    recorded = {f"{s}.{k}" for s, section in params.items() if s != "runtime" for k in section}
    assert set(run.data.params) == recorded  # every key that shapes a result; runtime shapes none
    assert run.data.params["train.lr"] == str(params["train"]["lr"])
    history = client(repo).get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["final_test_accuracy"] > 0.5  # learnable synthetic classes
    assert run.data.tags["git_commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert run.data.tags["env.device"] == "cpu" and run.data.tags["env.torch"] == torch.__version__
    artifacts = {a.path for a in client(repo).list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/predictions.png", "evaluation/per_class.csv",
            "evaluation/confusion.csv"} <= artifacts  # fmt: skip
    assert run.info.status == "FINISHED"


def test_no_secret_from_the_environment_reaches_mlflow(pipeline):
    repo, _ = pipeline
    run_ = client(repo).get_run(pipeline.run_id)
    version = client(repo).get_model_version("mnist-cnn", "1")
    recorded = json.dumps([run_.data.params, run_.data.tags, version.tags, version.description, run_.info.run_name])
    assert "secret-" not in recorded
    assert not any(key in recorded for key in SECRETS)


def test_model_registered_as_version_1_with_both_aliases(pipeline):
    repo, first = pipeline
    assert pipeline.export_report["registered"]["aliases"] == ["candidate", "champion"]
    assert "registered mnist-cnn version 1 (candidate, champion): no champion yet" in first.stderr
    version = client(repo).get_model_version("mnist-cnn", "1")
    run = client(repo).get_run(pipeline.run_id)
    assert version.run_id == run.info.run_id
    assert version.tags["run_id"] == run.info.run_id and version.tags["git_commit"] == run.data.tags["git_commit"]
    assert float(version.tags["test_accuracy"]) == run.data.metrics["final_test_accuracy"]
    assert version.tags["promotion"] == "no champion yet" and version.description.startswith("MNIST digit classifier")


def test_reports_and_plots_are_written(pipeline):
    repo, _ = pipeline
    for name in ("confusion_matrix.png", "predictions.png"):
        assert (repo / "reports" / name).read_bytes()[:4] == b"\x89PNG"
    assert (repo / "reports/per_class.md").read_text().count("\n") == 12  # header, rule, 10 digits
    assert len((repo / "reports/confusion.csv").read_text().splitlines()) == 301
    history = (repo / "reports/history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss,test_loss,test_accuracy") and len(history) == 3
    export = json.loads((repo / "reports/export.json").read_text())
    for fmt in ("onnx", "mlflow_model"):
        assert export[fmt]["max_abs_logit_diff"] <= 1e-4 and export[fmt]["argmax_mismatches"] == 0
    assert pipeline.export_report["registered"]["version"] == 1


def test_the_registered_model_loads_through_pyfunc_without_torch_or_the_project(pipeline, monkeypatch, tmp_path):
    """What a user or `mlflow models serve` does with the champion: MLflow alone, on any machine. The model is
    ONNX run by onnxruntime's CPU provider, so where its weights were saved (CPU or GPU) does not matter."""
    repo, _ = pipeline
    script = (
        "import sys; sys.modules['mnist_pipeline'] = None; sys.modules['torch'] = None  # neither can be imported\n"
        "import json, numpy as np, mlflow.pyfunc\n"
        "x = np.fromfile(sys.argv[1], np.uint8, offset=16).reshape(-1, 1, 28, 28)[:16].astype(np.float32) / 255\n"
        "model = mlflow.pyfunc.load_model('models:/mnist-cnn@champion')\n"
        "answer = model.predict(x)\n"
        "assert np.allclose(answer['probabilities'].sum(1), 1, atol=1e-5), 'probabilities'\n"
        "assert (answer['probabilities'].argmax(1) == answer['digit']).all(), 'digit'\n"
        "print(json.dumps(answer['digit'].tolist()))\n"
    )
    env = user_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlruns/mlflow.db")
    out = subprocess.run([sys.executable, "-c", script, str(repo / "data/raw/t10k-images-idx3-ubyte")],
                         capture_output=True, text=True, cwd=repo.parent, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == evaluated_predictions(repo, 16)
    assert "Warning" not in out.stderr
    import mlflow.artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlruns/mlflow.db")  # the registry's too
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/mnist-cnn@champion", dst_path=str(tmp_path))
    flavors = yaml.safe_load((Path(local) / "MLmodel").read_text())["flavors"]
    assert set(flavors) == {"onnx", "python_function"}  # no device anywhere in it: ONNX on the CPU provider
    assert flavors["onnx"]["providers"] == ["CPUExecutionProvider"]


def evaluated_predictions(repo: Path, n: int) -> list[int]:
    """The predicted digit for the first n test images, as the evaluate stage of the champion's run wrote them
    (other tests may have registered newer versions; this is the one `@champion` names now)."""
    c = client(repo)
    run_id = c.get_model_version_by_alias("mnist-cnn", "champion").run_id
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(c.download_artifacts(run_id, "evaluation/confusion.csv", tmp)).read_text().splitlines()
    return [int(row.split(",")[1]) for row in rows[1 : n + 1]]


def test_predict_on_png_files_agrees_with_the_evaluate_stage(pipeline, http_mirror, tmp_path):
    repo, _ = pipeline
    images = np.fromfile(repo / "data/raw/t10k-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 28, 28)
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(images[i]).save(paths[-1])
    out = run(repo, http_mirror, "mnist-pipeline", "predict", "--json", *map(str, paths))  # champion, by default
    assert out.returncode == 0, out.stderr
    predicted = [json.loads(line)["digit"] for line in out.stdout.splitlines()]
    assert predicted == evaluated_predictions(repo, 40)


def test_a_moved_copy_of_the_project_loads_its_champion_from_its_own_store(pipeline, http_mirror, tmp_path):
    """`cp -a project elsewhere`, then `predict` there: the champion loads from the copy's own mlruns/ (the
    original's is put out of reach meanwhile, so nothing can be read from it)."""
    repo, _ = pipeline
    moved = tmp_path / "moved-project"
    shutil.copytree(repo, moved, symlinks=True)
    image = tmp_path / "digit.png"
    Image.fromarray(
        np.fromfile(repo / "data/raw/t10k-images-idx3-ubyte", np.uint8, offset=16)[:784].reshape(28, 28)
    ).save(image)
    away = repo.parent / "mlruns-out-of-reach"
    (repo / "mlruns").rename(away)
    try:
        out = run(moved, http_mirror, "mnist-pipeline", "predict", str(image))
    finally:
        away.rename(repo / "mlruns")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\t")[1] == str(evaluated_predictions(repo, 1)[0])
    assert "artifact paths now point to" in out.stderr
    moved_store = MlflowClient(tracking_uri=f"sqlite:///{moved}/mlruns/mlflow.db")
    champion = moved_store.get_model_version_by_alias("mnist-cnn", "champion")
    logged = moved_store.get_logged_model(champion.source.removeprefix("models:/"))
    assert logged.artifact_location.startswith(str(moved / "mlruns"))


# Chromium as root, headless, with no calls home (this machine's network is closed).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def start(repo: Path, cmd: list[str]) -> subprocess.Popen:
    """Start a server command of this environment from the repo, as a user would."""
    return start_server(cmd, cwd=repo, env=user_env())


def test_rest_serving_round_trip(pipeline, http_mirror):
    repo, _ = pipeline
    port = free_port()
    server = start(repo, ["mnist-pipeline", "serve", "--port", str(port)])
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/ping")
        images = np.fromfile(repo / "data/raw/t10k-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 1, 28, 28)
        body = json.dumps({"inputs": (images[:16] / 255.0).astype("float32").tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        logits = np.array(answer["predictions"]["logits"])  # the ONNX model's outputs, by their names
        assert logits.shape == (16, 10)
        assert logits.argmax(1).tolist() == answer["predictions"]["digit"] == evaluated_predictions(repo, 16)
        assert np.allclose(np.array(answer["predictions"]["probabilities"]).sum(1), 1, atol=1e-5)
    finally:
        stop_server(server)


@pytest.mark.slow  # MLflow's own server
def test_the_model_cards_serving_command_works_as_written_from_the_project_folder(pipeline, http_mirror):
    """The card of a registered version says how to serve it with MLflow alone; run as written from the project
    folder, with no MLFLOW_TRACKING_URI of one's own, it serves that version, and leaves no stray ./mlflow.db."""
    repo, _ = pipeline
    version = client(repo).get_model_version_by_alias("mnist-cnn", "champion")
    (command,) = [c for c in re.findall(r"`([^`]+)`", version.description) if "mlflow models serve" in c]
    port = free_port()
    assignment, *cmd = shlex.split(command)  # MLFLOW_TRACKING_URI=... mlflow models serve -m ...
    name, value = assignment.split("=", 1)
    server = start_server([*cmd, "--port", str(port)], cwd=repo, env=user_env(**{name: value}))
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/ping")
        images = np.fromfile(repo / "data/raw/t10k-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 1, 28, 28)
        body = json.dumps({"inputs": (images[:4] / 255.0).astype("float32").tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["predictions"]["digit"] == evaluated_predictions(repo, 4)
    finally:
        stop_server(server)
    assert not (repo / "mlflow.db").exists()


def test_second_repro_runs_nothing(pipeline, http_mirror):
    repo, _ = pipeline
    before = len(runs(repo))
    again = run(repo, http_mirror, "dvc", "repro")
    assert again.returncode == 0, again.stderr
    assert ran_stages(again) == []
    assert len(runs(repo)) == before


def test_params_that_cannot_change_the_model_rerun_nothing(pipeline, http_mirror):
    repo, _ = pipeline
    params_file = repo / "params.yaml"
    before = params_file.read_text()
    params = yaml.safe_load(before)
    params["runtime"].update(log_every=7, resume=False)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        again = run(repo, http_mirror, "dvc", "repro")
        assert again.returncode == 0, again.stdout + again.stderr
        assert ran_stages(again) == ["params"]  # the whole file is checked again; nothing else reruns
    finally:
        params_file.write_text(before)
        restored = run(repo, http_mirror, "dvc", "repro")  # the check again, so that no other test finds it to redo
        assert restored.returncode == 0, restored.stdout + restored.stderr


def test_a_typo_in_params_loses_nothing_and_reports_every_mistake(pipeline, http_mirror):
    """DVC removes a stage's outputs before running it; the params stage, upstream of all, stops the run first."""
    repo, _ = pipeline
    params_file = repo / "params.yaml"
    before = params_file.read_text()
    outputs = {path: path.read_bytes() for folder in ("models", "reports") for path in (repo / folder).rglob("*")
               if path.is_file()}  # fmt: skip
    assert repo / "reports/history.csv" in outputs
    versions = len(client(repo).search_model_versions("name='mnist-cnn'"))
    params = yaml.safe_load(before)
    params["train"]["optimizer"] = "adma"
    params["evaluate"]["exampels"] = 3
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        typo = run(repo, http_mirror, "dvc", "repro")
        assert typo.returncode != 0
        assert ran_stages(typo) == ["params"]
        (error,) = [line for line in typo.stderr.splitlines() if line.startswith("error:")]
        assert "2 mistakes" in error and "train.optimizer = 'adma'" in error and "evaluate.exampels" in error
    finally:
        params_file.write_text(before)
    for path, content in outputs.items():
        assert path.is_file() and path.read_bytes() == content, f"{path} was lost or changed"
    fixed = run(repo, http_mirror, "dvc", "repro")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert ran_stages(fixed) == []  # back as it was: no retraining, not even the check
    assert len(client(repo).search_model_versions("name='mnist-cnn'")) == versions  # no new version


def test_exp_run_with_a_train_param_reruns_train_evaluate_export_only(pipeline, lower_lr, http_mirror):
    repo, _ = pipeline
    exp, new, registered, candidate = lower_lr
    assert ran_stages(exp) == ["params", "train", "evaluate", "export"]
    assert new.data.tags["dvc_exp_name"] == "lower-lr" and new.data.params["train.lr"] == "0.002"
    assert candidate == registered > 1
    # The README's line: the metrics and the params that differ, no column of file hashes.
    shown = run(repo, http_mirror, "dvc", "exp", "show", "--only-changed", "--drop", ".*/.*", "--csv")
    header, *rows = shown.stdout.splitlines()
    assert "lower-lr" in shown.stdout and {"test_accuracy", "test_loss", "train.lr"} <= set(header.split(","))
    assert "/" not in header and len(header.split(",")) <= 12, header


@pytest.mark.slow  # two more pipelines
def test_two_temp_experiments_at_once_both_log_fully_to_the_projects_store(pipeline, http_mirror):
    """Two `dvc exp run --temp` in parallel. Each runs in a copy under .dvc/tmp/exps/, and both write to the
    project's SQLite store at once: both runs complete and are recorded with all their metrics, no lock errors."""
    repo, _ = pipeline
    before = len(runs(repo))
    procs = [subprocess.Popen(["dvc", "exp", "run", "--temp", "-S", f"train.seed={seed}", "-n", f"in-temp-{seed}"],
                              cwd=repo, env=user_env(MNIST_MIRROR=http_mirror), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for seed in (1, 2)]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        assert "database is locked" not in out + err
    new = runs(repo)[before:]
    assert sorted(r.data.tags["dvc_exp_name"] for r in new) == ["in-temp-1", "in-temp-2"]
    for r in new:
        assert r.info.status == "FINISHED" and r.info.artifact_uri.startswith(str(repo / "mlruns"))
        assert [m.step for m in client(repo).get_metric_history(r.info.run_id, "test_accuracy")] == [1, 2]
        assert "final_test_accuracy" in r.data.metrics and "onnx_max_abs_logit_diff" not in r.data.metrics
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def test_compare_shows_the_runs_and_only_the_params_that_differ(pipeline, lower_lr, http_mirror):
    repo, _ = pipeline
    out = run(repo, http_mirror, "mnist-pipeline", "compare", "--csv", "--sort", "test_loss")
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(io.StringIO(out.stdout), dtype={"run_id": str})
    assert len(table) == len(runs(repo)) and "lower-lr" in set(table["run"])
    assert pipeline.run_id[:8] in set(table["run_id"])
    assert "train.lr" in table.columns and "model.hidden" not in table.columns
    assert list(table["test_loss"]) == sorted(table["test_loss"])
    newest = max(int(v.version) for v in client(repo).search_model_versions("name='mnist-cnn'"))
    candidate = table.loc[table["registered"].str.contains("candidate"), "registered"].item()
    assert candidate.startswith(f"mnist-cnn v{newest} ")
    assert not any(column.endswith("_percent") for column in table.columns)  # the UI's copies, not the table's
    text = run(repo, http_mirror, "mnist-pipeline", "compare").stdout.splitlines()
    champion = client(repo).get_model_version_by_alias("mnist-cnn", "champion").version
    assert text[-2].startswith("side by side in the MLflow UI (mnist-pipeline ui): http://127.0.0.1:5000/#/compare")
    assert text[-1].endswith(f"/#/models/mnist-cnn/versions/{champion}?workflowType=machine_learning")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _shown(value: float) -> str:
    """A metric as the MLflow UI's comparison table prints it (three decimals, trailing zeros dropped)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


@pytest.fixture(scope="module")
def third_run(pipeline, lower_lr, http_mirror):
    """A third run, trained with a learning rate ten times lower than the default's (fewer digits right)."""
    repo = pipeline.repo
    exp = run(repo, http_mirror, "dvc", "exp", "run", "--temp", "-S", "train.lr=0.0005", "-n", "lowest-lr")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    (found,) = [r for r in runs(repo) if r.data.tags.get("dvc_exp_name") == "lowest-lr"]
    return found


def _browse(sync_api, pages: dict[str, str], wait_for: dict[str, str], shots: Path) -> tuple[dict[str, str], list[str]]:
    """Each page's text in headless Chromium, each opened in a fresh profile (a new context: no view remembered
    from another page), its screenshot in ``shots``; every request beyond this machine refused (and listed).
    ``texts[name + " sidebar"]`` is the page's sidebar, ``texts[name + " columns"]`` its table's column headers
    from left to right."""
    refused, texts = [], {}

    def only_this_machine(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        for name, url in pages.items():
            context = browser.new_context(viewport={"width": 2600, "height": 1200})
            page = context.new_page()
            page.route("**/*", only_this_machine)
            page.goto(url)
            page.wait_for_selector(f"text={wait_for[name]}", timeout=90_000)
            page.screenshot(path=shots / f"{name.replace(' ', '_')}.png")
            texts[name] = page.inner_text("body")
            texts[name + " sidebar"] = page.locator("aside").first.inner_text()
            texts[name + " columns"] = "\n".join(
                page.evaluate("""() => [...document.querySelectorAll(
                '.ag-header-cell')].map(cell => [cell.innerText.trim(), cell.getBoundingClientRect().left])
                .filter(([text]) => text).sort((a, b) => a[1] - b[1]).map(([text]) => text)""")
            )
            context.close()
        browser.close()
    return texts, refused


@pytest.mark.slow  # a third run and the UI in Chromium
@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_every_ui_link_opens_the_model_training_view_where_runs_read_apart(pipeline, lower_lr, third_run,
                                                                           http_mirror, tmp_path_factory):  # fmt: skip
    """Every page the project prints or documents a link to, opened in a fresh browser profile: the runs table
    (the address `ui` prints), its chart view, a run and its system metrics, the compare page and the champion's
    version (the links `compare` prints), the experiment's Models tab and the registered model. Each shows the
    model-training view; the runs read apart without opening one. The screenshots stay in the test's output."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from mnist_pipeline.commands import ui

    repo = pipeline.repo
    chosen = [client(repo).get_run(pipeline.run_id), client(repo).get_run(lower_lr[1].info.run_id), third_run]
    experiment = chosen[0].info.experiment_id
    linked = run(repo, http_mirror, "mnist-pipeline", "compare").stdout.splitlines()[-2:]  # the two links
    port = free_port()
    server = start(repo, ["mnist-pipeline", "ui", "--port", str(port)])
    try:
        printed = server.stderr.readline().decode()  # "MLflow UI on <address> for <store>"
        address = printed.split(" on ", 1)[1].split(" for ", 1)[0]
        wait_until_up(server, f"http://127.0.0.1:{port}/health")
        here = (f"127.0.0.1:{ui.DEFAULT_PORT}/", f"127.0.0.1:{port}/")  # `compare` names the default port
        compare_link, version_link = (line.rsplit(" ", 1)[1].replace(*here) for line in linked)
        pages = {
            "runs table": address,
            "chart view": f"{address}&compareRunsMode=CHART",
            "run": ui.page("127.0.0.1", port, f"/experiments/{experiment}/runs/{chosen[0].info.run_id}"),
            "system metrics": ui.page("127.0.0.1", port,
                                      f"/experiments/{experiment}/runs/{chosen[0].info.run_id}/system-metrics"),
            "compare": compare_link,
            "models tab": ui.page("127.0.0.1", port, f"/experiments/{experiment}/models"),
            "registered model": ui.page("127.0.0.1", port, "/models/mnist-cnn"),
            "version": version_link,
        }  # fmt: skip
        shots = tmp_path_factory.mktemp("ui-screenshots")
        lowest = f"{min(r.data.metrics['final_test_accuracy_percent'] for r in chosen):.2f}"  # a chart's label
        texts, refused = _browse(sync_api, pages, {
            "runs table": "final_test_errors", "chart view": lowest, "run": "Datasets",
            "system metrics": "cpu_utilization_percentage", "compare": "final_test_errors",
            "models tab": "final_test_accuracy", "registered model": "Version", "version": "reads worst",
        }, shots)  # fmt: skip
        print(f"\nscreenshots of the MLflow UI: {shots}")
    finally:
        stop_server(server)
    assert refused == []  # the UI works offline
    for name in pages:  # the model-training view: its sidebar, not the GenAI one (Prompts, AI Gateway)
        assert "Model registry" in texts[name + " sidebar"] and "Prompts" not in texts[name + " sidebar"], name
    errors = [int(r.data.metrics["final_test_errors"]) for r in chosen]
    assert len(set(errors)) == 3  # the figure that tells close runs apart
    # the runs table: the shared view's columns, best run first, each run's errors and accuracy in percent
    table = texts["runs table"]
    from mnist_pipeline.tracking import runs as pipeline_runs

    columns = pipeline_runs.RUNS_VIEW_METRICS + pipeline_runs.RUNS_VIEW_PARAMS  # in this order, the users' first
    shown = texts["runs table columns"].splitlines()
    assert [c for c in shown if c in columns] == columns, shown
    best_first = sorted(chosen, key=lambda r: -r.data.metrics["final_test_accuracy"])
    positions = [table.index(r.info.run_name) for r in best_first]
    assert positions == sorted(positions), [r.info.run_name for r in best_first]
    for r in chosen:
        assert str(int(r.data.metrics["final_test_errors"])) in table
    assert "champion" in shown and "mnist-cnn v" in table  # the run that holds the champion, marked
    assert "repro-" not in table  # reproductions left out by the view's filter (they repeat a run's figures)
    # the chart view: each run's accuracy in percent reads apart at the charts' two places; no chart per
    # distortion, none of a metric constant by construction
    charts = texts["chart view"]
    assert all(f"{r.data.metrics['final_test_accuracy_percent']:.2f}" in charts for r in chosen)
    assert "robust_rotation" not in charts and "logit_diff" not in charts and "final_robust_accuracy" in charts
    models = texts["models tab"]
    for r in chosen:  # each model named after its run, with its registered version and test figures
        version = next(v.version for v in client(repo).search_model_versions(f"run_id='{r.info.run_id}'"))
        assert r.info.run_name in models and f"v{version}" in models
        assert _shown_exactly(r.data.metrics["final_test_accuracy"]) in models
    assert "mnist (" in texts["run"]  # the run's data: the dataset's name and digest
    assert "System metrics" in texts["system metrics"] and "system_memory_usage_megabytes" in texts["system metrics"]
    compare = texts["compare"]
    shown = compare[compare.index("final_test_errors") :].split("\n")
    assert all(str(e) in shown for e in errors), (errors, shown[:40])
    params = compare[compare.index("\nParameters\n") : compare.index("\nMetrics\n")].splitlines()
    assert any(line.startswith("model.conv_channels\t") for line in params)  # a list param: its name and values
    assert not any(line.startswith("\t") or line.endswith("\t[") for line in params)  # no row without a name
    assert "Test accuracy" in texts["version"] and "load_model(" in texts["version"]  # the model card


def _shown_exactly(value: float) -> str:
    """A metric as the Models table prints it: all its digits."""
    return repr(value).removesuffix(".0") if value == int(value) else repr(value)


# What `dvc plots show` draws, by plot id: each file once, with the axis titles of dvc.yaml.
PLOTS = {
    "Loss per epoch (train and test)": ("epoch", "cross-entropy loss"),
    "Test accuracy per epoch": ("epoch", "test accuracy"),
    "Confusion matrix of the test digits": ("predicted digit", "actual digit"),
    "Robustness (test accuracy under distortions, by strength)": ("strength level", "test accuracy"),
    "reports/confusion_matrix.png": None,
    "reports/predictions.png": None,
    "reports/robustness.png": None,
}


def _axis_titles(spec: dict) -> set[str]:
    found = set()
    for key, value in spec.items():
        if key in ("x", "y") and isinstance(value, dict) and isinstance(value.get("title"), str):
            found.add(value["title"])
        elif isinstance(value, dict):
            found |= _axis_titles(value)
        elif isinstance(value, list):
            for item in value:
                found |= _axis_titles(item) if isinstance(item, dict) else set()
    return found


def test_dvc_plots_show_draws_each_file_once_with_titled_axes(pipeline, http_mirror):
    repo, _ = pipeline
    out = run(repo, http_mirror, "dvc", "plots", "show", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["data"]
    assert set(shown) == set(PLOTS)  # the stages' files are not drawn a second time under their own names
    for plot_id, axes in PLOTS.items():
        (plot,) = shown[plot_id]
        if axes is None:
            assert plot["type"] == "image"
            continue
        spec = plot["content"]
        assert spec["title"]["text"] == plot_id
        if plot_id.startswith("Confusion"):  # the mistakes (0-10 a cell) read apart from the diagonal (~1,000)
            assert '"type": "symlog"' in json.dumps(spec)
        if plot_id.startswith("Robustness"):  # a line for every distortion the report has, none listed by hand
            report = pd.read_csv(repo / "reports/robustness.csv")
            assert {row["distortion"] for row in spec["data"]["values"]} == set(report.distortion)
        titles = _axis_titles(spec)
        for axis in axes:
            assert any(title.startswith(axis) for title in titles), (plot_id, axis, titles)


def _draw_offline(sync_api, page_file: Path) -> dict:
    """Open a `dvc plots` page in headless Chromium with every request but file:// refused; what it drew."""
    refused = []

    def only_files(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        context = browser.new_context(offline=True)
        context.route("**/*", only_files)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(page_file.as_uri())
        page.wait_for_function("document.querySelectorAll('svg.marks').length >= 3", timeout=60_000)
        drawn = page.evaluate("""() => ({
            charts: [...document.querySelectorAll('svg.marks')].map(svg => ({
                text: svg.textContent,
                lines: svg.querySelectorAll('.mark-line path[d]').length,
                strokes: [...new Set([...svg.querySelectorAll('.mark-line path[d]')]
                    .map(p => p.getAttribute('stroke')))],
                cells: svg.querySelectorAll('.mark-rect path[d]').length,
                points: [...svg.querySelectorAll('.mark-symbol path[d]')].filter(p => p.getBBox().width >= 6).length,
            })),
            images: [...document.images].map(img => ({src: img.getAttribute('src'), width: img.naturalWidth,
                                                       right: img.getBoundingClientRect().right})),
            pageWidth: document.documentElement.clientWidth,
        })""")
        browser.close()
    return {**drawn, "refused": refused, "errors": errors}


@pytest.mark.slow  # another experiment and Chromium
@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_dvc_plots_show_and_diff_draw_in_a_browser_without_a_network(pipeline, lower_lr, http_mirror):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    repo = pipeline.repo
    other = run(repo, http_mirror, "dvc", "exp", "run", "--temp", "-S", "train.lr=0.02", "-S", "train.epochs=1",
                "-n", "higher-lr")  # fmt: skip
    assert other.returncode == 0, other.stdout + other.stderr

    show = run(repo, http_mirror, "dvc", "plots", "show", "-o", "shown")
    assert show.returncode == 0, show.stderr
    drawn = _draw_offline(sync_api, repo / "shown" / "index.html")
    assert drawn["refused"] == [] and drawn["errors"] == []
    loss, accuracy, confusion, robustness = drawn["charts"]
    assert "Loss per epoch" in loss["text"] and loss["lines"] >= 2  # train and test
    assert "Test accuracy per epoch" in accuracy["text"] and accuracy["lines"] >= 1
    assert "Confusion matrix" in confusion["text"] and confusion["cells"] >= 10
    assert "Robustness" in robustness["text"] and robustness["lines"] >= 19  # one per distortion
    assert len(drawn["images"]) == 3 and all(image["width"] > 0 for image in drawn["images"])

    diff = run(repo, http_mirror, "dvc", "plots", "diff", "lower-lr", "higher-lr", "-o", "diffed")
    assert diff.returncode == 0, diff.stderr
    drawn = _draw_offline(sync_api, repo / "diffed" / "index.html")
    assert drawn["refused"] == [] and drawn["errors"] == []
    loss, accuracy, confusion, robustness = drawn["charts"]
    for chart in (loss, accuracy, confusion, robustness):
        assert "lower-lr" in chart["text"] and "higher-lr" in chart["text"], chart["text"][:300]
    assert loss["lines"] >= 4 and accuracy["lines"] >= 2 and robustness["lines"] >= 38  # each experiment's lines
    assert len(loss["strokes"]) >= 2, loss["strokes"]  # each experiment in a colour of its own
    # every epoch a point 6 pixels wide or more: higher-lr's one epoch is a curve of one point, which a line alone
    # does not draw (and a 3-pixel dot hardly)
    assert accuracy["points"] >= 2 + 1 and loss["points"] >= 2 * (2 + 1), (accuracy["points"], loss["points"])
    assert len(drawn["images"]) == 6 and all(image["width"] > 0 for image in drawn["images"])
    # each revision's figure scaled to fit the page, side by side (a 1120-pixel figure ran off it)
    assert all(image["right"] <= drawn["pageWidth"] for image in drawn["images"]), drawn["images"]


@pytest.mark.slow  # a whole pipeline in a worktree
def test_reproduce_a_run_exactly_without_touching_the_workspace(pipeline, http_mirror):
    repo, _ = pipeline
    original = client(repo).get_run(pipeline.run_id)  # the first `dvc repro`
    status_before = git(repo, "status", "--porcelain")
    lock_before = (repo / "dvc.lock").read_text()
    registry_before = registry_state(repo)
    earlier = {r.info.run_id for r in runs(repo)}  # another test may have reproduced the same run before
    nowhere = f"http://127.0.0.1:{free_port()}/"  # no mirror: the verified data already here must do
    out = run(repo, nowhere, "mnist-pipeline", "reproduce", original.info.run_id)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "final_test_accuracy: reproduced" in out.stdout and out.stdout.count("exactly equal") == 2
    assert "the download stage reads it from there (no network)" in out.stderr
    assert "Running stage 'train'" in out.stderr and "epoch 2/2 done" in out.stderr  # DVC's and the stages' lines
    assert not any(advice in out.stderr for advice in ("git add", "autostage", "dvc push"))  # the worktree's
    assert registry_state(repo) == registry_before  # no version registered, no alias moved
    (latest,) = [r for r in runs(repo) if r.data.tags.get("reproduces") == original.info.run_id
                 and r.info.run_id not in earlier]  # fmt: skip
    assert latest.data.metrics["final_test_loss"] == original.data.metrics["final_test_loss"]
    assert latest.data.tags["mlflow.parentRunId"] == original.info.run_id  # folded under it in the runs table
    listed = run(repo, http_mirror, "mnist-pipeline", "compare", "--csv")
    assert latest.info.run_id[:8] not in listed.stdout and "export.register" not in listed.stdout.splitlines()[0]
    assert git(repo, "status", "--porcelain") == status_before and (repo / "dvc.lock").read_text() == lock_before
    assert "mnist-reproduce" not in git(repo, "worktree", "list")
    # a run whose commit this repository does not have gets an explanation, not a traceback
    c = client(repo)
    orphan = c.create_run(original.info.experiment_id, tags={"git_commit": "0" * 40})
    c.log_metric(orphan.info.run_id, "final_test_accuracy", 0.5)
    c.set_terminated(orphan.info.run_id)
    missing = run(repo, http_mirror, "mnist-pipeline", "reproduce", orphan.info.run_id)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "was made from commit 000000000000, which this repository does not have" in missing.stderr
    c.delete_run(orphan.info.run_id)


@pytest.mark.slow  # a whole pipeline in a worktree, and an experiment beside it
def test_reproduce_works_while_a_dvc_experiment_runs_in_the_workspace(pipeline, http_mirror, tmp_path):
    """`dvc exp run` keeps its state in git refs every worktree shares: a reproduction run as a DVC experiment
    failed ("'NoneType' object is not subscriptable") when an experiment in the workspace ran and ended while it
    ran. Here one starts once the reproduction is training, and ends before it."""
    import time

    repo, _ = pipeline
    original = client(repo).get_run(pipeline.run_id)
    log = tmp_path / "reproduce.log"
    nowhere = f"http://127.0.0.1:{free_port()}/"
    with log.open("w") as out:
        reproduction = subprocess.Popen(
            ["mnist-pipeline", "reproduce", original.info.run_id],
            cwd=repo,
            env=user_env(MNIST_MIRROR=nowhere),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while "Running stage 'train'" not in log.read_text():  # the event: the reproduction is training
            assert reproduction.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        beside = run(repo, http_mirror, "dvc", "exp", "run", "-S", "export.parity_samples=64", "-n", "beside")
        overlapped = reproduction.poll() is None
        reproduction.wait(timeout=600)
    finally:
        if reproduction.poll() is None:
            reproduction.kill()
    assert beside.returncode == 0, beside.stdout + beside.stderr
    assert reproduction.returncode == 0, log.read_text()
    assert "final_test_accuracy: reproduced" in log.read_text() and log.read_text().count("exactly equal") == 2
    if not overlapped:
        pytest.skip("the experiment beside ended after the reproduction: they did not overlap on this machine")


def registry_state(repo: Path) -> tuple[list[str], dict[str, str]]:
    c = client(repo)
    versions = sorted(v.version for v in c.search_model_versions("name='mnist-cnn'"))
    aliases = {alias: c.get_model_version_by_alias("mnist-cnn", alias).version for alias in ("candidate", "champion")}
    return versions, aliases


def test_a_full_disk_names_the_file_and_keeps_the_earlier_outputs(pipeline):
    """The evaluate stage on a disk that takes no file over 16 KiB (RLIMIT_FSIZE): its first big file, the ONNX
    export, fails."""
    repo, _ = pipeline
    before = {p: p.read_bytes() for folder in ("reports", "models") for p in (repo / folder).iterdir() if p.is_file()}
    cmd = shlex.split(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["evaluate"]["cmd"])  # as DVC runs it

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    out = subprocess.run(cmd, cwd=repo, env=user_env(), capture_output=True, text=True, preexec_fn=full_disk)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: cannot write models/model.onnx: File too large;")  # the first big file
    after = {p: p.read_bytes() for folder in ("reports", "models") for p in (repo / folder).iterdir() if p.is_file()}
    assert after == before  # every earlier output whole and as it was (rewritten files came out the same)


# Slow (45 s with -j 2): the default suite covers parallel experiments with two `--temp` runs above, and the race
# on a new store with e2e/test_store_creation.py.
@pytest.mark.slow
@pytest.mark.parametrize("jobs", [2, 1])
def test_queued_experiments_each_log_and_register(tmp_path, http_mirror, mirror_md5, jobs):
    """Two queued experiments run by `--run-all -j N`: two MLflow runs, two registered versions, no lock errors
    (with -j 2 both start on a store that does not exist yet)."""
    repo = make_repo(tmp_path, mirror_md5)
    for seed in (1, 2):
        queued = run(repo, http_mirror, "dvc", "exp", "run", "--queue", "-S", f"train.seed={seed}", "-n", f"q{seed}")
        assert queued.returncode == 0, queued.stderr
    ran = run(repo, http_mirror, "dvc", "exp", "run", "--run-all", "-j", str(jobs))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    outcome = queue_outcome(repo, http_mirror)
    logs = "".join(run(repo, http_mirror, "dvc", "queue", "logs", name).stdout for name in outcome)
    assert outcome == {"q1": "Success", "q2": "Success"}, ran.stdout + ran.stderr + logs
    assert "database is locked" not in ran.stdout + ran.stderr + logs
    logged = runs(repo)
    assert sorted(r.data.tags["dvc_exp_name"] for r in logged) == ["q1", "q2"]
    assert all("final_test_accuracy" in r.data.metrics for r in logged)
    versions = client(repo).search_model_versions("name='mnist-cnn'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r.info.run_id for r in logged}


def test_bad_param_stops_before_any_work(tmp_path, http_mirror, mirror_md5):
    repo = make_repo(tmp_path, mirror_md5, train={"lr": -1})
    result = run(repo, http_mirror, "dvc", "repro")
    assert result.returncode != 0
    assert "error: params.yaml: train.lr = -1 is not allowed: input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo / "models").exists() and not (repo / "mlruns/mlflow.db").exists()


@pytest.mark.slow  # two pipelines
def test_a_fresh_clones_first_repro_leaves_git_status_clean_and_records_in_its_own_store(
    tmp_path, http_mirror, mirror_md5
):
    """The committed dvc.lock and reports are what a clone's first `dvc repro` writes on the same hardware: no
    time and no run of another store in a tracked file. The clone's export stage still runs, into its own store."""
    repo = make_repo(tmp_path / "origin", mirror_md5)
    first = run(repo, http_mirror, "dvc", "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "results")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    again = run(clone, http_mirror, "dvc", "repro")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "export" in ran_stages(again)
    assert git(clone, "status", "--porcelain") == "", git(clone, "diff")
    last = json.loads((clone / "reports/last_run.json").read_text())
    assert last["registered"]["version"] == 1 and client(clone).get_run(last["run_id"]).info.status == "FINISHED"
