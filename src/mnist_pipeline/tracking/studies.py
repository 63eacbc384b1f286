"""`mnist-pipeline tune` in MLflow: the study is one parent run, each trial a child run; at the end the parent gets
the counts, the best trial and Optuna's figures. Client calls only, so that trials of several threads (--jobs) or
machines (a shared study) write side by side."""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from mnist_pipeline import config, names
from mnist_pipeline.tracking import store

EXPERIMENT = names.TUNE_EXPERIMENT


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {
        state: sum(t.state == getattr(TrialState, state.upper()) for t in trials)
        for state in ("complete", "pruned", "fail", "running")
    }


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
        tags = {names.TUNE_STUDY: study, names.TUNE_ROLE: "study", names.TUNE_STORAGE: safe_url(storage)}
        mine = self.client.create_run(self.experiment_id, tags=with_context(tags), run_name=f"study {study}")
        first = oldest()
        if first.info.run_id != mine.info.run_id:
            self.client.delete_run(mine.info.run_id)
        return first.info.run_id

    def start_trial(self, number: int, params: config.Params) -> str:
        tags = {
            names.PARENT_RUN: self.parent,
            names.TUNE_STUDY: self.study,
            names.TUNE_ROLE: "trial",
            names.TUNE_TRIAL: str(number),
            names.OWNER: self.owner,
        }
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

    def log_best(self, accuracy: float, finished: int) -> None:
        """The best validation accuracy so far on the study's run, step = trials finished: its row in the runs
        table shows a figure (and a chart of the search) while its trials are collapsed under it."""
        from mlflow.entities import Metric

        best = Metric(names.BEST_VAL_ACCURACY, accuracy, int(time.time() * 1000), finished)
        store.despite_insert_races(lambda: self.client.log_batch(self.parent, metrics=[best]))

    def end_trial(self, run_id: str, state: str) -> None:
        self.client.set_tag(run_id, names.TUNE_STATE, state)
        status = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[state]
        self.client.set_terminated(run_id, status)

    def finish(self, study, status: str, best_values: Mapping[str, str]) -> None:
        """The study's summary on the parent run: counts, best trial and its params, Optuna's figures. A trial run of
        this process still open (a Ctrl-C between two MLflow calls) is ended KILLED. ``best_values``: the best
        trial's params, as `dvc exp run -S` takes them."""
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
        winner = best(study)
        if winner is not None:
            finished = done["complete"] + done["pruned"]
            metrics.append(Metric(names.BEST_VAL_ACCURACY, winner.value, now, finished))
            tags.append(RunTag(names.TUNE_BEST_TRIAL, str(winner.number)))
            tags += [RunTag(names.TUNE_BEST + key, value) for key, value in best_values.items()]
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


def safe_url(storage: str) -> str:
    """A storage URL without its password, as a tag may show it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(storage)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return storage


def best(study):
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value) if complete else None


def write_figures(study, folder: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG files (those that can
    be drawn: importances need finished trials enough for Optuna to tell params apart). Optuna's warnings stay
    here."""
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
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always", UserWarning)
                    axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # too few finished trials for this figure yet
            if any("will be equal" in str(w.message) for w in said):  # Optuna: too few trials for importances
                plt.close(axes.figure if hasattr(axes, "figure") else axes.flat[0].figure)
                continue
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
