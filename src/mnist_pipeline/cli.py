"""The ``mnist-pipeline`` command: what users run besides `dvc repro`."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

from mnist_pipeline.errors import run_main

ALLOW_PICKLE_HELP = "also load an MLflow model stored with pickle (it can run any code: only if you trust it)"


def _ui(args: argparse.Namespace) -> None:
    import os

    import mlflow

    from mnist_pipeline import names
    from mnist_pipeline.tracking import store

    uri = store.configure(writes=False)  # a moved store is pointed at its folder; a read-only one read via a copy
    _warn_if_exposed(
        args.host, args.port, "the MLflow UI (every run, metric, artifact and model, readable and changeable)"
    )
    experiment = mlflow.get_experiment_by_name(names.EXPERIMENT)
    where = f"#/experiments/{experiment.experiment_id}" if experiment else ""
    # MLflow's UI opens in its GenAI view unless the address asks for the model-training one (the browser then
    # remembers the choice).
    print(f"MLflow UI on http://{args.host}:{args.port}/?workflowType=machine_learning{where} for {uri}",
          file=sys.stderr)  # fmt: skip
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]  # fmt: skip
    # MLflow's server imports a module Starlette deprecates, and each worker says so: nothing for users to act on.
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated"}
    sys.exit(run_server(cmd, quiet))


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
    from mnist_pipeline.tracking import store

    print(store.tracking_uri())


def _predict(args: argparse.Namespace) -> None:
    from mnist_pipeline.commands import predict

    sys.exit(predict.main(args.inputs, args.model, args.json, args.top_k, args.allow_pickle))


def _compare(args: argparse.Namespace) -> None:
    from mnist_pipeline.commands import compare

    compare.main(args.last, args.sort, args.format)


def _reproduce(args: argparse.Namespace) -> None:
    from mnist_pipeline.commands import reproduce

    sys.exit(reproduce.main(args.run_id))


def _tune(args: argparse.Namespace) -> None:
    from mnist_pipeline.commands import tune

    options = tune.Options(params=args.params, space=args.space, sets=args.set, trials=args.trials,
                           timeout=args.timeout, jobs=args.jobs, storage=args.storage, study=args.study,
                           seed=args.seed, apply=args.apply)  # fmt: skip
    sys.exit(tune.main(options))


def _serve(args: argparse.Namespace) -> None:
    from mnist_pipeline.commands import predict
    from mnist_pipeline.commands import serve as serving
    from mnist_pipeline.tracking import store

    store.configure(writes=False)
    model = args.model or predict.champion()
    _warn_if_exposed(args.host, args.port, f"the model {model} (anyone can send it requests)")
    serving.serve(model, args.host, args.port, args.allow_pickle, args.allowed_hosts)


DESCRIPTION = """\
Use the MNIST pipeline's results: predict digits with a registered or exported model, compare the runs in MLflow,
reproduce a past run, open the MLflow UI, serve a model over REST, and benchmark the training. The pipeline itself
runs with `dvc repro` (download -> train -> evaluate -> export)."""

PREDICT_EXAMPLES = """\
examples:
  mnist-pipeline predict digit.png                             # the champion: models:/mnist-cnn@champion
  mnist-pipeline predict a.png b.png --top-k 3 --json          # the 3 likeliest digits, one JSON line per image
  mnist-pipeline predict data/raw/t10k-images-idx3-ubyte | head  # an IDX file, streamed
  mnist-pipeline predict digit.png --model models/model.onnx   # a local file: no MLflow, no torch"""

COMPARE_EXAMPLES = """\
examples:
  mnist-pipeline compare                         # every run, best test accuracy first
  mnist-pipeline compare --last 5 --sort train_seconds
  mnist-pipeline compare --markdown > runs.md    # for a pull request; --csv for a spreadsheet"""

TUNE_EXAMPLES = """\
examples:
  mnist-pipeline tune --trials 20                       # the space of tune.yaml; run it again to go on
  mnist-pipeline tune --trials 20 --timeout 1800 --apply   # then run the pipeline with the winner
  mnist-pipeline tune --trials 40 --set 'train.lr={low: 0.002, high: 0.02, log: true}'
  mnist-pipeline tune --trials 100 --storage postgresql+psycopg://user@db-host/optuna   # several machines"""

REPRODUCE_EXAMPLES = """\
examples:
  mnist-pipeline reproduce b589388b              # a run id prefix, as `compare` prints it
  mnist-pipeline reproduce lower-lr              # a DVC experiment name"""


HELP_WIDTH = 88  # descriptions are wrapped here; the examples of an epilog are kept as written


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description=textwrap.fill(DESCRIPTION, HELP_WIDTH),
                                     formatter_class=raw)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=textwrap.fill(description, HELP_WIDTH),
                                   epilog=epilog, formatter_class=raw)  # fmt: skip

    def host_and_port(sub: argparse.ArgumentParser, port: int) -> None:
        sub.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default: %(default)s, this machine only)")  # fmt: skip
        sub.add_argument("--port", type=int, default=port, help="port to listen on (default: %(default)s)")

    ui = command("ui", "open the MLflow UI on the project's store (bound to 127.0.0.1)",
                 "Start the MLflow UI on the store the pipeline logs to (the same one `dvc repro` and `compare` use), "
                 "to compare runs, metrics, figures and registered models in a browser. Ctrl-C stops it.")  # fmt: skip
    host_and_port(ui, 5000)
    ui.set_defaults(func=_ui)

    predict = command("predict", "predict the digit in images, .npy arrays or IDX files",
                      "Print the predicted digit and its probability for each input: images of any size (made "
                      "28x28 grey, white digit on black or black on white), .npy arrays and IDX files of "
                      "digits (one line per digit, streamed).", PREDICT_EXAMPLES)  # fmt: skip
    predict.add_argument("inputs", nargs="+", type=Path, help="PNG/JPEG/... images, .npy arrays, IDX files")
    predict.add_argument(
        "--model",
        help="a registry URI, version number or run id, or a local .onnx / TorchScript file "
        "(default: the champion, models:/<export.model_name>@champion)",
    )
    predict.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    predict.add_argument("--top-k", type=int, default=1, help="show the K most likely digits (default: %(default)s)")
    predict.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    predict.set_defaults(func=_predict)

    serve = command("serve", "serve a registered model over REST with MLflow's scoring app",
                    "Serve a registered model over REST with MLflow's scoring app (as `mlflow models serve` does), "
                    "behind a Host check, a body-size limit and a check of every input against the model's "
                    "signature: POST digits to /invocations, see docs/using-the-model.md. Ctrl-C stops "
                    "it.")  # fmt: skip
    serve.add_argument("--model", help="an MLflow model URI (default: models:/<export.model_name>@champion)")
    host_and_port(serve, 5001)
    serve.add_argument("--allowed-hosts", type=lambda v: [h.strip() for h in v.split(",") if h.strip()], default=[],
                       metavar="NAMES", help="comma-separated host names requests may address besides this "
                       "machine's loopback names and --host (e.g. the name of a reverse proxy)")  # fmt: skip
    serve.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    serve.set_defaults(func=_serve)

    compare = command("compare", "the experiment's runs as a table: differing params, metrics, versions",
                      "The pipeline's MLflow runs side by side: name, commit, only the params that differ between "
                      "them, test accuracy and loss, training time, and the registered versions with their "
                      "aliases.", COMPARE_EXAMPLES)  # fmt: skip
    compare.add_argument("--last", type=int, help="only the N most recent runs (default: all)")
    compare.add_argument("--sort", default="test_accuracy", choices=["test_accuracy", "test_loss", "train_seconds"],
                         help="order of the rows, best first (default: %(default)s)")  # fmt: skip
    output = compare.add_mutually_exclusive_group()
    output.add_argument("--csv", dest="format", action="store_const", const="csv",
                        help="CSV with the full numbers, for programs and spreadsheets")  # fmt: skip
    output.add_argument("--markdown", dest="format", action="store_const", const="markdown",
                        help="a Markdown table (default: a plain-text table)")  # fmt: skip
    compare.set_defaults(func=_compare, format="text")

    reproduce = command("reproduce", "rerun a past MLflow run's code and params as a DVC experiment",
                        "Rerun a past run from its own commit and params as a DVC experiment in a temporary copy "
                        "(the workspace is not touched), then say whether the test accuracy and loss came out the "
                        "same to the last digit, and if not which recorded part of the environment differs.",
                        REPRODUCE_EXAMPLES)  # fmt: skip
    reproduce.add_argument(
        "run_id", help="an MLflow run id, a unique prefix of one (as `compare` prints them) or a DVC experiment name"
    )
    reproduce.set_defaults(func=_reproduce)

    tune = command("tune", "search params on a validation split with Optuna; hand the winner to `dvc exp run`",
                   "Search the params of tune.yaml with Optuna: each trial trains in this process on the training "
                   "digits minus a validation split and is scored by its validation accuracy (the test digits are "
                   "never read); a median pruner stops trials that fall behind; a seeded sampler makes a search "
                   "repeatable. The study is kept in a database (SQLite under tuning/ by default), so running the "
                   "command again continues it. Every trial is an MLflow child run of the study's run, in the "
                   "experiment mnist-pipeline-tune. At the end it prints the `dvc exp run -S ...` command that "
                   "reruns the real pipeline with the best params.", TUNE_EXAMPLES)  # fmt: skip
    tune.add_argument("--trials", type=int, metavar="N",
                      help="stop once the study has N finished trials (complete or pruned)")  # fmt: skip
    tune.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="stop starting trials after SECONDS (default: no limit)")  # fmt: skip
    tune.add_argument("--jobs", type=int, default=1, metavar="J",
                      help="trials run at once in this process (default: %(default)s)")  # fmt: skip
    tune.add_argument("--storage", metavar="URL", help="an Optuna storage URL shared by several machines, e.g. "
                      "postgresql+psycopg://user@host/db (default: sqlite:///tuning/optuna.db)")  # fmt: skip
    tune.add_argument("--study", default="mnist-tune", help="the study's name (default: %(default)s)")
    tune.add_argument("--space", type=Path, default=Path("tune.yaml"),
                      help="the search space and validation split (default: %(default)s)")  # fmt: skip
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="add or replace a space entry, e.g. --set 'model.hidden=[64, 128]'; repeatable")  # fmt: skip
    tune.add_argument("--params", type=Path, default=Path("params.yaml"),
                      help="the params every trial starts from (default: %(default)s)")  # fmt: skip
    tune.add_argument("--seed", type=int, help="the sampler's seed (default: train.seed)")
    tune.add_argument("--apply", action="store_true",
                      help="then run the pipeline with the best params: a DVC experiment, an MLflow run")  # fmt: skip
    tune.set_defaults(func=_tune)

    store = command("store", "print the MLflow tracking URI the pipeline logs to",
                    "Print the MLflow tracking URI the pipeline logs to: MLFLOW_TRACKING_URI when set, else the "
                    "SQLite store in mlruns/ of this project.")  # fmt: skip
    store.set_defaults(func=_store)

    bench = commands.add_parser(
        "bench", help="benchmark the pipeline's training against the classic tutorial", add_help=False
    )  # its options are its own (mnist_pipeline.bench): `mnist-pipeline bench --help`
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
