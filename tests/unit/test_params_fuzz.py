"""Property-based: any params.yaml is either accepted or refused with one line and exit status 1, never a
traceback; every valid one is accepted and every invalid one refused.

Each key has a strategy for valid values and one for invalid values (wrong type or out of range), read from its
pydantic field in config.py (a new section is fuzzed as it is declared); hypothesis combines them, adds unknown and
missing keys, and shrinks any failure to the smallest params.yaml that shows it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_pipeline import config
from mnist_pipeline.errors import run_main
from mnist_pipeline.ml.data import FILE_NAMES

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


def from_field(field) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid values, invalid values) of a key, read from its pydantic field: its type and bounds."""
    annotation = field.annotation
    bounds = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    if get_origin(annotation) is Literal:
        options = get_args(annotation)
        return st.sampled_from(options), choice_outside(options)
    if annotation is bool:
        return st.booleans(), st.one_of(st.integers(), st.text(max_size=5), st.none())
    if annotation is int:
        low, high = bounds.get("ge", bounds.get("gt", -1) + 1), bounds.get("le")
        return st.integers(low, min(high, low + 10_000) if high is not None else low + 10_000), int_outside(low, high)
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    valid = st.floats(low, high, exclude_min="gt" in bounds, exclude_max="lt" in bounds)
    return valid, number_outside(low, high, "gt" in bounds, "lt" in bounds)


# What a field's type and bounds do not tell: its own check, or a shape of its own.
SPECIAL = {
    ("data", "expected_md5"): (
        st.dictionaries(st.sampled_from(FILE_NAMES), st.text("0123456789abcdef", min_size=32, max_size=32)),
        st.one_of(
            st.dictionaries(st.text(max_size=5), st.just("0" * 32), min_size=1),
            st.dictionaries(st.sampled_from(FILE_NAMES), st.text(max_size=31), min_size=1),
            st.lists(st.integers(), min_size=1),
            st.integers(),
        ),
    ),
    ("model", "conv_channels"): (
        st.lists(st.integers(1, 1024), min_size=1, max_size=2),
        st.one_of(st.lists(st.integers(1, 64), min_size=3, max_size=4), st.just([]),
                  st.lists(st.integers(max_value=0), min_size=1, max_size=2), st.integers(), st.text(max_size=3)),
    ),
    ("model", "kernel_size"): (
        st.sampled_from([3, 5]),
        st.one_of(st.integers().filter(lambda k: k not in (3, 5)), st.text(max_size=2)),
    ),
    ("export", "model_name"): (
        st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"),
        st.one_of(st.from_regex(r"\A[^A-Za-z0-9].*\Z"), st.just(""), st.just("a b"), st.integers()),
    ),
    # Cross-key rule train.batch_size >= train.nproc: the valid values keep it (a rule broken below).
    ("train", "batch_size"): (st.integers(8, 4096), int_outside(1, config.MAX_BATCH)),
    ("train", "nproc"): (st.integers(1, 8), int_outside(1, 1024)),
}  # fmt: skip

# key -> (valid values, invalid values) of every section of params.yaml, as config.py declares them.
FIELDS: dict[str, dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]] = {
    section: {key: SPECIAL.get((section, key)) or from_field(field) for key, field in model.model_fields.items()}
    for section, model in config.SECTIONS.items()
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
