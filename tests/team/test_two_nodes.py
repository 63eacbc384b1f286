"""Two nodes: the train stage under two torchrun launchers that meet through a c10d rendezvous on 127.0.0.1 (gloo
on the CPU), each in its own clone, as two machines would run it; then DVC records the training on the node that
holds the outputs and the rest of the pipeline logs one run to the team's tracking server."""

from __future__ import annotations

import io
import json
import sys

import pandas as pd
import pytest
import torch

from mnist_pipeline import config, names
from mnist_pipeline.ml import training
from mnist_pipeline.ml.data import load_split
from mnist_pipeline.ml.model import load_checkpoint
from mnist_pipeline.ml.tensors import Tensors
from tests.helpers import TINY, free_port, make_repo, ran_stages, run, start

pytestmark = [pytest.mark.team, pytest.mark.e2e]

# fp32 and no batch norm, as in tests/e2e/test_scaling.py: on CPUs each rank normalises its own half of the batch,
# and bf16's rounding is not the float32 rounding the comparison with one process allows for.
TRAIN = {"nproc": 1, "batch_size": 64, "epochs": 2, "device": "cpu", "precision": "fp32"}
MODEL = {**TINY["model"], "batch_norm": False}
STAGE = [
    "stages/train.py",
    "--data",
    "data/raw",
    "--checkpoint",
    "models/model.pt",
    "--history",
    "reports/history.csv",
    "--record",
    "models/training.json",
    "--times",
    "models/training_times.json",
    "--resume-state",
    "models/resume/train_state.pt",
]  # fmt: skip  (dvc.yaml's train command)


def test_two_nodes_train_like_one_and_one_run_records_both(tmp_path, team_server, http_mirror, mirror_md5, as_user):
    nodes = [make_repo(tmp_path / f"node{n}", mirror_md5, train=TRAIN, model=MODEL, export={"model_name": "two-nodes"})
             for n in (0, 1)]  # fmt: skip
    for repo in nodes:
        download = run(repo, http_mirror, "dvc", "repro", "download")
        assert download.returncode == 0, download.stderr
    endpoint = f"127.0.0.1:{free_port()}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                "--local-addr", "127.0.0.1"]  # fmt: skip
    launchers = [start(repo, http_mirror, *torchrun, *STAGE, **team_server.env("alice"), OMP_NUM_THREADS="1")
                 for repo in nodes]  # fmt: skip
    for process, log in launchers:
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]

    # The rendezvous decides which node is rank 0; that node's clone holds the outputs, the other's none.
    (main,) = [repo for repo in nodes if (repo / "models/model.pt").exists()]
    record = (main / "models/training.json").read_text()
    assert '"world_size": "2"' in record and '"nodes": "2"' in record

    # The same training in one process, with the same global batch: the same digits.
    params = config.load(main / "params.yaml")
    cpu = torch.device("cpu")
    data = [Tensors.from_split(load_split(main / "data/raw", split), cpu) for split in ("train", "test")]
    single = training.train(params.model, params.train, *data, cpu, log=io.StringIO())
    two_nodes, _ = load_checkpoint(main / "models/model.pt")
    pairs = zip(single.model.state_dict().values(), two_nodes.state_dict().values(), strict=True)
    weight_diff = max((a - b).abs().max().item() for a, b in pairs)
    history = pd.read_csv(main / "reports/history.csv")
    print(
        f"\ntwo nodes: max |weight difference| against one process {weight_diff:.2e}; test accuracy "
        f"{list(history.test_accuracy)} (two nodes) vs {[m.test_accuracy for m in single.history]} (one process)"
    )
    assert weight_diff < 1e-5  # float32 sums in another order; a wrong shard or scale is off by far more
    assert list(history.test_accuracy) == [m.test_accuracy for m in single.history]

    # DVC records the training it did not start, then runs the rest: one run on the server holds both nodes.
    committed = run(main, http_mirror, "dvc", "commit", "--force", "train", **team_server.env("alice"))
    assert committed.returncode == 0, committed.stderr
    rest = run(main, http_mirror, "dvc", "repro", **team_server.env("alice"))
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert ran_stages(rest) == ["evaluate", "export"]
    run_id = json.loads((main / "reports/last_run.json").read_text())["run_id"]
    logged = as_user("carol").get_run(run_id).data
    assert logged.tags[names.WORLD_SIZE] == "2" and logged.tags[names.NODES] == "2"
    for node in (0, 1):
        assert any(key.startswith(f"system/node_{node}_rank_") for key in logged.metrics), sorted(logged.metrics)
