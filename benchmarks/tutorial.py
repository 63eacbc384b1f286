"""Benchmark: the classic tutorial's training loop against this pipeline's, on the same data, side by side.

Each run is a fresh Python process, so its peak memory is its own and neither run warms the other's caches. The
parent prints one row per run and a summary: median per contender and the ratio pipeline / baseline.

Training time is the wall time of the epochs, each followed by the test-set evaluation both loops do (the
tutorial measures the test accuracy after every epoch too); "to 99%" is that time at the end of the first epoch
whose test accuracy reached 99.0%.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from mnist_pipeline.errors import run_main
from mnist_pipeline.ml import data
from mnist_pipeline.ml.tensors import Tensors

TARGET_ACCURACY = 0.99


# --- the contenders, each run inside a worker process -------------------------------------------------------


def run_baseline(data_dir: Path, seed: int) -> list[dict]:
    """The classic tutorial, as users write it: torchvision MNIST + ToTensor, a per-sample DataLoader."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    torch.manual_seed(seed)
    train_data = datasets.MNIST(root=data_dir, train=True, download=False, transform=ToTensor())
    test_data = datasets.MNIST(root=data_dir, train=False, download=False, transform=ToTensor())
    train_loader = DataLoader(train_data, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_data, batch_size=64)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(5408, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters())

    history, start = [], time.perf_counter()
    for epoch in range(1, 3):
        model.train()
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        history.append({"epoch": epoch, "test_accuracy": correct / len(test_data),
                        "seconds": time.perf_counter() - start})  # fmt: skip
    return history


def run_pipeline(data_dir: Path, seed: int, params: Path) -> list[dict]:
    """This project's training with the given params.yaml (the seed replaced)."""
    import io

    from mnist_pipeline import config
    from mnist_pipeline.ml import training

    loaded = config.load(params)
    model_cfg, train_cfg = loaded.model, loaded.train.replace(seed=seed)
    training.configure_threads(train_cfg.threads)
    device = training.resolve_device(train_cfg.device)
    raw = data_dir / "MNIST" / "raw"
    train_data = Tensors.from_split(data.load_split(raw, "train"), device)
    test_data = Tensors.from_split(data.load_split(raw, "test"), device)
    result = training.train(model_cfg, train_cfg, train_data, test_data, device, log=io.StringIO())
    return [{"epoch": m.epoch, "test_accuracy": m.test_accuracy, "seconds": m.seconds} for m in result.history]


def worker(contender: str, data_dir: Path, seed: int, params: Path) -> None:
    """Run one contender and print its result as JSON on the last line of stdout."""
    if contender == "baseline":
        history = run_baseline(data_dir, seed)
    else:
        history = run_pipeline(data_dir, seed, params)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"history": history, "peak_rss_mb": peak_mb}))


# --- the parent: data, runs, table --------------------------------------------------------------------------


def prepare_data(folder: Path) -> str:
    """Put MNIST-format files in ``folder/MNIST/raw`` (torchvision's layout); return what the data is."""
    raw = folder / "MNIST" / "raw"
    if os.environ.get(data.MIRROR_ENV):
        data.download(raw, data.expected_files("mnist"), mirror_list=[os.environ[data.MIRROR_ENV]])
        return f"real MNIST from {data.MIRROR_ENV}"
    from mnist_pipeline.ml.synthetic import write_raw

    write_raw(raw, n_train=60_000, n_test=10_000)
    return "SYNTHETIC data (MNIST_MIRROR is not set): only the timings mean anything, not the accuracies"


def write_params(base: Path, overrides: list[str], out: Path) -> Path:
    """params.yaml with ``KEY=VALUE`` overrides applied (as `dvc exp run -S` does), validated before any run."""
    import yaml

    from mnist_pipeline import config

    raw = config.with_overrides(config.read_params(base), dict(map(config.assignment, overrides)))
    config.build(raw)
    out.write_text(yaml.safe_dump(raw))
    return out


def summarise(history: list[dict]) -> dict:
    reached = next((m["seconds"] for m in history if m["test_accuracy"] >= TARGET_ACCURACY), None)
    return {"test_accuracy": history[-1]["test_accuracy"], "train_s": history[-1]["seconds"], "to_99_s": reached}


@click.command(
    context_settings={"show_default": True, "max_content_width": 100},
    epilog="""\b
Examples (from the project root):
  MNIST_MIRROR=/path/to/mnist python -m benchmarks --seeds 3
  MNIST_MIRROR=/path/to/mnist python -m benchmarks --loop --seeds 0   # the loop alone
  python -m benchmarks --only pipeline -S train.epochs=3""",
)
@click.option("--seeds", default=1, help="Run each contender with seeds 0..N-1 (0: none).")
@click.option("--loop", is_flag=True, help="First measure the everyday loop in this project (rerun, predict, "
              "compare, load) against the import floor; adds three runs to the store.")  # fmt: skip
@click.option("--params", default="params.yaml", type=click.Path(path_type=Path), help="The pipeline's params.")
@click.option("--only", type=click.Choice(["baseline", "pipeline"]), help="Run one contender only  [default: both]")
@click.option("-S", "--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a param as `dvc exp run -S` does (-S train.epochs=3); repeatable.")  # fmt: skip
def main(seeds: int, loop: bool, params: Path, only: str | None, sets: tuple[str, ...]) -> None:
    """Benchmark the classic tutorial's training loop against this pipeline's, on the same data, side by side;
    with --loop, first the everyday loop against the import floor."""
    run_main(lambda: _main(seeds, loop, params, only, list(sets)))


def _main(seeds: int, loop: bool, params_file: Path, only: str | None, sets: list[str]) -> None:
    if loop:
        from benchmarks import loop as loop_benchmark

        print(loop_benchmark.report(*loop_benchmark.measure(Path.cwd())), flush=True)
        if seeds == 0:
            return

    import pandas as pd

    contenders = [only] if only else ["baseline", "pipeline"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        params = write_params(params_file, sets, Path(tmp) / "params.yaml")
        what = prepare_data(Path(tmp))
        print(f"data: {what}", file=sys.stderr)
        for seed in range(seeds):
            for contender in contenders:
                cmd = [sys.executable, "-m", "benchmarks.tutorial", "--worker", contender, tmp, str(seed),
                       str(params)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{contender} seed {seed} failed:\n{out.stderr[-2000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                row = {"run": contender, "seed": seed, **summarise(result["history"]),
                       "peak_rss_mb": result["peak_rss_mb"]}  # fmt: skip
                rows.append(row)
                print(f"{contender} seed {seed}: {row}", file=sys.stderr, flush=True)

    table = pd.DataFrame(rows)
    print(f"\nData: {what}\n")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    medians = table.groupby("run")[["test_accuracy", "train_s", "to_99_s", "peak_rss_mb"]].median()
    print("\nMedians over seeds:\n")
    print(medians.to_markdown(floatfmt=".4g"))
    if len(contenders) == 2:
        ratio = medians.loc["pipeline"] / medians.loc["baseline"]
        print(f"\npipeline / baseline: training time {ratio['train_s']:.3f}, peak RSS {ratio['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
