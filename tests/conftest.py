"""Shared fixtures: synthetic MNIST-format data, served from a folder or over HTTP on 127.0.0.1; a real `mlflow
server`; input files of every format `predict` reads; an exported model."""

from __future__ import annotations

import functools
import http.server
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from mnist_pipeline.ml import export
from mnist_pipeline.ml.model import build
from mnist_pipeline.ml.synthetic import write_mirror
from mnist_pipeline.tracking import store
from tests.helpers import digit, free_port, serving, start_server, stop_server, tiny_model_config, wait_until_up


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
    with serving(functools.partial(_QuietHandler, directory=str(mirror_dir))) as url:
        yield f"{url}/"


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory, mirror_dir, mirror_md5) -> Path:
    """data/raw as the download stage leaves it, for the synthetic data."""
    from mnist_pipeline.ml import data

    out = tmp_path_factory.mktemp("raw")
    data.download(out, data.expected_files("mnist", mirror_md5), mirror_list=[str(mirror_dir)])
    return out


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


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    seven = digit()
    Image.fromarray(seven).save(folder / "grey.png")
    Image.fromarray(255 - seven).convert("RGB").save(folder / "inverted_rgb.png")
    Image.fromarray(255 - digit(100)).save(folder / "big.jpg", quality=95)
    np.save(folder / "one.npy", seven)
    np.save(folder / "batch.npy", np.stack([seven, seven]).astype(np.float32) / 255)
    (folder / "digits-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28)) + np.stack([seven] * 2).tobytes()
    )
    (folder / "text.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "short-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10)
    return folder


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An exported model, as the export stage writes it (ONNX)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export.save_onnx(build(tiny_model_config()).eval(), torch.rand(2, 1, 28, 28), path)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder whose local store holds one run with one artifact."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = tmp_path / "project"
    root.mkdir()
    store.configure(root)
    with mlflow.start_run() as run:
        mlflow.log_text("seven", "note.txt")
    yield root, run.info.run_id
    mlflow.set_tracking_uri(None)
