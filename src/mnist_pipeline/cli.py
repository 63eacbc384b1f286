"""The ``mnist-pipeline`` command: what users run besides `dvc repro`. Each subcommand's work lives in
``mnist_pipeline.commands``, imported when the subcommand runs, so that ``--help`` answers at once."""

from __future__ import annotations

from pathlib import Path

import click

from mnist_pipeline import names
from mnist_pipeline.commands.ui import DEFAULT_PORT as UI_PORT
from mnist_pipeline.errors import run_main

ALLOW_PICKLE_HELP = (
    "Also load a model whose loading can run code it carries: a torch.export .pt2 archive, an MLflow model of the "
    "pytorch flavor or stored with pickle (only if you trust where it came from)."
)
MODEL_HELP = "A registry URI, version number or run id, or a local .onnx file (a .pt2 with --allow-pickle)  "
MODEL_HELP += "[default: the champion, models:/<export.model_name>@champion]"


class Commands(click.Group):
    """The group: every subcommand runs under the pipeline's error and signal handling (`errors.run_main`)."""

    def invoke(self, ctx: click.Context):
        run_main(lambda: super(Commands, self).invoke(ctx))


@click.group(
    cls=Commands,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100},
)
def main() -> None:
    """Use the MNIST pipeline's results: predict digits with a registered or exported model, compare the runs in
    MLflow, reproduce a past run, tune params, open the MLflow UI, serve a model over REST. The pipeline itself
    runs with `dvc repro` (params -> download -> train -> evaluate -> export)."""


def listening(port: int):
    def options(command):
        command = click.option("--port", default=port, help="Port to listen on.")(command)
        return click.option("--host", default="127.0.0.1", help="Address to listen on (this machine only).")(command)

    return options


@main.command(short_help="Open the MLflow UI on the project's store (bound to 127.0.0.1).")
@listening(UI_PORT)
def ui(host: str, port: int) -> None:
    """Start the MLflow UI on the store the pipeline logs to (the same one `dvc repro` and `compare` use), to
    compare runs, metrics, figures and registered models in a browser. Ctrl-C stops it."""
    from mnist_pipeline.commands import ui as command

    command.main(host, port)


@main.command(
    short_help="Predict the digit in images, .npy arrays or IDX files.",
    epilog="""\b
Examples:
  mnist-pipeline predict digit.png                             # the champion: models:/mnist-cnn@champion
  mnist-pipeline predict a.png b.png --top-k 3 --json          # the 3 likeliest digits, one JSON line per image
  mnist-pipeline predict data/raw/t10k-images-idx3-ubyte | head  # an IDX file, streamed
  mnist-pipeline predict digit.png --model models/model.onnx   # a local file: no MLflow, no torch
  mnist-pipeline predict photo.jpg --show seen/                # and seen/photo.jpg.png: what the model saw""",
)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_ref", help=MODEL_HELP, show_default=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@click.option("--top-k", default=1, type=click.IntRange(1, 10), help="Show the K most likely digits.")
@click.option(
    "--show",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="FOLDER",
    help="Write the 28x28 image the model saw for each input into FOLDER (PNG, 8x enlarged).",
)
@click.option(
    "--uncertain-below",
    default=0.7,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Flag a prediction whose probability is below this as uncertain.",
)
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
def predict(
    inputs: tuple[Path, ...],
    model_ref: str | None,
    as_json: bool,
    top_k: int,
    show: Path | None,
    uncertain_below: float,
    allow_pickle: bool,
) -> None:
    """Print the predicted digit and its probability for each input: images of any size (PNG, JPEG, a photo:
    its background removed, the digit found, scaled and centred as MNIST's were), .npy arrays and IDX files of
    digits (one line per digit, streamed). A probability below --uncertain-below is flagged "uncertain"."""
    from mnist_pipeline.commands import predict as command

    options = command.Options(as_json, top_k, show, uncertain_below, allow_pickle)
    raise SystemExit(command.main(list(inputs), model_ref, options))


@main.command(short_help="Serve a registered model over REST with MLflow's scoring app.")
@click.option("--model", "model_ref", help="An MLflow model URI  [default: models:/<export.model_name>@champion]")
@listening(5001)
@click.option(
    "--allowed-hosts",
    default="",
    metavar="NAMES",
    help="Comma-separated host names requests may "
    "address besides this machine's loopback names and --host (e.g. a reverse proxy's name).",
)
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
def serve(model_ref: str | None, host: str, port: int, allowed_hosts: str, allow_pickle: bool) -> None:
    """Serve a registered model over REST with MLflow's scoring app (as `mlflow models serve` does), behind a
    Host check, a body-size limit and a check of every input against the model's signature: POST digits to
    /invocations, see docs/using-the-model.md. Ctrl-C stops it."""
    from mnist_pipeline.commands import serve as command

    command.main(model_ref, host, port, [h.strip() for h in allowed_hosts.split(",") if h.strip()], allow_pickle)


@main.command(
    short_help="The experiment's runs as a table: differing params, metrics, versions.",
    epilog="""\b
Examples:
  mnist-pipeline compare                         # every run, best test accuracy first
  mnist-pipeline compare --last 5 --sort train_seconds
  mnist-pipeline compare --markdown > runs.md    # for a pull request; --csv for a spreadsheet""",
)
@click.option("--last", type=click.IntRange(min=1), help="Only the N most recent runs  [default: all]")
@click.option("--sort", "sort_by", default=names.TEST_ACCURACY, help="Order of the rows, best first: a metric's name.")
@click.option("--csv", "fmt", flag_value="csv", help="CSV with the full numbers, for programs and spreadsheets.")
@click.option("--markdown", "fmt", flag_value="markdown", help="A Markdown table.")
@click.option("--text", "fmt", flag_value="text", default=True, help="A plain-text table (the default).")
def compare(last: int | None, sort_by: str, fmt: str) -> None:
    """The pipeline's MLflow runs side by side: name, commit, only the params that differ between them, the test
    metrics, training time, and the registered versions with their aliases."""
    from mnist_pipeline.commands import compare as command

    command.main(last, sort_by, fmt)


@main.command(
    short_help="Rerun a past MLflow run's code and params; say whether it came out the same.",
    epilog="""\b
Examples:
  mnist-pipeline reproduce b589388b              # a run id prefix, as `compare` prints it
  mnist-pipeline reproduce lower-lr              # a DVC experiment name""",
)
@click.argument("run_id")
def reproduce(run_id: str) -> None:
    """Rerun a past run (RUN_ID: a run id, a unique prefix of one as `compare` prints them, or a DVC experiment
    name) from its own commit and params with `dvc repro` in a temporary git worktree (the workspace is not
    touched, and DVC experiments may run there meanwhile), registering nothing, then say whether the test
    accuracy and loss came out the same to the last digit, and if not which recorded part of the environment
    differs."""
    from mnist_pipeline.commands import reproduce as command

    raise SystemExit(command.main(run_id))


@main.command(
    short_help="Search params on a validation split with Optuna; hand the winner to `dvc exp run`.",
    epilog="""\b
Examples:
  mnist-pipeline tune --trials 20                       # the space of tune.yaml; run it again to go on
  mnist-pipeline tune --trials 20 --timeout 1800 --apply   # then run the pipeline with the winner
  mnist-pipeline tune --trials 40 --set 'train.lr={low: 0.002, high: 0.02, log: true}'
  mnist-pipeline tune --trials 100 --storage postgresql+psycopg://user@db-host/optuna   # several machines""",
)
@click.option("--trials", type=int, metavar="N", help="Stop once the study has N finished trials (complete or pruned).")
@click.option("--timeout", type=float, metavar="SECONDS", help="Stop starting trials after SECONDS  [default: none]")
@click.option("--jobs", default=1, metavar="J", help="Trials run at once in this process.")
@click.option(
    "--storage",
    metavar="URL",
    help="An Optuna storage URL shared by several machines, e.g. "
    "postgresql+psycopg://user@host/db  [default: sqlite:///tuning/optuna.db]",
)
@click.option("--study", default="mnist-tune", help="The study's name.")
@click.option(
    "--space", default="tune.yaml", type=click.Path(path_type=Path), help="The search space and validation split."
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Add or replace a space entry, e.g. --set 'model.hidden=[64, 128]'; repeatable.",
)
@click.option(
    "--params", default="params.yaml", type=click.Path(path_type=Path), help="The params every trial starts from."
)
@click.option("--seed", type=int, help="The sampler's seed  [default: train.seed]")
@click.option("--apply", is_flag=True, help="Then run the pipeline with the best params (a DVC experiment).")
def tune(**options) -> None:
    """Search the params of tune.yaml with Optuna: each trial trains in this process on the training digits minus
    a validation split and is scored by its validation accuracy (the test digits are never read); a median pruner
    stops trials that fall behind; a seeded sampler makes a search repeatable. The study is kept in a database
    (SQLite under tuning/ by default), so running the command again continues it. Every trial is an MLflow child
    run of the study's run, in the experiment mnist-pipeline-tune. At the end it prints the `dvc exp run -S ...`
    command that reruns the real pipeline with the best params."""
    from mnist_pipeline.commands import tune as command

    raise SystemExit(command.main(command.Options(**{**options, "sets": list(options["sets"])})))


@main.command(short_help="Print the MLflow tracking URI the pipeline logs to.")
def store() -> None:
    """Print the MLflow tracking URI the pipeline logs to: MLFLOW_TRACKING_URI when set, else the SQLite store in
    mlruns/ of this project."""
    from mnist_pipeline.tracking import store as tracking_store

    print(tracking_store.tracking_uri())


if __name__ == "__main__":
    main()
