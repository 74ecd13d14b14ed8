"""Where the pipeline's files live, relative to a root (the repository, or a copy of its
outputs): the one place that spells ``models/<model>/s<seed>`` and the like. Torch-free."""

from __future__ import annotations

from pathlib import Path

PROCESSED = Path("data/processed")  # preprocess: <variant>/<split>.npy / .csv (+ masks)
MODELS = Path("models")  # train: <model>/s<seed>/{model.pt,history.json}
CHECKPOINTS = Path("checkpoints")  # train, while it runs: <model>/s<seed>/checkpoint.pt
SCORES = Path("scores")  # score: <model>/s<seed>/{settings.json,<score>/{val,test}.csv,...}
ROWS = Path("reports/rows")  # calibrate, evaluate: <row>/{calibration/s<seed>.json,metrics.json}
REPORTS = Path("reports")
# What one run of a stage was, not what it made: its timings and MLflow run (metrics files
# that no stage depends on; inside an output, a clock or run id would change its hash on every
# run and re-run everything after it): preprocess.json, train/<model>-s<seed>.json,
# score/<model>-s<seed>.json
RUNS = Path("reports/runs")
SETTINGS = "settings.json"  # in a scores/<model>/s<seed>: the score knobs the scores were made with


def seed_dir(model: str, seed: int) -> Path:
    """``<model>/s<seed>``, under :data:`MODELS`, :data:`CHECKPOINTS` or :data:`SCORES`."""
    return Path(model) / f"s{seed}"


def model_dir(model: str, seed: int, root: Path = MODELS) -> Path:
    return Path(root) / seed_dir(model, seed)


def scores_dir(model: str, seed: int, root: Path = SCORES) -> Path:
    """The score stage's output of one trained model; one folder per score name inside."""
    return Path(root) / seed_dir(model, seed)


def run_file(stage: str, model: str, seed: int, root: Path = RUNS) -> Path:
    """The run record of one (model, seed) of the train or score stage."""
    return Path(root) / stage / f"{model}-s{seed}.json"


def calibration_file(row: str, seed: int, root: Path = ROWS) -> Path:
    return Path(root) / row / "calibration" / f"s{seed}.json"


# The variants of the preprocessed data (the preprocess stage makes both, one DVC output each):
# raw as decoded and resized; filled with the white registration corners filled (param
# preprocess.variant.<model> picks one per model).
VARIANTS = ("raw", "filled")


def processed_dir(variant: str, root: Path = PROCESSED) -> Path:
    """``data/processed/<variant>``: the arrays a model of that variant trains and scores on."""
    return Path(root) / variant
