"""dvc.yaml's code deps hold every module of the project each stage loads, in every process it starts.

Each stage's command runs on tiny data with a ``sitecustomize`` on PYTHONPATH that, when a process exits, writes
down the project's modules in its ``sys.modules``: the stage's own process (and any process it starts) each leave
their list. A module the stage loads that dvc.yaml does not list would let `dvc repro` keep a result that the code
no longer gives. (The deps are computed from the imports, so they may also name a module a stage loads only on
another path, e.g. when it fails: see ``mnist_pipeline.code_deps``.)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.ml.data import load_split
from tests.helpers import git, make_repo, ran_stages, user_env

pytestmark = pytest.mark.e2e

RECORDER = """
import atexit, os, sys

def _record():
    loaded = [m for m in sys.modules if m == "mnist_pipeline" or m.startswith("mnist_pipeline.")]
    with open(os.path.join(os.environ["MODULES_LOG"], f"{os.getpid()}.txt"), "w") as out:
        out.write("\\n".join(loaded))

atexit.register(_record)
"""


def module_file(module: str, repo) -> str:
    """mnist_pipeline.ml.data -> src/mnist_pipeline/ml/data.py (a package: its __init__.py)."""
    base = "src/" + module.replace(".", "/")
    return f"{base}/__init__.py" if (repo / base).is_dir() else f"{base}.py"


def loaded_modules(log: Path) -> set[str]:
    return {m for f in log.glob("*.txt") for m in f.read_text().split()}


def test_each_stage_lists_the_code_it_loads(tmp_path, mirror_md5, http_mirror):
    repo = make_repo(tmp_path, mirror_md5)
    (tmp_path / "recorder").mkdir()
    (tmp_path / "recorder" / "sitecustomize.py").write_text(RECORDER)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():  # in pipeline order: each stage reads what the one before wrote
        log = tmp_path / f"modules-{name}"
        log.mkdir()
        env = user_env(MNIST_MIRROR=http_mirror, MODULES_LOG=str(log), PYTHONPATH=str(tmp_path / "recorder"))
        done = subprocess.run(shlex.split(stage["cmd"]), cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, f"stage {name} failed:\n{done.stderr}"
        _, script, *_ = shlex.split(stage["cmd"])  # python stages/<name>.py ...
        loaded = {module_file(m, repo) for m in loaded_modules(log)} | {script}
        listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
        listed |= {p.relative_to(repo).as_posix() for dep in stage["deps"] if dep.startswith("src/")
                   for p in (repo / dep).rglob("*.py")}  # fmt: skip
        if loaded - listed:
            problems.append(f"{name}: loads but does not list {sorted(loaded - listed)}")
    assert not problems, "dvc.yaml's code deps are wrong:\n" + "\n".join(problems)


STAGE_SCRIPT = '''"""Stage digit_counts: how many digits of each class a split of the data set holds."""

import json

from mnist_pipeline import stage
from mnist_pipeline.files import write_atomic


@stage.command
@stage.path("--data", "folder written by the download stage")
@stage.path("--out", "the count of each digit (JSON)")
def main(params, data, out):
    from mnist_pipeline.ml.data import load_split

    labels = load_split(data, params.digit_counts.split).labels
    write_atomic(out, json.dumps({str(d): int((labels == d).sum()) for d in range(10)}))


if __name__ == "__main__":
    main()
'''
SECTION_MODEL = """

class DigitCountsConfig(Section):
    SECTION = "digit_counts"
    split: Literal["train", "test"]
"""
DVC_STAGE = """
  digit_counts:
    cmd: python stages/digit_counts.py --data data/raw --out reports/digit_counts.json
    deps:
      - data/raw
    params: [digit_counts]
    outs:
      - reports/digit_counts.json
"""


def test_a_stage_with_settings_of_its_own_is_added_in_four_files_and_runs(tmp_path, mirror_md5, http_mirror):
    """What docs/pipeline.md tells a contributor to do: the script, its section in params.yaml and in config.py, its
    entry in dvc.yaml (its code deps written by the command that computes them)."""
    repo = make_repo(tmp_path, mirror_md5)
    (repo / "stages" / "digit_counts.py").write_text(STAGE_SCRIPT)
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "digit_counts:\n  split: test\n")
    config = repo / "src" / "mnist_pipeline" / "config.py"
    text = config.read_text().replace("\n\nclass Params(BaseModel):", SECTION_MODEL + "\n\nclass Params(BaseModel):")
    text = text.replace("    export: ExportConfig\n", "    export: ExportConfig\n    digit_counts: DigitCountsConfig\n")
    config.write_text(text)
    dvc_yaml = (repo / "dvc.yaml").read_text()
    plots = "\n# What `dvc plots show`"
    (repo / "dvc.yaml").write_text(dvc_yaml.replace(plots, DVC_STAGE + plots))
    env = user_env(MNIST_MIRROR=http_mirror, PYTHONPATH=str(repo / "src"))  # the copy's package, edited
    subprocess.run([sys.executable, "-m", "mnist_pipeline.code_deps"], cwd=repo, env=env, check=True)
    changed = git(repo, "status", "--porcelain").splitlines()
    assert len(changed) == 4, changed  # stages/digit_counts.py, params.yaml, config.py, dvc.yaml

    ran = subprocess.run(["dvc", "repro", "digit_counts"], cwd=repo, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    counts = json.loads((repo / "reports" / "digit_counts.json").read_text())
    assert sum(counts.values()) == len(load_split(repo / "data" / "raw", "test").labels)
    deps = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["digit_counts"]["deps"]
    assert "stages/digit_counts.py" in deps and "src/mnist_pipeline/ml/data.py" in deps

    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("split: test", "split: train"))
    again = subprocess.run(["dvc", "repro", "digit_counts"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and ran_stages(again) == ["params", "digit_counts"], again.stdout
    assert sum(json.loads((repo / "reports" / "digit_counts.json").read_text()).values()) > sum(counts.values())
