"""dvc.yaml's code deps, computed rather than kept by hand.

A stage's code deps are the files of this package its script can load: every ``import`` of ``mnist_pipeline``,
at the top of a module or inside a function, followed from the script through the modules it names. An edit to
any of them reruns that stage and those after it; an edit elsewhere reruns nothing. A folder whose every module
the stage can load is listed as the folder.

``python -m mnist_pipeline.code_deps`` writes them into dvc.yaml (each stage's deps list starts with them); a test
fails, naming that command, when they are stale.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE = "mnist_pipeline"
COMMAND = "python -m mnist_pipeline.code_deps"
_CODE_DEP = re.compile(r"^\s+- (stages/|src/)\S+\.py$|^\s+- src/\S+$")


def closure(script: Path, src: Path) -> set[Path]:
    """The script and every module of the package (under ``src``) it can load, package ``__init__`` files
    included."""
    todo, seen = [Path(script)], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported(path):
            todo += _files(module, src)
    return seen


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _files(module: str, src: Path) -> list[Path]:
    """The files that importing ``module`` runs (``a.b.c``: a/__init__.py, a/b/__init__.py, a/b/c.py); a name
    that is not a module (a function imported from one) adds nothing."""
    files, folder = [], src
    for part in module.split("."):
        if (folder / part).is_dir():
            folder = folder / part
            files.append(folder / "__init__.py")
        elif (folder / f"{part}.py").is_file():
            files.append(folder / f"{part}.py")
            break
        else:
            break
    return [f for f in files if f.is_file()]


def code_deps(stage: str, root: Path) -> list[str]:
    """The code deps of ``stages/<stage>.py``, relative to ``root``: its script first, then the package's files
    and folders in order."""
    src = root / "src"
    loaded = closure(root / "stages" / f"{stage}.py", src)
    return [f"stages/{stage}.py", *(p.relative_to(root).as_posix() for p in _collapsed(src / PACKAGE, loaded))]


def _collapsed(folder: Path, loaded: set[Path]) -> list[Path]:
    modules = sorted(folder.rglob("*.py"))
    if modules and all(m in loaded for m in modules):
        return [folder]
    found = [m for m in sorted(folder.glob("*.py")) if m in loaded]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"):
        found += _collapsed(sub, loaded)
    return found


def rewritten(dvc_yaml: str, root: Path) -> str:
    """dvc.yaml's text with each stage's code deps replaced by `code_deps`' (the rest of the file as it is)."""
    out: list[str] = []
    stage = None
    lines = iter(dvc_yaml.splitlines())
    for line in lines:
        if re.match(r"^  [a-z_]+:$", line):
            stage = line.strip()[:-1]
        if _CODE_DEP.match(line):
            continue  # replaced by the computed list, written under `deps:`
        out.append(line)
        if stage and line.strip() == "deps:":
            indent = line[: len(line) - len(line.lstrip())] + "  "
            out += [f"{indent}- {dep}" for dep in code_deps(stage, root)]
    return "\n".join(out) + "\n"


def main() -> int:
    root = Path.cwd()
    dvc_yaml = root / "dvc.yaml"
    text = dvc_yaml.read_text()
    new = rewritten(text, root)
    if new == text:
        print("dvc.yaml's code deps are up to date")
        return 0
    dvc_yaml.write_text(new)
    print("dvc.yaml's code deps rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
