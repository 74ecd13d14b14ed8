"""The one screening path: a trained model, its row's calibration and its score settings turned
into decisions on new scans. ``sparsegan predict`` (:mod:`sparsegan.predict`) and the MLflow
screening model (:mod:`sparsegan.serving`) both score through :class:`Screener`.

The screening config (:func:`screening_config`, ``screening.json`` beside the weights of a
logged model) is one seed's calibration of a row (phi, criterion, the map chosen on validation
lesions, the patient aggregation) with the score knobs the score stage recorded
(``scores/<model>/s<seed>/settings.json``, :data:`sparsegan.scoring.SETTINGS`).

Decisions (eq. 5): a scan is ``disease`` when its score > phi; a patient (or volume) is
``disease`` when the aggregation of its scans' scores (max, mean or top-3 mean, chosen on
validation patients) > the same phi, so a one-scan patient always gets its scan's decision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIG = "screening.json"


class ScreeningError(ValueError):
    """A calibration or score-settings file that cannot make a screening config."""


def default_map(score: str) -> str:
    """The map a reader is shown when calibration had no lesion masks to choose one on: the
    residual activation map for the latent score, else the difference map."""
    return "aam_residual" if score == "latent" else "difference"


def screening_config(calibration: dict, settings: dict) -> dict:
    """The screening config of one seed's calibration of a row
    (:func:`sparsegan.metrics.calibrate_row`) and the score stage's ``settings`` of the same
    trained model; ScreeningError naming what is missing or does not match."""
    try:
        model, seed = calibration["model"], int(calibration["seed"])
        if (settings["model"], int(settings["seed"])) != (model, seed):
            raise ScreeningError(f"the score settings are of {settings['model']} s"
                                 f"{settings['seed']}, the calibration of {model} s{seed}")
        rule = calibration.get("patient")
        return {"row": calibration["row"], "model": model, "score": calibration["score"],
                "seed": seed, "phi": float(calibration["phi"]),
                "criterion": calibration.get("criterion"),
                "map": calibration.get("map") or default_map(calibration["score"]),
                "patient": None if rule is None else {"aggregation": str(rule["aggregation"])},
                "score_params": dict(settings["score"])}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ScreeningError):
            raise
        raise ScreeningError(f"not a calibration and score settings of this version "
                             f"({type(exc).__name__}: {exc})") from None


@dataclass
class Screener:
    """A trained model (:class:`sparsegan.checkpoint.Trained`) with its screening config."""

    trained: object
    config: dict

    def __post_init__(self) -> None:
        import torch

        from .params import parse_params

        self.knobs = parse_params({"score": self.config["score_params"]}).score
        torch.manual_seed(self.trained.seed)  # as in the score stage

    @property
    def phi(self) -> float:
        return float(self.config["phi"])

    def warning(self) -> str | None:
        """The warning for a model trained on synthetic scans only, else None."""
        data = self.trained.data
        if data.get("source") != "synthetic":
            return None
        return (f"trained on synthetic scans only ({data.get('n_train', '?')} normal training "
                f"scans of the embedded generator); its scores and phi are not validated on "
                f"real scans. Train on yours: dvc exp run -S data.source=folder -S "
                f"data.folder=<your OCT tree>")

    def load(self, path: Path) -> np.ndarray:
        """One image file converted exactly as in training (uint8 ``(S, S)``); SkipImage if it
        cannot be used."""
        from .data.preprocess import load_gray

        m = self.trained
        return load_gray(path, m.image_size, m.params.preprocess.fills_corners(m.model))

    def score(self, images: np.ndarray, device=None):
        """The row's :class:`sparsegan.scoring.ScoreOutput` for uint8 scans ``(N, S, S)``."""
        from .data.dataset import to_float
        from .scoring import score_batch

        x = to_float(np.asarray(images)[:, None], device)
        return score_batch(self.trained.detector, x, self.knobs)[self.config["score"]]

    def decision(self, score: float) -> str:
        return "disease" if score > self.phi else "normal"

    def patients(self, scored: list[tuple[str, float]]) -> list[tuple[str, int, float, str]]:
        """``(patient, scans, patient score, decision)`` per patient of ``scored`` (patient,
        scan score) pairs, in sorted order; [] without a patient rule."""
        from .metrics import aggregate_patients

        rule = self.config.get("patient")
        if rule is None or not scored:
            return []
        ids, _, scores = aggregate_patients([p for p, _ in scored], np.zeros(len(scored), int),
                                            [s for _, s in scored], rule["aggregation"])
        counts: dict[str, int] = {}
        for p, _ in scored:
            counts[p] = counts.get(p, 0) + 1
        return [(str(p), counts[p], float(s), self.decision(float(s))) for p, s in zip(ids, scores)]


def read_config(calibration_file: Path, settings_file: Path) -> dict:
    """:func:`screening_config` of two files, ScreeningError naming the file at fault."""
    docs = []
    for path in (calibration_file, settings_file):
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ScreeningError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    try:
        return screening_config(*docs)
    except ScreeningError as exc:
        raise ScreeningError(f"{calibration_file} with {settings_file}: {exc}") from None
