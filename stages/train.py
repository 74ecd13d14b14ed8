"""Stage train@<variant>: train one variant of Table 1 on the normal training scans."""

import sys
from pathlib import Path

from sparsegan.cli import run_stage
from sparsegan.params import load_params
from sparsegan.train import train_variant


def main(variant: str) -> None:
    train_variant(variant, load_params(), Path("data/processed"), Path("models") / variant,
                  Path("checkpoints") / variant)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
