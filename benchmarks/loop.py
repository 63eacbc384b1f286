"""`python -m benchmarks --loop`: what the everyday loop costs, against the floor the machine sets.

The floor F is the wall time of ``python -c "import torch, mlflow"`` (median of 3): no command that trains, logs
or loads a model with both libraries can start faster. Every other figure is printed with its ratio to F:

- W: ``dvc repro -f -s train evaluate export`` in the project (real data, store and registry), and T, the training
  seconds that run logged; W - T is what the pipeline costs around the training. The pipeline runs 3 times (as F
  is measured 3 times): the run with the median W - T is shown, with the range;
- each stage's wall time, and the peak memory of its process (the largest rank's under torchrun), read from ``/proc``
  while it runs (Linux; sampled every 20 ms, so a peak reached in a stage's last 20 ms can be missed);
- ``mnist-pipeline predict one.png`` with the champion and with ``--model models/model.onnx``;
- ``mnist-pipeline compare``;
- ``mlflow.pyfunc.load_model("models:/<name>@champion")`` plus one prediction, in a fresh process that does not
  import this project.

Run it from the project root after a first ``dvc repro``: it adds three runs and three registered versions to the
store.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mnist_pipeline.errors import PipelineError

STAGES = ("train", "evaluate", "export")
POLL_S = 0.02
PYFUNC_SNIPPET = """
import sys
import numpy as np
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
output = model.predict(np.load(sys.argv[2]))
print(int(np.asarray(output["logits"] if isinstance(output, dict) else output).argmax()))
"""


@dataclass
class Figure:
    name: str
    seconds: float | None = None
    megabytes: float | None = None
    note: str = ""


@dataclass
class StageWatch:
    """Wall time and peak RSS of each stage, from its processes in /proc while `dvc repro` runs."""

    first_seen: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    peak_kb: dict[tuple[str, int], int] = field(default_factory=dict)  # (stage, pid) -> VmHWM

    def poll(self, root_pid: int, stop: threading.Event) -> None:
        owner: dict[int, str] = {}  # pid -> stage, inherited by a stage process's children
        while not stop.is_set():
            now = time.perf_counter()
            alive = _descendants(root_pid)
            owner = {pid: stage for pid, stage in owner.items() if pid in dict(alive)}  # a pid can be reused
            for pid, parent in alive:
                cmdline = _cmdline(pid)
                stage = owner.get(pid) or owner.get(parent) or _stage_of(cmdline)
                if stage is None:
                    continue
                owner[pid] = stage
                self.first_seen.setdefault(stage, now)
                self.last_seen[stage] = now
                # Memory: the stage's own processes (several under torchrun); other children (git, a shell) not, as
                # a forked child shows its parent's memory until it execs.
                if _stage_of(cmdline):
                    key = (stage, pid)
                    self.peak_kb[key] = max(self.peak_kb.get(key, 0), _vm_hwm_kb(pid))
            stop.wait(POLL_S)

    def wall(self, stage: str) -> float | None:
        if stage not in self.first_seen:
            return None
        return self.last_seen[stage] - self.first_seen[stage]

    def peak_mb(self, stage: str) -> float | None:
        """The largest peak RSS in MB of the stage's processes (one, or one per rank under torchrun). Not their
        sum: a child forked to run a command (MLflow asks git for the commit) shows its parent's memory until it
        execs."""
        peaks = [kb for (name, _), kb in self.peak_kb.items() if name == stage]
        return max(peaks) / 1024 if peaks else None


def _descendants(root: int) -> list[tuple[int, int]]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out.append((child, pid))
            todo.append(child)
    return out


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _stage_of(cmdline: list[bytes]) -> str | None:
    """The stage a Python process runs (each rank, under torchrun); None for anything else."""
    if not cmdline or b"python" not in Path(cmdline[0].decode(errors="replace")).name.encode():
        return None  # the shell DVC starts the command in is not the stage's process
    for stage in STAGES:
        if any(arg.endswith(f"stages/{stage}.py".encode()) for arg in cmdline):
            return stage
    return None


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise PipelineError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()[-600:]}")
    return seconds


def _median_of(runs: int, cmd: list[str], env: dict | None = None) -> float:
    return statistics.median(_timed(cmd, env) for _ in range(runs))


def _repro(project: Path) -> tuple[float, StageWatch, str]:
    cmd = ["dvc", "repro", "-f", "-s", *STAGES]
    watch, stop = StageWatch(), threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poller = threading.Thread(target=watch.poll, args=(process.pid, stop), daemon=True)
    poller.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    poller.join()
    if process.returncode != 0:
        raise PipelineError(f"`{' '.join(cmd)}` failed ({process.returncode}): {output.strip()[-800:]}")
    return seconds, watch, output


def _logged_train_seconds(project: Path) -> float:
    """The ``train_seconds`` of the training the pipeline just ran, from the train stage's record."""
    return float(json.loads((project / "models" / "training_times.json").read_text())["metrics"]["train_seconds"])


def machine() -> str:
    from mnist_pipeline.ml.environment import cpu_model

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, Python {platform.python_version()}"


def measure(project: Path, repeats: int = 3, log=sys.stderr) -> tuple[float, list[Figure], dict]:
    """Run the loop once; return (F, figures, facts about the run)."""
    from mnist_pipeline import config
    from mnist_pipeline.ml import data

    project = project.resolve()
    if not (project / "dvc.yaml").is_file():
        raise PipelineError(f"{project} has no dvc.yaml: run `python -m benchmarks --loop` from the project root")
    data.verify_folder(project / "data" / "raw")  # the loop starts from data that is present
    model_name = config.load(project / "params.yaml").export.model_name
    python = sys.executable
    script = Path(python).parent / "mnist-pipeline"  # the console script users run, when installed
    cli = [str(script)] if script.is_file() else [python, "-m", "mnist_pipeline.cli"]

    def say(line: str) -> None:
        print(line, file=log, flush=True)

    floor = _median_of(repeats, [python, "-c", "import torch, mlflow"])
    say(f"F (import torch, mlflow): {floor:.2f} s")
    # The pipeline runs `repeats` times; the run with the median W - T is shown, and the range of all of them.
    reruns = []
    for _ in range(repeats):
        wall, watch, output = _repro(project)
        train_s = _logged_train_seconds(project)
        reruns.append((wall - train_s, wall, train_s, watch, output))
        say(f"W (dvc repro -f -s train evaluate export): {wall:.2f} s, T {train_s:.2f} s")
    overheads = sorted(run[0] for run in reruns)
    _, wall, train_s, watch, output = sorted(reruns, key=lambda run: run[0])[len(reruns) // 2]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    spread = f"of {repeats} runs: {overheads[0]:.2f} to {overheads[-1]:.2f} s" if repeats > 1 else ""
    figures = [Figure("W: dvc repro -f -s train evaluate export", wall),
               Figure("T: training (train_seconds)", train_s),
               Figure("W - T: the pipeline around the training (median run)", wall - train_s, note=spread)]  # fmt: skip
    for stage in STAGES:
        figures.append(Figure(f"stage {stage}: wall, peak RSS", watch.wall(stage), watch.peak_mb(stage)))

    figures += _everyday_commands(project, cli, model_name, repeats, say)
    facts = {
        "test_accuracy": metrics.get("test_accuracy"),
        "warnings": [line for line in output.splitlines() if "Warning" in line or " INFO " in line],
    }
    return floor, figures, facts


def _everyday_commands(project: Path, cli: list[str], model_name: str, repeats: int, say) -> list[Figure]:
    """`predict` with the champion and with the ONNX file, `compare`, and pyfunc in a fresh process."""
    from mnist_pipeline import names
    from mnist_pipeline.ml import data
    from mnist_pipeline.tracking import store

    python = sys.executable
    figures = []
    with tempfile.TemporaryDirectory(prefix="mnist-loop-") as tmp:
        digit = data.load_split(project / "data" / "raw", "test").images[0]  # a real test digit
        png, npy = Path(tmp) / "one.png", Path(tmp) / "one.npy"
        _write_png(digit, png)
        import numpy as np

        np.save(npy, (digit.astype(np.float32) / 255.0).reshape(1, 1, 28, 28))
        champion = f"models:/{model_name}@{names.ALIAS_CHAMPION}"
        for name, cmd in [
            ("predict one.png (champion)", [*cli, "predict", str(png)]),
            ("predict one.png --model models/model.onnx", [*cli, "predict", str(png), "--model",
                                                            str(project / "models" / "model.onnx")]),
            ("compare", [*cli, "compare"]),
        ]:  # fmt: skip
            figures.append(Figure(name, _median_of(repeats, cmd)))
            say(f"{name}: {figures[-1].seconds:.2f} s")
        # A fresh process that knows nothing of the project: only MLflow, the store's URI and the model's name.
        env = {**os.environ, "MLFLOW_TRACKING_URI": store.tracking_uri(project)}
        pyfunc = [python, "-c", PYFUNC_SNIPPET, champion, str(npy)]
        figures.append(Figure(f"pyfunc load {champion} + predict one digit", _median_of(repeats, pyfunc, env)))
        say(f"pyfunc: {figures[-1].seconds:.2f} s")

    return figures


def _write_png(image, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def report(floor: float, figures: list[Figure], facts: dict) -> str:
    """The loop's figures as a Markdown table, each with its ratio to F."""
    lines = [
        f"Loop benchmark, {time.strftime('%Y-%m-%d')}, {machine()}",
        "",
        "| figure | seconds | × F | peak RSS (MB) |",
        "|---|---:|---:|---:|",
        f'| F: python -c "import torch, mlflow" (median of 3) | {floor:.2f} | 1.00 | |',
    ]
    for f in figures:
        seconds = f"{f.seconds:.2f}" if f.seconds is not None else "n/a"
        ratio = f"{f.seconds / floor:.2f}" if f.seconds is not None else ""
        rss = f"{f.megabytes:.0f}" if f.megabytes is not None else ""
        note = f" ({f.note})" if f.note else ""
        lines.append(f"| {f.name}{note if f.megabytes is None else ''} | {seconds} | {ratio} | {rss}"
                     f"{note if f.megabytes is not None else ''} |")  # fmt: skip
    lines.append("")
    lines.append(f"Test accuracy of that run: {facts['test_accuracy']}")
    if facts["warnings"]:
        lines.append("Warnings and INFO lines printed by `dvc repro`:")
        lines += [f"    {w}" for w in facts["warnings"]]
    else:
        lines.append("`dvc repro` printed no warnings.")
    return "\n".join(lines)
