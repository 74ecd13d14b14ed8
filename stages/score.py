"""Stage score@<variant>: anomaly scores of validation and test scans, test anomaly maps."""

import sys
from pathlib import Path

from sparsegan.cli import run_stage
from sparsegan.scoring import score_variant
from sparsegan.params import load_params


def main(variant: str) -> None:
    score_variant(variant, load_params(), Path("data/processed"), Path("models") / variant,
                  Path("scores") / variant)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
