"""Stage report: all rows in reports/metrics.json, Table 1, figures, galleries, index.html."""

import sys
from pathlib import Path

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan import layout
from sparsegan.cli import run_stage
from sparsegan.params import load_params
from sparsegan.report import build_report


def main() -> None:
    build_report(load_params(), layout.PROCESSED, layout.SCORES, layout.MODELS, layout.ROWS,
                 layout.REPORTS)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
