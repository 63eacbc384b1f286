"""Shared fixtures: synthetic MNIST-format data, served from a folder or over HTTP on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mnist_pipeline.synthetic import write_mirror

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
    from mnist_pipeline import data

    out = tmp_path_factory.mktemp("raw")
    data.download(out, data.expected_files("mnist", mirror_md5), mirror_list=[str(mirror_dir)])
    return out


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
