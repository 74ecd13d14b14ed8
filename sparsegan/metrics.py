"""Threshold calibration (eq. 5) and the detection / localisation metrics of the evaluation.

Decision rule (eq. 5): an image is called diseased when its anomaly score ``A > phi``. phi is
chosen on the validation set only; the test set never chooses phi, a checkpoint or a param.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from .layout import scores_dir
from .params import Params, check_row


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Every distinct decision: below all scores, midway between neighbours, and at the top."""
    s = np.unique(scores)
    mids = (s[:-1] + s[1:]) / 2
    return np.concatenate([[s[0] - 1.0], mids, [s[-1]]])


def confusion(labels: np.ndarray, scores: np.ndarray, phi: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """(tp, fp, tn, fn) for one phi or a vector of them (prediction: score > phi)."""
    phi = np.atleast_1d(np.asarray(phi, dtype=float))
    pred = scores[None, :] > phi[:, None]
    pos = labels.astype(bool)[None, :]
    tp = (pred & pos).sum(1)
    fp = (pred & ~pos).sum(1)
    fn = (~pred & pos).sum(1)
    tn = (~pred & ~pos).sum(1)
    return tp, fp, tn, fn


def calibrate_phi(labels: np.ndarray, scores: np.ndarray, criterion: str = "accuracy",
                  target_sensitivity: float = 0.95) -> float:
    """phi on validation scores. Criteria: ``accuracy`` (the paper's), ``youden`` (max TPR - FPR),
    ``f1``, or ``sensitivity`` (the highest phi whose sensitivity reaches the target). Ties go to
    the lowest phi for accuracy/youden/f1 (the first maximum)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if not np.isfinite(scores).all():
        raise ValueError(f"calibration needs finite scores; {int((~np.isfinite(scores)).sum())} "
                         "validation scores are NaN or infinite")
    if labels.min() == labels.max():
        raise ValueError("calibration needs both normal and diseased validation scans")
    phis = candidate_thresholds(scores)
    tp, fp, tn, fn = confusion(labels, scores, phis)
    if criterion == "accuracy":
        objective = (tp + tn) / len(labels)
    elif criterion == "youden":
        objective = tp / (tp + fn) - fp / (fp + tn)
    elif criterion == "f1":
        objective = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    elif criterion == "sensitivity":
        ok = np.flatnonzero(tp / (tp + fn) >= target_sensitivity)
        return float(phis[ok.max()])
    else:
        raise ValueError(f"calibrate.criterion = {criterion!r}: allowed accuracy, youden, f1, sensitivity")
    return float(phis[int(np.argmax(objective))])


def detection_metrics(labels: np.ndarray, scores: np.ndarray, phi: float) -> dict[str, float]:
    """AUC and average precision (threshold-free; AP as scikit-learn's step-wise area under the
    precision-recall curve, diseased = positive) and accuracy, sensitivity, specificity, F1 at
    phi. :mod:`sparsegan.stats` computes the same six on patient-bootstrap resamples."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    tp, fp, tn, fn = (int(v[0]) for v in confusion(labels, scores, phi))
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        "accuracy": (tp + tn) / len(labels),
        "sensitivity": tp / max(tp + fn, 1),
        "specificity": tn / max(tn + fp, 1),
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
    }


def roc_table(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, thr = roc_curve(labels, scores)
    return {"fpr": fpr, "tpr": tpr, "threshold": thr}


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Localisation: AUROC of map values as a lesion-pixel classifier, over the given scans
    (the evaluation passes the diseased test scans: does a map rank a scan's lesion pixels above
    its healthy pixels). ``maps`` and ``masks`` are (N, 1, S, S)."""
    truth = masks.reshape(-1).astype(bool)
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, maps.reshape(-1)))


# Anomaly maps a score may give (sparsegan.scoring): the paper's AAM (eq. 8), the residual
# activation map (ours) and |I_in - I_re|. Calibration shows the one that localises best.
MAP_NAMES = ("aam_residual", "aam", "difference")


def choose_map(val_localisation: dict[str, float]) -> str | None:
    """The map with the highest validation pixel AUROC (ties: the first of MAP_NAMES)."""
    finite = {k: v for k, v in val_localisation.items() if k in MAP_NAMES and np.isfinite(v)}
    if not finite:
        return None
    return max(finite, key=lambda k: (finite[k], -MAP_NAMES.index(k)))


# Ways to turn a patient's B-scan scores into one patient score (chosen on validation patients).
PATIENT_AGGREGATIONS = ("max", "mean", "top3_mean")


def aggregate_patients(patients, labels, scores, how: str):
    """``(patient ids, patient labels, patient scores)``: a patient is diseased when any of its
    scans is; its score is the ``how`` (:data:`PATIENT_AGGREGATIONS`) of its scans' scores.
    Scans without a patient (empty id) are a patient each."""
    import pandas as pd

    ids = pd.Series(np.asarray(patients, dtype=object)).fillna("").astype(str).to_numpy()
    blank = ids == ""
    ids = np.where(blank, np.char.add("scan:", np.arange(len(ids)).astype(str)), ids)
    df = pd.DataFrame({"p": ids, "y": np.asarray(labels), "s": np.asarray(scores, dtype=float)})
    g = df.groupby("p", sort=True)
    if how == "max":
        agg = g["s"].max()
    elif how == "mean":
        agg = g["s"].mean()
    elif how == "top3_mean":
        agg = g["s"].apply(lambda v: float(np.sort(v.to_numpy())[-3:].mean()))
    else:
        raise ValueError(f"patient aggregation {how!r}: allowed {', '.join(PATIENT_AGGREGATIONS)}")
    return agg.index.to_numpy(), g["y"].max().to_numpy(), agg.to_numpy(dtype=float)


def calibrate_patients(patients, labels, scores, phi: float) -> dict | None:
    """The patient-level rule from *validation* scans: the aggregation with the highest patient
    AUC (ties: the first of :data:`PATIENT_AGGREGATIONS`), decided at the scans' own ``phi``: a
    patient is diseased when the aggregation of its scans' scores exceeds phi. One threshold for
    scans and patients, so that a patient with one scan gets its scan's decision (and with
    ``max``, a patient is diseased exactly when one of its scans is). None when the validation
    patients are not of both classes."""
    aucs = {}
    for how in PATIENT_AGGREGATIONS:
        _, y, s = aggregate_patients(patients, labels, scores, how)
        if y.min() == y.max():
            return None
        aucs[how] = float(roc_auc_score(y, s))
    best = max(PATIENT_AGGREGATIONS, key=lambda h: (aucs[h], -PATIENT_AGGREGATIONS.index(h)))
    _, y, s = aggregate_patients(patients, labels, scores, best)
    return {"aggregation": best, "val_auc_by_aggregation": aucs, "n_patients": int(len(y)),
            "validation": detection_metrics(y, s, phi)}


def calibrate_scores(params: Params, scores_dir: Path) -> dict:
    """phi from ``scores_dir/val.csv`` only (eq. 5), with the validation operating point; the
    patient-level rule (:func:`calibrate_patients`) under ``"patient"`` when the scans have
    patients; the map shown to readers (:func:`choose_map`, best validation pixel AUROC) under
    ``"map"`` when validation has lesion masks."""
    import pandas as pd

    val = pd.read_csv(scores_dir / "val.csv", dtype={"patient": str}, keep_default_na=False)
    c = params.calibrate
    labels, scores = val["label"].to_numpy(), val["score"].to_numpy()
    phi = calibrate_phi(labels, scores, c.criterion, c.target_sensitivity)
    result = {"phi": phi, "criterion": c.criterion,
              "validation": detection_metrics(labels, scores, phi)}
    if c.criterion == "sensitivity":
        result["target_sensitivity"] = c.target_sensitivity
    localisation_file = scores_dir / "val_localisation.json"
    if localisation_file.exists():
        localisation = json.loads(localisation_file.read_text())
        shown = choose_map(localisation)
        if shown is not None:
            result["map"] = shown
            result["val_pixel_auroc"] = localisation
    if "patient" in val.columns:
        patient = calibrate_patients(val["patient"].to_numpy(), labels, scores, phi)
        if patient is not None:
            result["patient"] = patient
    return result


def calibrate_row(row: str, params: Params, scores_root: Path, out_dir: Path) -> dict[int, dict]:
    """Stage calibrate@<row>: for every seed, :func:`calibrate_scores` of the row's scores
    ``scores_root/<model>/s<seed>/<score>/`` into ``out_dir/s<seed>.json``, which also names the
    row, model, score and seed (the score knobs are recorded by the score stage, beside the
    scores: :data:`sparsegan.layout.SETTINGS`)."""
    model, score = check_row(row, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in params.seeds:
        result = {"row": row, "model": model, "score": score, "seed": seed,
                  **calibrate_scores(params, scores_dir(model, seed, scores_root) / score)}
        (out_dir / f"s{seed}.json").write_text(json.dumps(result, indent=1))
        results[seed] = result
    return results
