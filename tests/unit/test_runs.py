"""The training's record as the export stage reads it."""

from __future__ import annotations

import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import runs


def test_a_training_record_that_is_missing_or_foreign_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PipelineError, match="not a training record written by the train stage"):
        runs.read_record(tmp_path / "bad.json")
    with pytest.raises(PipelineError, match="missing: run the train stage"):
        runs.read_record(tmp_path / "none.json")


def test_the_record_dvc_hashes_holds_no_time_and_its_times_join_it_only_when_they_are_its_own(tmp_path, capsys):
    """Two runs of one training write the same record (dvc.lock stays as committed); their times go beside it.
    Times of another training (the train stage restored from DVC's run cache keeps the last run's) are left out."""
    import json

    from mnist_pipeline.ml import trainer

    def training(started: float) -> dict:
        epochs = [{"epoch": 1, "train_loss": 0.5, "test_loss": 0.1, "test_accuracy": 0.9}]
        return {
            "started": started,
            "ended": started + 9,
            "tags": {"env.precision": "bf16"},
            "metrics": {"train_seconds": 9.0},
            "history": [{**e, "seconds": 9.0, "measured_at": started + 9} for e in epochs],
            "system": [{"time": started + 1, "rank": 0, "values": {"cpu_utilization_percentage": 50.0}}],
        }

    (fixed, times), (again, other_times) = trainer.split_record(training(100.0)), trainer.split_record(training(500.0))
    assert fixed == again and times != other_times and "started" not in json.dumps(fixed)
    (tmp_path / "record.json").write_text(json.dumps(fixed))
    (tmp_path / "times.json").write_text(json.dumps(times))
    whole = runs.read_record(tmp_path / "record.json", tmp_path / "times.json")
    assert whole["started"] == 100.0 and whole["history"][0]["measured_at"] == 109.0 and whole["system"]

    (tmp_path / "times.json").write_text(json.dumps({**times, "of": "another training"}))
    alone = runs.read_record(tmp_path / "record.json", tmp_path / "times.json")
    assert alone["system"] == [] and alone["metrics"] == {} and alone["history"][0]["measured_at"] is None
    assert alone["history"][0]["test_accuracy"] == 0.9 and "holds no times of this training" in capsys.readouterr().err


@pytest.mark.parametrize(
    "times",
    [
        "[1, 2, 3]",  # not a mapping
        "{",  # not JSON
        '{"of": "ID", "started": "yesterday", "ended": 1, "metrics": {}, "system": [], "epochs": [{}]}',
        '{"of": "ID", "started": 1, "ended": 2, "metrics": {}, "system": [], "epochs": [{}, {}]}',  # another length
        '{"of": "ID", "started": 1, "ended": 2, "metrics": {}, "system": [{"time": 1}], "epochs": [{}]}',
        '{"of": "ID", "started": 1, "ended": 2, "metrics": {"x": "y"}, "system": [], "epochs": [{}]}',
    ],
    ids=["a list", "not JSON", "a time of text", "other epochs", "a sample without values", "a metric of text"],
)
def test_times_that_are_damaged_or_made_by_hand_are_set_aside_in_one_note(tmp_path, capsys, times):
    """The times file is no DVC output: whatever lies there leaves the run its epochs, never a traceback."""
    import json

    record = {"id": "ID", "tags": {}, "history": [{"epoch": 1, "train_loss": 0.5}]}
    (tmp_path / "record.json").write_text(json.dumps(record))
    (tmp_path / "times.json").write_text(times)
    read = runs.read_record(tmp_path / "record.json", tmp_path / "times.json")
    assert read["system"] == [] and read["history"][0] == {
        "epoch": 1,
        "train_loss": 0.5,
        "seconds": None,
        "measured_at": None,
    }
    assert "holds no times of this training" in capsys.readouterr().err
