"""Fixtures of the tracking layer: a real MLflow SQLite store in the test's temporary folder."""

from __future__ import annotations

import shutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_pipeline.tracking import store


@pytest.fixture(scope="session")
def empty_database(tmp_path_factory):
    """A new store's database with MLflow's tables, made once: creating them takes a second or two per store."""
    database = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture
def local_store(tmp_path, monkeypatch, empty_database):
    shutil.copy(empty_database, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # artifacts of this store land beside it
    uri = store.configure(tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)
