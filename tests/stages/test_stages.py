"""The stage scripts (``stages/``) called directly, in this process, on the synthetic data: the train
stage's resume and what rank 0 does that other ranks do not, without any MLflow store; then what the export stage
records in a real one (the one stage that talks to MLflow)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mnist_pipeline import config, names
from mnist_pipeline.ml import resume
from mnist_pipeline.tracking import runs
from tests.helpers import REPO_ROOT, run_stage


@pytest.fixture
def params() -> config.Params:
    p = config.load(REPO_ROOT / "params.yaml")
    return p.model_copy(
        update=dict(
            model=p.model.replace(conv_channels=(4,), kernel_size=3, hidden=16),
            train=p.train.replace(epochs=2, batch_size=100),
            runtime=p.runtime.replace(log_every=5),
            evaluate=p.evaluate.replace(examples=8),
            export=p.export.replace(parity_samples=64),
        )
    )


@pytest.fixture
def paths(tmp_path, raw_dir, monkeypatch) -> SimpleNamespace:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return SimpleNamespace(
        data=raw_dir,
        checkpoint=tmp_path / "model.pt",
        history=tmp_path / "history.csv",
        record=tmp_path / "training.json",
        times=tmp_path / "training_times.json",
        resume_state=tmp_path / "resume" / "state.pt",
    )


def interrupted_at_epoch(epoch: int, monkeypatch) -> None:
    """Ctrl-C right after the state of ``epoch`` is saved (where a real one waits: see training.train)."""
    save = resume.save

    def save_then_interrupt(path, state):
        save(path, state)
        if len(state["history"]) >= epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume, "save", save_then_interrupt)


def test_an_interrupted_training_continues_where_it_stopped_without_any_store(params, paths, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        interrupted_at_epoch(1, patch)
        with pytest.raises(KeyboardInterrupt):
            run_stage("train", params, **vars(paths))
    assert "the last completed epoch is saved in" in capsys.readouterr().err
    assert paths.resume_state.exists() and not paths.checkpoint.exists() and not paths.record.exists()

    run_stage("train", params, **vars(paths))
    assert "resuming after epoch 1/2" in capsys.readouterr().err
    record = runs.read_record(paths.record, paths.times)  # as the export stage reads it
    assert [m["epoch"] for m in record["history"]] == [1, 2]
    assert all(m["measured_at"] >= record["started"] for m in record["history"])  # when each was measured
    assert record["tags"]["env.threads"] and record["tags"]["data_md5"] and record["system"]
    assert record["tags"]["env.precision"] in ("bf16", "fp32")  # what the training computed in
    assert paths.checkpoint.exists() and not paths.resume_state.exists()
    assert len(paths.history.read_text().splitlines()) == 3  # header + both epochs, the first one restored
    assert not (paths.checkpoint.parent / "mlruns").exists()  # no MLflow store was opened


def test_a_changed_param_starts_over_instead_of_resuming(params, paths, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        interrupted_at_epoch(1, patch)
        with pytest.raises(KeyboardInterrupt):
            run_stage("train", params, **vars(paths))
    run_stage("train", params.model_copy(update={"train": params.train.replace(lr=0.02)}), **vars(paths))
    assert "from another training (params, data or code changed): starting over" in capsys.readouterr().err
    assert [m["epoch"] for m in json.loads(paths.record.read_text())["history"]] == [1, 2]


def test_only_rank_0_writes_the_outputs(params, paths, monkeypatch):
    # Rank 1 as torchrun describes it, in a world of one so that it needs no peer: it trains and writes nothing.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    run_stage("train", params, **vars(paths))
    assert not any(p.exists() for p in (paths.checkpoint, paths.history, paths.record, paths.resume_state))


@pytest.mark.e2e  # the three stages in turn, and the store
def test_the_export_stage_records_the_whole_pipeline_in_one_run(params, paths, tmp_path):
    run_stage("train", params, **vars(paths))
    reports = tmp_path / "reports"
    evaluated = SimpleNamespace(
        data=paths.data, checkpoint=paths.checkpoint, onnx=tmp_path / "model.onnx", parity=reports / "parity.json",
        metrics=reports / "metrics.json",
        per_class=reports / "per_class.csv", per_class_md=reports / "per_class.md", confusion=reports / "confusion.csv",
        confusion_png=reports / "confusion.png", predictions_png=reports / "predictions.png",
        robustness=reports / "robustness.csv", robustness_plot=reports / "robustness_by_level.csv",
        robustness_metrics=reports / "robustness.json", robustness_png=reports / "robustness.png",
    )  # fmt: skip
    run_stage("evaluate", params, **vars(evaluated))
    exported = SimpleNamespace(
        data=paths.data, onnx=evaluated.onnx, record=paths.record, times=paths.times, metrics=evaluated.metrics,
        robustness=evaluated.robustness_metrics, parity=evaluated.parity,
        evaluation=[evaluated.confusion_png, evaluated.predictions_png, evaluated.per_class, paths.history,
                    evaluated.robustness],
        report=reports / "export.json", last_run=reports / "last_run.json",
    )  # fmt: skip
    try:
        run_stage("export", params, **vars(exported))
    finally:
        mlflow.set_tracking_uri(None)
    report = json.loads(exported.last_run.read_text())
    checks = json.loads(exported.report.read_text())
    assert set(checks) == {"onnx", "mlflow_model"}  # no run id, no version: the same for the same model
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")  # the project's own store
    run = client.get_run(report["run_id"])
    # every param as it is, lists as their values
    assert run.data.params["model.conv_channels"] == "4" and run.data.params["train.epochs"] == "2"
    assert run.data.params["evaluate.examples"] == "8" and run.data.params["data.dataset"] == "mnist"
    # the training: its epochs at the times they were measured, its tags, the system metrics sampled meanwhile
    record = runs.read_record(paths.record, paths.times)
    history = client.get_metric_history(run.info.run_id, names.TEST_ACCURACY)
    assert [m.step for m in history] == [1, 2]
    assert [m.timestamp for m in history] == [int(e["measured_at"] * 1000) for e in record["history"]]
    assert run.info.start_time == int(record["started"] * 1000)
    assert run.data.tags["env.threads"] == record["tags"]["env.threads"] and run.data.tags[names.DATA_MD5]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    # the data as inputs, and the test figures against the model and the test data
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "testing"} and inputs["testing"].name == "mnist"
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.name == run.info.run_name and model.status == "READY"
    by_key = {m.key: m for m in model.metrics}
    assert by_key["final_test_accuracy"].value == run.data.metrics["final_test_accuracy"]
    assert by_key["final_test_errors"].value == json.loads(evaluated.metrics.read_text())["test_errors"]
    assert by_key["final_test_accuracy"].dataset_digest == inputs["testing"].digest
    # each accuracy in percent too (the UI's charts round fractions to two places)
    assert run.data.metrics["final_test_accuracy_percent"] == round(100 * by_key["final_test_accuracy"].value, 2)
    # the robustness report: its mean a metric, every distortion and strength in its table (an artifact), not 19
    # metrics; no metric that is constant by construction (the parity checks must pass: they are in the report)
    robust = json.loads(evaluated.robustness_metrics.read_text())
    assert len(robust) == 37 and not any(key.startswith("robust_") for key in run.data.metrics)
    assert not any("logit_diff" in key for key in run.data.metrics) and "max_abs_logit_diff" in checks["onnx"]
    assert by_key["final_robust_accuracy"].value == pytest.approx(sum(robust.values()) / len(robust))
    assert evaluated.robustness.read_text().splitlines()[0] == "distortion,strength,unit,accuracy"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/robustness.csv" in logged
    # registered through mlflow.register_model: the logged model knows its version
    assert report["registered"]["version"] == 1
    assert json.loads(model.tags["mlflow.modelVersions"])[0]["version"] == 1
    # the report its robust accuracy was measured on, so that only like is compared with like
    named = client.get_model_version(params.export.model_name, "1").tags["robust_report"]
    assert named.startswith("37 distortions (") and named.endswith(f"digits, seed {params.evaluate.robustness_seed}")
    # the version's description is a model card: data, scores, the weakest distortions, how to call it
    card = client.get_model_version(params.export.model_name, "1").description
    worst = min(robust, key=robust.get).removeprefix("robust_").replace("_", " ")
    assert f"Test accuracy {100 * by_key['final_test_accuracy'].value:.2f}%" in card and "training digits" in card
    from mnist_pipeline.ml.data import read_idx

    assert f"trained on its {len(read_idx(paths.data / 'train-labels-idx1-ubyte', 1)):,} training digits" in card
    assert f"reads worst: {worst}: " in card and f'load_model("models:/{params.export.model_name}/1")' in card
    # the registered ONNX file names the run and the training it came from
    from mlflow.onnx import load_model as load_onnx

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    try:
        proto = load_onnx(f"models:/{params.export.model_name}/1")
    finally:
        mlflow.set_tracking_uri(None)
    about = {p.key: p.value for p in proto.metadata_props}
    assert about["mlflow_run_id"] == run.info.run_id and about["training_id"] == record["id"] and about["labels"]
