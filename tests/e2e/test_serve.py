"""`mnist-pipeline serve`: MLflow's scoring app behind a Host check, a body limit and a check of every input; a
model that would run code it carries is never loaded, whatever its flavor list says."""

from __future__ import annotations

import http.client
import json
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mnist_pipeline.commands import serve
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.ml import export
from mnist_pipeline.ml.model import build
from mnist_pipeline.tracking import loader
from tests.helpers import free_port, tiny_model_config, user_env, wait_until_up

pytestmark = pytest.mark.e2e  # a real server process


@pytest.fixture(scope="module")
def onnx_model_dir(tmp_path_factory) -> Path:
    """A real MLflow ONNX model folder, as the export stage logs it (MLmodel: onnx + python_function)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build(tiny_model_config()).eval()
    export.save_onnx(model, torch.rand(2, 1, 28, 28), folder / "model.onnx")
    example = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    logits = model(torch.from_numpy(example)).detach().numpy()
    mlflow.onnx.save_model(onnx.load(str(folder / "model.onnx")), folder / "mlflow-model",
                           signature=infer_signature(example, logits),
                           onnx_execution_providers=["CPUExecutionProvider"])  # fmt: skip
    return folder / "mlflow-model"


class Payload:
    """Unpickling this creates the file it names: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_copies(model_dir: Path, tmp_path: Path, marker: Path) -> dict[str, Path]:
    """The ONNX model with a python_function flavor that runs code: a pickled python_model, or a code folder."""
    copies = {}
    for layout in ("pickled-python-model", "code-folder"):
        folder = tmp_path / layout
        subprocess.run(["cp", "-r", str(model_dir), str(folder)], check=True)
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        if layout == "pickled-python-model":
            (folder / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))
            mlmodel["flavors"]["python_function"] = {
                "loader_module": "mlflow.pyfunc.model",
                "python_model": "python_model.pkl",
                "python_version": "3.11",
            }
        else:  # the code folder goes first on sys.path: its onnxruntime.py shadows the real one
            (folder / "code").mkdir()
            (folder / "code" / "onnxruntime.py").write_text(f"open({str(marker)!r}, 'w')\n")
            mlmodel["flavors"]["python_function"]["code"] = "code"
        assert "onnx" in mlmodel["flavors"]  # the flavor list still looks safe
        (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        copies[layout] = folder
    return copies


def test_a_model_that_would_run_code_is_refused_by_serve_and_never_unpickled(onnx_model_dir, tmp_path):
    marker = tmp_path / "payload-ran"
    for layout, folder in malicious_copies(onnx_model_dir, tmp_path, marker).items():
        out = subprocess.run(["mnist-pipeline", "serve", "--model", str(folder), "--port", str(free_port())],
                             cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 1, (layout, out.stderr)
        assert "would run code it carries" in out.stderr and "--allow-pickle" in out.stderr, layout
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not marker.exists(), f"{layout}: the model's code ran"


def test_a_registered_version_that_would_run_code_is_refused_and_predict_loads_only_its_onnx(
    onnx_model_dir, tmp_path, monkeypatch
):
    """A version registered by anyone with write access, `champion` moved to it: serve refuses it; predict reads
    its ONNX file alone, so its pickle never runs."""
    marker = tmp_path / "payload-ran"
    folder = malicious_copies(onnx_model_dir, tmp_path, marker)["pickled-python-model"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        mlflow.set_experiment("shared-registry")  # this store's own, whatever another test set before
        with mlflow.start_run():
            mlflow.log_artifacts(str(folder), "evil")
            source = mlflow.get_artifact_uri("evil")
        client = MlflowClient()
        client.create_registered_model("shared")
        version = client.create_model_version("shared", source=source).version
        client.set_registered_model_alias("shared", "champion", version)
        with pytest.raises(PipelineError, match="would run code it carries"):
            loader.fetch_model("models:/shared@champion", loader="python_function")
        logits = loader.load_model("models:/shared@champion")(np.zeros((2, 1, 28, 28), np.float32))
        assert logits.shape == (2, 10)
    finally:
        mlflow.set_tracking_uri(None)
    assert not marker.exists(), "the registered model's pickle ran"


@pytest.fixture(scope="module")
def server(onnx_model_dir, tmp_path_factory):
    """`mnist-pipeline serve --model <folder>` on a free port; yields (process, base URL)."""
    port = free_port()
    cwd = tmp_path_factory.mktemp("serve")
    process = subprocess.Popen(["mnist-pipeline", "serve", "--model", str(onnx_model_dir), "--port", str(port)],
                               cwd=cwd, env=user_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/ping")
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(f"{url}/invocations", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def strict_json(data: bytes):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)


def digits(n: int) -> list:
    return np.random.default_rng(1).random((n, 1, 28, 28)).astype(np.float32).tolist()


def test_good_digits_are_predicted(server):
    _, url = server
    status, body = post(url, json.dumps({"inputs": digits(3)}).encode())
    assert status == 200
    assert np.array(strict_json(body)["predictions"]["logits"]).shape == (3, 10)


def closed_by_server(connections: list[socket.socket], within_s: float = 60) -> list[bool]:
    """For each connection, whether the server closed it (its stream ended) before ``within_s``, far beyond any
    stated timeout: each read returns as soon as the server closes."""
    deadline, closed = time.monotonic() + within_s, []
    for connection in connections:
        try:
            while True:
                connection.settimeout(max(0.1, deadline - time.monotonic()))
                if not connection.recv(4096):
                    break
            closed.append(True)
        except ConnectionResetError:
            closed.append(True)
        except TimeoutError:
            closed.append(False)
    return closed


def trickling(
    port: int, data: bytes, stop: threading.Event, first: bytes = b""
) -> tuple[socket.socket, threading.Thread]:
    """A connection that sends ``first`` at once, then ``data`` one byte every 0.2 s until ``stop`` or the server
    closes it."""
    connection = socket.create_connection(("127.0.0.1", port))
    connection.send(first)

    def send():
        for byte in data:
            try:
                connection.send(bytes([byte]))
            except OSError:
                return
            if stop.wait(0.2):
                return

    sender = threading.Thread(target=send)
    sender.start()
    return connection, sender


def test_connections_without_a_whole_request_head_are_closed_by_its_deadline(server):
    """A connection kept alive after its answer, one sending its head a byte at a time, and silent ones: each is
    closed HEAD_TIMEOUT_S after it opened or after its last answer; meanwhile a request is answered."""
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    kept.request("GET", "/ping")
    answer = kept.getresponse()
    assert answer.status == 200 and answer.read() is not None
    stop = threading.Event()
    head_trickler, sender = trickling(
        port, b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 10_000, stop
    )
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        assert post(url, json.dumps({"inputs": digits(1)}).encode())[0] == 200
        closed = closed_by_server([kept.sock, head_trickler, *silent])
        assert closed[0], "the kept-alive connection was not closed"
        assert closed[1], "the connection sending its head a byte at a time was not closed"
        assert all(closed[2:]), f"{closed[2:].count(False)} silent connections were not closed"
    finally:
        stop.set()
        sender.join()
        for connection in (head_trickler, *silent):
            connection.close()
        kept.close()


@pytest.mark.slow  # waits for the whole request's deadline: 20 s
def test_a_body_sent_a_byte_at_a_time_is_closed_by_the_whole_requests_deadline(server):
    """A whole head at once, then its body a byte every 0.2 s: closed REQUEST_TIMEOUT_S after the connection
    opened. Before, a body had no deadline."""
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    head = b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 100000\r\n\r\n"
    stop = threading.Event()
    body_trickler, sender = trickling(port, b"[" * 100_000, stop, first=head)
    try:
        assert closed_by_server([body_trickler]) == [True], (
            "the connection sending its body a byte at a time was not closed"
        )
    finally:
        stop.set()
        sender.join()
        body_trickler.close()


def test_a_client_reopening_connections_without_end_cannot_keep_another_from_its_answers(server):
    """One client opens a connection every few milliseconds and never sends a byte (twice MAX_CONNECTIONS open at
    a time, the oldest closed as each new one opens); meanwhile each of another client's requests is answered: the
    connection that waited longest for its request is closed to make room. Before, every request got 503."""
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    stop, opened = threading.Event(), []

    def flood():
        while not stop.is_set():
            opened.append(socket.create_connection(("127.0.0.1", port)))
            if len(opened) > 2 * serve.MAX_CONNECTIONS:
                opened.pop(0).close()
            stop.wait(0.005)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        while len(opened) <= serve.MAX_CONNECTIONS:  # the server is full before the first request
            stop.wait(0.01)
        statuses = [post(url, json.dumps({"inputs": digits(1)}).encode())[0] for _ in range(20)]
    finally:
        stop.set()
        flooder.join()
        for connection in opened:
            connection.close()
    assert statuses == [200] * 20


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (json.dumps({"inputs": digits(1)}).encode(), {"Host": "evil.example"}, 400, "Invalid host header"),
        # a 17 MiB body announced: refused from its headers (the client may send the rest into a closed socket)
        (b"[" * 2**10, {"Content-Length": str(17 * 2**20)}, 413, "larger than"),
        (json.dumps({"inputs": [[[[float("nan")] * 28] * 28]]}).encode(), {}, 400, "NaN or infinite"),
        (json.dumps({"inputs": [[[[1e39] * 28] * 28]]}).encode(), {}, 400, "outside [0, 1]"),
        (b"[" * 200_000 + b"]" * 200_000, {}, 400, "nested too deeply"),
        (json.dumps({"inputs": np.zeros((3, 3000)).tolist()}).encode(), {}, 400, "shape (3, 3000)"),
        (json.dumps({"dataframe_split": {"data": [[1]]}}).encode(), {}, 400, "expected a JSON object"),
        (b"a,b\n1,2\n", {"Content-Type": "text/csv"}, 415, "send JSON"),
    ],
    ids=["forged-host", "huge-body", "nan", "beyond-float32", "deep-nesting", "wrong-shape", "other-format", "csv"],
)
def test_hostile_requests_get_one_line_that_never_echoes_the_input(server, body, headers, status, says):
    process, url = server
    got, answer = post(url, body, headers)
    assert got == status, answer[:300]
    assert says in answer.decode(), answer[:300]
    assert len(answer) < 400  # one line of reason, not the input
    assert b"\n" not in answer.strip()
    assert process.poll() is None  # the server is still up


def test_serve_ended_by_sighup_frees_its_port(onnx_model_dir, tmp_path):
    """A closed terminal or a dropped SSH session sends SIGHUP: the server goes with it."""
    port = free_port()
    process = subprocess.Popen(["mnist-pipeline", "serve", "--model", str(onnx_model_dir), "--port", str(port)],
                               cwd=tmp_path, env=user_env(), stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/ping")
        process.send_signal(signal.SIGHUP)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGHUP, err
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)


def test_the_exported_model_passes_both_loaders_checks(onnx_model_dir):
    assert loader.fetch_model(str(onnx_model_dir), loader="python_function") == onnx_model_dir
    assert loader.fetch_model(str(onnx_model_dir)) == onnx_model_dir


def test_the_served_session_keeps_no_memory_arena_and_answers_as_before(onnx_model_dir):
    """onnxruntime's CPU arena keeps what its largest runs took (870 MB after 16 requests of 700 digits at once,
    measured): the served model's session has none, and answers the same."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(onnx_model_dir))
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    before = model.predict(x)
    serve._without_memory_arena(model, onnx_model_dir)
    assert model._model_impl.rt.get_session_options().enable_cpu_mem_arena is False
    after = model.predict(x)
    np.testing.assert_array_equal(np.asarray(after["logits"]), np.asarray(before["logits"]))
