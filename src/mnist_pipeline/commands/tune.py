"""`mnist-pipeline tune`: search params with Optuna on a validation split, then hand the winner to the pipeline.

Each trial trains in-process with the project's own training code on the training digits minus the validation
ones (``tune.yaml``'s ``validation``, drawn with ``train.seed``) and reports its validation accuracy after every
epoch to a median pruner. The test digits are never read: they stay for the pipeline's evaluate stage. Trials are
drawn by a seeded TPE sampler and kept in an Optuna study (SQLite under the project by default, or ``--storage``:
any database Optuna supports, shared by several machines), so a search run again continues where it stopped.

In MLflow (experiment ``mnist-pipeline-tune``) the study is one parent run, each trial a child run with its params,
its per-epoch validation metrics and its state (complete, pruned, failed, killed). At the end the parent gets
Optuna's figures and the best trial's params, and the tuner prints the `dvc exp run -S ...` command that reruns the
real pipeline with them; ``--apply`` runs it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnist_pipeline import config, names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import check_dvc_lock
from mnist_pipeline.tracking import store

EXPERIMENT = names.TUNE_EXPERIMENT
DEFAULT_STORAGE_FILE = Path("tuning") / "optuna.db"  # under the project root
# Keys a trial may set: what shapes the model and its training. Not the device, threads or process count (where it
# runs), the validation split (the tuner's own), nor printing and resuming.
TUNABLE_SECTIONS = ("model", "train")
NOT_TUNABLE = {"train.device", "train.threads", "train.nproc", "train.validation", "train.log_every", "train.resume"}


class SpaceError(PipelineError):
    """A search space that cannot be searched: raised before any study exists."""


# --- the search space ----------------------------------------------------------------------------------------


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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_dimension(key: str, spec: Any, base: Mapping[str, Any], where: str) -> Dimension:
    """One space entry, checked against params.yaml: a SpaceError naming the entry when it cannot be searched."""
    entry = f"{where}: space entry {key!r}"
    section, _, name = key.partition(".")
    if section not in TUNABLE_SECTIONS or name not in base.get(section, {}) or key in NOT_TUNABLE:
        tunable = sorted(f"{s}.{k}" for s in TUNABLE_SECTIONS for k in base.get(s, {}) if f"{s}.{k}" not in NOT_TUNABLE)
        raise SpaceError(f"{entry}: not a param a trial can set; expected one of {', '.join(tunable)}")
    if isinstance(spec, list):
        if not spec:
            raise SpaceError(f"{entry}: an empty list of choices")
        dimension = Dimension(key, choices=tuple(tuple(v) if isinstance(v, list) else v for v in spec))
        candidates = list(spec)
    elif isinstance(spec, dict):
        dimension = _range(key, spec, entry)
        candidates = dimension.draws()
    else:
        raise SpaceError(f"{entry}: expected a list of choices or {{low, high}}, got {spec!r}")
    for value in candidates:  # each bound or choice must be a valid value of the param itself
        try:
            with_params(base, {key: list(value) if isinstance(value, tuple) else value})
        except config.ConfigError as exc:
            raise SpaceError(f"{entry}: {exc}") from None
    return dimension


def _range(key: str, spec: dict, entry: str) -> Dimension:
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or not {"low", "high"} <= set(spec):
        raise SpaceError(f"{entry}: expected {{low, high}} with optional log and step, got {spec}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for bound, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and not _number(value):
            raise SpaceError(f"{entry}: {bound} {value!r} is not a number")
    if not low < high:
        raise SpaceError(f"{entry}: the range [{low}, {high}] is empty or inverted; expected low < high")
    if not isinstance(log, bool):
        raise SpaceError(f"{entry}: log {log!r} is not true or false")
    if log and (low <= 0 or step is not None):
        raise SpaceError(f"{entry}: a log scale needs low > 0 and no step")
    if step is not None and step <= 0:
        raise SpaceError(f"{entry}: step {step} must be > 0")
    return Dimension(key, low=low, high=high, log=log, step=step)


def with_params(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> config.Params:
    """params.yaml's content with ``overrides`` ({"train.lr": 0.003, ...}), built and checked as the stages do."""
    return config.build(config.with_overrides(dict(base), dict(overrides)))


def load_search(path: Path, base: Mapping[str, Any], sets: list[str]) -> Search:
    """tune.yaml with the --set entries on top, every entry checked: a SpaceError before anything is created."""
    raw = _read_space_file(path)
    space = dict(raw.get("space") or {})
    for item in sets:
        key, value = config.assignment(item, "--set")
        space[key] = value
    if not space:
        raise SpaceError(f"{path}: the space is empty; give it at least one param to search")
    dimensions = tuple(parse_dimension(key, spec, base, str(path)) for key, spec in space.items())
    validation = raw.get("validation", 5000)
    if not isinstance(validation, int) or isinstance(validation, bool) or validation < 1:
        raise SpaceError(f"{path}: validation {validation!r} must be a number of digits >= 1")
    pruner = raw.get("pruner") or {}
    unknown = set(pruner) - {"startup_trials", "warmup_epochs"}
    if unknown:
        raise SpaceError(f"{path}: unknown key pruner.{sorted(unknown)[0]}; expected startup_trials, warmup_epochs")
    startup, warmup = pruner.get("startup_trials", 5), pruner.get("warmup_epochs", 0)
    for name, value in (("startup_trials", startup), ("warmup_epochs", warmup)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SpaceError(f"{path}: pruner.{name} {value!r} must be an integer >= 0")
    return Search(validation, dimensions, startup, warmup)


def _read_space_file(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SpaceError(f"{path} is missing: it holds the search space (see the project's tune.yaml)") from None
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with validation, space and pruner, got {type(raw).__name__}")
    for key in ("space", "pruner"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise SpaceError(f"{path}: {key} must be a mapping, got {raw[key]!r}")
    unknown = set(raw) - {"validation", "space", "pruner"}
    if unknown:
        raise SpaceError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected validation, space, pruner")
    return raw


# --- the study -------------------------------------------------------------------------------------------------


def default_storage(root: Path) -> str:
    path = root / DEFAULT_STORAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


# A running trial writes a heartbeat to the study's storage this often; a trial silent for GRACE_S (its process
# killed, its machine gone) is marked failed by the next process of the study that starts a trial.
HEARTBEAT_S = 10
GRACE_S = 60


def open_study(name: str, storage: str, search: Search, seed: int, on_failed_trial=None):
    """Create the study, or load it to continue; a study made with another space is refused (its trials would not
    compare). A storage that cannot be opened is one line, with nothing created.

    The sampler is seeded with ``seed`` plus the number of trials the study already has: a new search is repeatable,
    and a resumed one draws new params instead of repeating the first trials' (a sampler seeded alike on every
    start draws the same sequence again).
    """
    import optuna

    # The tuner prints a line per trial; Optuna's warnings would repeat a stopped trial's error with its traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for attempt in range(OPEN_ATTEMPTS):
        try:
            study = _create_or_load(name, storage, search, on_failed_trial)
            break
        except Exception as exc:  # SQLAlchemy's and Optuna's errors: a bad URL, a missing folder, a damaged file
            # Two processes creating one new database at once: the second finds the tables half made by the first.
            racing = type(exc).__name__ == "IntegrityError" or "already exists" in str(exc)
            if attempt + 1 < OPEN_ATTEMPTS and racing:
                time.sleep(0.5 * (attempt + 1))
                continue
            problem = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise SpaceError(
                f"--storage {_safe(storage)}: cannot open the study's database ({problem}); check the URL, that its "
                "folder exists, and that the file is an Optuna database"
            ) from None
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    signature = {"space": {d.key: d.as_dict() for d in search.space}, "validation": search.validation}
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", yaml.safe_load(yaml.safe_dump(signature)))
    elif recorded != yaml.safe_load(yaml.safe_dump(signature)):
        raise SpaceError(f"the study {name!r} was made with another space or validation split; its trials would not "
                         f"compare: use another --study name, or the space it was made with")  # fmt: skip
    return study


OPEN_ATTEMPTS = 4


def _create_or_load(name: str, storage: str, search: Search, on_failed_trial):
    import optuna
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():  # Optuna calls the heartbeat experimental; it is what marks dead trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        database = RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=on_failed_trial)  # fmt: skip
    return optuna.create_study(
        study_name=name,
        storage=database,
        load_if_exists=True,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup_epochs),
    )


def fail_abandoned_trials(study, on_failed_trial) -> None:
    """Mark failed at once the running trials whose process, on this machine, is gone (kill -9): the heartbeat
    would take GRACE_S to notice. Trials of other machines are left to it."""
    from optuna.trial import TrialState

    from mnist_pipeline.tracking import repair

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker and repair.owner_is_gone(worker):
            # What optuna.storages.fail_stale_trials does for a trial whose heartbeat stopped.
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                on_failed_trial(study, trial)


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {state: sum(t.state == getattr(TrialState, state.upper()) for t in trials)
            for state in ("complete", "pruned", "fail", "running")}  # fmt: skip


def pipeline_command(search: Search, best_params: Mapping[str, Any], study: str, number: int) -> list[str]:
    """The `dvc exp run` that reruns the real pipeline with the best trial's params (and the full training set)."""
    command = ["dvc", "exp", "run", "-n", f"{study}-trial-{number}"]
    for dimension in search.space:
        value = dimension.value(best_params)
        command += ["-S", f"{dimension.key}={_yaml_value(value)}"]
    return command


def _yaml_value(value: Any) -> str:
    """A param value as `dvc exp run -S` reads it: YAML, a list in flow style ([16, 32])."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def shell_line(command: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)


# --- MLflow ----------------------------------------------------------------------------------------------------


class Tracking:
    """The tuner's MLflow runs: one parent per study, one child per trial (client calls: safe across --jobs)."""

    def __init__(self, study: str, storage: str):
        from mlflow.tracking import MlflowClient

        from mnist_pipeline.tracking import repair

        store.configure()
        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            self.experiment_id = store.create_experiment(self.client, EXPERIMENT)
        else:
            self.experiment_id = experiment.experiment_id
        self.owner = repair.owner()
        self.study = study
        self.parent = self._parent_run(study, storage)

    def _parent_run(self, study: str, storage: str) -> str:
        """The study's run, shared by every process of the study, on any machine.

        The tracking server has no lock: a process that finds no run of the study creates one, looks again, and
        keeps the oldest (by start time, then id), deleting its own if another came first. A process that looks
        after another has created one finds it, so all keep the same run; only two creations within the same
        millisecond on machines whose clocks differ could each keep their own."""
        query = f"tags.`{names.TUNE_STUDY}` = '{study}' and tags.`{names.TUNE_ROLE}` = 'study'"

        def oldest():
            found = self.client.search_runs([self.experiment_id], query, max_results=100)
            return min(found, key=lambda run: (run.info.start_time, run.info.run_id), default=None)

        found = oldest()
        if found is not None:  # the study goes on: so does its run
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        tags = {names.TUNE_STUDY: study, names.TUNE_ROLE: "study", names.TUNE_STORAGE: _safe(storage)}
        mine = self.client.create_run(self.experiment_id, tags=with_context(tags), run_name=f"study {study}")
        first = oldest()
        if first.info.run_id != mine.info.run_id:
            self.client.delete_run(mine.info.run_id)
        return first.info.run_id

    def start_trial(self, number: int, params: config.Params) -> str:
        tags = {names.PARENT_RUN: self.parent, names.TUNE_STUDY: self.study, names.TUNE_ROLE: "trial",
                names.TUNE_TRIAL: str(number), names.OWNER: self.owner}  # fmt: skip
        run_id = self.client.create_run(self.experiment_id, tags=with_context(tags), run_name=f"trial {number}")
        run_id = run_id.info.run_id
        from mlflow.entities import Param

        from mnist_pipeline.tracking.runs import param_value

        flat = {f"{s.SECTION}.{key}": value for s in (params.model, params.train) for key, value in s.to_dict().items()}
        self.client.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in flat.items()])
        return run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])

    def end_trial(self, run_id: str, state: str) -> None:
        self.client.set_tag(run_id, names.TUNE_STATE, state)
        status = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[state]
        self.client.set_terminated(run_id, status)

    def finish(self, study, search: Search, status: str) -> None:
        """The study's summary on the parent run: counts, best trial and its params, Optuna's figures. A trial run of
        this process still open (a Ctrl-C between two MLflow calls) is ended KILLED."""
        from mlflow.entities import Metric, RunTag

        open_trials = self.client.search_runs(
            [self.experiment_id], f"tags.`{names.PARENT_RUN}` = '{self.parent}' and attributes.status = 'RUNNING'"
        )
        for run in open_trials:
            if run.data.tags.get(names.OWNER) == self.owner:
                self.end_trial(run.info.run_id, "killed")

        done = counts(study)
        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{k}", v, now, 0) for k, v in done.items() if k != "running"]
        tags = []
        best = _best(study)
        if best is not None:
            metrics.append(Metric("best_val_accuracy", best.value, now, 0))
            tags.append(RunTag(names.TUNE_BEST_TRIAL, str(best.number)))
            tags += [RunTag(names.TUNE_BEST + d.key, _yaml_value(d.value(best.params))) for d in search.space]
        # Machines of one study may finish on its parent run at the same moment: one batch, not set_tag (a SQL
        # store retries a batch's tags when another writer inserted the same key first; set_tag fails on that
        # race), tried again when two machines logged one metric at the same millisecond.
        store.despite_insert_races(lambda: self.client.log_batch(self.parent, metrics=metrics, tags=tags))
        with tempfile.TemporaryDirectory() as folder:
            for figure in write_figures(study, Path(folder)):
                self.client.log_artifact(self.parent, str(figure), "optuna")
        self.client.set_terminated(self.parent, status)


def with_context(tags: Mapping[str, str]) -> dict[str, str]:
    from mnist_pipeline.tracking import runs  # imports MLflow: not before the tuner talks to it

    return runs.with_context(tags)


def _safe(storage: str) -> str:
    """A storage URL without its password, as a tag may show it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(storage)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return storage


def _best(study):
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value) if complete else None


def write_figures(study, folder: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG files (those that can
    be drawn: importances need two finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as figures
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import PedAnovaImportanceEvaluator

    drawn = []
    with warnings.catch_warnings():
        # Optuna marks its matplotlib figures experimental and says so on every call; the figures are what we want.
        warnings.simplefilter("ignore", ExperimentalWarning)
        # Its parallel-coordinates figure warns through matplotlib for a param every trial gave the same value.
        warnings.filterwarnings("ignore", "Attempting to set identical low and high ylims", UserWarning)
        target = "validation accuracy"  # what Optuna calls "Objective Value"
        for name, draw in (
            ("optimization_history", lambda: figures.plot_optimization_history(study, target_name=target)),
            # PED-ANOVA needs no scikit-learn (fANOVA, Optuna's default, does).
            (
                "param_importances",
                lambda: figures.plot_param_importances(
                    study, evaluator=PedAnovaImportanceEvaluator(), target_name=target
                ),
            ),
            ("parallel_coordinate", lambda: figures.plot_parallel_coordinate(study, target_name=target)),
        ):
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # too few finished trials for this figure yet
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            _readable(figure)
            path = folder / f"{name}.png"
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            figure.savefig(path, dpi=100)
            plt.close(figure)
            drawn.append(path)
    return drawn


def _readable(figure) -> None:
    """Optuna draws on a grey background (matplotlib's ggplot style) and colours trials from white to blue: the
    worst trial vanishes, and tick labels sit on the lines that cross them. White background, a colour map without
    white, and tick labels on a white box."""
    for axes in figure.axes:
        axes.set_facecolor("white")
        axes.grid(color="#dddddd")
        for collection in axes.collections:
            collection.set_cmap("viridis")
        for image in axes.images:
            image.set_cmap("viridis")
        for label in (*axes.get_xticklabels(), *axes.get_yticklabels()):
            label.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 1.0})


# --- running it ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    params: Path
    space: Path
    sets: list[str]
    trials: int | None
    timeout: float | None
    jobs: int
    storage: str | None
    study: str
    seed: int | None
    apply: bool


def main(options: Options) -> int:
    root = store.project_root()
    if options.apply:
        check_dvc_lock(root)  # before the search, not after it: the winner is run with `dvc exp run`
    base = config.read_params(options.params)
    config.load(options.params)  # params.yaml itself must be valid before any trial is built on it
    search = load_search(options.space, base, options.sets)
    _check(options)
    params = with_params(base, {})
    device, train_data, validation_data = _data(root, params, search, options.jobs)
    storage = options.storage or default_storage(root)
    tracking: Tracking | None = None

    def trial_failed(study_, trial) -> None:  # its process died: its MLflow run ends KILLED, and says so
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and tracking is not None:
            tracking.end_trial(run_id, "killed")
        print(f"trial {trial.number} was left running by a process that is gone: marked failed", file=sys.stderr)

    seed = params.train.seed if options.seed is None else options.seed
    study = open_study(options.study, storage, search, seed, trial_failed)
    tracking = Tracking(options.study, storage)
    fail_abandoned_trials(study, trial_failed)
    print(f"study {options.study!r} in {_safe(storage)}: {len(train_data):,} training digits, "
          f"{len(validation_data):,} for validation; MLflow run {tracking.parent[:8]} in experiment {EXPERIMENT!r}",
          file=sys.stderr)  # fmt: skip
    objective = _objective(search, base, tracking, train_data, validation_data, device)
    _optimize(study, objective, options, search, tracking)
    best, done = _best(study), counts(study)
    print(f"{done['complete']} trials complete, {done['pruned']} pruned, {done['fail']} failed", file=sys.stderr)
    if best is None:
        print("no trial finished: nothing to apply", file=sys.stderr)
        return 1
    command = pipeline_command(search, best.params, options.study, best.number)
    print(f"best: trial {best.number}, validation accuracy {100 * best.value:.2f}%. Rerun the pipeline with its "
          f"params (trained on all {len(train_data) + len(validation_data):,} training digits, evaluated on the test "
          "digits):", file=sys.stderr)  # fmt: skip
    print(shell_line(command))
    return apply(command, tracking, root) if options.apply else 0


def _check(options: Options) -> None:
    if options.trials is None and options.timeout is None:
        raise SpaceError("give --trials N, --timeout SECONDS or both: the search needs a limit")
    if options.jobs < 1 or (options.trials is not None and options.trials < 1):
        raise SpaceError("--trials and --jobs must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", options.study):
        raise SpaceError(f"--study {options.study!r}: use letters, digits, '_', '.', '-' (it names a DVC experiment)")


def _data(root: Path, params: config.Params, search: Search, jobs: int):
    """(device, training tensors, validation tensors): the training files only; the test split stays unread."""
    import torch

    from mnist_pipeline.ml import data, training

    data_dir = root / "data" / "raw"
    data.verify_folder(data_dir, only=data.TRAIN_FILE_NAMES)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    device = training.resolve_device(params.train.device)
    everything = training.Tensors.from_split(data.load_split(data_dir, "train"), device)
    return (device, *everything.hold_out(search.validation, params.train.seed))


def _objective(search: Search, base, tracking: Tracking, train_data, validation_data, device):
    """Optuna's objective: one trial trained on the training split, scored by its validation accuracy, reported
    after every epoch to the pruner and to the trial's MLflow run."""
    import optuna

    from mnist_pipeline.ml import training

    def objective(trial) -> float:
        values = {dimension.key: dimension.suggest(trial) for dimension in search.space}
        trial_params = with_params(base, {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
        run_id = tracking.start_trial(trial.number, trial_params)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("worker", tracking.owner)  # which process ran it (several may share a study)

        def on_epoch(metrics: training.EpochMetrics) -> None:
            tracking.log_epoch(run_id, metrics.epoch, metrics.metrics())
            trial.report(metrics.val_accuracy, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {metrics.val_accuracy:.4f} after epoch {metrics.epoch}")

        ending = "failed"
        try:
            with open(os.devnull, "w") as quiet:
                result = training.train(trial_params.model, trial_params.train, train_data, None, device,
                                        on_epoch=on_epoch, log=quiet, validation_data=validation_data)  # fmt: skip
            ending = "complete"
        except optuna.TrialPruned:
            ending = "pruned"
            raise
        except KeyboardInterrupt:
            ending = "killed"
            raise
        finally:
            tracking.end_trial(run_id, ending)
        return result.history[-1].val_accuracy

    return objective


def _optimize(study, objective, options: Options, search: Search, tracking: Tracking) -> None:
    """Run trials up to --trials finished ones in the study (however many processes or runs of this command made
    them: processes sharing a study stop together) or --timeout; end the study's MLflow run as the search ended."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    callbacks, remaining = [_progress(options, search)], None
    if options.trials is not None:
        finished = counts(study)["complete"] + counts(study)["pruned"]
        remaining = max(0, options.trials - finished)
        callbacks.append(MaxTrialsCallback(options.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        if finished:
            print(f"the study has {finished} finished trials; {remaining} to go", file=sys.stderr)
    status = "FAILED"
    try:
        if remaining != 0:
            study.optimize(objective, n_trials=remaining, timeout=options.timeout, n_jobs=options.jobs,
                           callbacks=callbacks, catch=(), gc_after_trial=False)  # fmt: skip
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish(study, search, status)


def _progress(options: Options, search: Search):
    """Optuna callback: one line per finished trial."""
    started = time.perf_counter()

    def progress(study_, trial) -> None:
        done, best = counts(study_), _best(study_)
        finished = done["complete"] + done["pruned"]
        of = f"{finished}/{options.trials} finished" if options.trials else f"{finished} finished"
        outcome = (f"validation accuracy {100 * trial.value:.2f}%" if trial.value is not None
                   else trial.state.name.lower())  # fmt: skip
        shown = ", ".join(f"{d.key}={_short(d.value(trial.params))}" for d in search.space if d.key in trial.params)
        best_text = f"best {100 * best.value:.2f}% (trial {best.number})" if best else "no trial finished yet"
        print(f"trial {trial.number} ({of}): {outcome} [{shown}]  |  {best_text}  |  pruned {done['pruned']}  |  "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    return progress


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(list(value) if isinstance(value, tuple) else value)


def apply(command: list[str], tracking: Tracking, root: Path) -> int:
    """Run the pipeline as one DVC experiment with the winner's params; tag its MLflow run with the study."""
    import json

    print(f"running {shell_line(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=root, check=False)
    if done.returncode != 0:
        raise PipelineError(f"the pipeline run with the best params failed (exit status {done.returncode})")
    run_id = json.loads((root / "reports" / "export.json").read_text())["run_id"]
    tracking.client.set_tag(run_id, names.TUNE_STUDY, tracking.study)
    tracking.client.set_tag(tracking.parent, names.TUNE_APPLIED_RUN, run_id)
    print(f"the pipeline's MLflow run {run_id[:8]} is tagged {names.TUNE_STUDY}={tracking.study}", file=sys.stderr)
    return 0
