"""Split the manifest into train / validation / test (docs/design.md, section 2).

Input: the manifest (``data/raw/manifest.csv``, see :mod:`sparsegan.data`), one row per image with
``path, class, patient, official_split, mask``. Output: three frames with columns
``path, label, class, patient, mask`` (label 0 = NORMAL, 1 = disease). Paths are resolved against
the manifest's folder and written relative to the current working directory (the repository root,
where every stage runs) when they lie inside it, absolute otherwise; ``mask`` likewise, and the
empty string when an image has none.

Protocols (``data.split.protocol``):

``paper``  The Sparse-GAN paper's split, by image. Test = every official test image (Kaggle's
           ``val`` folder is merged into test by the source). Validation = ``val_normal`` NORMAL
           images and ``val_per_disease`` images of each disease class (a number, or a count
           per class: :func:`validation_targets`), drawn at random (seeded by ``data.split.seed``)
           from the official train split. Train = all remaining official-train NORMAL images.
           Patients are shared between the splits (as in the paper).

``patient`` (default) The same proportions, but no patient appears in two of train/val/test.
           Test = the official test images (if ``test_per_class`` > 0, subsampled per class by
           whole patients to about that many images). Official-train images of patients that are
           in test are dropped (the count is logged and written to ``summary.json``). Validation
           is drawn by whole patients: the patients are shuffled (seeded) and, class by class
           (the scarcest first), a patient is added with *all* of their remaining images
           while that brings the counts closer to their targets (``val_normal`` per NORMAL,
           ``val_per_disease`` per disease class; a patient with images of several classes counts
           towards each), so the counts are approximate and a patient is never split.
           Train = the remaining NORMAL images of patients not in validation.

An image whose ``patient`` is empty is treated as a patient of its own (``summary.json`` counts
these files per split: for them the split is disjoint by file only). Draws do not depend on the
manifest's row order (rows are sorted by path first), so the same manifest and seed give the same
split. ``test_per_class`` applies to the ``patient`` protocol only (the paper uses all 1,000).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from sparsegan.params import CLASSES, DISEASES, ParamError, SplitParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = ["path", "label", "class", "patient", "mask"]
_MANIFEST_COLUMNS = ("path", "class", "patient", "official_split")


def _resolve(value: str, base: str, cwd: str) -> str:
    """``value`` resolved against ``base``; relative to ``cwd`` if inside it, else absolute."""
    if not value:
        return ""
    full = os.path.normpath(os.path.join(base, value))  # join keeps an absolute ``value``
    if full == cwd or full.startswith(cwd.rstrip(os.sep) + os.sep):
        return os.path.relpath(full, cwd)
    return full


def read_manifest(path: Path) -> pd.DataFrame:
    """``manifest.csv`` with every column as text (patient ids stay ``"0123"``, empty stays ``""``)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _as_text(col: pd.Series) -> pd.Series:
    """Ids as strings; integral floats (an int column with blanks read as float) lose the ``.0``."""
    if pd.api.types.is_float_dtype(col):
        return col.map(lambda v: "" if pd.isna(v) else str(int(v)) if float(v).is_integer()
                       else str(v))
    return col.fillna("").astype(str)


def _clean_manifest(manifest: pd.DataFrame, manifest_dir: Path) -> pd.DataFrame:
    missing = [c for c in _MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest: missing column(s) {', '.join(missing)}; expected "
                         f"{', '.join(_MANIFEST_COLUMNS)}, mask")
    df = pd.DataFrame({
        "path": manifest["path"].fillna("").astype(str),
        "class": manifest["class"].fillna("").astype(str).str.strip().str.upper(),
        "patient": _as_text(manifest["patient"]).str.strip(),
        "official_split": manifest["official_split"].fillna("").astype(str).str.strip().str.lower(),
        "mask": (manifest["mask"].fillna("").astype(str) if "mask" in manifest.columns
                 else ""),
    })
    bad = sorted(set(df["class"]) - set(CLASSES))
    if bad:
        raise ValueError(f"manifest: unknown class {bad[0]!r}; allowed {', '.join(CLASSES)}")
    df.loc[df["official_split"] == "val", "official_split"] = "test"  # Kaggle's val is test
    bad = sorted(set(df["official_split"]) - {"train", "test"})
    if bad:
        raise ValueError(f"manifest: unknown official_split {bad[0]!r}; allowed train, test")
    if (df["path"] == "").any():
        raise ValueError("manifest: a row has an empty path")

    base = os.path.abspath(manifest_dir)
    cwd = os.path.abspath(os.getcwd())
    df["path"] = [_resolve(p, base, cwd) for p in df["path"]]
    df["mask"] = [_resolve(m, base, cwd) for m in df["mask"]]
    dup = df["path"].duplicated()
    if dup.any():
        raise ValueError(f"manifest: image listed twice: {df['path'][dup].iloc[0]}")
    # Grouping key: an image without a patient id is a patient of its own.
    df["_pkey"] = np.where(df["patient"] == "", "__image__:" + df["path"], df["patient"])
    df["label"] = (df["class"] != "NORMAL").astype(np.int64)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """The output columns, rows ordered by class (CLASSES order) then path."""
    order = df["class"].map({c: i for i, c in enumerate(CLASSES)})
    out = df.assign(_order=order).sort_values(["_order", "path"], kind="stable")
    return out[COLUMNS].reset_index(drop=True)


def _require(df: pd.DataFrame, cls: str, needed: int, param: str, where: str,
             more_than: bool = False) -> None:
    have = int((df["class"] == cls).sum())
    if have < needed or (more_than and have == needed):
        what = "more than" if more_than else "at least"
        raise ParamError(
            f"params.yaml: data.split.{param} = {needed}: {where} has only {have} {cls} images "
            f"(needs {what} {needed}{', the rest for training' if more_than else ''}); "
            f"lower data.split.{param}")


def validation_targets(pool: pd.DataFrame, p: SplitParams, where: str) -> dict[str, int]:
    """Validation images wanted per class: ``val_normal`` NORMAL, and per disease class
    ``val_per_disease`` (a number: every disease class that has images, absent ones left out
    with a log line; a mapping: the classes it names; ``all``: every disease image). Too few images is a ParamError naming the
    class, its count and the param."""
    _require(pool, "NORMAL", p.val_normal, "val_normal", where, more_than=True)
    targets = {"NORMAL": p.val_normal}
    per_class = p.val_per_disease
    for cls in DISEASES:
        if per_class == "all":
            n = int((pool["class"] == cls).sum())
            if n:
                targets[cls] = n
            continue
        if isinstance(per_class, dict):
            n = per_class.get(cls, 0)
            param = f"val_per_disease.{cls}"
        else:
            n, param = per_class, "val_per_disease"
            if not (pool["class"] == cls).any():
                log.info("no %s images in %s: validation has none (a missing class is fine)",
                         cls, where)
                continue
        if n:
            _require(pool, cls, n, param, where)
            targets[cls] = n
    return targets


def _draw_patients(df: pd.DataFrame, targets: dict[str, int], rng: np.random.Generator) -> set:
    """Whole patients whose images bring each class's count close to its target (greedy).

    Patients are shuffled once; for each class (scarcest first) the patients with images of
    that class are visited in that order and one is taken, with all of their images, when that
    lowers ``sum_c |count_c - target_c| / target_c`` (so a patient who also has many images of
    another class, already full, is passed over), until the class reaches its target.
    """
    counts = df.groupby(["_pkey", "class"]).size().unstack(fill_value=0).sort_index()
    order = rng.permutation(len(counts))
    patients = np.array(counts.index, dtype=object)[order]
    matrix = counts.to_numpy()[order]
    columns = list(counts.columns)
    goal = np.array([targets.get(c, 0) for c in columns], dtype=np.float64)
    scale = np.where(goal > 0, 1.0 / np.maximum(goal, 1), 0.0)  # classes without target: ignored
    taken = np.zeros(len(patients), dtype=bool)
    total = np.zeros(len(columns), dtype=np.int64)
    available = dict(zip(columns, matrix.sum(axis=0)))
    for cls, target in sorted(targets.items(), key=lambda kv: available.get(kv[0], 0)):
        if cls not in columns:
            continue
        j = columns.index(cls)
        for i in np.flatnonzero(matrix[:, j]):
            if total[j] >= target:
                break
            if taken[i]:
                continue
            before = np.abs(total - goal) @ scale
            after = np.abs(total + matrix[i] - goal) @ scale
            if after < before:
                taken[i] = True
                total += matrix[i]
    return set(patients[taken])


def _warn_off_target(df: pd.DataFrame, targets: dict[str, int], what: str) -> None:
    """Log when whole-patient drawing missed a class's target by more than 20%."""
    counts = df["class"].value_counts()
    for cls, target in targets.items():
        got = int(counts.get(cls, 0))
        if abs(got - target) > 0.2 * target:
            log.warning("protocol 'patient': %s has %d %s images for a target of %d (patients "
                        "span several classes or have many images)", what, got, cls, target)


def make_splits(manifest: pd.DataFrame, manifest_dir: Path, p: SplitParams,
                seed: int) -> dict[str, pd.DataFrame]:
    """Split ``manifest`` by protocol ``p.protocol``; returns ``{"train", "val", "test"}`` frames.

    Each frame's ``attrs`` hold ``protocol``, ``seed``, ``dropped_overlap`` (official-train images
    dropped because their patient is in test) and ``dropped_overlap_patients``;
    :func:`write_splits` records them.
    """
    df = _clean_manifest(manifest, manifest_dir)
    rng = np.random.default_rng(seed)
    official_train = df[df["official_split"] == "train"]
    test = df[df["official_split"] == "test"]
    dropped = dropped_patients = 0

    if p.protocol == "paper":
        if p.test_per_class:
            log.warning("data.split.test_per_class = %d is ignored by protocol 'paper' "
                        "(it uses every official test image)", p.test_per_class)
        targets = validation_targets(official_train, p, "the official train split")
        val_idx = []
        for cls in CLASSES:
            idx = official_train.index[official_train["class"] == cls].to_numpy()
            val_idx.append(rng.choice(idx, size=targets.get(cls, 0), replace=False))
        val = df.loc[np.sort(np.concatenate(val_idx))]
        rest = official_train.drop(val.index)
        train = rest[rest["class"] == "NORMAL"]

    elif p.protocol == "patient":
        if p.test_per_class:
            keep = _draw_patients(test, {c: p.test_per_class for c in CLASSES}, rng)
            test = test[test["_pkey"].isin(keep)]
            _warn_off_target(test, {c: p.test_per_class for c in CLASSES}, "test")
        overlap = official_train["_pkey"].isin(set(test["_pkey"]))
        dropped = int(overlap.sum())
        dropped_patients = int(official_train.loc[overlap, "_pkey"].nunique())
        if dropped:
            log.info("protocol 'patient': dropped %d official-train images of %d patients that "
                     "also appear in test", dropped, dropped_patients)
        pool = official_train[~overlap]
        targets = validation_targets(pool, p, "the official train split (without test patients)")
        val_patients = _draw_patients(pool, targets, rng)
        val = pool[pool["_pkey"].isin(val_patients)]
        _warn_off_target(val, targets, "validation")
        rest = pool[~pool["_pkey"].isin(val_patients)]
        train = rest[rest["class"] == "NORMAL"]
        if train.empty:
            raise ParamError(
                f"params.yaml: data.split.val_normal = {p.val_normal}: validation took every "
                f"NORMAL patient of the official train split; lower data.split.val_normal")
    else:
        raise ParamError(f"params.yaml: data.split.protocol = {p.protocol!r}: allowed values are "
                         f"patient, paper")

    out = {"train": _finish(train), "val": _finish(val), "test": _finish(test)}
    for frame in out.values():
        frame.attrs.update(protocol=p.protocol, seed=seed, dropped_overlap=dropped,
                           dropped_overlap_patients=dropped_patients)
    return out


UNKNOWN_PATIENT_NOTE = ("files without a known patient (no OCT2017 name, not in a patients.csv) "
                        "are each their own group: for them patient-disjointness holds by file only")


def summarize(splits: dict[str, pd.DataFrame]) -> dict:
    """Counts per split and class, patients per split, patients shared between splits, and the
    files whose patient is unknown (for which the split is disjoint by file only)."""
    attrs = next((f.attrs for f in splits.values() if f.attrs), {})
    summary: dict = {
        "protocol": attrs.get("protocol"),
        "seed": attrs.get("seed"),
        "counts": {},
        "patients": {},
        "shared_patients": {},
        "unknown_patient_files": {},
        "dropped_for_patient_overlap": {
            "images": int(attrs.get("dropped_overlap", 0)),
            "patients": int(attrs.get("dropped_overlap_patients", 0)),
        },
    }
    patient_sets = {}
    for name, frame in splits.items():
        counts = {c: int((frame["class"] == c).sum()) for c in CLASSES}
        counts["total"] = len(frame)
        summary["counts"][name] = counts
        pats = frame["patient"].astype(str)
        patient_sets[name] = set(pats[pats != ""])
        summary["patients"][name] = len(patient_sets[name])
        summary["unknown_patient_files"][name] = int((pats == "").sum())
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            summary["shared_patients"][f"{a}-{b}"] = len(patient_sets[a] & patient_sets[b])
    if any(summary["unknown_patient_files"].values()):
        summary["unknown_patient_note"] = UNKNOWN_PATIENT_NOTE
    return summary


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> dict:
    """Write ``{train,val,test}.csv`` and ``summary.json`` into ``out_dir``; returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        splits[name][COLUMNS].to_csv(out_dir / f"{name}.csv", index=False)
    summary = summarize({name: splits[name] for name in SPLITS})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
