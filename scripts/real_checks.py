"""Design checks on real *validation* data: each default, and each candidate fix, over seeds.

    python scripts/real_checks.py --folder ../shared/oct_real --check lr_decay --seeds 0 1
    python scripts/real_checks.py --list

Each check trains the models it concerns with a few params changed (library calls, the same
functions the DVC stages run; data prepared once per image size / corner setting by the stage
scripts in ``studies/.work/``) and scores the **validation** split only: the test split is never
scored here, so nothing chosen from these numbers has seen it. One JSON line per (check, setting,
model, seed) goes to ``studies/real/checks.jsonl``: the val AUC of its Table 1 score, and for reconstruction
models the val AUC of the image score (MSE and L1) and of the latent score (eq. 4), the RMS of
H_in on normal scans, the share of near-zero SRN code entries; for f-AnoGAN each score term
alone; for every model the held-out operating point of each calibration criterion (phi chosen
on one half of the validation groups, measured on the other half, both ways).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from sparsegan.data.dataset import iterate_batches, load_split  # noqa: E402
from sparsegan.metrics import calibrate_phi, detection_metrics  # noqa: E402
from sparsegan.anomaly import image_anomaly_score, latent_anomaly_score  # noqa: E402
from sparsegan.params import parse_params  # noqa: E402
from sparsegan.stats import patient_codes  # noqa: E402
from sparsegan.models.sparse_gan import ReconstructionDetector  # noqa: E402
from sparsegan.scoring import score_batch  # noqa: E402
from sparsegan.train import load_trained, train_model  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from study import REAL_SPLIT  # noqa: E402

GEN = ["autoencoder", "pix2pix", "sparse_gan"]  # the pix2pix model gives both #1 and #2
# The score a record's val_auc is of: each model's Table 1 row (pix2pix: #2, its #1 is the
# image MSE, val_auc_image_mse). Records before the (model, score) layout name pix2pix
# "pix2pix_latent".
PRIMARY = {"autoencoder": "image", "pix2pix": "latent", "sparse_gan": "latent",
           "anogan": "search", "fanogan": "izif"}
# check -> {setting name: (models, overrides as a nested params.yaml mapping)}
CHECKS: dict[str, dict[str, tuple[list[str], dict]]] = {
    "baseline": {"default": (GEN + ["anogan", "fanogan"], {})},
    "lr_decay": {"constant": (GEN, {"train": {"lr_decay": 0.0}})},
    "fill_corners": {"off": (GEN, {"preprocess": {"fill_corners": False}})},
    "epochs": {"15": (GEN, {"train": {"epochs": 15}}), "60": (GEN, {"train": {"epochs": 60}})},
    "image_size": {"128": (["autoencoder", "sparse_gan"], {"data": {"image_size": 128}})},
    "srn": {"unit_atoms": (["sparse_gan"], {"srn": {"unit_atoms": True}}),
            "scale_invariant": (["sparse_gan"], {"srn": {"scale_invariant": True}}),
            "both": (["sparse_gan"], {"srn": {"unit_atoms": True, "scale_invariant": True}})},
    "fanogan": {"epochs100": (["fanogan"], {"fanogan": {"epochs": 100}}),
                "epochs200": (["fanogan"], {"fanogan": {"epochs": 200}})},
}
REAL = {"data": {"source": "folder", "split": REAL_SPLIT}}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and k != "val_per_disease" else v
    return out


def prepare(raw_params: dict, label: str) -> Path:
    """The processed arrays for these data/preprocess params (stage scripts, run once per label)."""
    d, pre = raw_params["data"], raw_params.get("preprocess", {})
    key = f"{label}-s{d.get('image_size', 64)}-c{int(pre.get('fill_corners', True))}"
    work = ROOT / "studies" / ".work" / key
    if (work / "data" / "processed" / "val.npy").is_file():
        return work / "data" / "processed"
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw_params))
    for stage in ("acquire", "split", "preprocess"):
        subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=work, check=True)
    return work / "data" / "processed"


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))


def held_out_calibration(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                         seed: int) -> dict:
    """2-fold by group: phi per criterion on one half, metrics on the other (both ways, mean)."""
    codes, n = patient_codes(groups)
    half = np.random.default_rng(seed).permutation(n) < n // 2
    fold = half[codes]
    out = {}
    for criterion in ("accuracy", "youden", "f1"):
        rows = []
        for a in (fold, ~fold):
            phi = calibrate_phi(labels[a], scores[a], criterion, 0.95)
            m = detection_metrics(labels[~a], scores[~a], phi)
            rows.append([m["accuracy"], m["sensitivity"], m["specificity"],
                         (m["sensitivity"] + m["specificity"]) / 2])
        acc, sen, spe, bal = np.mean(rows, axis=0)
        out[criterion] = {"accuracy": acc, "sensitivity": sen, "specificity": spe,
                          "balanced_accuracy": bal}
    return out


@torch.no_grad()
def diagnose(model: str, params, model_dir: Path, processed: Path, seed: int) -> dict:
    images, index, _ = load_split(processed, "val")
    labels = index["label"].to_numpy()
    detector = load_trained(model_dir, model=model).detector
    own, extra = [], {}
    for x in iterate_batches(images, 64, shuffle=False):
        out = score_batch(detector, x, params.score)[PRIMARY[model]]
        own.append(out.score.numpy())
        if isinstance(detector, ReconstructionDetector):
            h = detector.encoder(x)
            rec = detector.decoder(h)
            h_re = detector.encoder(rec)
            for k, v in {"image_mse": image_anomaly_score(x, rec),
                         "image_l1": (x - rec).abs().flatten(1).mean(1),
                         "latent": latent_anomaly_score(h, h_re),
                         "h_rms": h.flatten(1).pow(2).mean(1).sqrt()}.items():
                extra.setdefault(k, []).append(v.numpy())
            if detector.srn is not None:
                code = detector.srn(h)
                extra.setdefault("code_zero", []).append(
                    (code.abs() < 1e-6).flatten(1).float().mean(1).numpy())
                res = (h - detector.srn.reconstruct(code)).flatten(1).pow(2).mean(1)
                extra.setdefault("code_residual_share", []).append(
                    (res / h.flatten(1).pow(2).mean(1).clamp_min(1e-12)).numpy())
        if model == "fanogan":
            image_mse, feature_mse, _ = detector.izif(x)
            extra.setdefault("image_mse", []).append(image_mse.numpy())
            extra.setdefault("feature_mse", []).append(feature_mse.numpy())
    own = np.concatenate(own)
    extra = {k: np.concatenate(v) for k, v in extra.items()}
    normal = labels == 0
    cnv = index["class"].isin(["NORMAL", "CNV"]).to_numpy()
    result = {"val_auc": _auc(labels, own), "val_auc_cnv": _auc(labels[cnv], own[cnv]),
              "calibration": held_out_calibration(labels, own, index["patient"].to_numpy(), seed)}
    for k in ("image_mse", "image_l1", "latent", "feature_mse"):
        if k in extra:
            result[f"val_auc_{k}"] = _auc(labels, extra[k])
    for k in ("h_rms", "code_zero", "code_residual_share"):
        if k in extra:
            result[f"{k}_normal_mean"] = float(extra[k][normal].mean())
    if model == "pix2pix":
        result["val_auc_pix2pix_image"] = result["val_auc_image_mse"]
    return result


def run(folder: Path | None, check: str, seeds: list[int], settings: list[str] | None,
        label: str | None = None) -> None:
    """``folder`` None: the same check on the default synthetic data (for the comparison of
    synthetic and real rankings). ``label`` names the data in the records (default "real" or
    "synthetic"); a new label after a change of the defaults or of the generator keeps the
    earlier records apart and re-makes the data and models (they are cached by label)."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if folder is None:
        real, data = base, label or "synthetic"
    else:
        real, data = merge(base, REAL), label or "real"
        real["data"]["folder"] = str(folder.resolve())
        real["data"]["patients"] = str((ROOT / "studies" / "real" / "patients.csv").resolve())
    out = ROOT / "studies" / "real" / "checks.jsonl"
    for name, (variants, over) in CHECKS[check].items():
        if settings and name not in settings:
            continue
        raw = merge(real, over)
        processed = prepare(raw, data)
        params = parse_params(raw)
        for seed in seeds:
            for variant in variants:
                tag = f"{data}-{check}-{name}-{variant}-s{seed}"
                model_dir = ROOT / "studies" / ".work" / "models" / tag
                tic = time.perf_counter()
                if not (model_dir / "model.pt").is_file():
                    train_model(variant, seed, params, processed, model_dir,
                                ROOT / "studies" / ".work" / "checkpoints" / tag,
                                log_mlflow=False)
                rec = {"data": data, "check": check, "setting": name, "variant": variant, "seed": seed,
                       "overrides": over, "train_s": time.perf_counter() - tic,
                       **diagnose(variant, params, model_dir, processed, seed)}
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[check] {tag}: val AUC {rec['val_auc']:.3f} "
                      + " ".join(f"{k}={v:.3f}" for k, v in rec.items()
                                 if k.startswith(("val_auc_", "h_rms", "code_"))), flush=True)


def summary(path: Path) -> str:
    """checks.jsonl -> markdown: per (data, check, setting, variant) the val AUCs per seed and
    their mean; the latest record wins when a (setting, variant, seed) was run twice."""
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        latest[(r.get("data", "real"), r["check"], r["setting"], r["variant"], r["seed"])] = r
    groups: dict[tuple, list[dict]] = {}
    for key, r in latest.items():
        groups.setdefault(key[:4], []).append(r)
    cols = ["val_auc", "val_auc_image_mse", "val_auc_image_l1", "val_auc_latent",
            "val_auc_feature_mse", "h_rms_normal_mean"]
    lines = ["Validation only (the test split is never scored by these checks). Each cell: mean "
             "over seeds (per-seed values).", "",
             "| data | check | setting | variant | seeds | " + " | ".join(cols) + " |",
             "|---" * (5 + len(cols)) + "|"]
    for (data, check, setting, variant), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        cells = []
        for c in cols:
            vals = [r[c] for r in rs if c in r]
            cells.append(f"{np.mean(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})"
                         if vals else "")
        lines.append(f"| {data} | {check} | {setting} | {variant} | "
                     f"{','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration criteria, held out within validation (phi on one half of the "
              "validation groups, measured on the other, both ways; mean over seeds and rows of "
              "the baseline check):", "", "| data | criterion | accuracy | sensitivity | "
              "specificity | balanced accuracy |", "|---|---|---|---|---|---|"]
    for data in sorted({k[0] for k in latest}):
        rs = [r for k, r in latest.items() if k[0] == data and k[1] == "baseline"]
        for crit in ("accuracy", "youden", "f1"):
            m = [[r["calibration"][crit][k] for k in ("accuracy", "sensitivity", "specificity",
                                                       "balanced_accuracy")] for r in rs]
            if m:
                a = np.mean(m, axis=0)
                lines.append(f"| {data} | {crit} | " + " | ".join(f"{v:.3f}" for v in a) + " |")
    return "\n".join(lines) + "\n"


# Table 1's six rows as (trained models as recorded, record field of its validation AUC):
# pix2pix #1 is the image score of the pix2pix model that the checks train once.
ROWS = {"autoencoder": (("autoencoder",), "val_auc"), "anogan": (("anogan",), "val_auc"),
        "fanogan": (("fanogan",), "val_auc"),
        "pix2pix_image": (("pix2pix", "pix2pix_latent"), "val_auc_pix2pix_image"),
        "pix2pix_latent": (("pix2pix", "pix2pix_latent"), "val_auc"),
        "sparse_gan": (("sparse_gan",), "val_auc")}


def row_aucs(records: list[dict], label: str,
             studies_dir: Path = ROOT / "studies") -> dict[str, dict[int, float]]:
    """Row -> seed -> validation AUC of the baseline check on the data ``label`` (the latest
    record wins). ``study:<name>``: the per-seed validation AUCs of a pipeline study instead
    (``studies/<name>/metrics.json``, written by ``scripts/study.py run``)."""
    if label.startswith("study:"):
        path = studies_dir / label.split(":", 1)[1] / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path}: not found; run `scripts/study.py run` for it first")
        metrics = json.loads(path.read_text())["metrics"]
        return {row: {int(s): v["val_auc"] for s, v in metrics[row]["seeds"].items()}
                for row in ROWS if row in metrics}
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("data", "real") != label or r["check"] != "baseline":
            continue
        for row, (names, field) in ROWS.items():
            if r["variant"] in names and field in r:
                out.setdefault(row, {})[r["seed"]] = r[field]
    return out


def agreement(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]) -> dict:
    """How alike two data sets rank the six rows by validation AUC: Spearman and Kendall of the
    means over seeds, and Spearman over every pair (seed of a, seed of b); for scale, the
    Spearman between seeds within each data set (how far one seed's ranking is from another's)."""
    from scipy.stats import kendalltau, spearmanr

    rows = sorted(set(a) & set(b))
    if len(rows) < 3:
        raise SystemExit(f"agreement: only {len(rows)} rows in both data sets; run the baseline "
                         f"check on both first")
    seeds_a = sorted(set.intersection(*(set(a[r]) for r in rows)))
    seeds_b = sorted(set.intersection(*(set(b[r]) for r in rows)))
    mean_a = [float(np.mean([a[r][s] for s in seeds_a])) for r in rows]
    mean_b = [float(np.mean([b[r][s] for s in seeds_b])) for r in rows]

    def rho(x: list[float], y: list[float]) -> float:
        return float(spearmanr(x, y).statistic)

    def col(d, s):
        return [d[r][s] for r in rows]

    pairs = [rho(col(a, sa), col(b, sb)) for sa in seeds_a for sb in seeds_b]

    def within(d, seeds):
        vals = [rho(col(d, s), col(d, t)) for i, s in enumerate(seeds) for t in seeds[i + 1:]]
        return float(np.mean(vals)) if vals else float("nan")

    return {"rows": rows, "seeds_a": seeds_a, "seeds_b": seeds_b,
            "mean_auc_a": dict(zip(rows, mean_a)), "mean_auc_b": dict(zip(rows, mean_b)),
            "spearman_of_means": rho(mean_a, mean_b),
            "kendall_of_means": float(kendalltau(mean_a, mean_b).statistic),
            "spearman_seed_pairs": {"mean": float(np.mean(pairs)), "min": float(min(pairs)),
                                    "max": float(max(pairs)), "n": len(pairs)},
            "spearman_between_seeds_a": within(a, seeds_a),
            "spearman_between_seeds_b": within(b, seeds_b)}


def agreement_report(pairs: list[tuple[str, str]], records: list[dict]) -> tuple[dict, str]:
    result = {f"{x} vs {y}": agreement(row_aucs(records, x), row_aucs(records, y))
              for x, y in pairs}
    lines = ["Rank agreement of the six rows' validation AUC (baseline check; validation only).",
             "", "| data | seeds | Spearman of means | Kendall of means | Spearman over seed "
             "pairs: mean [min, max] | Spearman between seeds (first / second) |",
             "|---|---|---|---|---|---|"]
    for key, g in result.items():
        sp = g["spearman_seed_pairs"]
        lines.append(f"| {key} | {','.join(map(str, g['seeds_a']))} / "
                     f"{','.join(map(str, g['seeds_b']))} | {g['spearman_of_means']:.2f} | "
                     f"{g['kendall_of_means']:.2f} | {sp['mean']:.2f} [{sp['min']:.2f}, "
                     f"{sp['max']:.2f}] | {g['spearman_between_seeds_a']:.2f} / "
                     f"{g['spearman_between_seeds_b']:.2f} |")
    lines += ["", "Mean validation AUC over seeds per row:", "",
              "| data | " + " | ".join(ROWS) + " |", "|---" * (len(ROWS) + 1) + "|"]
    done = set()
    for key, g in result.items():
        for name, means in zip(key.split(" vs "), (g["mean_auc_a"], g["mean_auc_b"])):
            if name not in done:
                done.add(name)
                lines.append(f"| {name} | " + " | ".join(
                    f"{means[r]:.3f}" if r in means else "" for r in ROWS) + " |")
    return result, "\n".join(lines) + "\n"


def _pair(arg: str) -> tuple[str, str]:
    """``A:B`` -> (A, B); a ``study:<name>`` label keeps its colon (``real2:study:synthetic``)."""
    a, b = arg.split(":", 1)
    if a == "study":
        name, b = b.split(":", 1)
        a = f"study:{name}"
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, help="the real tree; omitted: the synthetic default")
    ap.add_argument("--check", choices=list(CHECKS))
    ap.add_argument("--setting", nargs="*")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--label", help="name of the data in the records (default: real / synthetic)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--summary", action="store_true", help="write studies/real/checks.md")
    ap.add_argument("--agreement", nargs="+", metavar="A:B",
                    help="rank agreement of data labels A and B (e.g. real2:synthetic3, "
                         "real2:study:synthetic for a make-study result) -> "
                         "studies/real/agreement.{json,md}")
    a = ap.parse_args()
    if a.summary:
        md = summary(ROOT / "studies" / "real" / "checks.jsonl")
        (ROOT / "studies" / "real" / "checks.md").write_text(md)
        print(md)
        return
    if a.agreement:
        records = [json.loads(x) for x in
                   (ROOT / "studies" / "real" / "checks.jsonl").read_text().splitlines()]
        pairs = [_pair(p) for p in a.agreement]
        result, md = agreement_report(pairs, records)
        (ROOT / "studies" / "real" / "agreement.json").write_text(json.dumps(result, indent=1)
                                                                 + "\n")
        (ROOT / "studies" / "real" / "agreement.md").write_text(md)
        print(md)
        return
    if a.list or not a.check:
        for c, s in CHECKS.items():
            print(c, {k: v[0] for k, v in s.items()})
        return
    run(a.folder, a.check, a.seeds, a.setting, a.label)


if __name__ == "__main__":
    main()
