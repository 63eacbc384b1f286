"""`tune`'s search space: every bad entry named in one line before anything is created; its figures."""

from __future__ import annotations

import optuna
import pytest

from mnist_pipeline import config
from mnist_pipeline.commands import search_space, tune_study
from mnist_pipeline.tracking import studies
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
BASE = config.read_params(ROOT / "params.yaml")


# --- the space, checked before anything exists -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, spec, message",
    [
        ("train.momentum", [0.9], "'train.momentum': not a param a trial can set"),
        ("train.device", ["cpu"], "'train.device': not a param a trial can set"),
        ("data.dataset", ["mnist"], "'data.dataset': not a param a trial can set"),
        ("train.lr", {"low": 0.01, "high": 0.01}, "'train.lr': the range [0.01, 0.01] is empty or inverted"),
        ("train.lr", {"low": 0.1, "high": 0.01}, "'train.lr': the range [0.1, 0.01] is empty or inverted"),
        ("train.lr", {"low": "tiny", "high": 0.01}, "'train.lr': low = 'tiny' is not allowed: not a number"),
        ("train.lr", {"low": 0.001, "high": ".1"}, "'train.lr': high = '.1' is not allowed: not a number"),
        ("train.lr", {"low": 0.0, "high": 0.1, "log": True}, "'train.lr': a log scale needs low > 0"),
        ("train.lr", {"low": 0.001, "high": 20}, "'train.lr': params.yaml: train.lr = 20"),
        ("model.hidden", [], "'model.hidden': expected a non-empty list of choices"),
        ("model.hidden", {"low": 16}, "'model.hidden': missing key high"),
        ("model.hidden", "big", "'model.hidden': expected a non-empty list of choices or {low, high}"),
        # bounds that pass while a value drawn between them does not: found by drawing before any study exists
        ("model.kernel_size", {"low": 3, "high": 5}, "'model.kernel_size': params.yaml: model.kernel_size = 4"),
    ],
)
def test_a_space_entry_that_cannot_be_searched_is_named(key, spec, message):
    with pytest.raises(search_space.SpaceError) as caught:
        search_space.parse_dimension(key, spec, BASE, "tune.yaml")
    assert str(caught.value).startswith(f"tune.yaml: space entry {message}"), str(caught.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("3\n", "expected a mapping, got int"),
        ("- train.lr\n", "expected a mapping, got list"),
        ("space: {train.lr: [0.001]}\npruner: [1]\n", "pruner = [1] is not allowed: expected a mapping, got list"),
        ("space: [train.lr]\n", "space = ['train.lr'] is not allowed: expected a mapping, got list"),
        (
            "space: {train.lr: [0.001]}\npruner: {patience: 3}\n",
            "unknown key pruner.patience; pruner takes startup_trials, warmup_epochs",
        ),
    ],
)
def test_a_malformed_tune_yaml_is_one_line(tmp_path, text, message):
    (tmp_path / "tune.yaml").write_text(text)
    with pytest.raises(search_space.SpaceError) as caught:
        search_space.load_search(tmp_path / "tune.yaml", BASE, [])
    assert str(caught.value) == f"{tmp_path / 'tune.yaml'}: {message}"


def test_a_resumed_study_draws_new_params_instead_of_repeating_its_first_trials(tmp_path):
    """The sampler is seeded with the seed plus the trials the study has: a study run again does not replay the
    draws of its first run."""
    search = search_space.Search(200, (search_space.Dimension("train.lr", low=1e-4, high=0.1, log=True),), 1, 0)
    storage = f"sqlite:///{tmp_path}/study.db"
    drawn = []
    for _ in range(2):  # the same command twice
        study = tune_study.open_study("s", storage, search, seed=0)
        study.optimize(lambda trial: drawn.append(search.space[0].suggest(trial)) or 0.5, n_trials=3)
    assert len(set(drawn)) == 6, drawn
    again = tune_study.open_study("fresh", storage, search, seed=0)  # a new study with the same seed: repeatable
    again.optimize(lambda trial: search.space[0].suggest(trial) or 0.5, n_trials=3)
    assert [t.params["train.lr"] for t in again.get_trials()] == drawn[:3]


def test_the_projects_space_is_valid_and_set_replaces_an_entry():
    search = search_space.load_search(ROOT / "tune.yaml", BASE, ["train.lr={low: 0.002, high: 0.02, log: true}"])
    by_key = {d.key: d for d in search.space}
    assert by_key["train.lr"] == search_space.Dimension("train.lr", low=0.002, high=0.02, log=True)
    assert by_key["model.conv_channels"].choices == ((16, 32), (32, 64))
    assert search.validation == 5000


def test_the_winner_becomes_a_dvc_exp_run_command():
    lr = search_space.Dimension("train.lr", low=0.001, high=0.1, log=True)
    channels = search_space.Dimension("model.conv_channels", choices=((16, 32), (8,)))
    search = search_space.Search(10, (lr, channels), 1, 0)
    command = search_space.pipeline_command(search, {"train.lr": 0.0031, "model.conv_channels": "[8]"}, "s", 7)
    assert command == ["dvc", "exp", "run", "-n", "s-trial-7", "-S", "train.lr=0.0031", "-S", "model.conv_channels=[8]"]


def test_the_studys_figures_are_drawn_on_white(tmp_path):
    """Optuna draws on matplotlib's ggplot grey, where its palest trials vanish: the figures are redrawn on white."""
    import numpy as np
    from PIL import Image

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: t.suggest_float("train.lr", 1e-4, 0.03, log=True) + t.suggest_int("model.hidden", 8, 64),
                   n_trials=8)  # fmt: skip
    drawn = studies.write_figures(study, tmp_path)
    assert {p.stem for p in drawn} == {"optimization_history", "param_importances", "parallel_coordinate"}
    for path in drawn:
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        ggplot_grey = (pixels == (229, 229, 229)).all(axis=1).mean()
        assert ggplot_grey < 0.01, (path.name, ggplot_grey)


def test_an_importance_figure_optuna_cannot_draw_is_left_out_without_its_warning(tmp_path, recwarn):
    """One complete trial and one pruned: Optuna warns that the importances "will be equal" and draws them so;
    the warning reached the user of `tune`."""
    import optuna

    from mnist_pipeline.tracking import studies

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")

    def objective(trial):
        x = trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1)
        if trial.number == 1:
            raise optuna.TrialPruned()
        return x

    study.optimize(objective, n_trials=2)
    drawn = {path.name for path in studies.write_figures(study, tmp_path)}
    assert drawn == {"optimization_history.png", "parallel_coordinate.png"}
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]
