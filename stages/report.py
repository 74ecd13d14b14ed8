"""Stage report: all rows in reports/metrics.json, Table 1, figures, galleries, index.html."""

import sys

from sparsegan import layout
from sparsegan.cli import run_stage
from sparsegan.params import load_params
from sparsegan.report import build_report


def main() -> None:
    build_report(load_params(), layout.PROCESSED, layout.SCORES, layout.MODELS, layout.ROWS,
                 layout.REPORTS)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
