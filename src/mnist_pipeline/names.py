"""The names the pipeline writes and others read: MLflow experiment, metrics, tags and aliases. Defined here once."""

EXPERIMENT = "mnist-pipeline"

# Per-epoch metrics: MLflow metrics with the epoch as step, and the columns of reports/history.csv.
TRAIN_LOSS = "train_loss"
TEST_LOSS = "test_loss"
TEST_ACCURACY = "test_accuracy"
VAL_LOSS = "val_loss"  # on the training digits held out by train.validation (and by the tuner)
VAL_ACCURACY = "val_accuracy"
TRAIN_SECONDS = "train_seconds"
TEST_ERRORS = "test_errors"  # test digits the model gets wrong: reads apart where an accuracy rounds alike
ROBUST_ACCURACY = "robust_accuracy"  # mean accuracy of the robustness report (`ml.robustness`)
# The evaluate stage's metrics (reports/metrics.json) are logged into the run under this prefix.
FINAL = "final_"
PERCENT = "_percent"  # each final accuracy is logged again in percent (final_test_accuracy_percent)

# Run tags.
GIT_COMMIT = "git_commit"
DATA_MD5 = "data_md5"
DVC_EXP_NAME = "dvc_exp_name"
OWNER = "pipeline.owner"  # the process that has the run open: host:pid:start (see `repair`)
TRAINING_ID = "pipeline.training_id"  # the training whose model the run records (an id the train stage draws)
TRAINING_RUN = "pipeline.training_run"  # on a run whose training an earlier run recorded first: that run's id

DDP_WEIGHT_SPREAD = "ddp_weight_spread"  # largest weight difference between ranks after a data-parallel training
WORLD_SIZE = "world_size"  # tag: the processes the training ran in
NODES = "nodes"  # tag: the machines they ran on
GIT_COMMIT_MLFLOW = "mlflow.source.git.commit"  # MLflow's own commit tag (the UI's Source column)

# The tuner's runs (experiment TUNE_EXPERIMENT): one parent per study, nested children, one per trial.
TUNE_EXPERIMENT = "mnist-pipeline-tune"
PARENT_RUN = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
TUNE_STUDY = "tune.study"  # on the study's run, its trials' and the pipeline run --apply made
TUNE_ROLE = "tune.role"  # "study" (the parent) or "trial"
TUNE_STATE = "tune.state"  # a trial's end: complete, pruned, failed, killed
TUNE_TRIAL = "tune.trial"  # a trial's number
TUNE_STORAGE = "tune.storage"  # the study's storage URL, without its password
BEST_VAL_ACCURACY = "best_val_accuracy"  # on a study's run: the best trial's so far, step = trials finished
TUNE_BEST_TRIAL = "tune.best_trial"
TUNE_BEST = "tune.best."  # + a param's key: the best trial's value
TUNE_APPLIED_RUN = "tune.applied_run"  # the pipeline run --apply made

# Registered model version tags.
RUN_ID = "run_id"  # the run that logged the version
REGISTERING = "pipeline.registering"  # while a version is being registered: the registering process (see `repair`)
PROMOTION = "promotion"  # the promotion decision and its reason, set once the version's aliases have moved
ROBUST_REPORT = "robust_report"  # the robustness report robust_accuracy was measured on: comparable when equal

# Registered model aliases.
ALIAS_CANDIDATE = "candidate"  # the newest version
ALIAS_CHAMPION = "champion"  # the best version so far; what `predict` and `serve` use by default
CHAMPION = "champion"  # tag of the run whose model the champion alias names: "<model> v<version>"
REPRODUCES = "reproduces"  # tag of a run made by `mnist-pipeline reproduce`: the run id it reproduces


def lower_is_better(metric: str) -> bool:
    """A loss, a count of errors, a time: the smaller the better (an accuracy: the larger)."""
    return any(word in metric for word in ("loss", "errors", "seconds"))


def for_people(metric: str, value: float) -> str:
    """How people read a metric: an accuracy in percent, a loss to four places, seconds to a tenth, counts whole."""
    if "accuracy" in metric:
        return f"{100 * value:.2f}%"
    if "seconds" in metric:
        return f"{value:.1f}"
    if "errors" in metric:
        return f"{value:.0f}"
    return f"{value:.4f}"
