"""Fixtures of the unit layer: a real MLflow SQLite store in the test's temporary folder."""

from __future__ import annotations

import mlflow
import pytest

from mnist_pipeline.tracking import store


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # artifacts of this store land beside it
    uri = store.configure(tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)
