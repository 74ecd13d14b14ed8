"""Where normal synthetic and normal real scans differ, as the detectors see them (64x64 inputs).

    python scripts/compare_domains.py SYNTH_PROCESSED REAL_PROCESSED [--out studies/real/domain_gap.json]

Reads the preprocessed ``train.npy`` (normal scans only, uint8 ``[N, 1, S, S]``) of two datasets
and reports per statistic the mean and sd over scans in each, and the standardised difference
(Cohen's d, pooled sd): intensity (mean, sd, percentiles, share of near-black and of near-white pixels: the
registration corners), the
vertical profile (brightest row, height of the bright band), texture (share of the variance in
the finest scale, the speckle: ``image - blur``, and its horizontal/vertical lag-1
autocorrelation) and edges (mean gradient magnitude). A large |d| names what the generator
should change for its normal scans to look like the real ones to a model that sees 64x64 inputs.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage


def scan_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-scan statistics of ``(N, 1, S, S)`` uint8 scans -> name -> (N,)."""
    x = images[:, 0].astype(np.float64) / 255.0  # (N, S, S)
    n = len(x)
    flat = x.reshape(n, -1)
    blur = ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0))
    fine = x - blur
    # vertical profile without the white registration corners (NaN rows: all white)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-white row: NaN, filled below
        rows = np.nanmean(np.where(x > 0.95, np.nan, x), axis=2)  # (N, S)
    rows = np.where(np.isnan(rows), np.nanmin(rows, axis=1, keepdims=True), rows)
    peak = rows.argmax(axis=1) / x.shape[1]
    band = (rows > rows.min(axis=1, keepdims=True)
            + 0.5 * (rows.max(axis=1, keepdims=True) - rows.min(axis=1, keepdims=True))).mean(1)

    def lag1(a: np.ndarray, axis: int) -> np.ndarray:
        a = a - a.mean(axis=(1, 2), keepdims=True)
        s0 = [slice(None)] * 3
        s1 = [slice(None)] * 3
        s0[axis], s1[axis] = slice(0, -1), slice(1, None)
        num = (a[tuple(s0)] * a[tuple(s1)]).mean(axis=(1, 2))
        return num / np.maximum((a * a).mean(axis=(1, 2)), 1e-12)

    gy, gx = np.gradient(x, axis=(1, 2))
    return {
        "mean": flat.mean(1), "sd": flat.std(1),
        "p05": np.percentile(flat, 5, axis=1), "p50": np.percentile(flat, 50, axis=1),
        "p95": np.percentile(flat, 95, axis=1), "p99": np.percentile(flat, 99, axis=1),
        "black_share": (flat < 0.05).mean(1), "white_share": (flat > 0.95).mean(1),
        "brightest_row": peak, "bright_band_height": band,
        "fine_variance_share": fine.reshape(n, -1).var(1) / np.maximum(flat.var(1), 1e-12),
        "speckle_sd": fine.reshape(n, -1).std(1),
        "speckle_lag1_horizontal": lag1(fine, 2), "speckle_lag1_vertical": lag1(fine, 1),
        "gradient_mean": np.hypot(gx, gy).reshape(n, -1).mean(1),
    }


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, dict[str, float]]:
    sa, sb = scan_stats(a), scan_stats(b)
    out = {}
    for k in sa:
        pooled = np.sqrt((sa[k].var(ddof=1) + sb[k].var(ddof=1)) / 2)
        out[k] = {"synthetic_mean": float(sa[k].mean()), "synthetic_sd": float(sa[k].std(ddof=1)),
                  "real_mean": float(sb[k].mean()), "real_sd": float(sb[k].std(ddof=1)),
                  "cohens_d": float((sa[k].mean() - sb[k].mean()) / max(pooled, 1e-12))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("synthetic", type=Path, help="processed dir of the synthetic data")
    ap.add_argument("real", type=Path, help="processed dir of the real data")
    ap.add_argument("--out", type=Path, default=Path("studies/real/domain_gap.json"))
    a = ap.parse_args()
    result = compare(np.load(a.synthetic / "train.npy", mmap_mode="r"),
                     np.load(a.real / "train.npy", mmap_mode="r"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in sorted(result.items(), key=lambda kv: -abs(kv[1]["cohens_d"])):
        print(f"{k:26s} synthetic {v['synthetic_mean']:.4f} ± {v['synthetic_sd']:.4f}   "
              f"real {v['real_mean']:.4f} ± {v['real_sd']:.4f}   d = {v['cohens_d']:+.2f}")


if __name__ == "__main__":
    main()
