"""Scoring and evaluation on test, per variant; phi is calibrated on validation apart (eq. 5).

Separate DVC stages, so that the test set can never influence phi: ``sparsegan.scoring.score_variant`` writes
validation and test scores (and test anomaly maps), ``sparsegan.metrics.calibrate_variant`` reads
the *validation* scores only, ``evaluate`` applies that phi to the test scores, and ``summarize`` gathers all
variants into ``reports/metrics.json`` and ``reports/table1.md``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from .metrics import MAP_NAMES, aggregate_patients, detection_metrics, pixel_auroc, roc_table
from .params import Params
from .stats import delong_test, paired_bootstrap, patient_bootstrap

logger = logging.getLogger(__name__)

# Zhou et al., ISBI 2020, Table 1 (OCT2017, 224x224): val AUC, test AUC, test Acc, test Sen.
PAPER_TABLE1 = {
    "autoencoder": ("Auto-Encoder", 0.729, 0.783, 0.751, 0.834),
    "anogan": ("AnoGAN", 0.815, 0.846, 0.789, 0.917),
    "fanogan": ("f-AnoGAN", 0.849, 0.882, 0.808, 0.871),
    "pix2pix_image": ("pix2pix #1 (image level)", 0.805, 0.861, 0.818, 0.879),
    "pix2pix_latent": ("pix2pix #2 (latent)", 0.837, 0.874, 0.815, 0.900),
    "sparse_gan": ("Sparse-GAN", 0.885, 0.925, 0.841, 0.951),
}


def evaluate_variant(variant: str, scores_dir: Path, report_dir: Path,
                     test_masks: np.ndarray | None, seed: int = 0, n_boot: int = 1000) -> dict:
    """Test metrics at the validation phi of ``report_dir/calibration.json``, the ROC table and
    (with lesion masks) the pixel AUROC of each anomaly map on the diseased test scans.

    Flat keys (floats, plus ``criterion``): ``val_auc``, ``phi``, ``test_<m>`` for m in AUC,
    average precision, accuracy, sensitivity, specificity, F1, each with its 95% patient-bootstrap
    percentile interval ``test_<m>_ci_low`` / ``test_<m>_ci_high`` (``n_boot`` resamples of the
    test *patients*, seeded by ``seed``; see :mod:`sparsegan.stats`), ``test_bootstrap_resamples``,
    ``test_bootstrap_skipped`` (single-class resamples), ``test_patients``, ``test_auc_<CLASS>``
    (each disease vs NORMAL), ``test_images_per_s`` and ``pixel_auroc_<map>``; with a patient
    rule in the calibration (aggregation and phi chosen on validation patients)
    ``patient_aggregation`` (a string), ``val_patient_auc``, ``patient_phi``,
    ``test_patient_count`` and ``test_patient_<m>`` for the six metrics, one decision per patient.
    """
    calibration = json.loads((report_dir / "calibration.json").read_text())
    test = pd.read_csv(scores_dir / "test.csv", dtype={"patient": str}, keep_default_na=False)
    labels, scores = test["label"].to_numpy(), test["score"].to_numpy(dtype=float)
    phi = calibration["phi"]
    metrics = {"val_auc": calibration["validation"]["auc"], "phi": phi,
               "criterion": calibration["criterion"],
               **{f"test_{k}": v for k, v in detection_metrics(labels, scores, phi).items()}}
    if "patient" in test.columns:
        patients = test["patient"].to_numpy()
    else:
        logger.warning("%s/test.csv has no patient column: bootstrapping scans, not patients",
                       scores_dir)
        patients = np.arange(len(test)).astype(str)
    intervals = patient_bootstrap(labels, scores, patients, phi, n_boot=n_boot, seed=seed)
    for k, (lo, hi) in intervals.items():
        metrics[f"test_{k}_ci_low"], metrics[f"test_{k}_ci_high"] = lo, hi
    metrics["test_bootstrap_resamples"] = n_boot
    metrics["test_bootstrap_skipped"] = intervals.n_skipped
    metrics["test_patients"] = intervals.n_patients
    rule = calibration.get("patient")
    if rule is not None and "patient" in test.columns:  # one decision per patient (volume)
        _, y, s = aggregate_patients(patients, labels, scores, rule["aggregation"])
        metrics["patient_aggregation"] = rule["aggregation"]
        metrics["val_patient_auc"] = rule["val_auc_by_aggregation"][rule["aggregation"]]
        metrics["patient_phi"] = rule["phi"]
        metrics["test_patient_count"] = int(len(y))
        metrics.update({f"test_patient_{k}": v
                        for k, v in detection_metrics(y, s, rule["phi"]).items()})
    for cls in sorted(set(test["class"]) - {"NORMAL"}):
        subset = test["class"].isin(["NORMAL", cls]).to_numpy()
        metrics[f"test_auc_{cls}"] = float(roc_auc_score(labels[subset], scores[subset]))
    metrics["test_images_per_s"] = json.loads((scores_dir / "timing.json").read_text())["test_images_per_s"]
    if test_masks is not None:
        maps = np.load(scores_dir / "test_maps.npz")
        diseased = labels == 1
        for name in MAP_NAMES:
            if name in maps:
                metrics[f"pixel_auroc_{name}"] = pixel_auroc(
                    maps[name][diseased].astype(np.float32), test_masks[diseased])
    report_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(roc_table(labels, scores)).assign(variant=variant).to_csv(
        report_dir / "roc.csv", index=False)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def compare_to_reference(variants: list[str], scores_root: Path, reference: str = "sparse_gan",
                         n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Paired comparison of ``reference`` against every other variant on the test set.

    Reads ``scores_root/<v>/test.csv`` of each variant (all must list the same scans in the same
    order: a differing ``path`` column raises ``ValueError``). For each other variant ``v``
    returns ``{v: {...}}`` with flat floats: ``delta_auc`` = AUC(reference) - AUC(v),
    ``delta_auc_ci_low`` / ``delta_auc_ci_high`` (95% percentile interval) and ``p_value`` of the
    paired patient bootstrap (the same patient resamples for both variants,
    :func:`sparsegan.stats.paired_bootstrap`), ``p_value_delong`` (DeLong's test, which treats
    scans as independent), ``auc_reference``, ``auc_other``, ``bootstrap_resamples`` and
    ``bootstrap_skipped``. Returns ``{}`` when ``reference`` is not among ``variants``.
    Pure: reads the score files, writes nothing.
    """
    if reference not in variants:
        return {}
    scores_root = Path(scores_root)

    def read(v: str) -> pd.DataFrame:
        return pd.read_csv(scores_root / v / "test.csv", dtype={"patient": str},
                           keep_default_na=False)

    ref = read(reference)
    labels = ref["label"].to_numpy()
    patients = (ref["patient"].to_numpy() if "patient" in ref.columns
                else np.arange(len(ref)).astype(str))
    results = {}
    for v in variants:
        if v == reference:
            continue
        other = read(v)
        if len(other) != len(ref) or not (other["path"].to_numpy() == ref["path"].to_numpy()).all():
            raise ValueError(f"{scores_root}/{v}/test.csv and {scores_root}/{reference}/test.csv "
                             f"do not list the same test scans in the same order; re-run "
                             f"`dvc repro score@{v} score@{reference}`")
        a, b = ref["score"].to_numpy(dtype=float), other["score"].to_numpy(dtype=float)
        boot = paired_bootstrap(labels, a, b, patients, n_boot=n_boot, seed=seed)
        results[v] = {"delta_auc": boot["delta_auc"], "delta_auc_ci_low": boot["ci"][0],
                      "delta_auc_ci_high": boot["ci"][1], "p_value": boot["p_value"],
                      "p_value_delong": delong_test(labels, a, b)["p_value"],
                      "auc_reference": boot["auc_a"], "auc_other": boot["auc_b"],
                      "bootstrap_resamples": n_boot, "bootstrap_skipped": boot["n_skipped"]}
    return results


def table1_markdown(results: dict[str, dict]) -> str:
    """The paper's Table 1 layout, ours beside the paper's (ours / paper)."""
    lines = ["| method | val AUC | test AUC | test Acc | test Sen |", "|---|---|---|---|---|"]
    for variant, (name, *paper) in PAPER_TABLE1.items():
        if variant not in results:
            continue
        m = results[variant]
        ours = (m["val_auc"], m["test_auc"], m["test_accuracy"], m["test_sensitivity"])
        cells = [f"{o:.3f} / {p:.3f}" for o, p in zip(ours, paper)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nEach cell: ours / paper (Zhou et al., ISBI 2020, OCT2017).\n"


def _log_to_mlflow(variant: str, model_dir: Path, metrics: dict, report_dir: Path,
                   processed_dir: Path) -> None:
    """The test metrics, their files and the registered screening model
    (:func:`sparsegan.serving.log_screening_model`, its input example a test scan) into the
    variant's training run (or a new run when that one lives in another store)."""
    import tempfile

    import mlflow
    from PIL import Image

    from .serving import log_screening_model
    from .tracking import start_run

    run_file = model_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    with start_run(variant, run_id):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and math.isfinite(v)})
        # a tag, not a param: params are immutable and the criterion may change after training
        mlflow.set_tag("calibrate.criterion", metrics["criterion"])
        for name in ("calibration.json", "metrics.json", "roc.csv"):
            mlflow.log_artifact(str(report_dir / name))
        calibration = json.loads((report_dir / "calibration.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            example = Path(tmp) / "example.png"
            Image.fromarray(np.load(processed_dir / "test.npy", mmap_mode="r")[0, 0]).save(example)
            log_screening_model(variant, model_dir, calibration, example)


def evaluate(variant: str, params: Params, processed_dir: Path, scores_dir: Path,
             model_dir: Path, report_dir: Path, log_mlflow: bool = True,
             n_boot: int = 1000) -> dict:
    """Stage evaluate@<variant>: metrics of one variant (the patient bootstrap seeded with
    ``params.seed``), also logged to its MLflow run with the model."""
    masks_path = processed_dir / "test_masks.npy"
    test_masks = np.load(masks_path, mmap_mode="r") if masks_path.exists() else None
    metrics = evaluate_variant(variant, scores_dir, report_dir, test_masks, seed=params.seed,
                               n_boot=n_boot)
    if log_mlflow:
        _log_to_mlflow(variant, model_dir, metrics, report_dir, processed_dir)
    return metrics


def summarize(variants: list[str], variants_dir: Path, reports_root: Path) -> dict[str, dict]:
    """Stage report: ``reports/metrics.json`` (one entry per variant), the ROC overlay table
    ``reports/roc.csv`` and ``reports/table1.md``."""
    results = {v: json.loads((variants_dir / v / "metrics.json").read_text()) for v in variants}
    reports_root.mkdir(parents=True, exist_ok=True)
    (reports_root / "metrics.json").write_text(json.dumps(results, indent=1))
    (reports_root / "table1.md").write_text(table1_markdown(results))
    pd.concat([pd.read_csv(variants_dir / v / "roc.csv") for v in variants]).to_csv(
        reports_root / "roc.csv", index=False)
    return results
