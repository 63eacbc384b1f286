"""The pipeline's four stages, one module each: ``download``, ``train``, ``evaluate``, ``export``.

Each module holds its stage's orchestration: a ``Paths`` dataclass (the files it reads and writes, named in
``dvc.yaml``) and ``run(params, paths)``; ``dvc.yaml`` runs it as ``python -m mnist_pipeline.stages.<name>``, and
`main` turns its command line into that one call. A stage module imports what is slow to import (torch, MLflow)
inside ``run``, so that ``--help`` and a bad argument answer at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from mnist_pipeline import config
from mnist_pipeline.errors import run_main


def main(stage: ModuleType) -> None:
    """Run a stage from its command line (`command`) under the pipeline's error handling (`errors.run_main`)."""
    command(stage).main()


def command(stage: ModuleType) -> click.Command:
    """The stage's command line: ``--params`` and one required ``--<field>`` per field of its ``Paths`` (its
    ``help`` metadata is the option's help; a list is given by repeating the option)."""

    def run(params: Path, **paths) -> None:
        paths = {name: list(value) if isinstance(value, tuple) else value for name, value in paths.items()}
        run_main(lambda: stage.run(_load(params), stage.Paths(**paths)))

    options = [click.Option(["--params"], type=click.Path(path_type=Path), default="params.yaml", show_default=True,
                            help="The params file.")]  # fmt: skip
    for field in dataclasses.fields(stage.Paths):
        flag = f"--{field.name.replace('_', '-')}"
        options.append(click.Option([flag, field.name], type=click.Path(path_type=Path), required=True,
                                    multiple=field.metadata["many"], help=field.metadata["help"]))  # fmt: skip
    name = stage.__spec__.name.rsplit(".", 1)[-1]  # under `python -m` the module's __name__ is "__main__"
    return click.Command(name, callback=run, params=options, help=stage.__doc__)


def _load(params_file: Path) -> config.Params:
    try:
        return config.load(params_file)
    except config.ConfigError as exc:  # under `dvc repro` the params stage has stopped the run before this
        raise config.ConfigError(f"{exc}; nothing was written") from None


def path(help: str, many: bool = False) -> Any:
    """A field of a stage's ``Paths``, with the help its command-line option shows (``many``: a list)."""
    return dataclasses.field(metadata={"help": help, "many": many})


def code_deps(stage: str, root: Path | None = None) -> list[Path]:
    """The Python files ``dvc.yaml`` lists as ``stage``'s deps: the code whose edit reruns it (a test checks that
    they are exactly the modules it loads). Outside a DVC project, every module of the package."""
    import yaml

    root = root or Path.cwd()
    try:
        deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["deps"]
    except (OSError, KeyError, TypeError):
        return sorted(Path(__file__).parent.parent.rglob("*.py"))
    return [root / dep for dep in deps if dep.endswith(".py")]
