"""Do two data sets rank Table 1's rows alike? And the records of the earlier design checks.

The rank agreement of the six rows' *validation* AUCs between two data sets (e.g. the synthetic
default and the real scans): Spearman and Kendall of the seed means, Spearman over every pair of
seeds, and for scale the Spearman between seeds within each data set. A data set is a label of
``studies/real/checks.jsonl`` (the records of the design checks of earlier versions, made by a
training path of their own that is retired: each record names its data and seed) or
``study:<name>``, the per-seed validation AUCs of a pipeline study (``studies/<name>/
metrics.json``, written by ``scripts/study.py run``). ``scripts/real_checks.py`` is the entry
point (``--agreement``, ``--summary``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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
             studies_dir: Path = Path("studies")) -> dict[str, dict[int, float]]:
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


def parse_pair(arg: str) -> tuple[str, str]:
    """``A:B`` -> (A, B); a ``study:<name>`` label keeps its colon (``real2:study:synthetic``)."""
    a, b = arg.split(":", 1)
    if a == "study":
        name, b = b.split(":", 1)
        a = f"study:{name}"
    return a, b
