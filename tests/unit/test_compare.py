"""`compare`'s table as people read it."""

from __future__ import annotations


def test_compare_rounds_for_people_and_leaves_blanks_where_a_run_has_no_value():
    import pandas as pd

    from mnist_pipeline.commands.compare import for_people

    table = pd.DataFrame({"run": ["a", "b"], "train.lr": ["0.01", None], "test_accuracy": [0.99153, float("nan")],
                          "test_loss": [0.0264231, 0.5], "test_errors": [85.0, 3.0],
                          "train_seconds": [107.1929, 16.55]})  # fmt: skip
    shown = for_people(table)
    assert shown.to_dict("list") == {"run": ["a", "b"], "train.lr": ["0.01", ""], "test_accuracy": ["99.15%", ""],
                                     "test_loss": ["0.0264", "0.5000"], "test_errors": ["85", "3"],
                                     "train_seconds": ["107.2", "16.6"]}  # fmt: skip
