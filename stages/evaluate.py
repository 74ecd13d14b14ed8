"""Stage evaluate@<row>: test metrics of every seed at its validation phi, their mean and spread."""

import sys
from pathlib import Path

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan import layout
from sparsegan.cli import run_stage
from sparsegan.evaluate import evaluate_row
from sparsegan.params import load_params


def main(row: str) -> None:
    evaluate_row(row, load_params(), layout.PROCESSED, layout.SCORES, layout.MODELS,
                 layout.ROWS / row)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
