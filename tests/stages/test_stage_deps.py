"""dvc.yaml's code deps are exactly the project's modules each stage loads, in every process it starts.

Each stage's command runs on tiny data with a ``sitecustomize`` on PYTHONPATH that, when a process exits, writes
down the project's modules in its ``sys.modules``: the stage's own process (and any process it starts) each leave
their list. A module the stage loads
that dvc.yaml does not list would let `dvc repro` keep a result that the code no longer gives; one it lists but
never loads reruns the stage for nothing.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_repo, user_env

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
    """mnist_pipeline.stages.train -> src/mnist_pipeline/stages/train.py (a package: its __init__.py)."""
    base = "src/" + module.replace(".", "/")
    return f"{base}/__init__.py" if (repo / base).is_dir() else f"{base}.py"


def loaded_modules(log: Path) -> set[str]:
    return {m for f in log.glob("*.txt") for m in f.read_text().split()}


def test_each_stage_lists_exactly_the_code_it_loads(tmp_path, mirror_md5, http_mirror):
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
        _, option, module, *_ = shlex.split(stage["cmd"])  # python -m mnist_pipeline.stages.<name> ...
        assert option == "-m", stage["cmd"]
        loaded = {module_file(m, repo) for m in loaded_modules(log)} | {module_file(module, repo)}
        listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
        if loaded - listed:
            problems.append(f"{name}: loads but does not list {sorted(loaded - listed)}")
        if listed - loaded:
            problems.append(f"{name}: lists but never loads {sorted(listed - loaded)}")
    assert not problems, "dvc.yaml's code deps are wrong:\n" + "\n".join(problems)
