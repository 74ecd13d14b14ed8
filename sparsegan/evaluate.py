"""Evaluation on test, per row of the report and over its training seeds; phi is calibrated on
validation apart (eq. 5).

Separate DVC stages, so that the test set can never influence phi:
:func:`sparsegan.scoring.score_model` writes validation and test scores (and test anomaly maps)
of every score of a trained model, :func:`sparsegan.metrics.calibrate_row` reads the
*validation* scores only, :func:`evaluate_row` applies each seed's phi to its test scores and
summarises the seeds (mean, sd, min, max), and :func:`summarize` gathers all rows into
``reports/metrics.json`` and ``reports/table1.md``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from .layout import SETTINGS, calibration_file, model_dir, processed_dir, run_file, scores_dir
from .metrics import MAP_NAMES, aggregate_patients, detection_metrics, pixel_auroc, roc_table
from .params import Params, check_row
from .spec import TABLE1_ROWS
from .stats import delong_test, over_seeds, paired_bootstrap, paired_over_seeds, patient_bootstrap

logger = logging.getLogger(__name__)

BOOTSTRAP_SEED = 0  # the resampling RNG's seed (not a training seed): the same draws for every row

# Zhou et al., ISBI 2020, Table 1 (OCT2017, 224x224): val AUC, test AUC, test Acc, test Sen.
PAPER_TABLE1 = {
    "autoencoder": ("Auto-Encoder", 0.729, 0.783, 0.751, 0.834),
    "anogan": ("AnoGAN", 0.815, 0.846, 0.789, 0.917),
    "fanogan": ("f-AnoGAN", 0.849, 0.882, 0.808, 0.871),
    "pix2pix_image": ("pix2pix #1 (image level)", 0.805, 0.861, 0.818, 0.879),
    "pix2pix_latent": ("pix2pix #2 (latent)", 0.837, 0.874, 0.815, 0.900),
    "sparse_gan": ("Sparse-GAN", 0.885, 0.925, 0.841, 0.951),
}
assert tuple(PAPER_TABLE1) == TABLE1_ROWS


def read_scores(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patient": str}, keep_default_na=False)


def seed_metrics(scores_dir: Path, calibration: dict, test_masks: np.ndarray | None,
                 n_boot: int = 1000) -> tuple[dict, pd.DataFrame]:
    """Test metrics of one trained model's score at its validation phi (``calibration``), and
    its ROC table.

    Flat keys (floats, plus ``criterion``): ``val_auc``, ``phi``, ``test_<m>`` for m in AUC,
    average precision, accuracy, sensitivity, specificity, F1, each with its 95% patient-bootstrap
    percentile interval ``test_<m>_ci_low`` / ``test_<m>_ci_high`` (``n_boot`` resamples of the
    test *patients*, see :mod:`sparsegan.stats`), ``test_bootstrap_resamples``,
    ``test_bootstrap_skipped`` (single-class resamples), ``test_patients``, ``test_auc_<CLASS>``
    (each disease vs NORMAL) and, with lesion masks, ``pixel_auroc_<map>``
    on the diseased test scans; with a patient rule in the calibration (the aggregation
    chosen on validation patients, decided at phi) ``patient_aggregation`` (a string), ``val_patient_auc``,
    ``test_patient_count`` and ``test_patient_<m>`` for the six metrics.
    """
    test = read_scores(scores_dir / "test.csv")
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
    intervals = patient_bootstrap(labels, scores, patients, phi, n_boot=n_boot,
                                  seed=BOOTSTRAP_SEED)
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
        metrics["test_patient_count"] = int(len(y))
        metrics.update({f"test_patient_{k}": v  # at the scans' phi (metrics.calibrate_patients)
                        for k, v in detection_metrics(y, s, phi).items()})
    for cls in sorted(set(test["class"]) - {"NORMAL"}):
        subset = test["class"].isin(["NORMAL", cls]).to_numpy()
        metrics[f"test_auc_{cls}"] = float(roc_auc_score(labels[subset], scores[subset]))
    if test_masks is not None:
        maps = np.load(scores_dir / "test_maps.npz")
        diseased = labels == 1
        for name in MAP_NAMES:
            if name in maps:
                metrics[f"pixel_auroc_{name}"] = pixel_auroc(
                    maps[name][diseased].astype(np.float32), test_masks[diseased])
    return metrics, pd.DataFrame(roc_table(labels, scores))


def summarize_seeds(per_seed: dict[int, dict]) -> dict:
    """One row's entry of ``metrics.json``: every numeric metric's mean over the seeds at the top
    level (the keys of :func:`seed_metrics`), ``n_seeds``, ``spread`` (``metric -> {sd, min,
    max}``, :func:`sparsegan.stats.over_seeds`) and ``seeds`` (``"<seed>" -> metrics``). String
    values (criterion, patient aggregation) are listed once each, joined by commas."""
    spread = over_seeds(per_seed)
    out: dict = {k: v["mean"] for k, v in spread.items()}
    for key in sorted({k for m in per_seed.values() for k, v in m.items() if isinstance(v, str)}):
        out[key] = ",".join(sorted({m[key] for m in per_seed.values() if key in m}))
    out["n_seeds"] = len(per_seed)
    out["spread"] = {k: {s: v[s] for s in ("sd", "min", "max")} for k, v in spread.items()}
    out["seeds"] = {str(seed): m for seed, m in per_seed.items()}
    return out


def _log_to_mlflow(row: str, model: str, seed: int, model_dir: Path, metrics: dict,
                   calibration_file: Path, settings_file: Path, processed_dir: Path) -> None:
    """One seed's test metrics of ``row`` (keys ``<row>.<metric>``), its calibration and the
    registered screening model (:func:`sparsegan.serving.log_screening_model` of the
    calibration with the score stage's settings, its input example a test scan) into the child
    run of (model, seed) that trained it (named by the train stage's run record, beside
    ``model_dir`` under ``reports/runs``), or a new one when there is none or it lives in
    another store (a training restored from DVC's cache)."""
    import tempfile

    import mlflow
    from PIL import Image

    from .screening import read_config
    from .serving import log_screening_model
    from .tracking import start_run

    record = run_file("train", model, seed)
    run_id = json.loads(record.read_text()).get("mlflow_run_id") if record.exists() else None
    with start_run(model, seed, run_id):
        mlflow.log_metrics({f"{row}.{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and math.isfinite(v)})
        # a tag, not a param: params are immutable and the criterion may change after training
        mlflow.set_tag(f"{row}.calibrate.criterion", metrics["criterion"])
        mlflow.log_artifact(str(calibration_file), artifact_path=f"rows/{row}")
        with tempfile.TemporaryDirectory() as tmp:
            example = Path(tmp) / "example.png"
            Image.fromarray(np.load(processed_dir / "test.npy", mmap_mode="r")[0, 0]).save(example)
            log_screening_model(model_dir, read_config(calibration_file, settings_file), example)


def evaluate_row(row: str, params: Params, processed_root: Path, scores_root: Path,
                 models_root: Path, row_dir: Path, log_mlflow: bool = True,
                 n_boot: int = 1000) -> dict:
    """Stage evaluate@<row>: :func:`seed_metrics` of every seed of ``params.seeds`` (scores
    ``scores_root/<model>/s<seed>/<score>/``, phi from ``row_dir/calibration/s<seed>.json``),
    summarised over the seeds (:func:`summarize_seeds`) into ``row_dir/metrics.json``, and the
    ROC tables of all seeds in ``row_dir/roc.csv``; each seed also logged to MLflow with its
    screening model. The lesion masks and the example scan come from the processed variant of
    the row's model, under ``processed_root``."""
    model, score = check_row(row, params)
    processed = processed_dir(params.preprocess.variant_of(model), processed_root)
    masks_path = processed / "test_masks.npy"
    test_masks = np.load(masks_path, mmap_mode="r") if masks_path.exists() else None
    per_seed, rocs = {}, []
    for seed in params.seeds:
        cal_file = calibration_file(row, seed, row_dir.parent)
        calibration = json.loads(cal_file.read_text())
        metrics, roc = seed_metrics(scores_dir(model, seed, scores_root) / score, calibration,
                                    test_masks, n_boot)
        per_seed[seed] = metrics
        rocs.append(roc.assign(row=row, seed=seed))
        if log_mlflow:
            _log_to_mlflow(row, model, seed, model_dir(model, seed, models_root), metrics,
                           cal_file, scores_dir(model, seed, scores_root) / SETTINGS,
                           processed)
    summary = summarize_seeds(per_seed)
    row_dir.mkdir(parents=True, exist_ok=True)
    (row_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    pd.concat(rocs).to_csv(row_dir / "roc.csv", index=False)
    return summary


def compare_to_reference(params: Params, scores_root: Path, reference: str = "sparse_gan",
                         n_boot: int = 1000) -> dict[str, dict[str, float]]:
    """Paired comparison of row ``reference`` against every other row on the test set, over the
    training seeds of ``params.seeds``.

    Reads each row's ``scores_root/<model>/s<seed>/<score>/test.csv`` (all must list the same
    scans in the same order: a differing ``path`` column raises ``ValueError``). For each other
    row ``r`` returns ``{r: {...}}`` with flat floats: ``delta_auc`` = mean AUC(reference) - mean
    AUC(r) over the seeds, ``delta_auc_ci_low`` / ``delta_auc_ci_high`` (95% percentile interval)
    and ``p_value`` of the paired bootstrap that resamples the test patients and the seeds
    (:func:`sparsegan.stats.paired_bootstrap`; one seed draw for both rows when they are two
    scores of the same model, whose seed ``s`` is then the same training), ``seeds_won`` and ``delta_auc_seed_sd`` (the
    per-seed differences, :func:`sparsegan.stats.paired_over_seeds`), ``p_value_delong``
    (DeLong's test, scans as independent; one seed only), ``auc_reference``, ``auc_other``,
    ``bootstrap_resamples`` and ``bootstrap_skipped``. ``{}`` when ``reference`` is not a row.
    Pure: reads the score files, writes nothing.
    """
    if reference not in params.rows:
        return {}

    def read(row: str) -> list[pd.DataFrame]:
        model, score = params.rows[row]
        return [read_scores(scores_dir(model, seed, scores_root) / score / "test.csv")
                for seed in params.seeds]

    ref = read(reference)
    labels = ref[0]["label"].to_numpy()
    patients = (ref[0]["patient"].to_numpy() if "patient" in ref[0].columns
                else np.arange(len(ref[0])).astype(str))
    a = np.stack([t["score"].to_numpy(dtype=float) for t in ref])
    results = {}
    for row in params.rows:
        if row == reference:
            continue
        other = read(row)
        for t in other:
            if len(t) != len(ref[0]) or not (t["path"].to_numpy() == ref[0]["path"].to_numpy()).all():
                raise ValueError(f"the test scores of rows {row} and {reference} do not list the "
                                 f"same test scans in the same order; re-run `dvc repro`")
        b = np.stack([t["score"].to_numpy(dtype=float) for t in other])
        same = params.rows[row][0] == params.rows[reference][0]  # two scores of one training
        boot = paired_bootstrap(labels, a, b, patients, n_boot=n_boot, seed=BOOTSTRAP_SEED,
                                same_trainings=same)
        per_seed = paired_over_seeds(
            {s: roc_auc_score(labels, x) for s, x in zip(params.seeds, a)},
            {s: roc_auc_score(labels, x) for s, x in zip(params.seeds, b)})
        results[row] = {"delta_auc": boot["delta_auc"], "delta_auc_ci_low": boot["ci"][0],
                        "delta_auc_ci_high": boot["ci"][1], "p_value": boot["p_value"],
                        "seeds_won": per_seed["wins"], "delta_auc_seed_sd": per_seed["sd"],
                        "auc_reference": boot["auc_a"], "auc_other": boot["auc_b"],
                        "bootstrap_resamples": n_boot, "bootstrap_skipped": boot["n_skipped"]}
        if len(params.seeds) == 1:
            results[row]["p_value_delong"] = delong_test(labels, a[0], b[0])["p_value"]
    return results


def _cell(m: dict, key: str) -> str:
    """``mean`` or, over several seeds, ``mean ± sd``."""
    sd = m.get("spread", {}).get(key, {}).get("sd", 0.0)
    return f"{m[key]:.3f} ± {sd:.3f}" if m.get("n_seeds", 1) > 1 else f"{m[key]:.3f}"


def table1_markdown(results: dict[str, dict]) -> str:
    """The paper's Table 1 layout, ours (mean ± sd over the training seeds) beside the paper's,
    then the other rows (the ablations) without a paper value."""
    lines = ["| method | val AUC | test AUC | test Acc | test Sen |", "|---|---|---|---|---|"]
    keys = ("val_auc", "test_auc", "test_accuracy", "test_sensitivity")
    for row, (name, *paper) in PAPER_TABLE1.items():
        if row in results:
            cells = [f"{_cell(results[row], k)} / {p:.3f}" for k, p in zip(keys, paper)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for row in results:
        if row not in PAPER_TABLE1:
            lines.append(f"| {row} (ablation) | "
                         + " | ".join(f"{_cell(results[row], k)} / -" for k in keys) + " |")
    n = sorted({m.get("n_seeds", 1) for m in results.values()})
    ours = ("one training seed" if n == [1] else
            f"the mean ± sd over {'/'.join(map(str, n))} training seeds")
    return ("\n".join(lines) + f"\n\nEach cell: ours / paper (Zhou et al., ISBI 2020, OCT2017); "
            f"ours is {ours}.\n")


def summarize(rows: list[str], rows_dir: Path, reports_root: Path) -> dict[str, dict]:
    """Stage report: ``reports/metrics.json`` (one entry per row), the ROC overlay table
    ``reports/roc.csv`` and ``reports/table1.md``."""
    results = {r: json.loads((rows_dir / r / "metrics.json").read_text()) for r in rows}
    reports_root.mkdir(parents=True, exist_ok=True)
    (reports_root / "metrics.json").write_text(json.dumps(results, indent=1))
    (reports_root / "table1.md").write_text(table1_markdown(results))
    pd.concat([pd.read_csv(rows_dir / r / "roc.csv") for r in rows]).to_csv(
        reports_root / "roc.csv", index=False)
    return results
