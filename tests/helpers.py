"""What the tests share besides fixtures: the project copied into a temporary git repository, commands run in it
as a user runs them, servers started and stopped, a server that trickles."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def stage_script(name: str):
    """``stages/<name>.py`` loaded as a module (its ``main`` is the stage's click command), as DVC runs it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stages.{name}", REPO_ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(name: str, params, **paths) -> None:
    """The function of ``stages/<name>.py`` called in this process with ``params`` (a ``config.Params``) and its
    paths, as its command line calls it, without the exit on error."""
    stage_script(name).main.callback.__wrapped__(params, **paths)


def tiny_model_config(**changes):
    """The smallest CNN of the classic shape: one 4-channel conv, 16 hidden units."""
    from mnist_pipeline.config import ModelConfig

    fields = {
        "conv_channels": (4,),
        "kernel_size": 3,
        "hidden": 16,
        "dropout": 0.0,
        "batch_norm": False,
        "input_norm": "mnist",
    }
    return ModelConfig(**{**fields, **changes})


def trickle(wfile, data: bytes, every_s: float = 0.2) -> None:
    """Send ``data`` one byte every ``every_s`` seconds, as a server that barely answers; stop when the client goes
    away."""
    for byte in data:
        try:
            wfile.write(bytes([byte]))
            wfile.flush()
        except OSError:
            return
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start a server command in its own process group, so that `stop_server` ends its children too."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip


def wait_until_up(server: subprocess.Popen, url: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"{url} did not answer within {limit_s} s"
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


# --- a temporary copy of the project, and commands run in it the way a user would -----------------------

# What a fresh clone holds that the pipeline needs (no dvc.lock: the copy starts with nothing run).
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/plots",
    ".dvc/.gitignore",
    "mlruns/.gitignore",
    "src",
    "stages",
    "requirements",
    "plots",
    "tune.yaml",
]
# Augmentation is on in params.yaml; on the tests' thousand synthetic digits and two epochs it only slows the
# training and blurs what a test looks at. The tests of augmentation turn it on themselves.
AUGMENTATION_OFF = {"augment_shift": 0, "augment_rotation": 0, "augment_scale": 0, "augment_shear": 0,
                    "augment_elastic": 0, "augment_stroke": 0, "augment_noise": 0, "augment_clutter": 0}  # fmt: skip
TINY = {
    "model": {"conv_channels": [4], "kernel_size": 3, "hidden": 16, "dropout": 0.0},
    "train": {"epochs": 2, "batch_size": 100},
    "runtime": {"log_every": 5},
    "evaluate": {"examples": 8},
    "export": {"parity_samples": 64},
}


def make_repo(tmp_path: Path, md5: dict[str, str], **overrides) -> Path:
    repo = tmp_path / "project"
    for name in PROJECT_FILES:
        src, dst = REPO_ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["expected_md5"] = md5
    params["train"].update(AUGMENTATION_OFF)  # the tests' digits are few and synthetic: see AUGMENTATION_OFF
    for section, values in {**TINY, **overrides}.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    return repo


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def user_env(**extra: str) -> dict[str, str]:
    """This environment as a user's shell has it: its bin/ (dvc, python, torchrun) on PATH, none of the
    MLflow or DVC variables the test process may carry, and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_IDENTITY, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    env.update(extra)
    return env


def run(repo: Path, mirror: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run a command (dvc, python, mnist-pipeline) from the repo root, as a user would, until it exits.

    Its output goes to files, not pipes: a process it leaves running (DVC's queue workers linger after `dvc exp run
    --run-all` has returned) would hold a pipe open, and reading it to its end would wait for that process too."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        done = subprocess.run(list(args), cwd=repo, env=user_env(MNIST_MIRROR=mirror, **env), stdout=out, stderr=err,
                              timeout=600)  # fmt: skip
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, out.read().decode(), err.read().decode())


def queue_outcome(repo: Path, mirror: str, limit_s: float = 600) -> dict[str, str]:
    """Name -> status (Success, Failed) of each experiment of DVC's queue, once none is queued or running.

    `dvc exp run --run-all` exits 0 whatever happened, and reports an experiment as failed when it finds no result
    for it among the tasks it reads back (DVC's `reproduce_celery`), which need not mean that the experiment failed
    or has ended: the queue's own status is what a test waits for, and then asserts on."""
    deadline = time.monotonic() + limit_s
    while True:
        table = run(repo, mirror, "dvc", "queue", "status").stdout.splitlines()
        rows = [line.split() for line in table[1:] if line.strip() and not line.startswith("Worker status")]
        outcome = {row[1]: row[-1] for row in rows}  # Task, Name, Created (two words), Status
        if not {"Queued", "Running"} & set(outcome.values()) or time.monotonic() > deadline:
            return outcome
        time.sleep(1)  # a poll, not a wait for time to pass


def start(repo: Path, mirror: str, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start a command in ``repo`` as `run` does, without waiting; its output goes to a file."""
    log = Path(tempfile.mkdtemp()) / "out.txt"
    with log.open("wb") as out:
        process = subprocess.Popen(list(args), cwd=repo, env=user_env(MNIST_MIRROR=mirror, **env), stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    return process, log


def ran_stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")]


def log_onnx(model, folder: Path) -> str:
    """Export ``model`` to ONNX as the export stage does and log it into the active run; its model URI."""
    import torch

    from mnist_pipeline.ml import export
    from mnist_pipeline.tracking import registry

    export.save_onnx(model, torch.rand(2, 1, 28, 28), folder / "model.onnx")
    return registry.log_onnx_model(folder / "model.onnx", torch.rand(4, 1, 28, 28).numpy(), "model").model_uri


def digit(size: int = 28) -> np.ndarray:
    """A light "7" on black, drawn at ``size`` pixels, off-centre so centring has work to do."""
    image = np.zeros((size, size), dtype=np.uint8)
    s = size / 28
    image[int(4 * s) : int(7 * s), int(6 * s) : int(22 * s)] = 255  # the bar
    for row in range(int(7 * s), int(24 * s)):  # the stem, slanting left
        col = int(22 * s - (row - 7 * s) * 0.5)
        image[row, max(col - int(2 * s), 0) : col + 1] = 255
    return image


@contextmanager
def serving(handler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1, on a free port, answering with ``handler`` in threads; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


PT2_CARRIERS = ("weight", "sample_inputs", "constant", "legacy_weights")


class _Payload:
    """Unpickles by running ``eval``: writes ``marker``, then evaluates to ``result`` so that the load goes on."""

    def __init__(self, marker: Path, result: str):
        self.marker, self.result = marker, result

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('ran') and {self.result}",)


def pt2_with_payload(model, path: Path, carrier: str, marker: Path) -> Path:
    """A real ``torch.export`` archive of ``model`` (input (N, 1, 28, 28)) in which ``carrier`` (one of
    `PT2_CARRIERS`) is a pickle that writes ``marker`` when ``torch.export.load`` reads it."""
    import io
    import json
    import zipfile

    import torch

    torch.export.save(torch.export.export(model.eval(), (torch.rand(2, 1, 28, 28),)), path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    weights_config = next(name for name in files if name.endswith("weights/model_weights_config.json"))
    weights_dir = weights_config.rpartition("/")[0]
    config = json.loads(files[weights_config])
    torch_ = "__import__('torch')"

    def pickled(result: str) -> bytes:
        buffer = io.BytesIO()
        torch.save(_Payload(marker, result), buffer)
        return buffer.getvalue()

    if carrier == "weight":  # a weight marked use_pickle: read with torch.load(weights_only=False)
        name, entry = next(iter(config["config"].items()))
        entry["use_pickle"] = True
        shape = [size["as_int"] for size in entry["tensor_meta"]["sizes"]]
        files[weights_config] = json.dumps(config).encode()
        files[f"{weights_dir}/{entry['path_name']}"] = pickled(f"{torch_}.nn.Parameter({torch_}.zeros({shape}))")
    elif carrier == "sample_inputs":  # torch retries with weights_only=False when the safe load fails
        name = next(name for name in files if "/data/sample_inputs/" in name)
        files[name] = pickled(f"(({torch_}.zeros(2, 1, 28, 28),), {{}})")
    elif carrier == "constant":
        constants_config = next(name for name in files if name.endswith("constants/model_constants_config.json"))
        entry = {"path_name": "tensor_constant_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        files[constants_config] = json.dumps({"config": {"payload": entry}}).encode()
        files[f"{constants_config.rpartition('/')[0]}/tensor_constant_0"] = pickled(f"{torch_}.zeros(1)")
    else:  # legacy_weights: one weights/<model>.pt file instead of the config and its files
        for name in [name for name in files if name.startswith(weights_dir + "/")]:
            del files[name]
        files[f"{weights_dir}/model.pt"] = pickled("{}")
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path
