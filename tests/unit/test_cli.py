"""Every command of `mnist-pipeline`, of the stages and of the benchmarks explains itself in --help; the servers
listen on this machine only unless told otherwise."""

from __future__ import annotations

import click
import pytest

from benchmarks import tutorial
from mnist_pipeline import cli, config, names
from tests.helpers import stage_script


def commands() -> dict[str, click.Command]:
    found = {"mnist-pipeline": cli.main, **{f"mnist-pipeline {name}": c for name, c in cli.main.commands.items()}}
    found["python -m benchmarks"] = tutorial.main
    for stage in ("params", "download", "train", "evaluate", "export"):
        found[f"python stages/{stage}.py"] = stage_script(stage).main
    return found


@pytest.mark.parametrize("name", sorted(commands()))
def test_each_command_has_a_description_and_each_option_a_help_text_with_its_default(name):
    command = commands()[name]
    assert command.help and len(command.help.split()) >= 5, f"{name}: no real description"
    # As --help builds it: a subcommand's context inherits the group's settings (show_default).
    parent = click.Context(cli.main, info_name="mnist-pipeline", **cli.main.context_settings)
    context = click.Context(command, parent=parent if name.startswith("mnist-pipeline ") else None, info_name=name,
                            **command.context_settings)  # fmt: skip
    for option in (p for p in command.params if isinstance(p, click.Option)):
        label = "/".join(option.opts)
        assert option.help and option.help.strip(), f"{name} {label}: no help text"
        _, shown = option.get_help_record(context)
        default = option.get_default(context, call=False)
        no_default = option.is_flag or option.required or default in (None, ()) or repr(default) == "Sentinel.UNSET"
        assert no_default or "[default: " in shown, f"{name} {label}: its help does not show its default"
    assert command.get_help(context)  # the help renders


def test_each_subcommand_is_listed_with_a_one_line_summary():
    for name, command in cli.main.commands.items():
        assert len(command.get_short_help_str(limit=200).split()) >= 4, f"{name}: no summary in `mnist-pipeline --help`"


@pytest.mark.parametrize("command", ["predict", "compare", "reproduce", "tune"])
def test_the_commands_people_use_most_show_examples(command):
    epilog = cli.main.commands[command].epilog or ""
    assert epilog.count(f"mnist-pipeline {command}") >= 2, f"{command}: fewer than two examples in its --help"


def test_servers_listen_on_127_0_0_1_unless_told_otherwise():
    for name in ("ui", "serve"):
        command = cli.main.commands[name]
        context = command.make_context(name, [])
        assert context.params["host"] == "127.0.0.1"
    assert cli.main.commands["serve"].make_context("serve", []).params["allow_pickle"] is False
    assert cli.main.commands["predict"].make_context("predict", ["x"]).params["allow_pickle"] is False


def test_the_ui_address_asks_for_the_model_training_view_in_the_route_itself():
    """MLflow 3's UI reads ``workflowType`` from the query of the ``#`` route; before the ``#`` it opened the GenAI
    overview in a fresh browser."""
    from types import SimpleNamespace

    from mnist_pipeline.commands import ui
    from mnist_pipeline.tracking import runs

    assert ui.address("127.0.0.1", 5000, SimpleNamespace(experiment_id="1", tags={})) == (
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    )
    assert ui.address("127.0.0.1", 5000, None) == "http://127.0.0.1:5000/#/?workflowType=machine_learning"
    # once a run has stored the pipeline's view of the runs table on the experiment, the address opens it
    shared = SimpleNamespace(experiment_id="1", tags={runs.RUNS_VIEW_TAG: runs.runs_view()})
    assert ui.address("127.0.0.1", 5000, shared) == (
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=runs-apart"
    )


def test_the_runs_view_names_metrics_and_params_the_runs_have():
    """Every column of the shared runs view is a param the run logs or a metric the export stage logs."""
    from mnist_pipeline.tracking import runs
    from tests.helpers import REPO_ROOT

    assert set(runs.RUNS_VIEW_PARAMS) <= set(runs.flat_params(config.load(REPO_ROOT / "params.yaml")))
    logged = {names.FINAL + key for key in ("test_accuracy", "test_errors", "robust_accuracy", "test_loss")}
    logged |= {key + names.PERCENT for key in logged if "accuracy" in key}
    assert set(runs.RUNS_VIEW_METRICS) <= logged
