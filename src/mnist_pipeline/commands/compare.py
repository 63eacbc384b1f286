"""`mnist-pipeline compare`: the experiment's runs side by side, with only the params that differ."""

from __future__ import annotations

import pandas as pd

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import store


def runs_table(last: int | None = None, sort_by: str = names.TEST_ACCURACY) -> pd.DataFrame:
    """One row per run of the experiment (newest first before sorting): name, commit, differing params, metrics,
    registry versions with their aliases. Runs of `mnist-pipeline reproduce` are left out (they repeat a run's
    figures: ``reproduces`` says which run's); ``attrs["reproductions"]`` counts them."""
    import mlflow
    from mlflow.tracking import MlflowClient

    store.configure(writes=False)
    runs = mlflow.search_runs(
        experiment_names=[names.EXPERIMENT],
        order_by=["attributes.start_time DESC"],
        max_results=last or 10_000,
    )
    reproductions = runs.get(f"tags.{names.REPRODUCES}", pd.Series(index=runs.index, dtype=object)).notna()
    runs = runs[~reproductions].reset_index(drop=True)
    if runs.empty:
        return pd.DataFrame()
    table = pd.DataFrame(
        {
            "run": runs.get(f"tags.{names.DVC_EXP_NAME}", pd.Series(index=runs.index, dtype=object)).fillna(
                runs["tags.mlflow.runName"]
            ),
            "run_id": runs["run_id"].str[:8],
            "commit": runs.get(f"tags.{names.GIT_COMMIT}", pd.Series("", index=runs.index)).fillna("").str[:7],
            "started": runs["start_time"].dt.strftime("%Y-%m-%d %H:%M"),
        }
    )
    params = runs.filter(like="params.")
    differing = [c for c in params.columns if params[c].nunique(dropna=False) > 1]
    for column in sorted(differing):
        table[column.removeprefix("params.")] = params[column]
    # Every test-set metric the export stage logged (the evaluate stage's metrics.json), then the training time.
    metrics = sorted(
        c for c in runs.columns if c.startswith(f"metrics.{names.FINAL}") and not c.endswith(names.PERCENT)
    )  # (an accuracy in percent too, for the UI's charts)
    for column in [*metrics, f"metrics.{names.TRAIN_SECONDS}"]:
        table[column.removeprefix("metrics.").removeprefix(names.FINAL)] = runs.get(column, float("nan"))
    shown = [c.removeprefix(f"metrics.{names.FINAL}") for c in metrics] + [names.TRAIN_SECONDS]
    if sort_by not in shown and metrics:  # (no run has test metrics yet: the newest first)
        raise PipelineError(f"--sort {sort_by}: expected one of {', '.join(shown)}")
    table["registered"] = runs["run_id"].map(_registered_versions(MlflowClient())).fillna("")
    table.attrs["run_ids"] = dict(zip(table["run_id"], runs["run_id"], strict=True))  # shown -> whole
    table.attrs["reproductions"] = int(reproductions.sum())
    if sort_by not in table:
        return table
    return table.sort_values(
        sort_by, ascending=names.lower_is_better(sort_by), na_position="last", kind="stable"
    ).reset_index(drop=True)


def _registered_versions(client) -> dict[str, str]:
    """run id -> "mnist-cnn v3 (candidate, champion)" for every registered version logged by that run."""
    versions = client.search_model_versions()
    aliases: dict[tuple[str, str], list[str]] = {}
    for name in {v.name for v in versions}:  # search results carry no aliases; the registered model does
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault((name, str(version)), []).append(alias)
    out: dict[str, list[str]] = {}
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        named = sorted(aliases.get((v.name, str(v.version)), []))
        out.setdefault(v.run_id, []).append(f"{v.name} v{v.version}" + (f" ({', '.join(named)})" if named else ""))
    return {run_id: "; ".join(items) for run_id, items in out.items()}


def for_people(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text: each metric rounded as `names.for_people` says, and a blank where a run has no value (a
    param that did not exist yet, a run that did not finish)."""
    shown = table.astype(object).where(table.notna(), "")
    for column in table.columns:
        if pd.api.types.is_float_dtype(table[column]):
            shown[column] = table[column].map(lambda v, c=column: "" if pd.isna(v) else names.for_people(c, v))
    return shown


def main(last: int | None, sort_by: str, fmt: str) -> None:
    with store.reading():  # all of its requests within one deadline, when the store is a server
        _print(runs_table(last, sort_by), fmt)


def _print(table: pd.DataFrame, fmt: str) -> None:
    if table.empty:
        print(f"no runs yet in the experiment {names.EXPERIMENT!r} of {store.tracking_uri()}")
    elif fmt == "csv":
        print(table.to_csv(index=False), end="")
    elif fmt == "markdown":
        print(for_people(table).to_markdown(index=False, disable_numparse=True))
    else:
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 40):
            print(for_people(table).to_string(index=False))
        if reproduced := table.attrs.get("reproductions"):
            print(f"(and {reproduced} runs of `mnist-pipeline reproduce`, each under the run it reproduces)")
        for line in ui_links(table):  # last: where to look further
            print(line)


SIDE_BY_SIDE = 10  # runs the UI's compare page is given: the best ones of the table


def ui_links(table: pd.DataFrame) -> list[str]:
    """Where to look further in the MLflow UI (`mnist-pipeline ui` on its default address): the table's first
    runs side by side, and the champion's page, its model card."""
    from mlflow.tracking import MlflowClient

    from mnist_pipeline.commands import ui

    experiment = MlflowClient().get_experiment_by_name(names.EXPERIMENT)
    best = [table.attrs["run_ids"][run] for run in table["run_id"][:SIDE_BY_SIDE]]
    lines = [f"side by side in the MLflow UI (mnist-pipeline ui): {ui.compare_page(best, experiment.experiment_id)}"]
    champions = table["registered"].str.extract(r"(\S+) v(\d+) \([^)]*champion")
    for name, version in champions.dropna().drop_duplicates().itertuples(index=False):
        lines.append(f"the champion, {name} v{version}, and its model card: {ui.version_page(name, version)}")
    return lines
