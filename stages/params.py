"""Stage params: check the whole of params.yaml before any other stage starts (and DVC removes its outputs).

dvc.yaml runs this script; what the stage does lives in mnist_pipeline.stages.params.
"""

from mnist_pipeline.stages import main, params

if __name__ == "__main__":
    main(params)
