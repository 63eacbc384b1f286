"""dvc.yaml's code deps are computed from the stage scripts' imports (``mnist_pipeline.code_deps``): they are never
stale, and what the computation finds is what a stage can load."""

from __future__ import annotations

from pathlib import Path

from mnist_pipeline import code_deps
from tests.helpers import REPO_ROOT


def test_dvc_yaml_lists_the_code_each_stage_script_can_load():
    text = (REPO_ROOT / "dvc.yaml").read_text()
    assert code_deps.rewritten(text, REPO_ROOT) == text, (
        f"dvc.yaml's code deps are stale: run `{code_deps.COMMAND}` in the project root and commit dvc.yaml"
    )


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_imports_are_followed_everywhere_and_a_folder_loaded_whole_is_listed_as_the_folder(tmp_path):
    root = package(tmp_path, {
        "stages/s.py": "from mnist_pipeline import a\n\ndef main():\n    from mnist_pipeline.sub import b\n",
        "src/mnist_pipeline/__init__.py": "",
        "src/mnist_pipeline/a.py": "import json\nfrom mnist_pipeline.errors import PipelineError\n",
        "src/mnist_pipeline/errors.py": "",
        "src/mnist_pipeline/unused.py": "",
        "src/mnist_pipeline/sub/__init__.py": "",
        "src/mnist_pipeline/sub/b.py": "from mnist_pipeline.sub.c import thing\n",
        "src/mnist_pipeline/sub/c.py": "thing = 1\n",
    })  # fmt: skip
    assert code_deps.code_deps("s", root) == [
        "stages/s.py", "src/mnist_pipeline/__init__.py", "src/mnist_pipeline/a.py", "src/mnist_pipeline/errors.py",
        "src/mnist_pipeline/sub",
    ]  # fmt: skip


def test_rewriting_replaces_only_the_code_deps_and_keeps_the_rest(tmp_path):
    root = package(tmp_path, {"stages/s.py": "import mnist_pipeline.a\n", "src/mnist_pipeline/__init__.py": "",
                              "src/mnist_pipeline/a.py": "", "src/mnist_pipeline/b.py": ""})  # fmt: skip
    stale = "stages:\n  s:\n    cmd: python stages/s.py  # why\n    deps:\n      - src/mnist_pipeline/b.py\n" \
            "      - data/raw\n    outs:\n      - out\n"  # fmt: skip
    assert code_deps.rewritten(stale, root) == (
        "stages:\n  s:\n    cmd: python stages/s.py  # why\n    deps:\n      - stages/s.py\n"
        "      - src/mnist_pipeline/__init__.py\n      - src/mnist_pipeline/a.py\n      - data/raw\n"
        "    outs:\n      - out\n"
    )
