"""Property-based: any params.yaml is either accepted or refused with one line and exit status 1, never a
traceback; every valid one is accepted and every invalid one refused.

Each key has a strategy for valid values and one for invalid values (wrong type or out of range); hypothesis
combines them, adds unknown and missing keys, and shrinks any failure to the smallest params.yaml that shows it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_pipeline import config
from mnist_pipeline.errors import run_main
from mnist_pipeline.ml.data import DATASETS, FILE_NAMES

# Values of the wrong YAML type for every kind of key; ranges are covered per key below.
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers()),
)


def number_outside(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> st.SearchStrategy:
    below = st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False, allow_infinity=False)
    above = st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False, allow_infinity=False)
    return st.one_of(below, above, st.just(float("nan")), st.text(max_size=5), st.none(), st.booleans())


def int_outside(lo: int, hi: int | None) -> st.SearchStrategy:
    out = [st.integers(max_value=lo - 1), st.floats(), st.text(max_size=5), st.none(), st.booleans()]  # 3.0 too
    if hi is not None:
        out.append(st.integers(min_value=hi + 1))
    return st.one_of(out)


def choice_outside(options) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=10).filter(lambda s: s not in options), st.integers(), st.none())


# key -> (valid values, invalid values). Cross-key rule: train.batch_size >= train.nproc (valid sets keep it).
FIELDS: dict[str, dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]] = {
    "data": {
        "dataset": (st.sampled_from(sorted(DATASETS)), choice_outside(DATASETS)),
        "expected_md5": (
            st.dictionaries(st.sampled_from(FILE_NAMES), st.text("0123456789abcdef", min_size=32, max_size=32)),
            st.one_of(
                st.dictionaries(st.text(max_size=5), st.just("0" * 32), min_size=1),
                st.dictionaries(st.sampled_from(FILE_NAMES), st.text(max_size=31), min_size=1),
                st.lists(st.integers(), min_size=1),
                st.integers(),
            ),
        ),  # fmt: skip
    },
    "model": {
        "conv_channels": (
            st.lists(st.integers(1, 1024), min_size=1, max_size=2),
            st.one_of(
                st.lists(st.integers(1, 64), min_size=3, max_size=4),
                st.just([]),
                st.lists(st.integers(max_value=0), min_size=1, max_size=2),
                st.integers(),
                st.text(max_size=3),
            ),
        ),  # fmt: skip
        "kernel_size": (
            st.sampled_from([3, 5]),
            st.one_of(st.integers().filter(lambda k: k not in (3, 5)), st.text(max_size=2)),
        ),
        "hidden": (st.integers(1, 8192), int_outside(1, 8192)),
        "dropout": (st.floats(0.0, 1.0, exclude_max=True), number_outside(0.0, 1.0, hi_open=True)),
        "input_norm": (st.sampled_from(config.INPUT_NORMS), choice_outside(config.INPUT_NORMS)),
        "batch_norm": (st.booleans(), st.one_of(st.integers(), st.text(max_size=5), st.none())),
    },
    "train": {
        "seed": (st.integers(0, 2**32 - 1), int_outside(0, 2**32 - 1)),
        "device": (st.sampled_from(config.DEVICES), choice_outside(config.DEVICES)),
        "epochs": (st.integers(1, config.MAX_EPOCHS), int_outside(1, config.MAX_EPOCHS)),
        "batch_size": (st.integers(8, 4096), int_outside(1, config.MAX_BATCH)),
        "optimizer": (st.sampled_from(config.OPTIMIZERS), choice_outside(config.OPTIMIZERS)),
        "lr": (st.floats(0.0, 10.0, exclude_min=True), number_outside(0.0, 10.0, hi_open=True)),
        "weight_decay": (st.floats(0.0, 1.0), number_outside(0.0, 1.0)),
        "lr_schedule": (st.sampled_from(config.LR_SCHEDULES), choice_outside(config.LR_SCHEDULES)),
        "label_smoothing": (st.floats(0.0, 1.0, exclude_max=True), number_outside(0.0, 1.0, hi_open=True)),
        "validation": (st.integers(0, 59_999), int_outside(0, 59_999)),
        "augment_shift": (st.integers(0, 8), int_outside(0, 8)),
        "augment_rotation": (st.floats(0.0, 180.0), number_outside(0.0, 180.0)),
        "augment_scale": (st.floats(0.0, 0.5), number_outside(0.0, 0.5)),
        "augment_shear": (st.floats(0.0, 45.0), number_outside(0.0, 45.0)),
        "augment_elastic": (st.floats(0.0, 8.0), number_outside(0.0, 8.0)),
        "augment_stroke": (st.floats(0.0, 1.0), number_outside(0.0, 1.0)),
        "augment_noise": (st.floats(0.0, 1.0), number_outside(0.0, 1.0)),
        "precision": (st.sampled_from(config.PRECISIONS), choice_outside(config.PRECISIONS)),
        "threads": (st.integers(0, 1024), int_outside(0, 1024)),
        "log_every": (st.integers(1, 10_000), int_outside(1, None)),
        "nproc": (st.integers(1, 8), int_outside(1, 1024)),
        "resume": (st.booleans(), st.one_of(st.integers(), st.text(max_size=5), st.none())),
    },
    "evaluate": {
        "batch_size": (st.integers(1, 10_000), int_outside(1, None)),
        "examples": (st.integers(1, 100), int_outside(1, 100)),
        "mistakes": (st.integers(0, 100), int_outside(0, 100)),
        "robustness_samples": (st.integers(0, 10_000), int_outside(0, 10_000)),
        "robustness_seed": (st.integers(0, 2**32 - 1), int_outside(0, 2**32 - 1)),
    },
    "export": {
        "model_name": (
            st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"),
            st.one_of(st.from_regex(r"\A[^A-Za-z0-9].*\Z"), st.just(""), st.just("a b"), st.integers()),
        ),  # fmt: skip
        "parity_samples": (st.integers(1, 10_000), int_outside(1, None)),
        "parity_tolerance": (
            st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
            number_outside(0.0, 1.0, True, True),
        ),
        "promote_min_delta": (st.floats(0.0, 1.0, exclude_max=True), number_outside(0.0, 1.0, hi_open=True)),
        "max_robust_drop": (st.floats(0.0, 1.0), number_outside(0.0, 1.0)),
        "register": (st.booleans(), st.one_of(st.integers(), st.just("yes"))),
    },
}


def valid_params() -> st.SearchStrategy:
    sections = {
        name: st.fixed_dictionaries({k: valid for k, (valid, _) in keys.items()}) for name, keys in FIELDS.items()
    }
    return st.fixed_dictionaries(sections)


@st.composite
def invalid_params(draw) -> dict:
    """A valid params dict with one thing broken: a bad value, an unknown or missing key or section, a section
    that is not a mapping."""
    params = draw(valid_params())
    section = draw(st.sampled_from(sorted(FIELDS)))
    key = draw(st.sampled_from(sorted(FIELDS[section])))
    fault = draw(st.sampled_from(["bad value", "unknown key", "missing key", "unknown section", "missing section",
                                  "section not a mapping", "batch smaller than nproc"]))  # fmt: skip
    if fault == "bad value":
        params[section][key] = draw(FIELDS[section][key][1])
    elif fault == "unknown key":
        params[section][draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in FIELDS[section]))] = 1
    elif fault == "missing key":
        del params[section][key]
    elif fault == "unknown section":
        params[draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in FIELDS))] = {}
    elif fault == "missing section":
        del params[section]
    elif fault == "section not a mapping":
        params[section] = draw(ANYTHING.filter(lambda v: not isinstance(v, dict)))
    else:
        params["train"]["nproc"] = draw(st.integers(2, 64))
        params["train"]["batch_size"] = draw(st.integers(1, params["train"]["nproc"] - 1))
    return params


def load_as_a_stage_would(params: dict, capsys) -> tuple[int, str]:
    """Write params.yaml and load it through `run_main`, as every stage does: (exit status, stderr)."""
    return load_text_as_a_stage_would(yaml.safe_dump(params, sort_keys=False), capsys)


def load_text_as_a_stage_would(text: str, capsys) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(text)
        capsys.readouterr()
        try:
            run_main(lambda: config.load(path))
            status = 0
        except SystemExit as exit_:
            status = exit_.code
        return status, capsys.readouterr().err


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(params=valid_params())
def test_every_valid_params_file_is_accepted(params, capsys):
    status, err = load_as_a_stage_would(params, capsys)
    assert (status, err) == (0, "")


@FUZZ
@given(params=invalid_params())
def test_every_invalid_params_file_is_refused_with_one_line(params, capsys):
    status, err = load_as_a_stage_would(params, capsys)
    assert status == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_at_all_is_accepted_or_refused_in_one_line(text, capsys):
    """Not even YAML: control characters, tabs, unbalanced brackets, anchors."""
    status, err = load_text_as_a_stage_would(text, capsys)
    assert (status, err) == (0, "") or (status == 1 and err.startswith("error: ") and err.count("\n") == 1)
