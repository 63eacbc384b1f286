"""params.yaml parsing and validation."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from mnist_pipeline import config
from mnist_pipeline.config import ConfigError
from tests.helpers import REPO_ROOT


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def _load(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return config.load(path).sections()


def test_repository_params_are_valid():
    params = config.load(REPO_ROOT / "params.yaml")
    model, train, export = params.model, params.train, params.export
    assert train.device in config.DEVICES and export.model_name == "mnist-cnn"
    assert model.conv_channels and isinstance(model.conv_channels, tuple)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "lr", 0, "train.lr = 0 is not allowed: input should be greater than 0"),
        ("train", "lr", -0.1, "train.lr = -0.1 is not allowed"),
        ("train", "lr", "fast", "train.lr = 'fast' is not allowed: input should be a valid number"),
        ("train", "batch_size", 0, "train.batch_size = 0 is not allowed: input should be greater than or equal to 1"),
        ("train", "batch_size", 1.5, "train.batch_size = 1.5 is not allowed: input should be a valid integer"),
        ("train", "epochs", 0, "train.epochs = 0 is not allowed: input should be greater than or equal to 1"),
        ("train", "epochs", True, "train.epochs = True is not allowed: input should be a valid integer"),
        ("train", "optimizer", "adagrad", "train.optimizer = 'adagrad' is not allowed: input should be 'adam', 'adamw"),
        ("train", "device", "tpu", "train.device = 'tpu' is not allowed: input should be 'auto', 'cpu' or 'cuda'"),
        ("model", "conv_channels", [], "model.conv_channels = [] is not allowed"),
        ("model", "kernel_size", 4, "model.kernel_size = 4 is not allowed: expected 3 or 5"),
        ("model", "dropout", 1.0, "model.dropout = 1.0 is not allowed"),
        ("data", "expected_md5", {"foo": "0" * 32}, "data.expected_md5.foo = 'foo' is not allowed: input should"),
        (
            "data",
            "dataset",
            "cifar10",
            "data.dataset = 'cifar10' is not allowed: input should be 'mnist', 'fashion_mnist' or 'kmnist'",
        ),
        ("export", "model_name", "", "export.model_name = '' is not allowed"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(tmp_path, params, section, key, value, message):
    params[section][key] = value
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, params)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_and_missing_keys(tmp_path, params):
    params["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="unknown key train.learning_rate; train takes seed, device"):
        _load(tmp_path, params)
    del params["train"]["learning_rate"]
    del params["train"]["seed"]
    with pytest.raises(ConfigError, match="missing key train.seed"):
        _load(tmp_path, params)
    params["extra"] = {}
    with pytest.raises(ConfigError, match="unknown section 'extra'"):
        _load(tmp_path, params)


def test_malformed_yaml_and_missing_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        config.load(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_ints_accepted_for_floats_and_configs_are_frozen(tmp_path, params):
    params["train"]["lr"] = 1
    train = _load(tmp_path, params)[2]
    assert train.lr == 1.0 and isinstance(train.lr, float)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        train.lr = 2.0


def test_the_run_records_every_key_of_params_lists_as_their_values(params):
    from mnist_pipeline.tracking.runs import flat_params, param_value

    flat = flat_params(config.load(REPO_ROOT / "params.yaml"))
    assert set(flat) == {f"{s}.{k}" for s, section in params.items() if s != "runtime" for k in section}
    assert param_value(flat["model.conv_channels"]) == ", ".join(map(str, params["model"]["conv_channels"]))


def test_the_stages_depend_on_every_section_that_shapes_results_and_none_on_runtime():
    """The train and export stages list whole sections, so a key added to params.yaml is among their params at
    once; runtime (what is printed, whether an interrupted training resumes) is no stage's, nor an MLflow param."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["params"] == ["model", "train"]
    assert set(stages["export"]["params"]) == {s for s, cls in config.SECTIONS.items() if cls.SHAPES_RESULTS}
    named = {str(entry).split(".")[0] for stage in stages.values() for entry in stage.get("params", [])}
    assert "runtime" not in named and not config.RuntimeConfig.SHAPES_RESULTS


def test_a_key_given_twice_is_a_mistake_of_its_own(tmp_path):
    text = (REPO_ROOT / "params.yaml").read_text().replace("  lr: 0.01 ", "  lr: 0.01\n  lr: 0.02 ", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path / "params.yaml")
    line = next(n for n, text in enumerate(text.splitlines(), 1) if text.startswith("  lr: "))
    twice = f"the key 'lr' is given twice (lines {line} and {line + 1}); keep one"
    assert str(exc.value) == f"{tmp_path / 'params.yaml'}: {twice}"
