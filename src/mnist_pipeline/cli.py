"""The ``mnist-pipeline`` command."""

from __future__ import annotations

import argparse
import subprocess
import sys

from mnist_pipeline.errors import run_main


def _ui(args: argparse.Namespace) -> None:
    from mnist_pipeline import tracking

    uri = tracking.tracking_uri()
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri}", file=sys.stderr)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    sys.exit(subprocess.call(cmd))


def _store(args: argparse.Namespace) -> None:
    from mnist_pipeline import tracking

    print(tracking.tracking_uri())


def main() -> None:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ui = commands.add_parser("ui", help="open the MLflow UI on the project's store (bound to 127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_ui)
    store = commands.add_parser("store", help="print the MLflow tracking URI the pipeline logs to")
    store.set_defaults(func=_store)
    bench = commands.add_parser(
        "bench", help="benchmark the pipeline's training against the classic tutorial", add_help=False
    )
    bench.set_defaults(func=None)
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
