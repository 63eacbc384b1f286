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

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_pipeline import config, names
from mnist_pipeline.commands.search_space import (
    Search,
    SpaceError,
    load_search,
    pipeline_command,
    with_params,
    yaml_value,
)
from mnist_pipeline.commands.tune_study import default_storage, fail_abandoned_trials, open_study
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import check_dvc_lock
from mnist_pipeline.tracking import store, studies


def shell_line(command: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)


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
    print("reading the training digits and opening the study", file=sys.stderr, flush=True)
    params = with_params(base, {})
    device, train_data, validation_data = _data(root, params, search, options.jobs)
    storage = options.storage or default_storage(root)
    tracking: studies.Tracking | None = None

    def trial_failed(study_, trial) -> None:  # its process died: its MLflow run ends KILLED, and says so
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and tracking is not None:
            tracking.end_trial(run_id, "killed")
        print(f"trial {trial.number} was left running by a process that is gone: marked failed", file=sys.stderr)

    seed = params.train.seed if options.seed is None else options.seed
    study = open_study(options.study, storage, search, seed, trial_failed)
    tracking = studies.Tracking(options.study, storage)
    fail_abandoned_trials(study, trial_failed)
    print(
        f"study {options.study!r} in {studies.safe_url(storage)}: {len(train_data):,} training digits, "
        f"{len(validation_data):,} for validation; MLflow run {tracking.parent[:8]} in experiment "
        f"{studies.EXPERIMENT!r}",
        file=sys.stderr,
    )
    objective = _objective(search, base, tracking, train_data, validation_data, device)
    _optimize(study, objective, options, search, tracking)
    best, done = studies.best(study), studies.counts(study)
    print(f"{done['complete']} trials complete, {done['pruned']} pruned, {done['fail']} failed", file=sys.stderr)
    if best is None:
        print("no trial finished: nothing to apply", file=sys.stderr)
        return 1
    command = pipeline_command(search, best.params, options.study, best.number)
    print(
        f"best: trial {best.number}, validation accuracy {100 * best.value:.2f}%. Rerun the pipeline with its "
        f"params (trained on all {len(train_data) + len(validation_data):,} training digits, evaluated on the test "
        "digits):",
        file=sys.stderr,
    )
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
    from mnist_pipeline.ml.tensors import Tensors

    data_dir = root / "data" / "raw"
    data.verify_folder(data_dir, only=data.TRAIN_FILE_NAMES)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    device = training.resolve_device(params.train.device)
    everything = Tensors.from_split(data.load_split(data_dir, "train"), device)
    return (device, *everything.hold_out(search.validation, params.train.seed))


def _objective(search: Search, base, tracking: studies.Tracking, train_data, validation_data, device):
    """Optuna's objective: one trial trained on the training split, scored by its validation accuracy, reported
    after every epoch to the pruner and to the trial's MLflow run."""
    import optuna

    from mnist_pipeline.ml import training
    from mnist_pipeline.ml.history import EpochMetrics

    def objective(trial) -> float:
        values = {dimension.key: dimension.suggest(trial) for dimension in search.space}
        trial_params = with_params(base, {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
        run_id = tracking.start_trial(trial.number, trial_params)
        shown = _drawn(search, trial)
        print(f"trial {trial.number}: training [{shown}]", file=sys.stderr, flush=True)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("worker", tracking.owner)  # which process ran it (several may share a study)

        def on_epoch(metrics: EpochMetrics) -> None:  # a line per epoch: a trial may take minutes on a busy CPU
            print(
                f"trial {trial.number}: epoch {metrics.epoch}/{trial_params.train.epochs}, validation accuracy "
                f"{100 * metrics.val_accuracy:.2f}%",
                file=sys.stderr,
                flush=True,
            )
            tracking.log_epoch(run_id, metrics.epoch, metrics.metrics())
            trial.report(metrics.val_accuracy, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {metrics.val_accuracy:.4f} after epoch {metrics.epoch}")

        ending = "failed"
        try:
            with open(os.devnull, "w") as quiet:
                result = training.train(
                    trial_params.model,
                    trial_params.train,
                    train_data,
                    None,
                    device,
                    on_epoch=on_epoch,
                    log=quiet,
                    validation_data=validation_data,
                )
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


def _optimize(study, objective, options: Options, search: Search, tracking: studies.Tracking) -> None:
    """Run trials up to --trials finished ones in the study (however many processes or runs of this command made
    them: processes sharing a study stop together) or --timeout; end the study's MLflow run as the search ended."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    callbacks, remaining = [_progress(options, search, tracking)], None
    if options.trials is not None:
        finished = studies.counts(study)["complete"] + studies.counts(study)["pruned"]
        remaining = max(0, options.trials - finished)
        callbacks.append(MaxTrialsCallback(options.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        if finished:
            print(f"the study has {finished} finished trials; {remaining} to go", file=sys.stderr)
    status = "FAILED"
    try:
        if remaining != 0:
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=options.timeout,
                n_jobs=options.jobs,
                callbacks=callbacks,
                catch=(),
                gc_after_trial=False,
            )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        winner = studies.best(study)
        values = {d.key: yaml_value(d.value(winner.params)) for d in search.space} if winner else {}
        tracking.finish(study, status, values)


def _progress(options: Options, search: Search, tracking: studies.Tracking):
    """Optuna callback: one line per finished trial."""
    started = time.perf_counter()

    def progress(study_, trial) -> None:
        done, best = studies.counts(study_), studies.best(study_)
        finished = done["complete"] + done["pruned"]
        of = f"{finished}/{options.trials} finished" if options.trials else f"{finished} finished"
        outcome = (
            f"validation accuracy {100 * trial.value:.2f}%" if trial.value is not None else trial.state.name.lower()
        )
        shown = _drawn(search, trial)
        best_text = f"best {100 * best.value:.2f}% (trial {best.number})" if best else "no trial finished yet"
        if best is not None:
            tracking.log_best(best.value, finished)
        print(
            f"trial {trial.number} ({of}): {outcome} [{shown}]  |  {best_text}  |  pruned {done['pruned']}  |  "
            f"{time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    return progress


def _drawn(search: Search, trial) -> str:
    """A trial's drawn params as the progress lines show them: ``train.lr=0.003, ...``."""
    return ", ".join(f"{d.key}={_short(d.value(trial.params))}" for d in search.space if d.key in trial.params)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(list(value) if isinstance(value, tuple) else value)


def apply(command: list[str], tracking: studies.Tracking, root: Path) -> int:
    """Run the pipeline as one DVC experiment with the winner's params; tag its MLflow run with the study."""
    import json

    print(f"running {shell_line(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=root, check=False)
    if done.returncode != 0:
        raise PipelineError(f"the pipeline run with the best params failed (exit status {done.returncode})")
    run_id = json.loads((root / "reports" / "last_run.json").read_text())["run_id"]
    tracking.client.set_tag(run_id, names.TUNE_STUDY, tracking.study)
    tracking.client.set_tag(tracking.parent, names.TUNE_APPLIED_RUN, run_id)
    print(f"the pipeline's MLflow run {run_id[:8]} is tagged {names.TUNE_STUDY}={tracking.study}", file=sys.stderr)
    return 0
