"""Stage train: train the CNN, save the checkpoint and the per-epoch history, start the pipeline's MLflow run.

dvc.yaml runs this script; what the stage does lives in mnist_pipeline.stages.train.
"""

from mnist_pipeline.stages import main, train

if __name__ == "__main__":
    main(train)
