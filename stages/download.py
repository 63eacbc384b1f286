"""Stage download: fetch the four IDX files of the data set into a folder, verified (``$MNIST_MIRROR`` first, then
the data set's public mirrors; see ``mnist_pipeline.ml.data``)."""

from mnist_pipeline import stage
from mnist_pipeline.ml import data


@stage.command
@stage.path("--out", "folder for the decompressed IDX files")
def main(params, out):
    data.download(out, data.expected_files(params.data.dataset, params.data.expected_md5))
    for split in ("train", "test"):  # read once here: a file whose structure is wrong stops the pipeline at its
        data.load_split(out, split)  # first stage, before DVC clears the train stage's outputs to rerun it


if __name__ == "__main__":
    main()
