"""The Optuna study of `mnist-pipeline tune`: where it is kept, opening or continuing it (its space checked), and
failing the trials whose process is gone."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import yaml

from mnist_pipeline.commands.search_space import Search, SpaceError
from mnist_pipeline.tracking import studies

DEFAULT_STORAGE_FILE = Path("tuning") / "optuna.db"  # under the project root


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
                f"--storage {studies.safe_url(storage)}: cannot open the study's database ({problem}); check the URL, "
                "that its folder exists, and that the file is an Optuna database"
            ) from None
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    signature = {"space": {d.key: d.as_dict() for d in search.space}, "validation": search.validation}
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", yaml.safe_load(yaml.safe_dump(signature)))
    elif recorded != yaml.safe_load(yaml.safe_dump(signature)):
        raise SpaceError(
            f"the study {name!r} was made with another space or validation split; its trials would not "
            f"compare: use another --study name, or the space it was made with"
        )
    return study


OPEN_ATTEMPTS = 4


def _create_or_load(name: str, storage: str, search: Search, on_failed_trial):
    import optuna
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():  # Optuna calls the heartbeat experimental; it is what marks dead trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        database = RDBStorage(
            storage,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=on_failed_trial,
        )
    return optuna.create_study(
        study_name=name,
        storage=database,
        load_if_exists=True,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup_epochs),
    )


def fail_abandoned_trials(study, on_failed_trial) -> None:
    """Fail at once the running trials whose process, on this machine, is gone (kill -9), as Optuna's heartbeat
    would after GRACE_S (it fails those of other machines, calling the same ``on_failed_trial``)."""
    from optuna.trial import TrialState

    from mnist_pipeline.tracking import repair

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker and repair.owner_is_gone(worker):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            on_failed_trial(study, trial)
