"""Shared fixtures: synthetic MNIST-format data, served from a folder or over HTTP on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.ml.synthetic import write_mirror

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mirror_dir(tmp_path_factory) -> Path:
    """A folder holding the four synthetic .gz files."""
    folder = tmp_path_factory.mktemp("mirror")
    write_mirror(folder)
    return folder


@pytest.fixture(scope="session")
def mirror_md5(mirror_dir) -> dict[str, str]:
    return write_mirror(mirror_dir)  # deterministic: rewrites the same bytes, returns their checksums


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def http_mirror(mirror_dir):
    """The synthetic files served over HTTP on 127.0.0.1, on a free port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(mirror_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory, mirror_dir, mirror_md5) -> Path:
    """data/raw as the download stage leaves it, for the synthetic data."""
    from mnist_pipeline.ml import data

    out = tmp_path_factory.mktemp("raw")
    data.download(out, data.expected_files("mnist", mirror_md5), mirror_list=[str(mirror_dir)])
    return out


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
    "stages",
    "src",
    "requirements",
    "plots",
    "tune.yaml",
]
TINY = {
    "model": {"conv_channels": [4], "kernel_size": 3, "hidden": 16, "dropout": 0.0},
    "train": {"epochs": 2, "batch_size": 100, "log_every": 5},
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
    """Run a command (dvc, python, mnist-pipeline) from the repo root, as a user would."""
    return subprocess.run(list(args), cwd=repo, env=user_env(MNIST_MIRROR=mirror, **env), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def ran_stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts); yields its URL. Starting it takes
    about half a minute on two cores, so the tests share it: each finds its own run by id and registers under a
    model name of its own where it checks the registry."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{folder}/server.db",
           "--artifacts-destination", str(folder / "artifacts")]  # fmt: skip
    server = start_server(cmd)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)
