"""Do the detectors see normal synthetic scans as they see normal real ones? Their scores and
residual maps compared, one training run on each dataset.

    python scripts/compare_scores.py SYNTH_SCORES REAL_SCORES [--seed 0] [--out studies/real/score_gap.json]

``*_SCORES`` are the ``scores/`` folders of two pipeline runs (``scores/<model>/s<seed>/<score>/``
with ``val.csv``, ``test.csv`` and, for the reconstruction models, ``test_maps.npz``). Scores
are compared on a log scale, where a detector's scores of two datasets differ by a factor, not
an offset. Per row (model, score):

* ``normal_sd``: the sd of the log scores of the validation normals: how much a normal scan's
  score varies (a lesion must raise it by more than this to be seen);
* ``shift``: (median log score of validation diseased - that of validation normals) /
  ``normal_sd``: how far a lesion moves the score, in units of that variation;
* ``patient_share``: the share of the validation normals' log-score variance between patients
  (one-way ANOVA intraclass correlation, patients with 2+ scans; real files of unknown patient
  do not count): a large share means a score tells patients apart rather than lesions.
  ``patient_share_named`` counts only patients whose ID is a number (from an OCT2017 file name,
  or the generator's), not groups such as ``normal_train:12`` that ``scripts/study.py groups``
  made of runs of consecutive file numbers;
* ``test_minus_val``: (median log score of the test normals - that of the validation normals) /
  ``normal_sd``: whether normal test scans score like normal validation scans;
* for rows with residual maps, the depth profile of the mean absolute ``difference`` map of the
  *test* normals (the only split whose maps the pipeline keeps; a description, nothing is
  chosen on it), normalised to sum 1: ``profile_r`` is the correlation of the two datasets'
  profiles, ``profile_top_quarter`` / ``profile_bottom_quarter`` their shares in the top and
  bottom quarter of the scan.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .. import evaluate, layout


def read_scores(path: Path) -> dict[str, np.ndarray]:
    """``val.csv``/``test.csv`` -> label (N,), log score (N,), patient (N,) (``""`` unknown)."""
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; run the score stage first")
    table = evaluate.read_scores(path)
    score = table["score"].to_numpy(dtype=np.float64)
    patient = table["patient"] if "patient" in table.columns else [""] * len(table)
    return {"label": table["label"].to_numpy(),
            "log": np.log(np.maximum(score, np.finfo(np.float64).tiny)),
            "patient": np.asarray(patient, dtype=str)}


def patient_share(log: np.ndarray, patient: np.ndarray) -> tuple[float, int]:
    """Intraclass correlation ICC(1) of ``log`` grouped by patient (known patients with 2+ scans);
    (nan, groups) when fewer than 3 such patients."""
    groups = [log[patient == p] for p in np.unique(patient[patient != ""])]
    groups = [g for g in groups if len(g) >= 2]
    if len(groups) < 3:
        return float("nan"), len(groups)
    k = np.mean([len(g) for g in groups])  # mean group size (balanced approximation)
    grand = np.concatenate(groups).mean()
    n_total = sum(len(g) for g in groups)
    ms_between = sum(len(g) * (g.mean() - grand) ** 2 for g in groups) / (len(groups) - 1)
    ms_within = sum(((g - g.mean()) ** 2).sum() for g in groups) / (n_total - len(groups))
    icc = (ms_between - ms_within) / (ms_between + (k - 1) * ms_within)
    return float(icc), len(groups)


def depth_profile(folder: Path, labels: np.ndarray) -> np.ndarray | None:
    """Mean |difference| of the test normals per image row, normalised to sum 1; None without
    maps."""
    path = folder / "test_maps.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        if "difference" not in z.files:
            return None
        diff = np.abs(z["difference"][labels == 0, 0].astype(np.float32))  # (N, S, S)
    profile = diff.mean(axis=(0, 2)).astype(np.float64)
    return profile / profile.sum()


def row_stats(folder: Path) -> tuple[dict[str, float], np.ndarray | None]:
    val, test = read_scores(folder / "val.csv"), read_scores(folder / "test.csv")
    normal = val["log"][val["label"] == 0]
    sick = val["log"][val["label"] == 1]
    sd = float(normal.std(ddof=1))
    patients = val["patient"][val["label"] == 0]
    share, groups = patient_share(normal, patients)
    named = np.char.isdigit(patients)  # an ID from an OCT2017 file name (or the generator's)
    share_named, groups_named = patient_share(normal[named], patients[named])
    stats = {"normal_sd": sd,
             "shift": float((np.median(sick) - np.median(normal)) / sd),
             "patient_share": share, "patient_groups": groups,
             "patient_share_named": share_named, "patient_groups_named": groups_named,
             "test_minus_val": float((np.median(test["log"][test["label"] == 0])
                                      - np.median(normal)) / sd),
             "val_normals": int(len(normal)), "val_diseased": int(len(sick))}
    return stats, depth_profile(folder, test["label"])


def compare(synthetic: Path, real: Path, seed: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model_dir in sorted(p for p in synthetic.iterdir() if p.is_dir()):
        seed_dir = synthetic / layout.seed_dir(model_dir.name, seed)
        if not seed_dir.is_dir():
            continue
        for score_dir in sorted(p for p in seed_dir.iterdir() if p.is_dir()):
            other = real / layout.seed_dir(model_dir.name, seed) / score_dir.name
            if not other.is_dir():
                continue
            (s, s_prof), (r, r_prof) = row_stats(score_dir), row_stats(other)
            row = {"synthetic": s, "real": r}
            if s_prof is not None and r_prof is not None and len(s_prof) == len(r_prof):
                q = len(s_prof) // 4
                row["profile_r"] = float(np.corrcoef(s_prof, r_prof)[0, 1])
                for name, prof in (("synthetic", s_prof), ("real", r_prof)):
                    row[name]["profile_top_quarter"] = float(prof[:q].sum())
                    row[name]["profile_bottom_quarter"] = float(prof[-q:].sum())
            out[f"{model_dir.name}/{score_dir.name}"] = row
    if not out:
        raise SystemExit(f"error: no row of {synthetic} has a counterpart in {real} for seed "
                         f"{seed} (expected <model>/s{seed}/<score>/val.csv in both)")
    return out


def markdown(result: dict[str, dict]) -> str:
    cols = ("normal_sd", "shift", "patient_share", "patient_share_named", "test_minus_val",
            "profile_top_quarter", "profile_bottom_quarter")
    lines = ["| row | " + " | ".join(f"{c} (syn / real)" for c in cols) + " | profile_r |",
             "|---" * (len(cols) + 2) + "|"]
    for name, row in result.items():
        cells = []
        for c in cols:
            a, b = row["synthetic"].get(c), row["real"].get(c)
            cells.append("-" if a is None else f"{a:.2f} / {b:.2f}")
        r = row.get("profile_r")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if r is None else f'{r:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("real", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    for folder in (args.synthetic, args.real):
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is not a scores/ folder of a pipeline run")
    result = compare(args.synthetic, args.real, args.seed)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))

