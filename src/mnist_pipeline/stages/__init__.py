"""The pipeline's four stages, one module each: ``download``, ``train``, ``evaluate``, ``export``.

Each module holds its stage's orchestration: a ``Paths`` dataclass (the files it reads and writes, named in
``dvc.yaml``) and ``run(params, paths)``. The scripts under ``stages/`` at the project root, which ``dvc.yaml``
runs, only turn the command line into that one call (`main`). A stage module imports what is slow to import
(torch, MLflow) inside ``run``, so that ``--help`` and a bad argument answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

from mnist_pipeline import config
from mnist_pipeline.errors import run_main


def main(stage: ModuleType) -> None:
    """The command line of a stage script: ``--params`` and one required ``--<field>`` per field of the stage's
    ``Paths`` (its ``help`` metadata is the option's help), then ``stage.run(params, paths)`` under the pipeline's
    error handling (`errors.run_main`)."""
    args = vars(build_parser(stage).parse_args())
    params_file = args.pop("params")
    run_main(lambda: stage.run(_load(params_file), stage.Paths(**args)))


def build_parser(stage: ModuleType) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=stage.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="the params file (default: %(default)s)"
    )
    for field in dataclasses.fields(stage.Paths):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, dest=field.name, type=Path, required=True, help=field.metadata.get("help"),
                            nargs=field.metadata.get("nargs"))  # fmt: skip
    return parser


def _load(params_file: Path) -> config.Params:
    try:
        return config.load(params_file)
    except config.ConfigError as exc:  # under `dvc repro` the params stage has stopped the run before this
        raise config.ConfigError(f"{exc}; nothing was written") from None


def path(help: str | None = None, nargs: str | None = None) -> Any:
    """A field of a stage's ``Paths``, with the help its command-line option shows (``nargs="+"``: a list)."""
    return dataclasses.field(metadata={"help": help, "nargs": nargs})


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
