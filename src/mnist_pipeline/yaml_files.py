"""YAML files read within bounds: params.yaml and tune.yaml are a few KB each, so a hostile one (a link to /dev/zero,
an alias bomb, millions of keys, deep nesting) is one line within a second and a few MB, never a hang or a
traceback; and a key given twice in a mapping is a mistake, not "the last wins"."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from mnist_pipeline.errors import PipelineError


class ConfigError(PipelineError):
    """A params or tune file that is not what it must be."""


MAX_YAML_BYTES = 256 * 2**10
MAX_YAML_NODES = 10_000  # values, keys and entries, each alias counted as what it stands for
MAX_YAML_DEPTH = 32
QUOTED_VALUE = reprlib.Repr()  # its limits as attributes: Python 3.11's takes no arguments
QUOTED_VALUE.maxstring = QUOTED_VALUE.maxother = 60
QUOTED_VALUE.maxlist = QUOTED_VALUE.maxtuple = QUOTED_VALUE.maxdict = 6


class _UniqueKeys(yaml.SafeLoader):
    """YAML as ``yaml.safe_load`` reads it, but a key given twice in one mapping is a mistake, not "the last wins"
    (DVC refuses such a file later, in many lines)."""

    def fetch_flow_collection_start(self, token_class):  # `[` or `{`: too deep is refused as soon as it is read
        if self.flow_level >= MAX_YAML_DEPTH:
            raise YamlBeyondBounds(f"it nests deeper than {MAX_YAML_DEPTH} levels")
        super().fetch_flow_collection_start(token_class)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {quoted(key)} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                    "keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


class YamlBeyondBounds(yaml.YAMLError):
    """Valid YAML, but nested deeper or expanding further than a params or tune file can need."""


def quoted(value: Any) -> str:
    """``repr(value)``, cut to a few dozen characters: an error message never carries a whole value."""
    return QUOTED_VALUE.repr(value)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing a key given twice in a mapping, and a document that nests deeper than
    MAX_YAML_DEPTH or holds more than MAX_YAML_NODES once its aliases are expanded (yaml.YAMLError)."""
    loader = _UniqueKeys(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlBeyondBounds(f"it nests deeper than {MAX_YAML_DEPTH} levels") from None
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_size(root: yaml.Node) -> None:
    """Count the nodes of a composed document as its values will hold them (an alias as many times as it is
    used), without expanding anything: each node's count is computed once."""
    counts: dict[int, int] = {}
    stack = [(root, 1, False)]
    while stack:
        node, depth, children_counted = stack.pop()
        if id(node) in counts and not children_counted:
            continue
        children = (
            [child for pair in node.value for child in pair]
            if isinstance(node, yaml.MappingNode)
            else (node.value if isinstance(node, yaml.SequenceNode) else [])
        )
        if depth > MAX_YAML_DEPTH:
            raise YamlBeyondBounds(f"it nests deeper than {MAX_YAML_DEPTH} levels")
        if children_counted:
            if any(id(child) not in counts for child in children):
                raise YamlBeyondBounds("an alias refers to a value that holds it")
            counts[id(node)] = 1 + sum(counts[id(child)] for child in children)
            if counts[id(node)] > MAX_YAML_NODES:
                raise YamlBeyondBounds(f"it holds more than {MAX_YAML_NODES:,} values once its aliases are expanded")
            continue
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children if id(child) not in counts)


def read_yaml_file(path: Path) -> Any:
    """A YAML file of at most MAX_YAML_BYTES of UTF-8 text, read by `load_yaml`. Raises FileNotFoundError,
    yaml.YAMLError, or ConfigError for what is not such a file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file (a folder, device or FIFO)")
    with path.open("rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_YAML_BYTES // 2**10} KiB; refused (it should hold a few KB)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return load_yaml(text)


def yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML file, in one line: where and what, as the parser or our checks say."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:200]
    if problem.startswith("the key "):
        return f"{path}: {problem}"
    if isinstance(exc, YamlBeyondBounds):
        return f"{path} is refused: {problem}"
    return f"{path} is not valid YAML{where}: {problem}"
