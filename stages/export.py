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
@stage.path("--metrics", "the evaluate stage's metrics JSON (every key is logged as final_<key>)")
@stage.path("--robustness", "the robustness report's accuracy per distortion (JSON; its weakest go in the model card)")
@stage.path("--parity", "the evaluate stage's check of the ONNX file against the trained model (JSON)")
@stage.path("--evaluation", "the evaluate stage's figures and tables, logged with the run", many=True)
@stage.path("--report", "parity figures, the MLflow run id and the registered version (JSON)")
def main(params, data, onnx, record, metrics, robustness, parity, evaluation, report):
    from mnist_pipeline.ml.data import verify_folder
    from mnist_pipeline.tracking import publish, runs

    verify_folder(data)
    result = publish.Result(
        data,
        onnx,
        runs.read_record(record),
        publish.read_json(metrics),
        publish.read_json(robustness),
        publish.read_json(parity),
        evaluation,
    )
    write_atomic(report, json.dumps(publish.publish(params, result), indent=2) + "\n")


if __name__ == "__main__":
    main()
