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
