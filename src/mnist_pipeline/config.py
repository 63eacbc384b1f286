"""params.yaml as typed, frozen pydantic models, one per section; what each key allows is declared on its field.

Strict (no string for a number, no bool for an integer; an integer is fine for a float), and every mistake of a
file is reported at once, in one line: the key, the value and what is allowed. The params are loaded before any
work, so a bad one leaves no half-written output and no MLflow run. What each key means: params.yaml's comments.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mnist_pipeline.datasets import DATASETS, FILE_NAMES
from mnist_pipeline.yaml_files import ConfigError, load_yaml, quoted, read_yaml_file, yaml_problem

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
INPUT_NORMS = ("mnist", "per_image")
# Bounds of what can work on MNIST: a batch is at most the training set (60,000 digits); a run of more epochs
# than this is a typo (the accuracy preset needs 10).
MAX_BATCH = 60_000
MAX_EPOCHS = 1_000


class Section(BaseModel):
    """Base of the sections: unknown keys refused, frozen, strict types."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    SECTION: ClassVar[str]
    SHAPES_RESULTS: ClassVar[bool] = True  # a stage's results depend on its values (DVC params, MLflow params)

    @classmethod
    def from_dict(cls, raw: Any):
        return _validated(cls, raw, "params.yaml", prefix=(cls.SECTION,))

    def replace(self, **changes: Any):
        """A copy with ``changes``, validated."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types, the same shape as in params.yaml."""
        return self.model_dump(mode="json")


MD5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class DataConfig(Section):
    SECTION = "data"
    dataset: Literal[tuple(DATASETS)]
    expected_md5: dict[Literal[FILE_NAMES], MD5]


class ModelConfig(Section):
    SECTION = "model"
    conv_channels: Annotated[
        tuple[Annotated[int, Field(ge=1, le=1024)], ...],
        Field(min_length=1, max_length=2, strict=False),  # 28x28 digits allow two 2x2 poolings
    ]
    kernel_size: Annotated[int, AfterValidator(lambda size: _one_of(size, (3, 5)))]
    hidden: Annotated[int, Field(ge=1, le=8192)]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    batch_norm: bool
    input_norm: Literal[INPUT_NORMS]


class TrainConfig(Section):
    SECTION = "train"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)]
    device: Literal[DEVICES]
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)]
    optimizer: Literal[OPTIMIZERS]
    lr: Annotated[float, Field(gt=0, le=10)]
    weight_decay: Annotated[float, Field(ge=0, le=1)]
    lr_schedule: Literal[LR_SCHEDULES]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    augment_shift: Annotated[int, Field(ge=0, le=8)]
    augment_rotation: Annotated[float, Field(ge=0, le=180)]
    augment_scale: Annotated[float, Field(ge=0, le=0.5)]
    augment_shear: Annotated[float, Field(ge=0, le=45)]
    augment_elastic: Annotated[float, Field(ge=0, le=8)]
    augment_stroke: Annotated[float, Field(ge=0, le=1)]
    augment_noise: Annotated[float, Field(ge=0, le=1)]
    augment_clutter: Annotated[float, Field(ge=0, le=1)]
    validation: Annotated[int, Field(ge=0, lt=MAX_BATCH)]
    precision: Literal[PRECISIONS]
    threads: Annotated[int, Field(ge=0, le=1024)]
    nproc: Annotated[int, Field(ge=1, le=1024)]

    @model_validator(mode="after")
    def _a_sample_per_process(self):
        if self.batch_size < self.nproc:
            raise ValueError(f"train.batch_size = {self.batch_size} is not allowed; expected at least train.nproc")
        return self


class RuntimeConfig(Section):
    """How a training runs and reports, never what it produces: no stage lists this section among its params."""

    SECTION = "runtime"
    SHAPES_RESULTS = False
    log_every: Annotated[int, Field(ge=1)]
    resume: bool


class EvaluateConfig(Section):
    SECTION = "evaluate"
    batch_size: Annotated[int, Field(ge=1)]
    examples: Annotated[int, Field(ge=1, le=100)]
    mistakes: Annotated[int, Field(ge=0, le=100)]
    robustness_samples: Annotated[int, Field(ge=0, le=10_000)]
    robustness_seed: Annotated[int, Field(ge=0, le=2**32 - 1)]


def _one_of(value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"expected {' or '.join(map(str, allowed))}")
    return value


# ABCMeta gives every class a ``register`` method; the export section's key of that name is meant to shadow it.
warnings.filterwarnings("ignore", 'Field name "register" in "ExportConfig" shadows', UserWarning)


class ExportConfig(Section):
    SECTION = "export"
    model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    parity_samples: Annotated[int, Field(ge=1)]
    parity_tolerance: Annotated[float, Field(gt=0, lt=1)]
    promote_min_delta: Annotated[float, Field(ge=0, lt=1)]
    max_robust_drop: Annotated[float, Field(ge=0, le=1)]
    register: bool = Field(...)  # required: without Field(...) pydantic takes ABCMeta's `register` as its default


class Params(BaseModel):
    """The whole of params.yaml, validated: one typed, frozen object per section."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    runtime: RuntimeConfig

    def sections(self) -> tuple[Section, ...]:
        return tuple(getattr(self, name) for name in type(self).model_fields)


SECTIONS = {name: field.annotation for name, field in Params.model_fields.items()}


def read_params(path: Path) -> dict[str, Any]:
    """Parse params.yaml into a dict; a missing or malformed file is a ConfigError."""
    try:
        raw = read_yaml_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(path, exc)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load(path: Path) -> Params:
    return build(read_params(path), str(path))


def build(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Every section from a params file's content (as `read_params` returns it); every mistake in one ConfigError."""
    return _validated(Params, raw, source)


def assignment(item: str, option: str = "-S") -> tuple[str, Any]:
    """``SECTION.KEY=VALUE`` as given on a command line (``-S``, ``--set``): the key and the value read as YAML."""
    name, sep, value = item.partition("=")
    if not sep or "." not in name.strip(" ."):
        raise ConfigError(f"{option} {item!r}: expected SECTION.KEY=VALUE, e.g. {option} train.epochs=3")
    try:
        return name.strip(), load_yaml(value)
    except yaml.YAMLError:
        raise ConfigError(f"{option} {item!r}: the value is not YAML") from None


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's content with ``{"train.lr": 0.003, ...}`` applied; not validated (`build` does that)."""
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for name, value in overrides.items():
        section, _, field = name.partition(".")
        raw.setdefault(section, {})[field] = value
    return raw


def one_line(exc: ValidationError, model: type[BaseModel] | None = None, prefix: tuple = ()) -> str:
    """Pydantic's errors as one line: each one's key, the value as written and pydantic's own message
    (``train.lr = 0 is not allowed: input should be greater than 0``); an unknown key lists the keys its section
    takes when ``model`` is given. ``prefix``: where the validated part sits in its file (a section's name)."""

    def problem(error) -> str:
        loc = [*prefix, *(str(part) for part in error["loc"] if part != "[key]")]
        where, kind = ".".join(loc), error["type"]
        message = str(error["msg"]).removeprefix("Value error, ")
        message = message[0].lower() + message[1:]
        what = f"section {where!r}" if model is Params and len(loc) == 1 else f"key {where}"
        if kind == "missing":
            return f"missing {what}"
        if kind == "extra_forbidden":
            fields = _fields(model, loc[len(prefix) : -1])
            return f"unknown {what}" + (
                f"; {'.'.join(loc[:-1]) or 'params.yaml'} takes {', '.join(fields)}" if fields else ""
            )
        if kind in ("model_type", "dict_type"):
            message = f"expected a mapping, got {type(error['input']).__name__}"
        if not where or (kind == "value_error" and isinstance(error["input"], dict)):
            return message  # a check across keys words its own line
        return f"{where} = {quoted(error['input'])} is not allowed: {message}"

    return "; ".join(problem(error) for error in exc.errors())


def _fields(model: type[BaseModel] | None, loc: list[str]) -> list[str]:
    for part in loc:
        model = model.model_fields[part].annotation if model and part in model.model_fields else None
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _validated(model: type[BaseModel], raw: Any, source: str, prefix: tuple[str, ...] = ()):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        count = len(exc.errors())
        mistakes = f"{count} mistakes: " if count > 1 else ""
        raise ConfigError(f"{source}: {mistakes}{one_line(exc, model, prefix)}") from None
