"""Stage download: fetch the four IDX files of the data set into a folder, verified (see ``mnist_pipeline.ml.data``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import config
from mnist_pipeline.ml import data
from mnist_pipeline.stages import main, path


@dataclass(frozen=True)
class Paths:
    out: Path = path("folder for the decompressed IDX files")


def run(params: config.Params, paths: Paths) -> None:
    data.download(paths.out, data.expected_files(params.data.dataset, params.data.expected_md5))


if __name__ == "__main__":  # dvc.yaml runs python -m mnist_pipeline.stages.download
    main(sys.modules[__name__])
