"""The search of `mnist-pipeline tune`: ``tune.yaml`` read and checked by pydantic, as params.yaml is, and every
entry tried against params.yaml's own checks, so that a space that cannot be searched stops in one line before any
study, run or trial exists."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mnist_pipeline import config, yaml_files
from mnist_pipeline.errors import PipelineError

# Keys a trial may set: what shapes the model and its training. Not the device, threads or process count (where it
# runs), the validation split (the tuner's own), nor printing and resuming.
TUNABLE_SECTIONS = ("model", "train")
NOT_TUNABLE = {"train.device", "train.threads", "train.nproc", "train.validation"}


class SpaceError(PipelineError):
    """A search space that cannot be searched: raised before any study exists."""


def _a_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("not a number")
    return value


Number = Annotated[Any, AfterValidator(_a_number)]  # an int stays an int: a range of ints draws ints


class Range(BaseModel):
    """A range entry of the space: ``{low, high}``, optionally ``log`` and ``step``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    low: Number
    high: Number
    log: bool = False
    step: Annotated[Number | None, Field(gt=0)] = None

    @model_validator(mode="after")
    def _searchable(self):
        if not self.low < self.high:
            raise ValueError(f"the range [{self.low}, {self.high}] is empty or inverted; expected low < high")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("a log scale needs low > 0 and no step")
        return self


class Pruner(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    startup_trials: int = Field(5, ge=0)
    warmup_epochs: int = Field(0, ge=0)


class TuneFile(BaseModel):
    """tune.yaml: the validation split, the space (each entry a list of choices or a `Range`) and the pruner."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    validation: int = Field(5000, ge=1)
    space: dict[str, Any] = Field(default_factory=dict)
    pruner: Pruner = Pruner()


@dataclass(frozen=True)
class Dimension:
    """One entry of the space: a params.yaml key and the values a trial may give it."""

    key: str
    choices: tuple | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return self._choice(trial.suggest_categorical(self.key, [_label(c) for c in self.choices]))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def value(self, trial_params: Mapping[str, Any]) -> Any:
        """The param's value in a trial, from what Optuna recorded."""
        raw = trial_params[self.key]
        return self._choice(raw) if self.choices is not None else raw

    def _choice(self, label: Any) -> Any:
        return next(c for c in self.choices if _label(c) == label)

    def draws(self, count: int = 64) -> list:
        """Values a trial may draw from this range, to check against the param's own validation before a study
        exists: every integer of a range of up to ``count``, else the bounds and ``count`` seeded draws."""
        import numpy as np

        integers = isinstance(self.low, int) and isinstance(self.high, int)
        step = self.step or (1 if integers else None)
        if step is not None and (self.high - self.low) / step <= count:
            values = [self.low + i * step for i in range(int((self.high - self.low) / step) + 1)]
            return [int(v) if integers else float(v) for v in values]
        rng = np.random.default_rng(0)
        if self.log:
            drawn = np.exp(rng.uniform(np.log(self.low), np.log(self.high), count))
        else:
            drawn = rng.uniform(self.low, self.high, count)
        if step is not None:
            drawn = self.low + np.floor((drawn - self.low) / step) * step
        return [self.low, self.high] + [int(round(v)) if integers else float(v) for v in drawn]

    def as_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass(frozen=True)
class Search:
    """What tune.yaml (and --set) ask for."""

    validation: int
    space: tuple[Dimension, ...]
    startup_trials: int
    warmup_epochs: int


def _label(choice: Any) -> Any:
    """How Optuna records a choice: as itself, or a list (e.g. conv_channels) as its text "[16, 32]", which its
    storage and figures can show."""
    return f"[{', '.join(str(v) for v in choice)}]" if isinstance(choice, tuple) else choice


def load_search(path: Path, base: Mapping[str, Any], sets: list[str]) -> Search:
    """tune.yaml with the --set entries on top, every entry checked: a SpaceError before anything is created."""
    try:
        raw = yaml_files.read_yaml_file(path)
    except FileNotFoundError:
        raise SpaceError(f"{path} is missing: it holds the search space (see the project's tune.yaml)") from None
    except config.ConfigError as exc:
        raise SpaceError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise SpaceError(yaml_files.yaml_problem(path, exc)) from None
    try:
        tune = TuneFile.model_validate(raw or {})
    except ValidationError as exc:
        raise SpaceError(f"{path}: {config.one_line(exc, TuneFile)}") from None
    space = dict(tune.space)
    for item in sets:
        key, value = config.assignment(item, "--set")
        space[key] = value
    if not space:
        raise SpaceError(f"{path}: the space is empty; give it at least one param to search")
    dimensions = tuple(parse_dimension(key, spec, base, str(path)) for key, spec in space.items())
    return Search(tune.validation, dimensions, tune.pruner.startup_trials, tune.pruner.warmup_epochs)


def parse_dimension(key: str, spec: Any, base: Mapping[str, Any], where: str) -> Dimension:
    """One space entry, checked against params.yaml: a SpaceError naming the entry when it cannot be searched."""
    entry = f"{where}: space entry {key!r}"
    section, _, name = key.partition(".")
    if section not in TUNABLE_SECTIONS or name not in base.get(section, {}) or key in NOT_TUNABLE:
        tunable = sorted(f"{s}.{k}" for s in TUNABLE_SECTIONS for k in base.get(s, {}) if f"{s}.{k}" not in NOT_TUNABLE)
        raise SpaceError(f"{entry}: not a param a trial can set; expected one of {', '.join(tunable)}")
    if isinstance(spec, list) and spec:
        dimension = Dimension(key, choices=tuple(tuple(v) if isinstance(v, list) else v for v in spec))
        candidates = list(spec)
    elif isinstance(spec, dict):
        try:
            dimension = Dimension(key, **Range.model_validate(spec).model_dump())
        except ValidationError as exc:
            raise SpaceError(f"{entry}: {config.one_line(exc, Range)}") from None
        candidates = dimension.draws()
    else:
        raise SpaceError(f"{entry}: expected a non-empty list of choices or {{low, high}}, got {spec!r}")
    for value in candidates:  # each bound or choice must be a valid value of the param itself
        try:
            with_params(base, {key: list(value) if isinstance(value, tuple) else value})
        except config.ConfigError as exc:
            raise SpaceError(f"{entry}: {exc}") from None
    return dimension


def with_params(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> config.Params:
    """params.yaml's content with ``overrides`` ({"train.lr": 0.003, ...}), built and checked as the stages do."""
    return config.build(config.with_overrides(dict(base), dict(overrides)))


def pipeline_command(search: Search, best_params: Mapping[str, Any], study: str, number: int) -> list[str]:
    """The `dvc exp run` that reruns the real pipeline with the best trial's params (and the full training set)."""
    command = ["dvc", "exp", "run", "-n", f"{study}-trial-{number}"]
    for dimension in search.space:
        value = dimension.value(best_params)
        command += ["-S", f"{dimension.key}={yaml_value(value)}"]
    return command


def yaml_value(value: Any) -> str:
    """A param value as `dvc exp run -S` reads it: YAML, a list in flow style ([16, 32])."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
