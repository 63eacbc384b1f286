"""Faults injected into real pipelines: Ctrl-C, SIGTERM, kill -9, a tracking server that is down or dies mid-run,
corrupt data. Each test checks that nothing is lost, nothing is left half-done, and that the user is told plainly
what happened and what to do. (Concurrent experiments and a full disk: test_pipeline.py.)"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from mnist_pipeline.ml import resume
from tests.helpers import free_port, make_repo, ran_stages, run, serving, trickle, user_env

pytestmark = pytest.mark.e2e

STATE = Path("models/resume/train_state.pt")
LONG = {"epochs": 30}  # long enough to interrupt in the middle; a few seconds on synthetic data


def start_repro(repo: Path, mirror: str, **env: str) -> subprocess.Popen:
    """`dvc repro` in a process group of its own, as a terminal runs it: a signal can reach all of it at once."""
    return subprocess.Popen(["dvc", "repro"], cwd=repo, env=user_env(MNIST_MIRROR=mirror, **env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def wait_for_epochs(repo: Path, proc: subprocess.Popen, epochs: int, limit_s: float = 180) -> None:
    """Until the train stage has saved the state of at least ``epochs`` epochs."""
    deadline = time.monotonic() + limit_s
    while True:
        state = resume.load(repo / STATE)
        if state is not None and len(state["history"]) >= epochs:
            return
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not get going"
        time.sleep(0.05)


def store(repo: Path, uri: str | None = None) -> MlflowClient:
    return MlflowClient(uri or f"sqlite:///{repo}/mlruns/mlflow.db")


def pipeline_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("mnist-pipeline")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def the_run(client: MlflowClient):
    (only,) = pipeline_runs(client)
    return only


def logged_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "test_accuracy"))


# --- interruption and resume -----------------------------------------------------------------------------


def interrupt(repo: Path, mirror: str, sig: signal.Signals, after_epochs: int) -> str:
    """Start `dvc repro`, let the train stage save ``after_epochs`` more epochs, send ``sig`` to the whole
    process group (as Ctrl-C or a job scheduler does); return its stderr."""
    before = len((resume.load(repo / STATE) or {"history": []})["history"])
    proc = start_repro(repo, mirror)
    wait_for_epochs(repo, proc, before + after_epochs)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    return err


@pytest.mark.slow  # three interrupted pipelines
def test_interrupted_three_ways_the_pipeline_still_finishes_with_every_epoch_logged_once(tmp_path, http_mirror,
                                                                                         mirror_md5):  # fmt: skip
    """Ctrl-C, then SIGTERM, then kill -9, each in the middle of training; each rerun continues from the last
    saved epoch; the fourth `dvc repro` finishes. Nothing is recorded in MLflow before the pipeline is complete;
    then one run with every epoch logged exactly once, and one registered version."""
    repo = make_repo(tmp_path, mirror_md5, train=LONG)
    client = store(repo)
    saved = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        err = interrupt(repo, http_mirror, sig, after_epochs=2)
        assert f"interrupted ({sig.name})" in err and "`dvc repro` continues from it" in err
        assert "Traceback" not in err
        if saved:
            assert f"resuming after epoch {saved}/{LONG['epochs']}" in err
        saved_now = len(resume.load(repo / STATE)["history"])  # the last good checkpoint
        assert saved + 2 <= saved_now < LONG["epochs"]
        assert pipeline_runs(client) == [] and client.search_registered_models() == []  # nothing recorded yet
        saved = saved_now

    interrupt(repo, http_mirror, signal.SIGKILL, after_epochs=2)  # nothing can be cleaned up

    again = run(repo, http_mirror, "dvc", "repro")
    assert again.returncode == 0, again.stdout + again.stderr
    assert ran_stages(again) == ["train", "evaluate", "export"] and "resuming after epoch" in again.stderr
    finished = the_run(client)  # the one run, with the whole training
    assert finished.info.status == "FINISHED"
    assert logged_steps(client, finished.info.run_id) == list(range(1, LONG["epochs"] + 1))
    assert [int(v.version) for v in client.search_model_versions("name='mnist-cnn'")] == [1]
    assert not (repo / STATE).exists()
    assert run(repo, http_mirror, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


# --- the tracking server ---------------------------------------------------------------------------------


def test_a_tracking_server_that_does_not_answer_stops_the_pipeline_before_training(tmp_path, http_mirror,
                                                                                   mirror_md5):  # fmt: skip
    repo = make_repo(tmp_path, mirror_md5)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = run(repo, http_mirror, "dvc", "repro", MLFLOW_TRACKING_URI=uri)
    assert out.returncode != 0 and ran_stages(out) == ["params", "download", "train"]
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: the MLflow tracking server {uri} does not answer (")
    assert "check that it is running" in line and "Traceback" not in out.stderr
    assert "epoch 1" not in out.stderr  # before any training
    assert not (repo / "models").exists()  # nothing trained or written but the params check
    assert [p.name for p in (repo / "reports").iterdir()] == ["params_checked.txt"]


class Relay:
    """A TCP relay on 127.0.0.1 in front of a real server. `cut` makes the server vanish for its clients
    (connections dropped, new ones refused), `restore` brings it back on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.sockets: list[socket.socket] = []
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        for s in [self.listener, *self.sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.slow  # a real server and a relay
def test_a_tracking_server_lost_mid_run_keeps_the_training_and_the_next_repro_records_it(
    tmp_path, http_mirror, mirror_md5, mlflow_server
):
    """The server answers when the pipeline starts and is gone by the time the export stage records the run: the
    stage fails in one line naming it; once it is back, `dvc repro` runs the export stage alone (no training)."""
    relay = Relay(int(mlflow_server.rsplit(":", 1)[1]))
    repo = make_repo(tmp_path, mirror_md5, train={**LONG, "seed": 7}, export={"model_name": "outage-test"})
    proc = start_repro(repo, http_mirror, MLFLOW_TRACKING_URI=relay.url)
    wait_for_epochs(repo, proc, 3)
    relay.cut()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: the MLflow tracking server {relay.url} does not answer (")
    assert (repo / "models" / "model.pt").exists() and (repo / "models" / "training.json").exists()

    relay.restore()
    again = run(repo, http_mirror, "dvc", "repro", MLFLOW_TRACKING_URI=relay.url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert ran_stages(again) == ["export"]  # not trained again
    client = store(repo, mlflow_server)
    run_id = json.loads((repo / "reports/last_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert logged_steps(client, run_id) == list(range(1, LONG["epochs"] + 1))  # every epoch, once
    assert client.get_model_version_by_alias("outage-test", "champion").run_id == run_id


# --- corrupt data ----------------------------------------------------------------------------------------


@pytest.mark.slow  # two pipelines: the default suite's budget
def test_a_flipped_byte_in_the_data_is_caught_before_training_and_repro_restores_the_file(tmp_path, http_mirror,
                                                                                          mirror_md5):  # fmt: skip
    repo = make_repo(tmp_path, mirror_md5)
    assert run(repo, http_mirror, "dvc", "repro", "download").returncode == 0
    images = repo / "data/raw/train-images-idx3-ubyte"
    good = images.read_bytes()
    flipped = bytearray(good)
    flipped[1234] ^= 0x10
    images.write_bytes(bytes(flipped))

    alone = run(repo, http_mirror, "dvc", "repro", "--single-item", "train")  # the train stage on this data
    assert alone.returncode != 0 and "Traceback" not in alone.stderr
    assert "error: data/raw/train-images-idx3-ubyte is corrupt or was changed after download" in alone.stderr
    assert "`dvc checkout data/raw`" in alone.stderr and "epoch 1" not in alone.stderr
    assert not (repo / "models").exists() and not (repo / "mlruns/mlflow.db").exists()

    assert "modified" in run(repo, http_mirror, "dvc", "status").stdout  # DVC sees it too
    healed = run(repo, http_mirror, "dvc", "repro", "download")  # its output changed, so DVC restores it
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert "Stage 'download' is cached - skipping run, checking out outputs" in healed.stdout  # from DVC's cache
    assert images.read_bytes() == good


@pytest.mark.slow  # two pipelines: the default suite's budget
def test_a_data_file_whose_header_lies_stops_the_download_stage_and_keeps_the_model(tmp_path, mirror_dir,
                                                                                   mirror_md5):  # fmt: skip
    """An IDX header declaring 2**31 x 2**31 x 4 images (the product wraps to 0 in int64), its checksum given in
    params.yaml as a data set of one's own would: the download stage refuses it in one line, so the train stage never
    starts and DVC never clears the model it made before."""
    repo = make_repo(tmp_path, mirror_md5)
    assert run(repo, str(mirror_dir), "dvc", "repro", "train").returncode == 0
    model = (repo / "models/model.pt").read_bytes()

    hostile = tmp_path / "hostile"
    shutil.copytree(mirror_dir, hostile)
    absurd = b"\x00\x00\x08\x03" + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big")
    (hostile / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(absurd, mtime=0))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["expected_md5"]["t10k-images-idx3-ubyte"] = hashlib.md5(absurd).hexdigest()
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    refused = run(repo, str(hostile), "dvc", "repro", "train")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert (
        "IDX header says 2147483648x2147483648x4 (18,446,744,073,709,551,632 bytes) but the file has 16"
        in refused.stderr
    )
    assert "train" not in ran_stages(refused)
    assert (repo / "models/model.pt").read_bytes() == model


# --- kill -9 at the worst moments of the export stage ------------------------------------------------------


def repro_killed_at(repo: Path, mirror: str, trigger: str) -> str:
    """`dvc repro`, killed outright (SIGKILL to every process of it) the moment its output shows ``trigger``."""
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=user_env(MNIST_MIRROR=mirror), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if trigger in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    proc.wait(timeout=60)
    output = "".join(seen)
    assert trigger in output, output
    return output


def what_a_kill_left(client: MlflowClient) -> dict[str, bool]:
    """What the store holds half-done after a kill, read as the next `dvc repro` will find it."""
    versions = client.search_model_versions("name='mnist-cnn'")
    return {
        GONE: any(r.info.status == "RUNNING" for r in pipeline_runs(client)),
        HALF: any("pipeline.registering" in v.tags or "promotion" not in v.tags for v in versions),
    }


GONE = "left RUNNING by a process that is gone: ended as KILLED"
HALF = "left half-registered: deleted"


@pytest.mark.slow  # three killed pipelines
def test_killed_at_any_moment_of_export_the_next_repro_leaves_the_registry_whole(tmp_path, http_mirror, mirror_md5):
    """kill -9 of the whole pipeline before, during and right after registering: each following `dvc repro`
    repairs what the last one left (a RUNNING run, a PENDING logged model, a half-registered version), runs the
    export stage again (DVC's run cache may not skip it), and in the end the registry, the run and
    reports/last_run.json agree.

    The kill lands a moment after its line is read, and the stage goes on meanwhile: right after "registered" it
    ends its run and DVC records the stage, so a busy machine may see both done before the kill. The test reads
    what each kill left, as the next repro will find it, and holds that repro to repairing exactly that."""
    repo = make_repo(tmp_path, mirror_md5)
    client = store(repo)
    moments = [
        "ONNX parity on",  # in evaluate: the export stage has not opened the store
        "registering mnist-cnn version",  # the version has just been created: no tags, no aliases
        "registered mnist-cnn version",  # registered with its aliases; reports/last_run.json not written
    ]
    outputs, left = [], []
    for moment in moments:
        outputs.append(repro_killed_at(repo, http_mirror, moment))
        left.append(what_a_kill_left(client))
    assert left[0] == {GONE: False, HALF: False}  # nothing half-done before export
    assert left[1][GONE]  # killed inside the run (half-registered too, unless registration outran the kill)
    assert not left[2][HALF]  # killed after the version was whole
    for found, output in zip(left[:2], outputs[1:], strict=True):  # what the next repro, killed in turn, repaired
        assert all((line in output) == found[line] for line in (GONE, HALF)), (found, output)

    # The last kill may even land after DVC recorded the finished stage in dvc.lock: then nothing is left to do.
    export_recorded = "export" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    final = run(repo, http_mirror, "dvc", "repro")
    assert final.returncode == 0, final.stdout + final.stderr
    assert (GONE in final.stderr) == left[2][GONE] and HALF not in final.stderr  # registered whole, then killed
    assert ran_stages(final) == ([] if export_recorded else ["export"])
    assert "is cached - skipping run" not in final.stdout
    report = json.loads((repo / "reports/last_run.json").read_text())
    pipeline_run = client.get_run(report["run_id"])
    assert pipeline_run.info.status == "FINISHED"  # the killed exports' runs: ended, none left RUNNING
    assert all(
        r.info.status in ("KILLED", "FAILED") for r in pipeline_runs(client) if r.info.run_id != report["run_id"]
    )
    experiment = pipeline_run.info.experiment_id
    assert all(m.status != LoggedModelStatus.PENDING for m in client.search_logged_models([experiment]))
    versions = client.search_model_versions("name='mnist-cnn'")
    assert versions and all("pipeline.registering" not in v.tags and "promotion" in v.tags for v in versions)
    report = json.loads((repo / "reports/last_run.json").read_text())["registered"]
    candidate = client.get_model_version_by_alias("mnist-cnn", "candidate")
    assert int(candidate.version) == report["version"] == max(int(v.version) for v in versions)
    assert candidate.run_id == pipeline_run.info.run_id
    assert run(repo, http_mirror, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."

    # Back to deps the export stage has run with before: DVC's run cache would bring back that run's report
    # and skip the registration, leaving `candidate` on the version in between.
    params_file = repo / "params.yaml"
    before = params_file.read_text()
    params_file.write_text(before.replace("promote_min_delta: 0.0", "promote_min_delta: 0.5"))
    assert ran_stages(run(repo, http_mirror, "dvc", "repro")) == ["params", "export"]
    params_file.write_text(before)
    back = run(repo, http_mirror, "dvc", "repro")
    assert ran_stages(back) == ["params", "export"] and "skipping run" not in back.stdout
    report = json.loads((repo / "reports/last_run.json").read_text())["registered"]
    assert int(client.get_model_version_by_alias("mnist-cnn", "candidate").version) == report["version"]


# --- a tracking server that trickles -----------------------------------------------------------------------


class _HealthyThenTrickling(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers /health and the pipeline's own login check (urllib's requests: as a server
    without the experiment yet) at once, and every other request (MLflow's client's) one byte every 0.2 s."""

    def do_GET(self):
        if self.path.startswith("/health"):
            self._answer(200, b"OK")
        elif self.headers.get("User-Agent", "").startswith("Python-urllib"):
            self._answer(404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}')
        else:
            self._trickle()

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PATCH = do_DELETE = do_GET
    trickling = threading.Event()  # set when a client is waiting on a trickle

    def _trickle(self):
        type(self).trickling.set()
        trickle(self.wfile, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"a" * 5000)

    def log_message(self, *args):
        pass


@pytest.fixture
def trickling_server():
    with serving(_HealthyThenTrickling) as url:
        yield url


@pytest.mark.slow  # waits out a deadline
def test_a_tracking_server_that_trickles_ends_the_export_in_one_line_and_sigterm_stops_it(
    tmp_path, http_mirror, mirror_md5, trickling_server
):
    """MLflow bounds each wait for data, not a whole answer: a server that sends a byte every 0.2 s held a stage
    for over 10 minutes, deaf to SIGTERM. The export stage's exchange now has a deadline as a whole."""
    repo = make_repo(tmp_path, mirror_md5)
    out = run(repo, http_mirror, "dvc", "repro", MLFLOW_TRACKING_URI=trickling_server, MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    assert out.returncode != 0 and ran_stages(out)[-1] == "export" and "Traceback" not in out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: the MLflow tracking server {trickling_server} did not answer within 3 s")

    # With the default deadline (minutes), SIGTERM while the export stage waits on the server stops it.
    _HealthyThenTrickling.trickling.clear()
    proc = start_repro(repo, http_mirror, MLFLOW_TRACKING_URI=trickling_server)
    assert _HealthyThenTrickling.trickling.wait(timeout=300), proc.communicate()  # the export stage waits on it
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "interrupted (SIGTERM)" in err


# --- a full disk while the export stage records the run ----------------------------------------------------


def in_namespace_with_small_disk(repo: Path, folder: Path, size_kb: int, command: str, mirror: str):
    """``command`` in ``repo`` with a tmpfs of ``size_kb`` mounted on ``folder`` (a user and mount namespace of its
    own: no privilege needed, nothing left mounted)."""
    script = f"mount -t tmpfs -o size={size_kb}k tmpfs '{folder}' && {command}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=repo, env=user_env(MNIST_MIRROR=mirror),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow  # two pipelines on a tmpfs
@pytest.mark.parametrize("moment", ["first artifact", "logged model"])
def test_a_full_disk_during_export_is_one_line_and_leaves_nothing_running_or_pending(
    tmp_path, http_mirror, mirror_md5, moment
):
    repo = make_repo(tmp_path, mirror_md5)
    assert run(repo, http_mirror, "dvc", "repro", "evaluate").returncode == 0
    artifacts = repo / "mlruns" / "mnist-pipeline"  # where the store keeps the experiment's artifacts
    artifacts.mkdir(parents=True)
    probe = in_namespace_with_small_disk(repo, artifacts, 8, "true", http_mirror)
    if probe.returncode != 0:
        pytest.skip(f"no small filesystem here (unshare -rm, mount -t tmpfs: {probe.stderr.strip()[:200]})")
    # Room for nothing, or for the figures and the exported files but not the logged model beside them.
    logged_first = [*(repo / "reports").glob("*.png"), *(repo / "reports").glob("*.csv"), repo / "reports/per_class.md"]
    size_kb = 8 if moment == "first artifact" else sum(p.stat().st_size for p in logged_first) // 1024 + 64
    out = in_namespace_with_small_disk(repo, artifacts, size_kb, "dvc repro", http_mirror)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: cannot write ") and "No space left on device" in line, line
    assert f"in {artifacts}/" in line and "MB free there, the run's artifacts need about" in line
    assert float(line.split("; ")[1].split(" MB free")[0]) < size_kb / 1000 and "nothing was registered" in line
    client = store(repo)
    assert [r.info.status for r in pipeline_runs(client)] == ["FAILED"]
    experiment = client.get_experiment_by_name("mnist-pipeline").experiment_id
    assert all(m.status != LoggedModelStatus.PENDING for m in client.search_logged_models([experiment]))
    assert client.search_registered_models() == []


@pytest.mark.slow  # six export reruns beside a loop
def test_the_repair_on_opening_the_store_never_touches_a_live_run(tmp_path, http_mirror, mirror_md5):
    """`compare` (which repairs the store when it opens it) in a loop beside six export-only reruns: before, the
    repair marked the live run KILLED and its model FAILED in three of them."""
    repo = make_repo(tmp_path, mirror_md5)
    assert run(repo, http_mirror, "dvc", "repro").returncode == 0
    stop, repairs = threading.Event(), []

    def compare_in_a_loop():
        while not stop.is_set():
            out = run(repo, http_mirror, "mnist-pipeline", "compare")
            repairs.extend(line for line in out.stderr.splitlines() if "repaired" in line)

    looping = threading.Thread(target=compare_in_a_loop)
    looping.start()
    try:
        for _ in range(6):
            rerun = run(repo, http_mirror, "dvc", "repro", "-f", "-s", "export")
            assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    finally:
        stop.set()
        looping.join()
    client = store(repo)
    assert repairs == []
    assert [r.info.status for r in pipeline_runs(client)] == ["FINISHED"] * 7
    experiment = client.get_experiment_by_name("mnist-pipeline").experiment_id
    assert {m.status for m in client.search_logged_models([experiment])} == {LoggedModelStatus.READY}
