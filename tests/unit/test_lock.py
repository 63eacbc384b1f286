"""The committed dvc.lock matches the committed code, params and results: a fresh clone's `dvc repro` has nothing to
redo (after the data is downloaded). After an edit to anything a stage loads or reads, rerun the pipeline on real
MNIST and commit the lock, as docs/reproducibility.md says."""

from __future__ import annotations

import hashlib

import yaml

from tests.helpers import REPO_ROOT


def md5(path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def param(params: dict, key: str):
    section, _, name = key.partition(".")
    return params[section][name] if name else params[section]


def test_the_committed_lock_matches_the_committed_code_params_and_reports():
    lock = yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())["stages"]
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    stale = []
    for name, stage in stages.items():
        locked = lock.get(name)
        if locked is None:
            stale.append(f"{name}: not in dvc.lock")
            continue
        if locked["cmd"].split() != stage["cmd"].split():
            stale.append(f"{name}: its command changed")
        deps = {dep["path"]: dep for dep in locked.get("deps", [])}
        if set(deps) != set(stage["deps"]):
            stale.append(f"{name}: deps {sorted(set(deps) ^ set(stage['deps']))} differ")
        for path, dep in deps.items():  # the files git holds: code, and the reports kept beside dvc.lock
            file = REPO_ROOT / path
            if file.is_file() and path.startswith(("src/", "stages/", "reports/")) and md5(file) != dep["md5"]:
                stale.append(f"{name}: {path} changed")
        recorded = locked.get("params", {}).get("params.yaml", {})
        for key, value in recorded.items():
            if param(params, key) != value:
                stale.append(f"{name}: params.yaml {key} changed")
        for out in locked.get("outs", []):  # outputs kept in git (cache: false): the committed results
            file = REPO_ROOT / out["path"]
            if file.is_file() and out["path"].startswith("reports/") and md5(file) != out["md5"]:
                stale.append(f"{name}: output {out['path']} is not the one dvc.lock records")
    assert not stale, (
        "dvc.lock does not match the committed code and params; rerun the pipeline on real MNIST "
        "(MNIST_MIRROR=<folder with the four .gz files> dvc repro) and commit dvc.lock and reports/:\n"
        + "\n".join(stale)
    )
