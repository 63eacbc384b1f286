"""Stage download: fetch the four IDX files of the data set into a folder, verified (see ``mnist_pipeline.data``).

dvc.yaml runs this script; what the stage does lives in mnist_pipeline.stages.download.
"""

from mnist_pipeline.stages import download, main

if __name__ == "__main__":
    main(download)
