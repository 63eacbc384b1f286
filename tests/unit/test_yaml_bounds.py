"""params.yaml and tune.yaml as an attacker writes them: each refused in one short line, within a second and a few
MB, before anything is built; and a set of params each valid alone whose model cannot fit in memory."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_pipeline import config, yaml_files
from mnist_pipeline.commands import search_space
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import training
from mnist_pipeline.ml.tensors import Tensors
from tests.helpers import AUGMENTATION_OFF, REPO_ROOT

PARAMS = (REPO_ROOT / "params.yaml").read_text()


def alias_bomb(levels: int = 9) -> str:
    """A billion laughs: each anchor a list of nine of the one before (9**9 values once expanded)."""
    lines = ["l0: &l0 [laugh, laugh, laugh, laugh, laugh, laugh, laugh, laugh, laugh]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE = {
    "an alias bomb in a known key": (
        alias_bomb() + PARAMS.replace("conv_channels: [16, 32]", "conv_channels: *l8"),
        r"is refused: it holds more than 10,000 values once its aliases are expanded",
    ),
    "an alias that holds itself": ("a: &a [*a]\n", r"is refused: it nests deeper than 32 levels"),
    "100,000 nested lists": ("a: " + "[" * 100_000, r"is refused: it nests deeper than 32 levels"),
    "3 million keys": ("".join(f"k{i}: 1\n" for i in range(3_000_000)), r"is larger than 256 KiB; refused"),
    "UTF-16": (PARAMS.encode("utf-16"), r"is not UTF-8 text \(byte 0\); save it as UTF-8"),
    "Latin-1": (("# \xe9\n" + PARAMS).encode("latin-1"), r"is not UTF-8 text \(byte 2\)"),
}


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_params_file_is_one_short_line_in_bounded_time_and_memory(tmp_path, case):
    content, message = HOSTILE[case]
    path = write(tmp_path / "params.yaml", content)
    started = time.process_time()
    tracemalloc.start()
    try:
        with pytest.raises(config.ConfigError, match=message) as refused:
            config.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 300
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB"  # a 9**9 expansion or a whole /dev/zero would be GBs
    assert time.process_time() - started < 60  # CPU time, not a wall clock: minutes before, on any CPU


def test_a_link_to_a_device_is_not_read(tmp_path):
    os.symlink("/dev/zero", tmp_path / "params.yaml")
    with pytest.raises(config.ConfigError, match=r"is not a regular file \(a folder, device or FIFO\)"):
        config.load(tmp_path / "params.yaml")


def test_a_small_alias_within_the_bounds_is_read_as_yaml_reads_it(tmp_path):
    text = PARAMS.replace("conv_channels: [16, 32]", "conv_channels: &widths [16, 32]").replace(
        "model_name: mnist-cnn", "model_name: mnist-cnn\n  # widths again: *widths"
    )
    assert config.load(write(tmp_path / "params.yaml", text)).model.conv_channels == (16, 32)


def test_an_error_quotes_a_bounded_piece_of_a_huge_value(tmp_path):
    path = write(tmp_path / "params.yaml", PARAMS.replace("optimizer: adam", "optimizer: " + "x" * 200_000))
    with pytest.raises(config.ConfigError) as refused:
        config.load(path)
    message = str(refused.value)
    assert "train.optimizer = 'xxx" in message and "..." in message and len(message) < 300


@pytest.mark.parametrize("case", ["an alias bomb in a known key", "100,000 nested lists", "UTF-16"])
def test_tune_yaml_has_the_same_bounds(tmp_path, case):
    content, message = HOSTILE[case]
    content = content if isinstance(content, bytes) else content.replace("conv_channels: *l8", "")
    path = write(tmp_path / "tune.yaml", content)
    with pytest.raises(search_space.SpaceError) as refused:
        search_space.load_search(path, yaml.safe_load(PARAMS), [])
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 300


def test_a_set_value_has_the_same_bounds():
    with pytest.raises(config.ConfigError, match="the value is not YAML"):
        config.assignment("train.lr=" + "[" * 10_000)


@settings(max_examples=40, deadline=None)
@given(levels=st.integers(2, 12), width=st.integers(2, 12))
def test_any_alias_expansion_is_read_or_refused_by_its_size(levels, width):
    """An expansion within the bound is read; one past it is refused, whatever its shape."""
    lines = ["l0: &l0 [" + ", ".join(["1"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    size = sum(sum(width**j for j in range(1, i + 2)) + 2 for i in range(levels)) + 1
    try:
        value = yaml_files.load_yaml("\n".join(lines))
        assert size <= yaml_files.MAX_YAML_NODES and len(value) == levels
    except yaml_files.YamlBeyondBounds:
        assert size > yaml_files.MAX_YAML_NODES or levels > yaml_files.MAX_YAML_DEPTH


OVERCOMMIT = Path("/proc/sys/vm/overcommit_memory")


@pytest.mark.skipif(
    OVERCOMMIT.exists() and OVERCOMMIT.read_text().strip() == "1",
    reason="the kernel grants any allocation (vm.overcommit_memory 1): 141 GB would be granted, then killed",
)
def test_a_model_too_large_for_memory_is_one_line_naming_the_params():
    raw = config.read_params(REPO_ROOT / "params.yaml")
    model = config.ModelConfig.from_dict({**raw["model"], "conv_channels": [1024], "hidden": 16})
    train = config.TrainConfig.from_dict({**raw["train"], **AUGMENTATION_OFF, "batch_size": 60_000})
    digits = Tensors(torch.zeros(60_000, 1, 28, 28, dtype=torch.uint8), torch.zeros(60_000, dtype=torch.long))
    with pytest.raises(PipelineError, match=r"conv_channels \[1024\], .* train.batch_size 60000 need more memory"):
        training.train(model, train, digits, None, torch.device("cpu"))
