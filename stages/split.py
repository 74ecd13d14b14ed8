"""Stage 2: train / val / test CSVs from the manifest (protocol `patient` or `paper`)."""

import sys
from pathlib import Path

import pandas as pd

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan.cli import run_stage
from sparsegan.data.split import make_splits, write_splits
from sparsegan.params import load_params


def main(raw_dir: str = "data/raw", out_dir: str = "data/splits") -> None:
    params = load_params()
    manifest = pd.read_csv(Path(raw_dir) / "manifest.csv", keep_default_na=False, dtype=str)
    splits = make_splits(manifest, Path(raw_dir), params.data.split, params.data.split.seed)
    write_splits(splits, Path(out_dir))


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
