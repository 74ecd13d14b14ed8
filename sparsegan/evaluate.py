"""Scoring, calibration of phi on validation (eq. 5) and evaluation on test, per variant.

Separate DVC stages, so that the test set can never influence phi: ``score_variant`` writes
validation and test scores (and test anomaly maps), ``calibrate_variant`` reads the *validation*
scores only, ``evaluate`` applies that phi to the test scores, and ``summarize`` gathers all
variants into ``reports/metrics.json`` and ``reports/table1.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from .data.dataset import iterate_batches, load_split
from .metrics import calibrate_phi, detection_metrics, pixel_auroc, roc_table
from .params import Params
from .train import load_detector, resolve_device

# Zhou et al., ISBI 2020, Table 1 (OCT2017, 224x224): val AUC, test AUC, test Acc, test Sen.
PAPER_TABLE1 = {
    "autoencoder": ("Auto-Encoder", 0.729, 0.783, 0.751, 0.834),
    "anogan": ("AnoGAN", 0.815, 0.846, 0.789, 0.917),
    "fanogan": ("f-AnoGAN", 0.849, 0.882, 0.808, 0.871),
    "pix2pix_image": ("pix2pix #1 (image level)", 0.805, 0.861, 0.818, 0.879),
    "pix2pix_latent": ("pix2pix #2 (latent)", 0.837, 0.874, 0.815, 0.900),
    "sparse_gan": ("Sparse-GAN", 0.885, 0.925, 0.841, 0.951),
}


def score_images(detector, images: np.ndarray, batch_size: int, device: torch.device,
                 keep_maps: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scores (N,) and, if ``keep_maps``, float16 maps (N, 1, S, S) by name plus the
    reconstruction as uint8 ("reconstruction")."""
    scores, maps = [], {}
    for x in iterate_batches(images, batch_size, shuffle=False):
        out = detector.score(x.to(device))
        scores.append(out.score.float().cpu().numpy())
        if keep_maps:
            for name, m in out.maps.items():
                maps.setdefault(name, []).append(m.float().cpu().numpy().astype(np.float16))
            rec = ((out.reconstruction.float().cpu().numpy() + 1) * 127.5).round().clip(0, 255)
            maps.setdefault("reconstruction", []).append(rec.astype(np.uint8))
    return np.concatenate(scores), {k: np.concatenate(v) for k, v in maps.items()}


def score_variant(variant: str, params: Params, processed_dir: Path, model_dir: Path,
                  out_dir: Path) -> None:
    """Write ``out_dir/{val,test}.csv`` (index + score), ``test_maps.npz`` and ``timing.json``."""
    device = resolve_device(params.train.device)
    torch.manual_seed(params.seed)  # AnoGAN's search draws its start from torch's RNG
    detector = load_detector(variant, params, model_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing = {}
    for split in ("val", "test"):
        images, index, _ = load_split(processed_dir, split)
        tic = time.perf_counter()
        scores, maps = score_images(detector, images, params.train.batch_size, device,
                                    keep_maps=split == "test")
        timing[f"{split}_images_per_s"] = len(images) / (time.perf_counter() - tic)
        index.assign(score=scores).to_csv(out_dir / f"{split}.csv", index=False)
        if maps:
            np.savez_compressed(out_dir / "test_maps.npz", **maps)
    (out_dir / "timing.json").write_text(json.dumps(timing, indent=1))


def calibrate_variant(params: Params, scores_dir: Path, out_path: Path) -> dict:
    """phi from validation scores only (eq. 5), with the validation operating point."""
    val = pd.read_csv(scores_dir / "val.csv")
    c = params.calibrate
    phi = calibrate_phi(val["label"].to_numpy(), val["score"].to_numpy(), c.criterion,
                        c.target_sensitivity)
    result = {"phi": phi, "criterion": c.criterion,
              "validation": detection_metrics(val["label"].to_numpy(), val["score"].to_numpy(), phi)}
    if c.criterion == "sensitivity":
        result["target_sensitivity"] = c.target_sensitivity
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    return result


def evaluate_variant(variant: str, scores_dir: Path, report_dir: Path,
                     test_masks: np.ndarray | None) -> dict:
    """Test metrics at the validation phi of ``report_dir/calibration.json``, the ROC table and
    (with lesion masks) the pixel AUROC of each anomaly map on the diseased test scans."""
    calibration = json.loads((report_dir / "calibration.json").read_text())
    test = pd.read_csv(scores_dir / "test.csv")
    labels, scores = test["label"].to_numpy(), test["score"].to_numpy()
    metrics = {"val_auc": calibration["validation"]["auc"], "phi": calibration["phi"],
               "criterion": calibration["criterion"],
               **{f"test_{k}": v for k, v in detection_metrics(labels, scores, calibration["phi"]).items()}}
    for cls in sorted(set(test["class"]) - {"NORMAL"}):
        subset = test["class"].isin(["NORMAL", cls]).to_numpy()
        metrics[f"test_auc_{cls}"] = float(roc_auc_score(labels[subset], scores[subset]))
    metrics["test_images_per_s"] = json.loads((scores_dir / "timing.json").read_text())["test_images_per_s"]
    if test_masks is not None:
        maps = np.load(scores_dir / "test_maps.npz")
        diseased = labels == 1
        for name in ("difference", "aam"):
            if name in maps:
                metrics[f"pixel_auroc_{name}"] = pixel_auroc(
                    maps[name][diseased].astype(np.float32), test_masks[diseased])
    report_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(roc_table(labels, scores)).assign(variant=variant).to_csv(
        report_dir / "roc.csv", index=False)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


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


def _log_to_mlflow(variant: str, model_dir: Path, metrics: dict, report_dir: Path) -> None:
    import mlflow

    from .tracking import start_run

    run_file = model_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    with start_run(variant, run_id):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and math.isfinite(v)})
        mlflow.log_param("calibrate.criterion", metrics["criterion"])
        for name in ("metrics.json", "roc.csv"):
            mlflow.log_artifact(str(report_dir / name))


def evaluate(variant: str, processed_dir: Path, scores_dir: Path, model_dir: Path,
             report_dir: Path, log_mlflow: bool = True) -> dict:
    """Stage evaluate@<variant>: metrics of one variant, also logged to its MLflow run."""
    masks_path = processed_dir / "test_masks.npy"
    test_masks = np.load(masks_path, mmap_mode="r") if masks_path.exists() else None
    metrics = evaluate_variant(variant, scores_dir, report_dir, test_masks)
    if log_mlflow:
        _log_to_mlflow(variant, model_dir, metrics, report_dir)
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
