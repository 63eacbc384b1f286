"""Stage export: TorchScript and ONNX files, each checked against the trained model, then log + register in MLflow.

dvc.yaml runs this script; what the stage does lives in mnist_pipeline.stages.export.
"""

from mnist_pipeline.stages import export, main

if __name__ == "__main__":
    main(export)
