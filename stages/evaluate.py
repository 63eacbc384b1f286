"""Stage evaluate: measure the trained model on the test digits; metrics, per-class table, figures.

dvc.yaml runs this script; what the stage does lives in mnist_pipeline.stages.evaluate.
"""

from mnist_pipeline.stages import evaluate, main

if __name__ == "__main__":
    main(evaluate)
