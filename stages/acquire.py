"""Stage 1: get the images (generate, download or point at a folder) -> data/raw/manifest.csv."""

import sys
from pathlib import Path

from sparsegan.cli import run_stage
from sparsegan.data.sources import acquire
from sparsegan.params import load_params


def main(raw_dir: str = "data/raw") -> None:
    acquire(load_params(), Path(raw_dir))


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
