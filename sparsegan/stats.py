"""Patient-level bootstrap intervals and paired comparisons of detection metrics.

Why patients, not images: the scans of one patient share a retina, a device and a visit, so they
are not independent draws. Resampling images treats them as if they were and gives intervals that
are too narrow. Every resample here draws ``P`` patients *with replacement* out of the ``P``
patients of the set; all scans of a drawn patient enter together, and a patient drawn twice
enters twice (Field & Welsh's cluster bootstrap).

How (fast enough for 1,000 resamples of a few thousand scans in well under a second):

* a resample is a **weight per scan**: how many times its patient was drawn (``(n_boot, N)``, in
  chunks of resamples). Every metric below is computed from these weights, which gives exactly the
  metric of the explicit resampled index set (:func:`resample_indices` builds that set; the tests
  check both agree with scikit-learn);
* AUC is rank based: the scores are sorted once, tied scores grouped, and per resample
  ``AUC = sum_groups W+_g (W-_below_g + W-_g / 2) / (W+ W-)`` (ties count one half, as in
  ``roc_auc_score``); average precision walks the same groups from the top
  (``AP = sum_g W+_g / W+ * precision_g``, scikit-learn's definition);
* accuracy, sensitivity, specificity and F1 come from weighted confusion counts at the fixed phi
  (phi was chosen on validation, so it is not re-chosen per resample).

A resample that holds a single class (no diseased or no normal scan) has no AUC, sensitivity or
specificity; it is **skipped** for every metric and counted (``n_skipped``). Intervals are
percentile intervals (``alpha / 2`` and ``1 - alpha / 2`` quantiles of the valid resamples).

:func:`paired_bootstrap` compares two rows scored on the same scans: the same patient
resamples serve both, so the interval and p-value of the AUC difference account for the scores'
correlation; with several training seeds per row it resamples the seeds too (paired by
training when both rows are scores of one model). :func:`delong_test` is the classic DeLong et
al. (1988) test of two correlated AUCs
(fast midrank algorithm of Sun & Xu, 2014); it treats scans as independent, so prefer the paired
bootstrap when a patient has several scans.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, rankdata

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1", "average_precision")
CHUNK_ENTRIES = 4_000_000  # (resamples x scans) weights held at once, about 32 MB of float64

_MISSING = {"", "nan", "none", "<na>"}


class BootstrapIntervals(dict):
    """``metric -> (lo, hi)`` percentile interval; also ``n_boot`` (resamples drawn),
    ``n_skipped`` (single-class resamples left out), ``n_patients`` and ``point`` (the
    estimates on the data as given, ``metric -> float``)."""

    n_boot: int
    n_skipped: int
    n_patients: int
    point: dict[str, float]


def patient_codes(patients: Sequence | np.ndarray) -> tuple[np.ndarray, int]:
    """Patient ids -> ``(codes (N,) in 0..P-1, P)``. A missing id ("", NaN, None) makes that scan
    a patient of its own, so unknown patients are never merged."""
    ids = np.asarray(patients).astype(str)
    missing = np.char.lower(np.char.strip(ids))
    missing = np.isin(missing, list(_MISSING))
    if missing.any():
        ids = ids.astype(object)
        ids[missing] = [f"<no patient: scan {i}>" for i in np.flatnonzero(missing)]
        ids = ids.astype(str)
    uniq, codes = np.unique(ids, return_inverse=True)
    return codes.astype(np.int64), len(uniq)


def draw_patients(n_patients: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The bootstrap draws: ``(n_boot, n_patients)`` patient codes, with replacement. The one
    place where resamples are drawn (so that a test can instrument it)."""
    return rng.integers(0, n_patients, size=(n_boot, n_patients))


def draw_counts(draws: np.ndarray, n_patients: int) -> np.ndarray:
    """``(n_boot, P)`` draws -> ``(n_boot, P)`` how many times each patient was drawn."""
    n_boot = len(draws)
    offset = (draws + np.arange(n_boot)[:, None] * n_patients).ravel()
    return np.bincount(offset, minlength=n_boot * n_patients).reshape(n_boot, n_patients)


def resample_indices(patients: Sequence | np.ndarray, n_boot: int = 1000,
                     seed: int = 0) -> list[np.ndarray]:
    """The explicit scan indices of each resample that :func:`patient_bootstrap` with the same
    ``seed`` uses (the drawn patients' scans, concatenated in draw order, repeats included).
    For inspection and tests; the bootstrap itself works on weights."""
    codes, n_patients = patient_codes(patients)
    members = [np.flatnonzero(codes == p) for p in range(n_patients)]
    draws = draw_patients(n_patients, n_boot, np.random.default_rng(seed))
    return [np.concatenate([members[p] for p in row]) for row in draws]


def _groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending sort order and the start of each run of tied scores in it."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s) != 0) + 1])
    return order, starts


def _rank_metrics(pos_sorted: np.ndarray, weights_sorted: np.ndarray,
                  starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUC and average precision, rows of ``weights_sorted`` (scans in ascending score
    order, ``starts`` the tie groups). NaN where a class has zero weight."""
    wp = np.add.reduceat(weights_sorted * pos_sorted, starts, axis=1)  # (B, G) diseased weight
    wn = np.add.reduceat(weights_sorted * ~pos_sorted, starts, axis=1)  # (B, G) normal weight
    n_pos, n_neg = wp.sum(1), wn.sum(1)
    below = np.cumsum(wn, axis=1) - wn
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wp * (below + 0.5 * wn)).sum(1) / (n_pos * n_neg)
        tp = np.cumsum(wp[:, ::-1], axis=1)  # thresholds from the top score down
        fp = np.cumsum(wn[:, ::-1], axis=1)
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        ap = (wp[:, ::-1] * precision).sum(1) / n_pos
    bad = (n_pos == 0) | (n_neg == 0)
    auc[bad] = np.nan
    ap[bad] = np.nan
    return auc, ap


def weighted_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray,
                     phi: float | None = None) -> dict[str, np.ndarray]:
    """The metrics of :data:`METRICS` for each row of ``weights`` ``(B, N)`` (scan multiplicities;
    all ones = the data as given). Without ``phi`` only ``auc`` and ``average_precision``.
    A row with a single class gives NaN everywhere."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=float)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    order, starts = _groups(scores)
    auc, ap = _rank_metrics(labels[order], weights[:, order], starts)
    out = {"auc": auc, "average_precision": ap}
    if phi is not None:
        pred = scores > phi
        tp = weights @ (labels & pred)
        fn = weights @ (labels & ~pred)
        fp = weights @ (~labels & pred)
        tn = weights @ (~labels & ~pred)
        bad = (tp + fn == 0) | (tn + fp == 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["accuracy"] = (tp + tn) / (tp + fn + fp + tn)
            out["sensitivity"] = tp / (tp + fn)
            out["specificity"] = tn / (tn + fp)
            out["f1"] = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp),
                                  where=(2 * tp + fp + fn) > 0)
        for k in ("accuracy", "sensitivity", "specificity", "f1"):
            out[k][bad] = np.nan
        out = {k: out[k] for k in METRICS}
    return out


def _resampled(labels, scores_list, patients, phi, n_boot, seed):
    """Yield the metric dicts of every chunk of resamples, one per scores array."""
    codes, n_patients = patient_codes(patients)
    if not len(codes):
        raise ValueError("bootstrap needs at least one scan")
    draws = draw_patients(n_patients, n_boot, np.random.default_rng(seed))
    chunk = max(1, CHUNK_ENTRIES // len(codes))
    for start in range(0, n_boot, chunk):
        weights = draw_counts(draws[start:start + chunk], n_patients)[:, codes]
        yield [weighted_metrics(labels, s, weights, phi) for s in scores_list]


def _check(labels, *arrays):
    labels = np.asarray(labels)
    for a in arrays:
        if len(a) != len(labels):
            raise ValueError(f"labels ({len(labels)}) and scores/patients ({len(a)}) differ in length")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError("labels must be 0 (normal) or 1 (diseased)")
    return labels


def bootstrap_distribution(labels: np.ndarray, scores: np.ndarray, patients: Sequence | np.ndarray,
                           phi: float, n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """``metric -> (n_boot,)`` values over the patient resamples (NaN for a skipped one)."""
    labels = _check(labels, scores, patients)
    parts = [m for (m,) in _resampled(labels, [np.asarray(scores, float)], patients, phi,
                                      n_boot, seed)]
    return {k: np.concatenate([p[k] for p in parts]) for k in METRICS}


def patient_bootstrap(labels: np.ndarray, scores: np.ndarray, patients: Sequence | np.ndarray,
                      phi: float, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> BootstrapIntervals:
    """Percentile ``1 - alpha`` intervals of AUC, accuracy, sensitivity, specificity, F1 and
    average precision (decision ``score > phi``) over ``n_boot`` patient resamples.

    Returns ``metric -> (lo, hi)`` (a :class:`BootstrapIntervals`, a dict that also carries
    ``n_boot``, ``n_skipped``, ``n_patients`` and the point estimates ``point``). All intervals
    are NaN when every resample was skipped.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    labels = _check(labels, scores, patients)
    scores = np.asarray(scores, dtype=float)
    dist = bootstrap_distribution(labels, scores, patients, phi, n_boot, seed)
    valid = ~np.isnan(dist["auc"])
    out = BootstrapIntervals()
    for k in METRICS:
        v = dist[k][valid]
        lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2]) if len(v) else (np.nan, np.nan)
        out[k] = (float(lo), float(hi))
    out.n_boot = n_boot
    out.n_skipped = int((~valid).sum())
    out.n_patients = patient_codes(patients)[1]
    point = weighted_metrics(labels, scores, np.ones((1, len(labels))), phi)
    out.point = {k: float(v[0]) for k, v in point.items()}
    return out


def paired_bootstrap(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                     patients: Sequence | np.ndarray, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05, same_trainings: bool = False) -> dict:
    """AUC(a) - AUC(b) on the same scans, with the same patient resamples for both.

    ``scores_a`` / ``scores_b``: (N,), or (seeds, N) with one row per training seed of that row.
    With several seeds each resample also draws the seeds with replacement and compares the mean
    AUCs over the drawn seeds, so the interval accounts for the training seeds as well as for the
    test patients; with one seed per side it is the plain paired patient bootstrap. The two
    sides' seeds are drawn independently (two models: separate trainings), or, with
    ``same_trainings`` (two scores of one model: row ``i`` of both sides is the same training),
    as one draw for both, so that the comparison is paired by training too.

    Returns ``{"delta_auc", "ci": (lo, hi), "p_value", "auc_a", "auc_b", "n_boot",
    "n_skipped"}``: ``delta_auc`` (of the seed-mean AUCs) on the data as given, the percentile
    ``1 - alpha`` interval of the resampled differences, and the two-sided bootstrap p-value
    ``min(1, 2 min((1 + #{d <= 0}) / (1 + n), (1 + #{d >= 0}) / (1 + n)))`` over the ``n`` valid
    resamples ``d``: it is below ``alpha`` about when the interval excludes 0. Identical scores
    give ``delta_auc`` 0 and p 1 with one seed or ``same_trainings`` (every ``d`` is 0); with
    independent seed draws the ``d`` spread around 0 and p is near 1, not exactly 1.
    """
    sa = np.atleast_2d(np.asarray(scores_a, float))
    sb = np.atleast_2d(np.asarray(scores_b, float))
    labels = _check(labels, *sa, *sb, patients)
    ka, kb = len(sa), len(sb)
    if same_trainings and ka != kb:
        raise ValueError(f"same_trainings needs one score row per training on both sides, "
                         f"got {ka} and {kb} seeds")
    seed_rng = np.random.default_rng([seed, 1])  # apart from the patient draws

    def seed_means(auc: np.ndarray, picks: np.ndarray | None) -> np.ndarray:  # (n, k) -> (n,)
        if picks is None:
            return auc[:, 0]
        return np.take_along_axis(auc, picks, axis=1).mean(axis=1)

    def draw(k: int, n: int) -> np.ndarray | None:
        return None if k == 1 else seed_rng.integers(0, k, size=(n, k))

    deltas = []
    for metrics in _resampled(labels, [*sa, *sb], patients, None, n_boot, seed):
        auc = np.stack([m["auc"] for m in metrics], axis=1)  # (chunk, ka + kb)
        picks_a = draw(ka, len(auc))
        picks_b = picks_a if same_trainings else draw(kb, len(auc))
        deltas.append(seed_means(auc[:, :ka], picks_a) - seed_means(auc[:, ka:], picks_b))
    d = np.concatenate(deltas)
    valid = ~np.isnan(d)
    d = d[valid]
    ones = np.ones((1, len(labels)))
    auc_a = float(np.mean([weighted_metrics(labels, s, ones)["auc"][0] for s in sa]))
    auc_b = float(np.mean([weighted_metrics(labels, s, ones)["auc"][0] for s in sb]))
    if len(d):
        lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
        n = len(d)
        p = min(1.0, 2 * min((1 + (d <= 0).sum()) / (1 + n), (1 + (d >= 0).sum()) / (1 + n)))
    else:
        lo = hi = p = np.nan
    return {"delta_auc": auc_a - auc_b, "ci": (float(lo), float(hi)), "p_value": float(p),
            "auc_a": auc_a, "auc_b": auc_b, "n_boot": n_boot, "n_skipped": int((~valid).sum())}


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                alpha: float = 0.05) -> dict:
    """DeLong's test of AUC(a) = AUC(b) for two correlated ROC curves (same scans).

    Returns ``{"delta_auc", "ci": (lo, hi), "z", "p_value", "auc_a", "auc_b"}`` with the normal
    ``1 - alpha`` interval of the difference. Scans are treated as independent (no patients).
    """
    labels = _check(labels, scores_a, scores_b).astype(bool)
    m, n = int(labels.sum()), int((~labels).sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both normal and diseased scans")
    v10, v01, aucs = [], [], []
    for s in (np.asarray(scores_a, float), np.asarray(scores_b, float)):
        x, y = s[labels], s[~labels]
        tx, ty, tz = rankdata(x), rankdata(y), rankdata(np.concatenate([x, y]))
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # per diseased scan: share of normal scans below it
        v01.append(1 - (tz[m:] - ty) / m)  # per normal scan: share of diseased scans above it
    s10 = np.atleast_2d(np.cov(np.array(v10))) if m > 1 else np.zeros((2, 2))
    s01 = np.atleast_2d(np.cov(np.array(v01))) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    delta = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        z = 0.0 if abs(delta) < 1e-12 else np.copysign(np.inf, delta)
        p = 1.0 if abs(delta) < 1e-12 else 0.0
        half = 0.0
    else:
        z = delta / np.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
        half = float(norm.ppf(1 - alpha / 2) * np.sqrt(var))
    return {"delta_auc": delta, "ci": (delta - half, delta + half), "z": float(z),
            "p_value": float(p), "auc_a": float(aucs[0]), "auc_b": float(aucs[1])}


# ------------------------------------------------------------------------------ over seeds


def over_seeds(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Spread of each metric over training seeds: ``{seed: {metric: value}}`` ->
    ``{metric: {mean, sd, min, max, n}}`` (sd with ddof=1; 0 for a single seed). A GAN's test AUC
    moves by several hundredths between training runs, more than a patient-bootstrap interval of
    one run shows, so orderings are read from these, not from one seed."""
    names = sorted(set().union(*(m.keys() for m in per_seed.values()))) if per_seed else []
    out = {}
    for name in names:
        values = np.array([m[name] for m in per_seed.values()
                           if isinstance(m.get(name), (int, float)) and np.isfinite(m[name])],
                          dtype=np.float64)
        if len(values):
            out[name] = {"mean": float(values.mean()),
                         "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                         "min": float(values.min()), "max": float(values.max()),
                         "n": int(len(values))}
    return out


def paired_over_seeds(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """Paired comparison of two rows trained with the same seeds: the per-seed differences
    ``a[s] - b[s]`` (seeds both have), their mean, sd, min and max, how many seeds ``a`` won,
    and a paired t statistic (mean / (sd / sqrt(n)); nan for fewer than 2 seeds or sd 0). The
    seed pairs the two rows because both were trained from it on the same split."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    t = float(d.mean() / (sd / np.sqrt(n))) if n > 1 and sd > 0 else float("nan")
    return {"mean": float(d.mean()) if n else float("nan"), "sd": sd,
            "min": float(d.min()) if n else float("nan"),
            "max": float(d.max()) if n else float("nan"),
            "wins": int((d > 0).sum()), "n": n, "t": t,
            "per_seed": {str(s): float(v) for s, v in zip(seeds, d)}}
