"""The commands as users run them, each in a fresh process: help, `predict`'s output and exit status, a search
space or a dvc.lock that cannot work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mnist_pipeline import cli
from tests.helpers import REPO_ROOT, user_env

pytestmark = pytest.mark.e2e  # each test starts a command in a fresh process


def predict_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.cli", "predict", *args], capture_output=True, text=True
    )


def test_cli_predicts_good_inputs_reports_bad_ones_and_exits_non_zero(files, model_file):
    out = predict_command(
        str(files / "grey.png"), str(files / "text.png"), str(files / "big.jpg"), "--model", str(model_file)
    )
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(files / "grey.png"), str(files / "big.jpg")]
    digit_, probability, *flag = lines[0].split("\t")[1:]
    assert 0 <= int(digit_) <= 9 and 0 < float(probability) <= 1
    assert flag == (["uncertain"] if float(probability) < 0.7 else [])  # --uncertain-below's default
    assert (
        out.stderr.strip() == f"error: {files / 'text.png'}: not a readable image (cannot identify image file "
        f"'{files / 'text.png'}')"
    )


def test_cli_json_and_top_k(files, model_file):
    out = predict_command(str(files / "batch.npy"), "--json", "--top-k", "3", "--model", str(model_file))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["input"] for r in rows] == [f"{files / 'batch.npy'}[0]", f"{files / 'batch.npy'}[1]"]
    assert len(rows[0]["top_k"]) == 3 and rows[0]["top_k"][0]["digit"] == rows[0]["digit"]
    probabilities = [t["probability"] for t in rows[0]["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_a_reader_that_stops_early_gets_no_traceback(files, model_file):
    """`mnist-pipeline predict ... | head -1`: the pipe closes while predictions are still printed."""
    cmd = [sys.executable, "-m", "mnist_pipeline.cli", "predict", "--model", str(model_file),
           *[str(files / "batch.npy")] * 3000]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith(str(files / "batch.npy"))
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_help_is_printed_by_the_installed_command_for_every_subcommand():
    for name in [*cli.main.commands, None]:
        args = [sys.executable, "-m", "mnist_pipeline.cli", *([name] if name else []), "--help"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("Usage: "), (name, out.stderr)


def test_a_bad_space_stops_the_command_with_one_line_and_no_study(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    (tmp_path / "tune.yaml").write_text("space:\n  train.lr: {low: 0.1, high: 0.001}\n")
    out = subprocess.run(["mnist-pipeline", "tune", "--trials", "3"], cwd=tmp_path, env=user_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: tune.yaml: space entry 'train.lr': the range [0.1, 0.001] is empty or inverted; expected low < high"
    ]
    assert not (tmp_path / "tuning").exists() and not (tmp_path / "mlruns").exists()


# --- a real search on synthetic data -----------------------------------------------------------------------------


def test_an_empty_dvc_lock_is_named_with_the_way_back(tmp_path):
    """kill -9 while DVC writes dvc.lock leaves it at 0 bytes; DVC then says only "validation failed"."""
    (tmp_path / "dvc.lock").write_text("")
    out = subprocess.run(["mnist-pipeline", "reproduce", "0" * 32], cwd=tmp_path, env=user_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'dvc.lock'} is empty (a DVC command was stopped while writing it), so DVC cannot read "
        "the pipeline's state: `git checkout dvc.lock` brings back the last committed one; or delete it, and the "
        "next `dvc repro` runs every stage again"
    ]
