"""Training recipes side by side on real MNIST: for each recipe and seed, the training time, the test accuracy, the
robustness report's mean (`robust_accuracy`) and its weakest row at the milder strength, measured as the pipeline
measures them (the train stage's training, the evaluate stage's report, on the trained model in fp32).

    python -m benchmarks.recipes --data data/raw --seeds 0 1 2 --recipe "default" \
        --recipe "wide: model.conv_channels=[32, 64]" --recipe "3 epochs: train.epochs=3"

A recipe is a name and params.yaml overrides (``SECTION.KEY=VALUE``, separated by ``;``) on top of params.yaml.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mnist_pipeline import config
from mnist_pipeline.ml import robustness, training
from mnist_pipeline.ml.data import load_split
from mnist_pipeline.ml.model import to_pixels
from mnist_pipeline.ml.tensors import Tensors


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition(":")
    return name.strip(), dict(config.assignment(item.strip()) for item in overrides.split(";") if item.strip())


def measure(params: config.Params, train: Tensors, test: Tensors, pixels, labels) -> dict:
    cpu = torch.device("cpu")
    with open("/dev/null", "w") as quiet:
        result = training.train(params.model, params.train, train, test, cpu, log=quiet)
    model = result.model.eval()

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    n = params.evaluate.robustness_samples
    table = robustness.report(logits, pixels[:n], labels[:n], params.evaluate.robustness_seed)
    milder = table[table.level == 1]
    weakest = milder.loc[milder.accuracy.idxmin()]
    return {
        "seconds": result.seconds,
        "precision": result.precision,
        "test": result.history[-1].test_accuracy,
        "robust": robustness.robust_accuracy(table),
        "weakest_milder": f"{weakest.distortion} {100 * weakest.accuracy:.1f}%",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/raw"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", action="append", default=[], help='"name: section.key=value; ..."')
    args = parser.parse_args()
    training.configure_threads(0)
    base = config.read_params(args.params)
    cpu = torch.device("cpu")
    train = Tensors.from_split(load_split(args.data, "train"), cpu)
    test = Tensors.from_split(load_split(args.data, "test"), cpu)
    split = load_split(args.data, "test")
    pixels, labels = to_pixels(torch.from_numpy(split.images)), torch.from_numpy(split.labels.astype("int64"))
    print("recipe\tseed\tprecision\ttraining s\ttest %\trobust %\tweakest milder row", flush=True)
    for recipe in args.recipe or ["default"]:
        name, overrides = parse_recipe(recipe)
        params = config.build(config.with_overrides(base, overrides))
        for seed in args.seeds:
            started = time.perf_counter()
            seeded = params.model_copy(update={"train": params.train.replace(seed=seed)})
            row = measure(seeded, train, test, pixels, labels)
            print(f"{name}\t{seed}\t{row['precision']}\t{row['seconds']:.2f}\t{100 * row['test']:.2f}\t"
                  f"{100 * row['robust']:.2f}\t{row['weakest_milder']}\t({time.perf_counter() - started:.0f} s in all)",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
