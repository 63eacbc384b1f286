"""Stage export: record the pipeline's result as one MLflow run and register its model.

The one stage that talks to MLflow, in its own process, and it needs no torch: the run gets every param, the
training's record, the evaluation's metrics and figures, the data as inputs and the ONNX file the evaluate stage
exported and measured, logged as the run's model, checked through ``mlflow.pyfunc`` and registered (see
``mnist_pipeline.tracking.publish`` and ``registry``).
"""

import json

from mnist_pipeline import stage
from mnist_pipeline.files import write_atomic


@stage.command
@stage.path("--data", "folder written by the download stage")
@stage.path("--onnx", "the model the evaluate stage exported and measured: logged and registered")
@stage.path("--record", "the train stage's record of the training (JSON)")
@stage.path("--times", "the training's times and usage, beside the record (JSON; not a dependency: they vary)")
@stage.path("--metrics", "the evaluate stage's metrics JSON (every key is logged as final_<key>)")
@stage.path("--robustness", "the robustness report's accuracy per distortion (JSON; its weakest go in the model card)")
@stage.path("--parity", "the evaluate stage's check of the ONNX file against the trained model (JSON)")
@stage.path("--evaluation", "the evaluate stage's figures and tables, logged with the run", many=True)
@stage.path("--report", "the parity checks the model passed (JSON): the same for the same model, a DVC output")
@stage.path("--last-run", "the MLflow run and the registered version (JSON): this store's, not a DVC output")
def main(params, data, onnx, record, times, metrics, robustness, parity, evaluation, report, last_run):
    from mnist_pipeline.ml.data import verify_folder
    from mnist_pipeline.tracking import publish, runs

    verify_folder(data)
    result = publish.Result(
        data,
        onnx,
        runs.read_record(record, times),
        publish.read_json(metrics),
        publish.read_json(robustness),
        publish.read_json(parity),
        evaluation,
    )
    published = publish.publish(params, result)
    run = {key: published.pop(key) for key in ("run_id", "registered")}
    write_atomic(last_run, json.dumps(run, indent=2) + "\n")
    write_atomic(report, json.dumps(published, indent=2) + "\n")


if __name__ == "__main__":
    main()
