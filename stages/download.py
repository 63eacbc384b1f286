"""Stage download: fetch the four MNIST IDX files into a folder, verified (see mnist_pipeline.data)."""

import argparse
from pathlib import Path

from mnist_pipeline import config, data
from mnist_pipeline.errors import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="folder for the decompressed IDX files")
    args = parser.parse_args()
    data_cfg = config.load(args.params).data
    data.download(args.out, data.expected_files(data_cfg.dataset, data_cfg.expected_md5))


if __name__ == "__main__":
    run_main(main)
