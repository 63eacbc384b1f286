"""`mnist-pipeline ui` and `serve` start MLflow servers, which start processes of their own: stopping the command
stops all of them, and a server about to listen beyond this machine says so."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, user_env, wait_until_up

pytestmark = pytest.mark.e2e  # real MLflow servers


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table, found, frontier = processes(), set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies, which hold no port, excepted)."""
    return {pid for pid, (_, state) in processes().items() if pid in pids and state != "Z"}


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# SIGTERM: what a process manager or `kill <pid>` sends (Ctrl-C takes the same path); SIGHUP: a closed terminal or a
# dropped SSH session.
@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),  # as SIGHUP
        pytest.param(signal.SIGHUP, id="SIGHUP"),
    ],
)
def test_ui_stopped_by_its_pid_leaves_no_server_behind(tmp_path, sig):
    (tmp_path / "mlruns").mkdir()
    port = free_port()
    ui = subprocess.Popen(["mnist-pipeline", "ui", "--port", str(port)], cwd=tmp_path, env=user_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until_up(ui, f"http://127.0.0.1:{port}/health")
        server = descendants(ui.pid)
        assert len(server) > 1  # MLflow's server and the workers it started
        os.kill(ui.pid, sig)
        _, err = ui.communicate(timeout=60)
    finally:
        if ui.poll() is None:
            ui.kill()
    assert ui.returncode == 128 + sig and f"interrupted ({sig.name})" in err
    # the only address it shows opens the model-training view (the server's own bare one opens the GenAI home)
    assert all("workflowType=machine_learning" in url for url in re.findall(r"http://\S+", err)), err
    deadline = time.monotonic() + 30  # the group is gone when the command returns; the kernel may lag (busy machine)
    while (port_open(port) or alive(server)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_open(port), "the port still answers"
    assert not alive(server), "processes of the server are left"


def test_a_host_beyond_this_machine_gets_one_line_of_warning(tmp_path):
    (tmp_path / "mlruns").mkdir()
    port = free_port()
    ui = subprocess.Popen(["mnist-pipeline", "ui", "--host", "0.0.0.0", "--port", str(port)], cwd=tmp_path,
                          env=user_env(), stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        first = ui.stderr.readline()
    finally:
        os.kill(ui.pid, signal.SIGTERM)
        try:
            ui.communicate(timeout=60)
        finally:
            for pid in alive(descendants(ui.pid) | {ui.pid}):  # a command that did not stop leaves nothing either
                os.kill(pid, signal.SIGKILL)
    assert first.startswith("warning: --host 0.0.0.0 makes the MLflow UI") and "127.0.0.1" in first


@pytest.mark.parametrize("command", [["ui"], ["serve", "--model", "models/model.onnx"]])
def test_a_port_another_program_holds_ends_the_command_in_one_line_before_any_address(tmp_path, command):
    (tmp_path / "mlruns").mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(["mnist-pipeline", *command, "--port", str(port)], cwd=tmp_path, env=user_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}:") and done.stderr.count("\n") == 1
