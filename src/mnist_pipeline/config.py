"""params.yaml as typed, frozen pydantic models, one per section; what each key allows is declared on its field.

Strict (no string for a number, no bool for an integer; an integer is fine for a float), and every mistake of a
file is reported at once, in one line: the key, the value and what is allowed. The params are loaded before any
work, so a bad one leaves no half-written output and no MLflow run. What each key means: params.yaml's comments.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mnist_pipeline.datasets import DATASETS, FILE_NAMES
from mnist_pipeline.errors import PipelineError


class ConfigError(PipelineError):
    pass


DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
INPUT_NORMS = ("mnist", "per_image")
# Bounds of what can work on MNIST: a batch is at most the training set (60,000 digits); a run of more epochs
# than this is a typo (the accuracy preset needs 10).
MAX_BATCH = 60_000
MAX_EPOCHS = 1_000


def rule(*constraints: Any, allowed: str | None = None, **bounds: Any) -> Any:
    """A field's bounds (pydantic's ``ge``, ``lt``, ...) and, optionally, what it allows in words."""
    return Field(*constraints, **bounds, json_schema_extra={"allowed": allowed} if allowed else None)


class Section(BaseModel):
    """Base of the sections: unknown keys refused, frozen, strict types."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    SECTION: ClassVar[str]

    @classmethod
    def from_dict(cls, raw: Any):
        return _validated(cls, raw, f"params.yaml section {cls.SECTION}", prefix=(cls.SECTION,))

    def replace(self, **changes: Any):
        """A copy with ``changes``, validated."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types, the same shape as in params.yaml."""
        return self.model_dump(mode="json")


MD5 = Annotated[str, rule(pattern=r"^[0-9a-f]{32}$", allowed="32 lowercase hex digits")]


class DataConfig(Section):
    SECTION = "data"
    dataset: Literal[tuple(DATASETS)]
    expected_md5: dict[Literal[FILE_NAMES], MD5]


class ModelConfig(Section):
    SECTION = "model"
    conv_channels: Annotated[
        tuple[Annotated[int, rule(ge=1, le=1024)], ...],
        rule(min_length=1, max_length=2, strict=False,
            allowed="a list of 1 or 2 channel counts in 1..1024 (28x28 digits allow two 2x2 poolings)"),
    ]  # fmt: skip
    kernel_size: Annotated[int, rule(allowed="3 or 5"), AfterValidator(lambda size: _one_of(size, (3, 5)))]
    hidden: Annotated[int, rule(ge=1, le=8192)]
    dropout: Annotated[float, rule(ge=0, lt=1)]
    batch_norm: bool
    input_norm: Literal[INPUT_NORMS]


class TrainConfig(Section):
    SECTION = "train"
    seed: Annotated[int, rule(ge=0, le=2**32 - 1, allowed="an integer in 0..2**32-1")]
    device: Literal[DEVICES]
    epochs: Annotated[int, rule(ge=1, le=MAX_EPOCHS)]
    batch_size: Annotated[int, rule(ge=1, le=MAX_BATCH, allowed=f"an integer in 1..{MAX_BATCH} (the training set)")]
    optimizer: Literal[OPTIMIZERS]
    lr: Annotated[float, rule(gt=0, le=10)]
    weight_decay: Annotated[float, rule(ge=0, le=1)]
    lr_schedule: Literal[LR_SCHEDULES]
    label_smoothing: Annotated[float, rule(ge=0, lt=1)]
    augment_shift: Annotated[int, rule(ge=0, le=8)]
    augment_rotation: Annotated[float, rule(ge=0, le=180)]
    augment_scale: Annotated[float, rule(ge=0, le=0.5)]
    augment_shear: Annotated[float, rule(ge=0, le=45)]
    augment_elastic: Annotated[float, rule(ge=0, le=8)]
    augment_stroke: Annotated[float, rule(ge=0, le=1)]
    augment_noise: Annotated[float, rule(ge=0, le=1)]
    validation: Annotated[int, rule(ge=0, lt=MAX_BATCH, allowed=f"an integer in 0..{MAX_BATCH - 1} (digits held out)")]
    precision: Literal[PRECISIONS]
    threads: Annotated[int, rule(ge=0, le=1024, allowed="an integer in 0..1024 (0 = one per core)")]
    log_every: Annotated[int, rule(ge=1)]
    nproc: Annotated[int, rule(ge=1, le=1024)]
    resume: bool

    # Keys that change what is printed or whether an interrupted training continues, never the trained model:
    # they are not among the train stage's params in dvc.yaml, nor in the resume fingerprint.
    NO_EFFECT_ON_MODEL: ClassVar[tuple[str, ...]] = ("log_every", "resume")

    @model_validator(mode="after")
    def _a_sample_per_process(self):
        if self.batch_size < self.nproc:
            raise ValueError(f"train.batch_size = {self.batch_size} is not allowed; expected at least train.nproc")
        return self


class EvaluateConfig(Section):
    SECTION = "evaluate"
    batch_size: Annotated[int, rule(ge=1)]
    examples: Annotated[int, rule(ge=1, le=100)]
    mistakes: Annotated[int, rule(ge=0, le=100)]
    robustness_samples: Annotated[int, rule(ge=0, le=10_000, allowed="an integer in 0..10000 (0 = no report)")]
    robustness_seed: Annotated[int, rule(ge=0, le=2**32 - 1, allowed="an integer in 0..2**32-1")]


def _one_of(value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError  # worded by `_mistake`, from the field's ``allowed``
    return value


# ABCMeta gives every class a ``register`` method; the export section's key of that name is meant to shadow it.
warnings.filterwarnings("ignore", 'Field name "register" in "ExportConfig" shadows', UserWarning)


class ExportConfig(Section):
    SECTION = "export"
    model_name: Annotated[str, rule(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                    allowed="letters, digits, '_', '.', '-' (starting with a letter or digit)")]
    parity_samples: Annotated[int, rule(ge=1)]
    parity_tolerance: Annotated[float, rule(gt=0, lt=1)]
    promote_min_delta: Annotated[float, rule(ge=0, lt=1)]
    max_robust_drop: Annotated[float, rule(ge=0, le=1)]
    register: bool = Field(...)  # required: without Field(...) pydantic takes ABCMeta's `register` as its default


class Params(BaseModel):
    """The whole of params.yaml, validated: one typed, frozen object per section."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig

    def sections(self) -> tuple[Section, ...]:
        return tuple(getattr(self, name) for name in type(self).model_fields)


SECTIONS = {name: field.annotation for name, field in Params.model_fields.items()}


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
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"{option} {item!r}: the value is not YAML") from None


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's content with ``{"train.lr": 0.003, ...}`` applied; not validated (`build` does that)."""
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for name, value in overrides.items():
        section, _, field = name.partition(".")
        raw.setdefault(section, {})[field] = value
    return raw


def one_line(exc: ValidationError) -> str:
    """Pydantic's errors as one line: each one's place and message (``pruner.warmup_epochs: input should be greater
    than or equal to 0``; a check of ours words its own message)."""

    def problem(error) -> str:
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] in ("model_type", "dict_type"):
            message = f"expected a mapping, got {type(error['input']).__name__}"
        return f"{where}: {message[0].lower()}{message[1:]}" if where else message

    return "; ".join(problem(error) for error in exc.errors())


def _validated(model: type[BaseModel], raw: Any, source: str, prefix: tuple = ()):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        mistakes = [_mistake(model, prefix + tuple(error["loc"]), error, raw, prefix) for error in exc.errors()]
    if len(mistakes) == 1:
        raise ConfigError(f"{source}: {mistakes[0]}") from None
    raise ConfigError(f"{source}: {len(mistakes)} mistakes: " + "; ".join(mistakes)) from None


def _mistake(model: type[BaseModel], loc: tuple, error: dict, raw: Any, prefix: tuple) -> str:
    """One line for one of pydantic's errors: the key, the value as written and what is allowed."""
    loc = tuple(part for part in loc if part != "[key]")
    kind = error["type"]
    if kind == "value_error" and len(loc) <= 1:  # a check across keys, which words its own line
        return str(error["msg"]).removeprefix("Value error, ")
    if len(loc) == 1 and kind == "missing":
        return f"missing section {loc[0]!r}"
    if len(loc) == 1 and kind == "extra_forbidden":
        return f"unknown section {loc[0]!r}; sections are {', '.join(SECTIONS)}"
    if len(loc) == 1:
        return f"section {loc[0]!r} must be a mapping of keys to values, got {error['input']!r}"
    section, name = loc[0], loc[1]
    fields = SECTIONS[section].model_fields
    if kind == "extra_forbidden":
        return f"unknown key {section}.{name}; {section} takes {', '.join(fields)}"
    if kind == "missing":
        return f"missing key {section}.{name}"
    values = raw if prefix else raw.get(section, {})
    value = values[name]
    where = f"{section}.{name}"
    annotation, allowed = fields[name].annotation, _allowed(fields[name])
    if get_origin(annotation) is dict and len(loc) > 2:  # one entry of a mapping: named by its key
        where, value = f"{where}.{loc[2]}", value[loc[2]]
        allowed = f"a key among {' | '.join(FILE_NAMES)}" if error["input"] == loc[2] else "32 lowercase hex digits"
    return f"{where} = {value!r} is not allowed; expected {allowed}"


def _allowed(field) -> str:
    """What a field allows, in words: its own ``allowed``, or read from its type and bounds."""
    if field.json_schema_extra:
        return field.json_schema_extra["allowed"]
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return " | ".join(map(str, get_args(annotation)))
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower(), None) for m in field.metadata}
    if annotation is int:
        low, high = bounds.get("ge"), bounds.get("le")
        return f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
    low = "(" if "gt" in bounds else "["
    high = ")" if "lt" in bounds else "]"
    return f"a number in {low}{bounds.get('gt', bounds.get('ge'))}, {bounds.get('lt', bounds.get('le'))}{high}"
