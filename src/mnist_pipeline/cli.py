"""The ``mnist-pipeline`` command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mnist_pipeline.errors import run_main

ALLOW_PICKLE_HELP = "also load an MLflow model stored with pickle (it can run any code: only if you trust it)"


def _ui(args: argparse.Namespace) -> None:
    from mnist_pipeline import store

    uri = store.tracking_uri()
    _warn_if_exposed(
        args.host, args.port, "the MLflow UI (every run, metric, artifact and model, readable and changeable)"
    )
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri}", file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]  # fmt: skip
    sys.exit(run_server(cmd))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _warn_if_exposed(host: str, port: int, what: str) -> None:
    """One line when a server is about to listen beyond this machine."""
    if host not in LOOPBACK and not host.startswith("127."):
        print(f"warning: --host {host} makes {what} reachable on port {port} from every network this machine is "
              "on, without a login; keep the default 127.0.0.1 and reach it through an SSH tunnel "
              f"(ssh -L {port}:127.0.0.1:{port} <this machine>) or a reverse proxy with authentication",
              file=sys.stderr)  # fmt: skip


def run_server(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a server command in a process group of its own until it ends; return its exit status.

    MLflow's servers start workers and job runners of their own; stopping only the first process would leave them
    listening. Ctrl-C or SIGTERM sent to this command (run_main turns both into KeyboardInterrupt) is passed on to
    the whole group, which is waited for, and killed if it has not stopped within ``STOP_GRACE_S``.
    """
    import signal

    from mnist_pipeline.errors import interrupts_held

    server = None
    try:
        with interrupts_held():  # a signal while the child starts is acted on once there is a group to stop
            server = subprocess.Popen(cmd, env=env, start_new_session=True)
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


STOP_GRACE_S = 10


def _stop_group(pgid: int, sig) -> None:
    import os

    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _store(args: argparse.Namespace) -> None:
    from mnist_pipeline import store

    print(store.tracking_uri())


def _predict(args: argparse.Namespace) -> None:
    from mnist_pipeline import predict

    sys.exit(predict.main(args.inputs, args.model, args.json, args.top_k, args.allow_pickle))


def _compare(args: argparse.Namespace) -> None:
    from mnist_pipeline import compare

    compare.main(args.last, args.sort, args.format)


def _reproduce(args: argparse.Namespace) -> None:
    from mnist_pipeline import reproduce

    sys.exit(reproduce.main(args.run_id))


def _serve(args: argparse.Namespace) -> None:
    import os

    from mnist_pipeline import predict, registry, store

    env = {**os.environ, "MLFLOW_TRACKING_URI": store.configure()}
    args.model = args.model or predict.champion()
    registry.fetch_model(args.model, args.allow_pickle)  # refuses a pickled model before anything listens
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model, "--env-manager", "local",
           "--host", args.host, "--port", str(args.port)]  # fmt: skip
    _warn_if_exposed(args.host, args.port, f"the model {args.model} (anyone can send it requests)")
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations", file=sys.stderr)
    sys.exit(run_server(cmd, env))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ui = commands.add_parser("ui", help="open the MLflow UI on the project's store (bound to 127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_ui)
    predict = commands.add_parser("predict", help="predict the digit in images, .npy arrays or IDX files")
    predict.add_argument("inputs", nargs="+", type=Path, help="PNG/JPEG/... images, .npy arrays, IDX files")
    predict.add_argument(
        "--model",
        help="a registry URI, version number or run id, or a local .onnx / TorchScript file "
        "(default: the champion, models:/<export.model_name>@champion)",
    )
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--top-k", type=int, default=1, help="show the K most likely digits")
    predict.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    predict.set_defaults(func=_predict)
    serve = commands.add_parser("serve", help="serve a registered model over REST with `mlflow models serve`")
    serve.add_argument("--model", help="an MLflow model URI (default: models:/<export.model_name>@champion)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    serve.set_defaults(func=_serve)
    compare = commands.add_parser(
        "compare", help="the experiment's runs as a table: differing params, metrics, versions"
    )
    compare.add_argument("--last", type=int, help="only the N most recent runs")
    compare.add_argument("--sort", default="test_accuracy", help="test_accuracy (default) | test_loss | train_seconds")
    output = compare.add_mutually_exclusive_group()
    output.add_argument("--csv", dest="format", action="store_const", const="csv")
    output.add_argument("--markdown", dest="format", action="store_const", const="markdown")
    compare.set_defaults(func=_compare, format="text")
    reproduce = commands.add_parser("reproduce", help="rerun a past MLflow run's code and params as a DVC experiment")
    reproduce.add_argument(
        "run_id", help="an MLflow run id, a unique prefix of one (as `compare` prints them) or a DVC experiment name"
    )
    reproduce.set_defaults(func=_reproduce)
    store = commands.add_parser("store", help="print the MLflow tracking URI the pipeline logs to")
    store.set_defaults(func=_store)
    bench = commands.add_parser(
        "bench", help="benchmark the pipeline's training against the classic tutorial", add_help=False
    )
    bench.set_defaults(func=None)
    return parser


def main() -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args()
    if args.command == "bench":
        from mnist_pipeline import bench as benchmark

        run_main(lambda: benchmark.main(rest))
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    run_main(lambda: args.func(args))


if __name__ == "__main__":
    main()
