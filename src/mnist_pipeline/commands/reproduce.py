"""`mnist-pipeline reproduce RUN_ID`: rerun the pipeline with a past run's code and params, beside the workspace.

The run's commit is checked out in a temporary git worktree (the user's workspace is not touched), its
params.yaml is set to the run's logged params with ``export.register: false``, and `dvc repro --force` runs every
stage again there (forced: DVC's run cache would otherwise restore the old outputs instead of recomputing them).
It is not a DVC experiment: `dvc exp run` keeps its state in git refs every worktree of a repository shares
(``refs/exps/exec/*``), so an experiment run in the workspace meanwhile moved or removed them under it ("'NoneType'
object is not subscriptable"); a plain `dvc repro` in its own worktree shares nothing with the workspace but the
cache. When the project's ``data/raw`` holds the run's data, verified (same fingerprint), the download stage reads
it as a local mirror: no network, no ``MNIST_MIRROR`` needed. The export stage records the run and logs its model
but registers no version and moves no alias. The new MLflow run lands in the same store, named ``repro-<id>-<pid>``
and tagged ``reproduces=<run id>``. Afterwards the two runs' data fingerprints and final test metrics are compared:
with the same data, the same locked environment and the same hardware, accuracy and loss are equal to the last
digit on the CPU. When they are not, the run tags that record the environment (``environment``) say which of those
differ.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import check_dvc_lock
from mnist_pipeline.ml import environment
from mnist_pipeline.ml.data import MIRROR_ENV
from mnist_pipeline.tracking import store

# What `dvc repro` advises at its end (stage the lock, turn autostage on, push): for the user's workspace, not for
# the temporary worktree a reproduction runs in.
DVC_WORKSPACE_ADVICE = (
    b"To track the changes with git",
    b"git add ",
    b"To enable auto staging",
    b"dvc config core.autostage",
    b"Use `dvc push`",
)


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def _write_params(params_file: Path, logged: dict[str, str]) -> None:
    """Set every value of ``params_file`` to the run's logged one ("train.lr" -> "0.01"; lists and mappings were
    logged as JSON, which is YAML too)."""
    import yaml

    params = yaml.safe_load(params_file.read_text())
    for key, value in logged.items():
        section, _, name = key.partition(".")
        if section in params and name in params[section]:
            params[section][name] = _param_value(value, params[section][name])
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def _param_value(logged: str, current):
    """A logged param as params.yaml holds it: lists were logged as their items ("16, 32"), mappings as "key:
    value" pairs (earlier runs: as JSON, which is YAML too)."""
    import yaml

    if isinstance(current, list) and not logged.startswith("["):
        return yaml.safe_load(f"[{logged}]")
    if isinstance(current, dict) and not logged.startswith("{"):
        return yaml.safe_load(f"{{{logged}}}")
    return yaml.safe_load(logged)


METRICS = (names.FINAL + names.TEST_ACCURACY, names.FINAL + names.TEST_LOSS)


def find_run(client, reference: str, uri: str) -> str:
    """The full id of the run ``reference`` names: a whole run id, a unique prefix of one (as `compare` prints
    them), or the name of a DVC experiment (a run's name). Ambiguous or unknown: one line saying which runs match."""
    if re.fullmatch(r"[0-9a-f]{32}", reference):
        return reference
    from mlflow.entities import ViewType

    experiment = client.get_experiment_by_name(names.EXPERIMENT)
    runs = (
        client.search_runs([experiment.experiment_id], max_results=50_000, run_view_type=ViewType.ALL)
        if experiment
        else []
    )  # a deleted run too: `_original` says it is deleted
    matches = {
        r.info.run_id: r.info.run_name
        for r in runs
        if r.info.run_id.startswith(reference.lower())
        or reference in (r.info.run_name, r.data.tags.get(names.DVC_EXP_NAME))
    }
    if len(matches) == 1:
        return next(iter(matches))
    if not matches:
        raise PipelineError(
            f"no run in {uri} has an id starting with {reference!r} or that name; `mnist-pipeline compare` lists "
            "the runs, with the first 8 characters of each id"
        )
    listed = ", ".join(f"{run_id[:12]} ({name})" for run_id, name in sorted(matches.items()))
    raise PipelineError(f"{reference!r} matches {len(matches)} runs: {listed}; give more of the run id")


def _local_mirror(root: Path, fingerprint: str | None, folder: Path, log) -> bool:
    """Fill ``folder`` with the run's data as a mirror the download stage reads (``.gz`` files) when the project's
    ``data/raw`` holds them, verified (its MD5SUMS) and the run's own (same fingerprint); False when it does not."""
    import gzip

    from mnist_pipeline.ml import data

    raw = root / DATA_DIR
    try:
        if data.verify_folder(raw) != fingerprint and fingerprint:
            return False
    except PipelineError:
        return False
    for name in data.FILE_NAMES:
        with (raw / name).open("rb") as source, gzip.open(folder / f"{name}.gz", "wb", compresslevel=1) as target:
            shutil.copyfileobj(source, target)
    print(f"the run's data, verified, in {raw}: the download stage reads it from there (no network)", file=log)
    return True


DATA_DIR = Path("data/raw")  # the download stage's out in dvc.yaml


@dataclass(frozen=True)
class Reproduction:
    run_id: str  # the new run
    original: dict[str, float]  # final metrics
    reproduced: dict[str, float]
    environment_changes: list[str]  # what `environment.differences` finds between the two runs' tags


def _original(client, run_id: str, uri: str, root: Path, log):
    """The run to reproduce and its commit, checked: in the store, its commit in this repository, a result."""
    from mlflow.exceptions import MlflowException

    try:
        original = client.get_run(run_id)
    except MlflowException:
        raise PipelineError(
            f"run {run_id} is not in the store {uri}; `mnist-pipeline compare` lists the runs"
        ) from None
    if original.info.lifecycle_stage == "deleted":
        raise PipelineError(
            f"run {run_id} is deleted; restore it to reproduce it (`mlflow.MlflowClient().restore_run('{run_id}')`, "
            "or the UI's deleted runs), unless `mlflow gc` has removed it for good"
        )
    commit = original.data.tags.get(names.GIT_COMMIT, "unknown")
    if _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=root).returncode != 0:
        raise PipelineError(
            f"run {run_id} was made from commit {commit[:12]}, which this repository does not have "
            "(never committed, or rebased away); fetch that commit, or rerun its params on the current code with "
            "`dvc exp run -S ...`"
        )
    if original.info.status != "FINISHED":
        print(
            f"note: run {run_id} never finished (status {original.info.status}): reproducing what it had done", file=log
        )
    if METRICS[0] not in original.data.metrics:
        raise PipelineError(f"run {run_id} never finished its evaluate stage: there is no result to reproduce")
    return original, commit


def _rerun(original, commit: str, name: str, root: Path, uri: str, log) -> None:
    """The run's commit and params, in a temporary worktree; the new run is named ``name``."""
    import yaml

    run_id = original.info.run_id
    worktree = Path(tempfile.mkdtemp(prefix="mnist-reproduce-")) / "repo"
    if _git("worktree", "add", "--detach", str(worktree), commit, cwd=root).returncode != 0:
        raise PipelineError(f"could not check out commit {commit[:12]} into a temporary worktree")
    try:
        # The export stage names its run after DVC_EXP_NAME, which `dvc exp run` sets: given here, the code of any
        # commit names the new run so, and tags it dvc_exp_name, though this is no DVC experiment.
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": name}
        env.pop("DVC_ROOT", None)
        mirror = env.get(MIRROR_ENV, "")
        if mirror and "://" not in mirror:  # a relative folder means the same folder from inside the worktree
            env[MIRROR_ENV] = str(Path(mirror).expanduser().resolve())
        subprocess.run(
            ["dvc", "cache", "dir", "--local", str(root / ".dvc" / "cache")],
            cwd=worktree,
            env=env,
            check=True,
            capture_output=True,
        )
        # The whole pipeline, its export recording the run and the model but registering nothing. Code from before
        # export.register recorded its run in the train stage: it stops at evaluate.
        registers = "register" in yaml.safe_load((worktree / "params.yaml").read_text()).get("export", {})
        _write_params(
            worktree / "params.yaml", {**original.data.params, **({"export.register": "false"} if registers else {})}
        )
        mirror = worktree.parent / "mirror"
        mirror.mkdir()
        if _local_mirror(root, original.data.tags.get(names.DATA_MD5), mirror, log):
            env[MIRROR_ENV] = str(mirror)  # tried first; the download stage still verifies every file
        print(f"reproducing run {run_id} (commit {commit[:12]}) as run {name!r}, in a worktree of its own", file=log)
        command = ["dvc", "repro", "--force"] + ([] if registers else ["evaluate"])
        process = subprocess.Popen(command, cwd=worktree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:  # as it comes, but DVC's advice for a workspace: this one is removed at once
            if line.strip() and not line.lstrip().startswith(DVC_WORKSPACE_ADVICE):
                log.write(line.decode(errors="replace"))
                log.flush()
        if process.wait() != 0:
            raise PipelineError(f"the pipeline failed while reproducing run {run_id} (see the output above)")
    finally:
        _git("worktree", "remove", "--force", str(worktree), cwd=root)
        shutil.rmtree(worktree.parent, ignore_errors=True)


def reproduce(run_id: str, root: Path, log=sys.stderr) -> Reproduction:
    """Rerun ``run_id`` and compare the new run with it."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    check_dvc_lock(root)
    uri = store.configure(root)
    client = MlflowClient()
    original, commit = _original(client, find_run(client, run_id, uri), uri, root, log)
    run_id = original.info.run_id
    name = f"repro-{run_id[:8]}-{os.getpid()}"
    _rerun(original, commit, name, root, uri, log)
    new = client.search_runs([original.info.experiment_id], f"tags.{names.DVC_EXP_NAME} = '{name}'")
    if not new:
        raise PipelineError(f"the reproduced run of {run_id} was not found in {uri}")
    reproduced = new[0]
    client.set_tag(reproduced.info.run_id, names.REPRODUCES, run_id)
    # Nested under the run it reproduces (MLflow's own parent tag): the runs table shows it there, folded, rather
    # than beside the runs it would crowd (the same figures sort it next to, or above, the original).
    client.set_tag(reproduced.info.run_id, MLFLOW_PARENT_RUN_ID, run_id)
    was, now = original.data.tags.get(names.DATA_MD5), reproduced.data.tags.get(names.DATA_MD5)
    if was and now and was != now:
        raise PipelineError(
            f"run {run_id} trained on other data (fingerprint {was[:12]}, now {now[:12]}): the mirror served "
            f"different files, so its result cannot be reproduced exactly; the new run is {reproduced.info.run_id}"
        )
    return Reproduction(
        reproduced.info.run_id,
        {m: original.data.metrics[m] for m in METRICS},
        {m: reproduced.data.metrics.get(m, float("nan")) for m in METRICS},
        environment.differences(original.data.tags, reproduced.data.tags),
    )


def main(run_id: str) -> int:
    """Print the comparison; exit status 0 when every final metric is reproduced exactly."""
    result = reproduce(run_id, store.project_root())
    before, after = result.original, result.reproduced
    for metric in METRICS:
        same = (
            "exactly equal"
            if before[metric] == after[metric]
            else f"DIFFERENT by {after[metric] - before[metric]:+.3g}"
        )
        print(f"{metric}: reproduced {after[metric]!r}, original {before[metric]!r}: {same}")
    print(f"run {result.run_id} reproduces {run_id}")
    if before != after:
        if result.environment_changes:
            print("what differs between the two runs' environments (see docs/reproducibility.md):")
            for change in result.environment_changes:
                print(f"  {change}")
        else:
            print("the two runs' recorded environments are the same: the difference is not explained by them")
    return 0 if before == after else 1
