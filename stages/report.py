"""Stage report: every variant in reports/metrics.json, the ROC overlay and Table 1."""

import sys
from pathlib import Path

from sparsegan.cli import run_stage
from sparsegan.evaluate import summarize
from sparsegan.params import load_params


def main() -> None:
    summarize(list(load_params().variants), Path("reports/variants"), Path("reports"))


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
