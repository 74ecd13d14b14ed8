"""Stage calibrate@<row>: phi of every seed's trained model from validation scores only (eq. 5)."""

import sys
from pathlib import Path

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan import layout
from sparsegan.cli import run_stage
from sparsegan.metrics import calibrate_row
from sparsegan.params import load_params


def main(row: str) -> None:
    calibrate_row(row, load_params(), layout.SCORES, layout.ROWS / row / "calibration")


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
