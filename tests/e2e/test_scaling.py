"""Beyond one process and one laptop: data-parallel training under torchrun, a shared MLflow tracking server,
a DVC remote. All real: torchrun with gloo on the CPU, `mlflow server` on 127.0.0.1, a folder as DVC remote."""

from __future__ import annotations

import io
import json
import shutil
import statistics
import time
import urllib.parse
import urllib.request

import pandas as pd
import pytest
import torch

from mnist_pipeline import config
from mnist_pipeline.ml import training
from mnist_pipeline.ml.data import load_split
from mnist_pipeline.ml.model import load_checkpoint
from mnist_pipeline.ml.tensors import Tensors
from mnist_pipeline.tracking import runs
from tests.helpers import TINY, make_repo, ran_stages, run

pytestmark = pytest.mark.e2e


# --- data-parallel training -----------------------------------------------------------------------------


def test_more_processes_than_cores_is_refused_in_one_line_before_any_starts(tmp_path, http_mirror, mirror_md5):
    from mnist_pipeline.ml.distributed import usable_cores

    nproc = usable_cores() + 1
    repo = make_repo(tmp_path, mirror_md5, train={"nproc": nproc, "device": "cpu"})
    out = run(repo, http_mirror, "dvc", "repro", "train")
    assert out.returncode != 0
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line == (f"error: train.nproc = {nproc} but this machine has {nproc - 1} CPU cores for train.device = "
                    f"'cpu'; set train.nproc to at most {nproc - 1} (nothing was started)")  # fmt: skip
    assert "epoch" not in out.stderr and not (repo / "models").exists()


@pytest.mark.slow  # two ranks under torchrun, then one process: the default suite's budget
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, http_mirror, mirror_md5):
    """`dvc repro train` with train.nproc=2: torchrun starts two gloo ranks that each train on half of every
    batch of 64 (1000 digits: the last batch of 40 is split 20/20). Rank 0 alone logs and writes; the ranks end
    with identical weights; the result is what one process with batches of 64 gets, up to float rounding."""
    # Batch norm off: on CPUs each rank normalises over its own half of the batch (SyncBatchNorm is CUDA's only),
    # so with it the ranks' statistics, and one process's, differ by design (docs/operations.md). fp32: the sums
    # in another order then differ by float32's rounding, which the bound below is for, not bf16's.
    train = {"nproc": 2, "batch_size": 64, "epochs": 2, "precision": "fp32"}
    repo = make_repo(tmp_path, mirror_md5, train=train, model={**TINY["model"], "batch_norm": False})
    out = run(repo, http_mirror, "dvc", "repro", "train")
    assert out.returncode == 0, out.stdout + out.stderr
    assert ran_stages(out) == ["params", "download", "train"] and "Traceback" not in out.stderr
    assert out.stderr.count("epoch 2/2 done: train loss (epoch mean)") == 1  # rank 0 alone reports

    models = repo / "models"
    record = runs.read_record(models / "training.json", models / "training_times.json")  # as the export stage reads it
    assert record["tags"]["world_size"] == "2"
    assert record["metrics"]["ddp_weight_spread"] == 0.0  # weights identical on both ranks, to the bit
    rank_seconds = [record["metrics"][f"train_seconds_rank{r}"] for r in (0, 1)]  # both ranks finished
    assert [epoch["epoch"] for epoch in record["history"]] == [1, 2]
    assert {sample["rank"] for sample in record["system"]} == {0, 1}  # each rank's system metrics
    assert not (repo / "models/resume/train_state.pt").exists()

    # The same training in one process (this one), with the same global batch.
    params = config.load(repo / "params.yaml")
    cpu = torch.device("cpu")
    train_data, test_data = (Tensors.from_split(load_split(repo / "data/raw", s), cpu) for s in ("train", "test"))
    single = training.train(params.model, params.train, train_data, test_data, cpu, log=io.StringIO())
    two_ranks, _ = load_checkpoint(repo / "models/model.pt")
    pairs = zip(single.model.state_dict().values(), two_ranks.state_dict().values(), strict=True)
    weight_diff = max((a - b).abs().max().item() for a, b in pairs)
    history = pd.read_csv(repo / "reports/history.csv")
    print(f"\n2 ranks: training seconds per rank {rank_seconds}; max |weight difference| against 1 process "
          f"{weight_diff:.2e}; test accuracy {list(history.test_accuracy)} (2 ranks) vs "
          f"{[m.test_accuracy for m in single.history]} (1 process)")  # fmt: skip
    assert weight_diff < 1e-5  # float32 sums in another order; a wrong shard or scale is off by far more
    assert list(history.test_accuracy) == [m.test_accuracy for m in single.history]
    assert list(history.test_loss) == pytest.approx([m.test_loss for m in single.history], rel=1e-4)


# --- a shared tracking server, and a DVC remote ------------------------------------------------------------


@pytest.fixture(scope="module")
def served_pipeline(tmp_path_factory, http_mirror, mirror_md5, mlflow_server):
    """A project that ran `dvc repro` with MLFLOW_TRACKING_URI pointing at a real tracking server."""
    repo = make_repo(tmp_path_factory.mktemp("served"), mirror_md5, export={"model_name": "served-test"})
    out = run(repo, http_mirror, "dvc", "repro", MLFLOW_TRACKING_URI=mlflow_server)
    assert out.returncode == 0, out.stdout + out.stderr
    return repo


def rest(server: str, endpoint: str, **query) -> dict:
    """GET one of the tracking server's REST endpoints (what any client, in any language, sees)."""
    url = f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow  # a pipeline against a real mlflow server
def test_the_server_holds_the_run_its_metrics_and_the_registered_version(served_pipeline, mlflow_server):
    repo = served_pipeline
    assert not (repo / "mlruns/mlflow.db").exists()  # nothing went to the local store
    run_id = json.loads((repo / "reports/last_run.json").read_text())["run_id"]
    experiment = rest(mlflow_server, "experiments/get-by-name", experiment_name="mnist-pipeline")["experiment"]
    request = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                                     json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    listed = json.load(urllib.request.urlopen(request, timeout=30))["runs"]
    (found,) = [r for r in listed if r["info"]["run_id"] == run_id]
    assert found["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in found["data"]["params"]}["train.epochs"] == "2"
    metrics = {m["key"]: m["value"] for m in found["data"]["metrics"]}
    assert metrics["final_test_accuracy"] == json.loads((repo / "reports/metrics.json").read_text())["test_accuracy"]

    history = rest(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="test_accuracy")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]
    artifacts = rest(mlflow_server, "artifacts/list", run_id=run_id, path="evaluation")["files"]
    assert {"evaluation/confusion_matrix.png", "evaluation/predictions.png"} <= {a["path"] for a in artifacts}

    champion = rest(mlflow_server, "registered-models/alias", name="served-test", alias="champion")["model_version"]
    assert champion["version"] == "1" and champion["run_id"] == run_id
    assert set(champion["aliases"]) == {"candidate", "champion"}

    round_trips = []
    for _ in range(10):
        start = time.perf_counter()
        rest(mlflow_server, "runs/get", run_id=run_id)
        round_trips.append(1000 * (time.perf_counter() - start))
    print(f"\nREST round trip (runs/get), median of 10: {statistics.median(round_trips):.1f} ms")


@pytest.mark.slow  # the same pipeline
def test_compare_reads_the_runs_from_the_server(served_pipeline, http_mirror, mlflow_server):
    out = run(served_pipeline, http_mirror, "mnist-pipeline", "compare", "--csv", MLFLOW_TRACKING_URI=mlflow_server)
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(io.StringIO(out.stdout), dtype={"commit": str, "run_id": str})  # "82946536" is an id
    run_id = json.loads((served_pipeline / "reports/last_run.json").read_text())["run_id"]
    (row,) = table[table["run_id"] == run_id[:8]].itertuples()
    assert row.registered.startswith("served-test v1")


@pytest.mark.slow  # the same pipeline
def test_dvc_remote_push_then_pull_restores_data_and_model(served_pipeline, http_mirror, tmp_path):
    """A folder as the DVC remote (S3, GCS and SSH remotes work alike, see README): push, lose the cache and
    every output, pull; then `dvc repro` has nothing to do."""
    repo = tmp_path / "clone"
    shutil.copytree(served_pipeline, repo)
    remote = tmp_path / "remote"
    for args in (("remote", "add", "-d", "shared", str(remote)), ("push",)):
        out = run(repo, http_mirror, "dvc", *args)
        assert out.returncode == 0, out.stdout + out.stderr
    model_bytes = (repo / "models/model.pt").read_bytes()
    shutil.rmtree(repo / ".dvc/cache")
    for lost in ("data", "models", "reports/per_class.csv"):  # what git does not hold (it holds the metrics and
        # the export report, the stages' uncached outs)
        path = repo / lost
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    pulled = run(repo, http_mirror, "dvc", "pull")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert (repo / "models/model.pt").read_bytes() == model_bytes
    assert sorted(p.name for p in (repo / "data/raw").iterdir()) == sorted(
        p.name for p in (served_pipeline / "data/raw").iterdir()
    )
    again = run(repo, http_mirror, "dvc", "repro")  # no MLFLOW_TRACKING_URI: nothing may need it
    assert again.returncode == 0 and ran_stages(again) == [], again.stdout + again.stderr
    assert "Data and pipelines are up to date" in run(repo, http_mirror, "dvc", "status").stdout
