"""What every script in the project's ``stages/`` shares: its command line and its params.

A stage script is a click command made with `command`: it takes ``--params`` (params.yaml, loaded and checked
before anything else) and its own path options (`path`: every file it reads or writes, named once in dvc.yaml),
and runs under the pipeline's error handling (`errors.run_main`): a mistake is one line and exit status 1. Slow
libraries (torch, MLflow) are imported inside the script's function, so ``--help`` answers at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mnist_pipeline import config
from mnist_pipeline.errors import run_main


def command(stage: Callable[..., None]) -> click.Command:
    """The stage function ``stage(params, **paths)`` as its script's command line, its help the script's docstring."""

    @functools.wraps(stage)
    def run(params: Path, **paths: Any) -> None:
        paths = {name: list(value) if isinstance(value, tuple) else value for name, value in paths.items()}
        run_main(lambda: stage(load(params), **paths))

    name = Path(stage.__code__.co_filename).stem  # the script's name: stages/train.py -> train
    params = click.option(
        "--params", type=click.Path(path_type=Path), default="params.yaml", show_default=True, help="The params file."
    )
    return click.command(name, help=stage.__globals__["__doc__"])(params(run))  # the script's docstring


def path(flag: str, help: str, many: bool = False) -> Callable:
    """A required path option of a stage (``many``: repeated, a list)."""
    return click.option(flag, type=click.Path(path_type=Path), required=True, multiple=many, help=help)


def load(params_file: Path) -> config.Params:
    try:
        return config.load(params_file)
    except config.ConfigError as exc:  # under `dvc repro` the params stage has stopped the run before this
        raise config.ConfigError(f"{exc}; nothing was written") from None
