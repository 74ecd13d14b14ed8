"""Stage 3: grayscale, resize to data.image_size, uint8 arrays per split (+ lesion masks), in
both variants: data/processed/raw and data/processed/filled (registration corners filled)."""

import sys
from pathlib import Path

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan import layout
from sparsegan.cli import run_stage
from sparsegan.data.preprocess import preprocess_variants
from sparsegan.params import load_params


def main(splits_dir: str = "data/splits", out_dir: str = "data/processed") -> None:
    params = load_params()
    preprocess_variants(Path(splits_dir), Path(out_dir), params.data.image_size,
                        params.preprocess.workers, timing_file=layout.RUNS / "preprocess.json")


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
