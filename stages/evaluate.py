"""Stage evaluate@<variant>: test metrics at the validation phi, ROC, pixel AUROC, MLflow."""

import sys
from pathlib import Path

from sparsegan.cli import run_stage
from sparsegan.evaluate import evaluate
from sparsegan.params import load_params


def main(variant: str) -> None:
    params = load_params()
    evaluate(variant, params, Path("data/processed"), Path("scores") / variant,
             Path("models") / variant, Path("reports/variants") / variant)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
