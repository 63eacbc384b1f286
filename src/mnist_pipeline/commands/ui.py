"""`mnist-pipeline ui`: MLflow's UI on the project's store, stopped with everything it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError, interrupts_held

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STOP_GRACE_S = 10


def main(host: str, port: int) -> None:
    import mlflow

    from mnist_pipeline.tracking import store

    bind(host, port).close()  # a port another program holds: one line now, before any address is printed
    uri = store.configure(writes=False)  # a moved store is pointed at its folder; a read-only one read via a copy
    warn_if_exposed(host, port, "the MLflow UI (every run, metric, artifact and model, readable and changeable)")
    opened = address(host, port, mlflow.get_experiment_by_name(names.EXPERIMENT))
    print(f"MLflow UI on {opened} for {uri}", file=sys.stderr)

    def ours(line: str) -> str:  # the server's own address opens MLflow's GenAI home: name the page to open instead
        return f"MLflow UI ready: {opened}\n" if "Uvicorn running on" in line else line

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # MLflow's server imports a module Starlette deprecates, and each worker says so: nothing for users to act on.
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated"}
    sys.exit(run_server(cmd, quiet, ours))


def address(host: str, port: int, experiment) -> str:
    """The page of the experiment's runs in the model-training view, with the pipeline's shared view of the runs
    table when the experiment has it (`runs.RUNS_VIEW_KEY`: best run first, the figures that tell runs apart).
    MLflow's UI opens in its GenAI view unless the route's own query asks for the other
    (``#/...?workflowType=machine_learning``; a query before the ``#`` is not read)."""
    from mnist_pipeline.tracking import runs

    if experiment is None:
        return page(host, port, "/")
    shared = f"&viewStateShareKey={runs.RUNS_VIEW_KEY}" if runs.RUNS_VIEW_TAG in experiment.tags else ""
    return page(host, port, f"/experiments/{experiment.experiment_id}/runs") + shared


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5000  # where `mnist-pipeline ui` listens unless told otherwise


def page(host: str, port: int, route: str) -> str:
    """A page of MLflow's UI, in the model-training view (see `address`)."""
    return f"http://{host}:{port}/#{route}?workflowType=machine_learning"


def compare_page(run_ids: list[str], experiment_id: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The UI's page comparing ``run_ids`` side by side."""
    import json
    from urllib.parse import quote

    query = f"runs={quote(json.dumps(run_ids))}&experiments={quote(json.dumps([experiment_id]))}"
    return page(host, port, "/compare-runs").replace("?", f"?{query}&", 1)


def version_page(name: str, version: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The UI's page of one registered version: its description (the model card), tags, aliases, schema."""
    return page(host, port, f"/models/{name}/versions/{version}")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as a server binds it (SO_REUSEADDR), or one line saying why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PipelineError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; another program may hold it: choose another --port"
        ) from None
    return sock


def warn_if_exposed(host: str, port: int, what: str) -> None:
    """One line when a server is about to listen beyond this machine."""
    if host not in LOOPBACK and not host.startswith("127."):
        print(
            f"warning: --host {host} makes {what} reachable on port {port} from every network this machine is "
            "on, without a login; keep the default 127.0.0.1 and reach it through an SSH tunnel "
            f"(ssh -L {port}:127.0.0.1:{port} <this machine>) or a reverse proxy with authentication",
            file=sys.stderr,
        )


def run_server(cmd: list[str], env: dict[str, str] | None = None, rewrite: Callable[[str], str] | None = None) -> int:
    """Run a server command in a process group of its own until it ends; return its exit status. ``rewrite``: each
    line the server prints (stdout and stderr), as it is to be shown.

    MLflow's servers start workers and job runners of their own; stopping only the first process would leave them
    listening. Ctrl-C or SIGTERM sent to this command (run_main turns both into KeyboardInterrupt) is passed on to
    the whole group, which is waited for, and killed if it has not stopped within ``STOP_GRACE_S``.
    """
    server = None
    try:
        piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if rewrite else {}
        with interrupts_held():  # a signal while the child starts is acted on once there is a group to stop
            server = subprocess.Popen(cmd, env=env, start_new_session=True, **piped)
        for line in server.stdout if rewrite else ():
            sys.stderr.write(rewrite(line))
            sys.stderr.flush()
        return server.wait()
    except KeyboardInterrupt:
        if server is not None:
            _stop_group(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            _stop_group(server.pid, signal.SIGKILL)  # whatever is left of the group, workers included
            server.wait()
        raise
    finally:
        if server is not None and server.poll() is None:  # an error of our own: leave nothing behind
            _stop_group(server.pid, signal.SIGKILL)
            server.wait()


def _stop_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
