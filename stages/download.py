"""Stage download: fetch the four IDX files of the data set into a folder, verified (``$MNIST_MIRROR`` first, then
the data set's public mirrors; see ``mnist_pipeline.ml.data``)."""

from mnist_pipeline import stage
from mnist_pipeline.ml import data


@stage.command
@stage.path("--out", "folder for the decompressed IDX files")
def main(params, out):
    data.download(out, data.expected_files(params.data.dataset, params.data.expected_md5))


if __name__ == "__main__":
    main()
