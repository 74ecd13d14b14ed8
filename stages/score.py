"""Stage score@<model>-<seed>: every score of one trained model, on validation and test scans."""

import sys
from pathlib import Path

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan import layout
from sparsegan.cli import run_stage
from sparsegan.params import check_model, check_seed, load_params
from sparsegan.scoring import score_model


def main(model: str, seed: str) -> None:
    params = load_params()
    where = layout.seed_dir(check_model(model), check_seed(seed))
    score_model(model, int(seed), params.score, params.runtime.score_batch, params.runtime.device,
                layout.processed_dir(params.preprocess.variant_of(model)), layout.MODELS / where,
                layout.SCORES / where,
                run_file=layout.run_file("score", model, int(seed)))


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
