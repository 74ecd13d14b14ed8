"""Stage calibrate@<row>: phi of every seed's trained model from validation scores only (eq. 5)."""

import sys

from sparsegan import layout
from sparsegan.cli import run_stage
from sparsegan.metrics import calibrate_row
from sparsegan.params import load_params


def main(row: str) -> None:
    calibrate_row(row, load_params(), layout.SCORES, layout.ROWS / row / "calibration")


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
