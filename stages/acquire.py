"""Stage 1: get the images (generate, download or point at a folder) -> data/raw/manifest.csv."""

import sys
from pathlib import Path

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan.cli import run_stage
from sparsegan.data.sources import acquire
from sparsegan.params import load_params


def main(raw_dir: str = "data/raw") -> None:
    acquire(load_params(), Path(raw_dir))


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
