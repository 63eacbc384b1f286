"""Every command, subcommand and option of `mnist-pipeline` (and of the stage scripts) explains itself in --help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mnist_pipeline import bench, cli
from mnist_pipeline.stages import build_parser as stage_parser
from mnist_pipeline.stages import download, evaluate, export, train


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def parsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.build_parser()
    found = {"mnist-pipeline": top, **{f"mnist-pipeline {name}": p for name, p in subcommands(top).items()}}
    found["mnist-pipeline bench"] = bench.build_parser()  # bench parses its own options
    for stage in (download, train, evaluate, export):
        found[f"stages/{stage.__name__.rsplit('.', 1)[1]}.py"] = stage_parser(stage)
    return found


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


@pytest.mark.parametrize("name", sorted(parsers()))
def test_each_command_has_a_description_and_each_option_a_help_text_with_its_default(name):
    parser = parsers()[name]
    assert parser.description and len(parser.description.split()) >= 5, f"{name}: no real description"
    for action in options(parser):
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{name} {label}: no help text"
        is_flag = isinstance(action, argparse._StoreConstAction)  # store_true/const: the default is its absence
        shows_default = is_flag or action.default in (None, [], argparse.SUPPRESS) or "%(default)" in action.help
        assert shows_default, f"{name} {label}: its help does not show its default ({action.default!r})"
    parser.format_help()  # every %(...)s in the help texts expands


def test_each_subcommand_is_listed_with_a_one_line_summary():
    for name, action in [(a.dest, a) for a in cli.build_parser()._subparsers._group_actions[0]._choices_actions]:
        assert action.help and len(action.help.split()) >= 4, f"{name}: no summary in `mnist-pipeline --help`"


@pytest.mark.parametrize("command", ["predict", "compare", "reproduce"])
def test_the_commands_people_use_most_show_examples(command):
    epilog = subcommands(cli.build_parser())[command].epilog or ""
    assert epilog.count(f"mnist-pipeline {command}") >= 2, f"{command}: fewer than two examples in its --help"


def test_help_is_printed_by_the_installed_command_for_every_subcommand():
    for name in [*subcommands(cli.build_parser()), None]:
        args = [sys.executable, "-m", "mnist_pipeline.cli", *([name] if name else []), "--help"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("usage: mnist-pipeline"), (name, out.stderr)
