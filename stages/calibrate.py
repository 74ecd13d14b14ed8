"""Stage calibrate@<variant>: phi from the validation scores only (eq. 5)."""

import sys
from pathlib import Path

from sparsegan.cli import run_stage
from sparsegan.metrics import calibrate_variant
from sparsegan.params import load_params


def main(variant: str) -> None:
    calibrate_variant(load_params(), Path("scores") / variant,
                      Path("reports/variants") / variant / "calibration.json")


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
