"""Stage score@<model>-<seed>: every score of one trained model, on validation and test scans."""

import sys
from pathlib import Path

from sparsegan.cli import run_stage
from sparsegan.params import check_model, check_seed, load_params
from sparsegan.scoring import score_model


def main(model: str, seed: str) -> None:
    params = load_params()
    where = Path(check_model(model)) / f"s{check_seed(seed)}"
    score_model(model, int(seed), params.score, params.train.batch_size, params.train.device,
                Path("data/processed"), Path("models") / where, Path("scores") / where)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
