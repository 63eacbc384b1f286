"""The loop benchmark's measuring parts (the benchmark itself is run by hand: it measures, tests assert)."""

from __future__ import annotations

import subprocess
import sys
import threading

from benchmarks import loop as bench_loop

# A stand-in for a stage's process: named like one, holding 300 MB for a moment, with a child that is not a stage
# process (100 MB: not counted).
STAGE = (
    "import subprocess, sys, time\n"
    "block = b'x' * 300_000_000  # written, so resident\n"
    "hold = 'b = bytes(100_000_000).replace(bytes(1), bytes([1])); import time; time.sleep(0.6)'\n"
    "other = subprocess.Popen([sys.executable, '-c', hold])\n"
    "time.sleep(0.6)\n"
    "other.wait()\n"
)


def test_stage_processes_are_found_timed_and_their_peak_memory_read():
    shell = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "$0" stages/evaluate.py', STAGE])
    watch, stop = bench_loop.StageWatch(), threading.Event()
    poller = threading.Thread(target=watch.poll, args=(shell.pid, stop))
    poller.start()
    assert shell.wait(timeout=60) == 0
    stop.set()
    poller.join()
    assert set(watch.first_seen) == {"evaluate"}  # the shell itself is not the stage
    assert 0.4 < watch.wall("evaluate") < 30
    assert 250 <= watch.peak_mb("evaluate") < 380  # the stage's process: the other child is not counted
    assert watch.wall("train") is None and watch.peak_mb("train") is None


def test_the_report_gives_each_figure_as_a_ratio_to_the_floor():
    figures = [bench_loop.Figure("W", 30.0), bench_loop.Figure("stage train", 20.0, 900.0, "2 ranks")]
    text = bench_loop.report(5.0, figures, {"test_accuracy": 0.99, "warnings": []})
    assert "| W | 30.00 | 6.00 |  |" in text
    assert "| stage train | 20.00 | 4.00 | 900 (2 ranks) |" in text
    assert "printed no warnings" in text


def test_a_recipe_is_a_name_and_params_overrides_checked_as_params_yaml_is():
    import pytest

    from benchmarks import recipes
    from mnist_pipeline import config

    name, overrides = recipes.parse_recipe("wide, 3 epochs: model.conv_channels=[32, 64]; train.epochs=3")
    assert (name, overrides) == ("wide, 3 epochs", {"model.conv_channels": [32, 64], "train.epochs": 3})
    assert recipes.parse_recipe("default") == ("default", {})
    with pytest.raises(config.ConfigError, match="expected SECTION.KEY=VALUE"):
        recipes.parse_recipe("typo: epochs=3")
