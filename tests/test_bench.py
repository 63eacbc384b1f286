"""The loop benchmark's measuring parts (the benchmark itself is run by hand: it measures, tests assert)."""

from __future__ import annotations

import subprocess
import sys
import threading

from mnist_pipeline import bench_loop

# A stand-in for a stage's process: named like one, holding 200 MB for a moment, with a child of its own.
STAGE = (
    "import subprocess, sys, time\n"
    "block = bytearray(200_000_000)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.6)'])\n"
    "time.sleep(0.6)\n"
    "child.wait()\n"
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
    largest, total = watch.peak_mb("evaluate")
    assert largest >= 200 and total > largest  # the stage's own process, then with its child
    assert watch.wall("train") is None and watch.peak_mb("train") == (None, None)


def test_the_report_gives_each_figure_as_a_ratio_to_the_floor():
    figures = [bench_loop.Figure("W", 30.0), bench_loop.Figure("stage train", 20.0, 900.0, "all: 1100 MB")]
    text = bench_loop.report(5.0, figures, {"test_accuracy": 0.99, "warnings": []})
    assert "| W | 30.00 | 6.00 |  |" in text
    assert "| stage train | 20.00 | 4.00 | 900 (all: 1100 MB) |" in text
    assert "printed no warnings" in text
