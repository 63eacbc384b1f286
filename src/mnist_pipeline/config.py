"""Typed, validated params: one frozen dataclass per section of params.yaml.

Construction is strict: an unknown key, a missing key, a wrong type or an out-of-range value raises
ConfigError with one line naming the key, the bad value and what is allowed; for a whole file (`load`, `build`),
one line for all its mistakes at once. Stages build their config before
doing any work, so a bad param never leaves half-written outputs or an MLflow run behind.
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mnist_pipeline.data import DATASETS, FILE_NAMES
from mnist_pipeline.errors import PipelineError


class ConfigError(PipelineError):
    pass


def _allowed(options: tuple[str, ...]) -> str:
    return " | ".join(options)


# While `build` reads a whole file, each mistake is added here instead of raised, so that all of them are reported
# at once; anywhere else (a section built on its own) the first one raises.
_collected: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("collected", default=None)


def _fail(message: str) -> None:
    collected = _collected.get()
    if collected is None:
        raise ConfigError(message)
    collected.append(message)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(f"params.yaml: {key} = {value!r} is not allowed; expected {allowed}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type (raising ConfigError); ints are accepted where floats are expected."""

    def _check(ok: bool, key: str, value: Any, allowed: str) -> None:  # the first type mistake of a value raises
        if not ok:
            raise ConfigError(f"params.yaml: {key} = {value!r} is not allowed; expected {allowed}")

    origin = typing.get_origin(annotation)
    if origin is tuple:  # tuple[int, ...]: a YAML list of ints
        (item_type, _) = typing.get_args(annotation)
        _check(isinstance(value, list), key, value, f"a list of {item_type.__name__}")
        return tuple(_coerce(v, item_type, key) for v in value)
    if origin is dict:  # dict[str, str]
        _check(isinstance(value, dict), key, value, "a mapping")
        return types.MappingProxyType({str(k): _coerce(v, str, f"{key}.{k}") for k, v in value.items()})
    if annotation is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if annotation is bool:
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if annotation is str:
        _check(isinstance(value, str), key, value, "a string")
        return value
    raise TypeError(f"unsupported config type {annotation!r} for {key}")


class Section:
    """Base of the config dataclasses: strict construction from a params.yaml section."""

    SECTION: typing.ClassVar[str]

    @classmethod
    def from_dict(cls, raw: Any):
        name = cls.SECTION
        if not isinstance(raw, Mapping):
            _fail(f"params.yaml: section {name!r} must be a mapping of keys to values, got {raw!r}")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        mistakes = [f"params.yaml: unknown key {name}.{key}; {name} takes {', '.join(fields)}"
                    for key in sorted(set(raw) - set(fields))]  # fmt: skip
        mistakes += [f"params.yaml: missing key {name}.{key}" for key in fields if key not in raw]
        hints, values = typing.get_type_hints(cls), {}
        for key in (key for key in fields if key in raw):
            try:
                values[key] = _coerce(raw[key], hints[key], f"{name}.{key}")
            except ConfigError as exc:
                mistakes.append(str(exc))
        for message in mistakes:
            _fail(message)
        if mistakes:  # collecting: the values' ranges are checked once every key is there with its type
            return None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types, the same shape as in params.yaml."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out


_MD5 = re.compile(r"^[0-9a-f]{32}$")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "adamw", "sgd")
# Bounds of what can work on MNIST: a batch is at most the training set (60,000 digits); a run of more epochs
# than this is a typo (the accuracy preset needs 10).
MAX_BATCH = 60_000
MAX_EPOCHS = 1_000
LR_SCHEDULES = ("constant", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    SECTION = "data"
    dataset: str  # mnist | fashion_mnist | kmnist: all in MNIST's format, each with its mirrors and checksums
    expected_md5: dict[str, str]  # file name -> MD5 of its decompressed content; empty = published MNIST

    def __post_init__(self):
        _check(self.dataset in DATASETS, "data.dataset", self.dataset, _allowed(tuple(DATASETS)))
        for name, md5 in self.expected_md5.items():
            _check(name in FILE_NAMES, f"data.expected_md5.{name}", md5, f"a key among {_allowed(FILE_NAMES)}")
            _check(bool(_MD5.match(md5)), f"data.expected_md5.{name}", md5, "32 lowercase hex digits")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    SECTION = "model"
    conv_channels: tuple[int, ...]  # one conv + ReLU + 2x2 max-pool block per entry
    kernel_size: int
    hidden: int  # width of the first linear layer
    dropout: float  # before the last linear layer
    batch_norm: bool  # BatchNorm after each conv

    def __post_init__(self):
        _check(
            1 <= len(self.conv_channels) <= 2,
            "model.conv_channels",
            list(self.conv_channels),
            "a list of 1 or 2 channel counts (28x28 digits allow two 2x2 poolings)",
        )
        for c in self.conv_channels:
            _check(1 <= c <= 1024, "model.conv_channels", list(self.conv_channels), "channel counts in 1..1024")
        _check(self.kernel_size in (3, 5), "model.kernel_size", self.kernel_size, "3 or 5")
        _check(1 <= self.hidden <= 8192, "model.hidden", self.hidden, "an integer in 1..8192")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    SECTION = "train"
    seed: int
    device: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float  # peak learning rate when lr_schedule is onecycle
    weight_decay: float
    lr_schedule: str
    label_smoothing: float
    augment_shift: int  # shift each training digit by up to this many pixels (0 = no augmentation)
    validation: int  # training digits held out, drawn with the seed, and measured after each epoch (0 = none)
    precision: str  # auto = bf16 autocast on CUDA, fp32 on CPU
    threads: int  # CPU threads for torch; 0 = one per core
    log_every: int  # print the running loss every this many batches
    nproc: int  # data-parallel processes torchrun starts on this machine (one per GPU); batch_size is global
    resume: bool  # after an interruption, continue from the last completed epoch instead of starting over

    # Keys that change what is printed or whether an interrupted training continues, never the trained model:
    # they are not among the train stage's params in dvc.yaml, nor in the resume fingerprint.
    NO_EFFECT_ON_MODEL: typing.ClassVar[tuple[str, ...]] = ("log_every", "resume")

    def __post_init__(self):
        _check(0 <= self.seed < 2**32, "train.seed", self.seed, "an integer in 0..2**32-1")
        _check(self.device in DEVICES, "train.device", self.device, _allowed(DEVICES))
        _check(1 <= self.epochs <= MAX_EPOCHS, "train.epochs", self.epochs, f"an integer in 1..{MAX_EPOCHS}")
        _check(1 <= self.batch_size <= MAX_BATCH, "train.batch_size", self.batch_size,
               f"an integer in 1..{MAX_BATCH} (the training set's size)")  # fmt: skip
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, _allowed(OPTIMIZERS))
        _check(0.0 < self.lr <= 10.0, "train.lr", self.lr, "a number in (0, 10]")
        _check(0.0 <= self.weight_decay <= 1.0, "train.weight_decay", self.weight_decay, "a number in [0, 1]")
        _check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", self.lr_schedule, _allowed(LR_SCHEDULES))
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        _check(0 <= self.augment_shift <= 8, "train.augment_shift", self.augment_shift, "an integer in 0..8")
        _check(0 <= self.validation < MAX_BATCH, "train.validation", self.validation,
               f"an integer in 0..{MAX_BATCH - 1} (digits of the training set held out)")  # fmt: skip
        _check(self.precision in PRECISIONS, "train.precision", self.precision, _allowed(PRECISIONS))
        _check(0 <= self.threads <= 1024, "train.threads", self.threads, "an integer in 0..1024 (0 = one per core)")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        _check(1 <= self.nproc <= 1024, "train.nproc", self.nproc, "an integer in 1..1024")
        _check(self.batch_size >= self.nproc, "train.batch_size", self.batch_size, "at least train.nproc")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Section):
    SECTION = "evaluate"
    batch_size: int
    examples: int  # random test digits shown in the predictions figure
    mistakes: int  # the model's most confident mistakes shown below them

    def __post_init__(self):
        _check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")
        _check(1 <= self.examples <= 100, "evaluate.examples", self.examples, "an integer in 1..100")
        _check(0 <= self.mistakes <= 100, "evaluate.mistakes", self.mistakes, "an integer in 0..100")


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class ExportConfig(Section):
    SECTION = "export"
    model_name: str  # registered model name in MLflow
    parity_samples: int  # real test digits the exported model is checked on
    parity_tolerance: float  # max absolute logit difference allowed against the eager model
    promote_min_delta: float  # champion moves to a new version only if its accuracy >= champion's + this
    register: bool  # register the logged model and move the aliases (false: the run and its model only)

    def __post_init__(self):
        _check(
            bool(_MODEL_NAME.match(self.model_name)),
            "export.model_name",
            self.model_name,
            "letters, digits, '_', '.', '-' (starting with a letter or digit)",
        )
        _check(self.parity_samples >= 1, "export.parity_samples", self.parity_samples, "an integer >= 1")
        _check(
            0.0 < self.parity_tolerance < 1.0, "export.parity_tolerance", self.parity_tolerance, "a number in (0, 1)"
        )
        _check(
            0.0 <= self.promote_min_delta < 1.0,
            "export.promote_min_delta",
            self.promote_min_delta,
            "a number in [0, 1)",
        )


SECTIONS = {cls.SECTION: cls for cls in (DataConfig, ModelConfig, TrainConfig, EvaluateConfig, ExportConfig)}


def read_params(path: Path) -> dict[str, Any]:
    """Parse params.yaml into a dict; a missing or malformed file is a ConfigError."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    return raw


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole of params.yaml, validated: one typed, frozen object per section."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig

    def sections(self) -> tuple[Section, ...]:
        return tuple(getattr(self, name) for name in SECTIONS)


def load(path: Path) -> Params:
    """Build and validate every section of params.yaml: a typo anywhere stops any stage before it starts work."""
    return build(read_params(path), str(path))


def build(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Every section from the content of a params file (as `read_params` returns it), validated. Every mistake of
    the file is reported, in one ConfigError whose lines are joined by "; "."""
    mistakes: list[str] = []
    token = _collected.set(mistakes)
    try:
        sections = {}
        for name, cls in SECTIONS.items():
            if name not in raw:
                mistakes.append(f"{source}: missing section {name!r}")
            else:
                sections[name] = cls.from_dict(raw[name])
    finally:
        _collected.reset(token)
    if len(mistakes) == 1:
        raise ConfigError(mistakes[0])
    if mistakes:
        each = (m.removeprefix("params.yaml: ").removeprefix(f"{source}: ") for m in mistakes)
        raise ConfigError(f"{source}: {len(mistakes)} mistakes: " + "; ".join(each))
    return Params(**sections)
