"""The package's folders are layers: a module imports only from its own folder or from the ones below it."""

from __future__ import annotations

import ast

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "mnist_pipeline"
# Lowest first: the foundation (config, names, errors, files, network, datasets) is the package's top-level modules.
LAYERS = ["", "ml", "tracking", "stages", "commands", "cli"]
# Side by side, never importing each other: the stages (run by DVC) and the commands (run by people).
APART = {("stages", "commands"), ("commands", "stages")}


def layer(module: str) -> str:
    """mnist_pipeline.ml.data -> "ml"; mnist_pipeline.config -> ""; mnist_pipeline.cli -> "cli"."""
    parts = module.split(".")[1:]
    if not parts or (parts[0] not in LAYERS and len(parts) == 1):
        return ""
    return parts[0]


def imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_pipeline"):
            found |= (
                {f"{node.module}.{alias.name}" for alias in node.names}
                if node.module == "mnist_pipeline"
                else {node.module}
            )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnist_pipeline")}
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer("mnist_pipeline." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for imported in imports(path):
            other = layer(imported)
            if LAYERS.index(other) > LAYERS.index(own) or (own, other) in APART:
                wrong.append(f"{path.relative_to(PACKAGE)} ({own or 'foundation'}) imports {imported} ({other})")
    assert not wrong, "\n".join(wrong)
