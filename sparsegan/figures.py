"""Figures of the evaluation (PNG, matplotlib's Agg renderer, no display needed).

* :func:`roc_overlay`: the test ROC curves of all rows (one seed) on one plot, AUC in the legend, each
  row's operating point at its validation phi marked.
* :func:`score_histograms`: test scores of NORMAL vs each disease class, phi marked.
* :func:`loss_curves`: per-epoch training losses (every ``loss_*`` key of ``history.json``), one
  small panel per loss, training phases (f-AnoGAN: ``gan`` then ``encoder``) shaded.
* :func:`aam_gallery`: per class, input / reconstruction / difference / AAM overlay of the most and
  least anomalous test scans, plus a second PNG with the false negatives and false positives at
  phi (decision: ``score > phi``, eq. 5). Lesion mask contours (green) when masks exist.
* :func:`make_figures`: all of them for the rows of the report into one folder.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no ``pyplot`` state), so
the module never switches the process's backend and can run in any thread.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .data.dataset import load_split

DISEASES = ("CNV", "DME", "DRUSEN")
CLASSES = (*DISEASES, "NORMAL")
DPI = 90
MASK_COLOR = "#39ff14"

# File stem -> caption; html_report uses it to title the figures.
FIGURE_CAPTIONS = {
    "roc": "Test ROC curves of all rows (dot: the operating point at the validation phi)",
    "scores": "Test score histograms, NORMAL vs each disease class, with phi",
    "losses": "Training losses per epoch",
    "gallery": "AAM gallery: most and least anomalous test scans of each class",
    "gallery_errors": "AAM gallery: false negatives and false positives at phi",
}


def _save(fig: Figure, out_png: Path, palette: bool = False) -> Path:
    """PNG at ``DPI``; ``palette``: quantised to 256 colours (image galleries: a third of the
    bytes, no visible change), so that a gallery of speckled 224 px scans stays under ~1 MB."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not palette:
        fig.savefig(out_png, dpi=DPI, format="png")
        return out_png
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                                    dither=Image.Dither.NONE).save(out_png, optimize=True)
    return out_png


def _read_json(path: Path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


# ----------------------------------------------------------------------------- ROC


class RowFiles(NamedTuple):
    """The files of one row's trained model of one seed that the figures read."""

    seed: int
    scores: Path  # scores/<model>/s<seed>/<score>/ (val.csv, test.csv, test_maps.npz)
    calibration: Path  # reports/rows/<row>/calibration/s<seed>.json
    history: Path  # models/<model>/s<seed>/history.json
    roc: Path  # reports/rows/<row>/roc.csv (every seed, column ``seed``)
    metrics: Path  # reports/rows/<row>/metrics.json (``seeds`` -> per-seed metrics)
    processed: Path | None = None  # data/processed/<variant of the row's model>/ (test.npy, masks)


def _seed_metrics(files: RowFiles) -> dict:
    """The metrics of ``files.seed`` from the row's metrics.json (a flat one as it is)."""
    metrics = _read_json(files.metrics) or {}
    return metrics.get("seeds", {}).get(str(files.seed), metrics)


def roc_overlay(rows: dict[str, RowFiles], out_png: Path,
                labels: dict[str, str] | None = None) -> Path:
    """Test ROC curves of each row's seed ``files.seed`` (``roc.csv``, columns fpr, tpr[, seed])
    on one plot; the legend gives the test AUC (``metrics.json``, else the trapezoid of the
    curve). ``labels``: optional display name per row."""
    fig = Figure(figsize=(5.6, 5.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--", label="chance")
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for (row, files), color in zip(rows.items(), colors):
        if not Path(files.roc).exists():
            continue
        roc = pd.read_csv(files.roc)
        if "seed" in roc.columns:
            roc = roc[roc["seed"] == files.seed]
        metrics = _seed_metrics(files)
        auc = metrics.get("test_auc")
        if auc is None:
            auc = float(np.trapezoid(roc["tpr"], roc["fpr"]))
        name = (labels or {}).get(row, row)
        ax.plot(roc["fpr"], roc["tpr"], color=color, lw=1.5, label=f"{name} (AUC {auc:.3f})")
        if "test_sensitivity" in metrics and "test_specificity" in metrics:
            ax.plot(1 - metrics["test_specificity"], metrics["test_sensitivity"], "o",
                    color=color, ms=5, mec="k", mew=0.5)
    seeds = sorted({f.seed for f in rows.values()})
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)",
           title=f"Test ROC, disease vs normal (seed {', '.join(map(str, seeds))})")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- histograms


def score_histograms(title: str, scores_dir: Path, calibration: dict, out_png: Path) -> Path:
    """One panel per disease class present in ``scores_dir/test.csv``: NORMAL vs that class's
    test scores on shared bins, phi (from the validation calibration) as a labelled line."""
    from sklearn.metrics import roc_auc_score

    test = pd.read_csv(Path(scores_dir) / "test.csv", keep_default_na=False)
    phi = float(calibration["phi"])
    diseases = [c for c in DISEASES if c in set(test["class"])] or \
        sorted(set(test["class"]) - {"NORMAL"})
    scores = test["score"].to_numpy(dtype=float)
    finite = scores[np.isfinite(scores)]
    lo, hi = min(finite.min(), phi), max(finite.max(), phi)
    pad = 0.02 * (hi - lo or 1.0)
    bins = np.linspace(lo - pad, hi + pad, 31)
    normal = test.loc[test["class"] == "NORMAL", "score"].to_numpy(dtype=float)
    fig = Figure(figsize=(3.6 * max(len(diseases), 1), 3.2))
    axes = fig.subplots(1, max(len(diseases), 1), sharey=True, squeeze=False)[0]
    for ax, cls in zip(axes, diseases):
        sick = test.loc[test["class"] == cls, "score"].to_numpy(dtype=float)
        ax.hist(normal, bins=bins, color="C0", alpha=0.55, label=f"NORMAL (n={len(normal)})")
        ax.hist(sick, bins=bins, color="C3", alpha=0.55, label=f"{cls} (n={len(sick)})")
        ax.axvline(phi, color="k", lw=1.2, ls="--", label=f"phi = {phi:.4g}")
        ax.text(phi, 0.5, " phi ", transform=ax.get_xaxis_transform(), rotation=90,
                ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="k", lw=0.6))
        title = f"{cls} vs NORMAL"
        if len(normal) and len(sick):
            y = np.r_[np.zeros(len(normal)), np.ones(len(sick))]
            title += f" (AUC {roc_auc_score(y, np.r_[normal, sick]):.3f})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("anomaly score")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test scans")
    fig.suptitle(f"{title}: test scores, phi from validation "
                 f"({calibration.get('criterion', '?')})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- losses


def loss_curves(title: str, history: list[dict], out_png: Path) -> Path:
    """One panel per ``loss_*`` key of the per-epoch ``history`` (rows with ``epoch``, optional
    ``phase``); a key is drawn only in the epochs that logged it, each phase shaded and named."""
    hist = pd.DataFrame(history)
    if "epoch" not in hist:
        hist["epoch"] = np.arange(1, len(hist) + 1)
    if "phase" not in hist:
        hist["phase"] = ""
    keys = [k for k in hist.columns if k.startswith("loss_")]
    n = max(len(keys), 1)
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.5 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    # contiguous phase segments: (phase, first epoch, last epoch)
    segments: list[tuple[str, int, int]] = []
    for ep, ph in zip(hist["epoch"], hist["phase"].astype(str)):
        if segments and segments[-1][0] == ph:
            segments[-1] = (ph, segments[-1][1], ep)
        else:
            segments.append((ph, ep, ep))
    multi_phase = len({s[0] for s in segments}) > 1
    phase_colors = {ph: f"C{i}" for i, ph in enumerate(dict.fromkeys(s[0] for s in segments))}
    for ax, key in zip(axes, keys or [None]):
        if key is None:
            ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
            continue
        if multi_phase:
            for i, (ph, a, b) in enumerate(segments):
                ax.axvspan(a - 0.5, b + 0.5, color="0.92" if i % 2 == 0 else "0.98", zorder=0)
        for ph in phase_colors:
            rows = hist[(hist["phase"].astype(str) == ph) & hist[key].notna()]
            if rows.empty:
                continue
            ax.plot(rows["epoch"], rows[key], "o-", ms=3, lw=1.2, color=phase_colors[ph])
        ax.set_title(key.removeprefix("loss_"), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys or [None]):]:
        ax.set_visible(False)
    title = f"{title}: training losses (mean per epoch)"
    if multi_phase:
        title += "; phases: " + ", ".join(
            f"{ph} (epochs {a}-{b})" for ph, a, b in segments)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if multi_phase:
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], color=c, marker="o", ms=3, label=ph)
                   for ph, c in phase_colors.items()]
        fig.legend(handles=handles, title="phase", fontsize=8, title_fontsize=8,
                   loc="lower right", ncols=len(handles))
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- galleries


def _load_maps(scores_dir: Path) -> dict[str, np.ndarray]:
    path = Path(scores_dir) / "test_maps.npz"
    if not path.exists():
        return {}
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _normalise(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


class _GalleryData:
    """What a gallery row needs, read once per row."""

    def __init__(self, processed_dir: Path, scores_dir: Path, calibration: dict):
        self.images, _, self.masks = load_split(Path(processed_dir), "test")
        self.test = pd.read_csv(Path(scores_dir) / "test.csv", keep_default_na=False)
        if len(self.test) != len(self.images):
            raise ValueError(f"{scores_dir}/test.csv has {len(self.test)} rows but the processed "
                             f"test set {len(self.images)}; re-run the score stage")
        self.maps = _load_maps(scores_dir)
        self.phi = float(calibration["phi"])
        self.has_aam = "aam" in self.maps
        self.diff_vmax = 1.0
        if "difference" in self.maps:
            d = self.maps["difference"]
            sample = d[:: max(1, len(d) // 200)].astype(np.float32)
            self.diff_vmax = float(np.percentile(sample, 99.5)) or 1.0

    def heat(self, i: int) -> np.ndarray | None:
        if self.has_aam:
            return _normalise(self.maps["aam"][i, 0])
        if "difference" in self.maps:
            return _normalise(self.maps["difference"][i, 0])
        return None


def _draw_row(axes, data: _GalleryData, i: int, label: str, first: bool) -> None:
    img = np.asarray(data.images[i, 0])
    mask = None if data.masks is None else np.asarray(data.masks[i, 0])
    if mask is not None and not mask.any():
        mask = None
    score = float(data.test["score"].iloc[i])
    truth = int(data.test["label"].iloc[i])
    pred = int(score > data.phi)
    titles = ["input", "reconstruction", "|difference|",
              "AAM overlay" if data.has_aam else "difference overlay"]
    panels = [img,
              data.maps["reconstruction"][i, 0] if "reconstruction" in data.maps else None,
              (data.maps["difference"][i, 0].astype(np.float32)
               if "difference" in data.maps else None),
              data.heat(i)]
    for j, (ax, title, panel) in enumerate(zip(axes, titles, panels)):
        ax.set_xticks([])
        ax.set_yticks([])
        if first:
            ax.set_title(title, fontsize=8)
        if panel is None:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        if j in (0, 1):
            ax.imshow(panel, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        elif j == 2:
            ax.imshow(panel, cmap="magma", vmin=0, vmax=data.diff_vmax, interpolation="antialiased")
        else:
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
            ax.imshow(panel, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        if mask is not None and j in (0, 3):
            ax.contour(mask, levels=[0.5], colors=MASK_COLOR, linewidths=0.7)
    verdict = "disease" if pred else "normal"
    color = "#1a7f37" if pred == truth else "#c62828"
    axes[0].set_ylabel(f"{label}\nscore {score:.4g}\n-> {verdict}", fontsize=7, color=color,
                       rotation=0, ha="right", va="center", labelpad=4)


PANEL = 1.15      # inches per image panel
LABEL_W = 1.05    # inches left of a block for the row labels
BLOCK_TOP = 0.55  # inches above a block's first row: its title and the column titles
TITLE_H = 0.4     # inches for the figure's title


def _block_size(slots: int) -> tuple[float, float]:
    return LABEL_W + 4 * PANEL + 0.1, slots * PANEL + BLOCK_TOP + 0.1


def _block(subfig, data: _GalleryData, rows: list[tuple[int, str]], title: str,
           empty: str, n_slots: int) -> None:
    w, h = _block_size(n_slots)
    subfig.suptitle(title, fontsize=10, fontweight="bold", y=1 - 0.05 / h, va="top")
    axes = subfig.subplots(max(n_slots, 1), 4, squeeze=False, gridspec_kw=dict(
        left=LABEL_W / w, right=1 - 0.1 / w, top=1 - BLOCK_TOP / h, bottom=0.1 / h,
        wspace=0.06, hspace=0.06))
    for r, ax_row in enumerate(axes):
        if r < len(rows):
            _draw_row(ax_row, data, rows[r][0], rows[r][1], first=r == 0)
        else:
            for ax in ax_row:
                ax.axis("off")
            if r == 0:
                ax_row[1].text(1.0, 0.5, empty, ha="center", va="center", fontsize=9,
                               transform=ax_row[1].transAxes)


def _titled(width: float, body_height: float, title: str):
    """A figure with a title strip on top; returns (figure, the body's subfigure)."""
    fig = Figure(figsize=(width, body_height + TITLE_H))
    head, body = fig.subfigures(2, 1, height_ratios=[TITLE_H, body_height])
    head.text(0.5, 0.5, title, ha="center", va="center", fontsize=11)
    return fig, body


def _class_rows(data: _GalleryData, cls: str, per_group: int) -> list[tuple[int, str]]:
    idx = np.flatnonzero(data.test["class"].to_numpy() == cls)
    order = idx[np.argsort(-data.test["score"].to_numpy(dtype=float)[idx], kind="stable")]
    k = min(per_group, len(order) // 2) if len(order) < 2 * per_group else per_group
    most = [(int(i), f"most #{r + 1}") for r, i in enumerate(order[:k])]
    rest = order[k:]
    least = [(int(i), f"least #{r + 1}") for r, i in enumerate(rest[::-1][:per_group])]
    return most + least


def aam_gallery(title: str, processed_dir: Path, scores_dir: Path, calibration: dict,
                out_png: Path, per_group: int = 3) -> list[Path]:
    """Two PNGs: ``out_png``, per class (CNV, DME, DRUSEN, NORMAL) the ``per_group`` most and
    least anomalous test scans, and ``<out_png stem>_errors.png``, up to ``2 * per_group`` false
    negatives (lowest scores first) and false positives (highest first) at phi. Each row: input
    (lesion contour in green when masks exist), reconstruction, |difference| (one colour scale for
    the row), and the AAM (or, without one, the normalised difference) over the input. The row
    label shows the score and the decision at phi, green when right and red when wrong."""
    out_png = Path(out_png)
    data = _GalleryData(processed_dir, scores_dir, calibration)
    classes = [c for c in CLASSES if c in set(data.test["class"])]
    blocks = [(cls, _class_rows(data, cls, per_group)) for cls in classes]
    slots = max([len(rows) for _, rows in blocks] + [1])
    ncols = 2 if len(blocks) > 1 else 1
    nrows = -(-len(blocks) // ncols)
    bw, bh = _block_size(slots)
    fig, body = _titled(ncols * bw, nrows * bh,
                        f"{title}: most / least anomalous test scans per class "
                        f"(phi = {data.phi:.4g}; green contour: lesion mask)")
    subfigs = np.atleast_1d(body.subfigures(nrows, ncols, squeeze=False)).ravel()
    for sf, (cls, rows) in zip(subfigs, blocks):
        n = int((data.test["class"] == cls).sum())
        _block(sf, data, rows, f"{cls} (n={n})", "no scans", slots)
    paths = [_save(fig, out_png, palette=True)]

    labels = data.test["label"].to_numpy()
    scores = data.test["score"].to_numpy(dtype=float)
    classes_col = data.test["class"].to_numpy()
    n_err = 2 * per_group
    fn = np.flatnonzero((labels == 1) & ~(scores > data.phi))
    fn = fn[np.argsort(scores[fn], kind="stable")][:n_err]
    fp = np.flatnonzero((labels == 0) & (scores > data.phi))
    fp = fp[np.argsort(-scores[fp], kind="stable")][:n_err]
    n_fn = int(((labels == 1) & ~(scores > data.phi)).sum())
    n_fp = int(((labels == 0) & (scores > data.phi)).sum())
    slots = max(len(fn), len(fp), 1)
    bw, bh = _block_size(slots)
    fig, body = _titled(2 * bw, bh, f"{title}: errors at phi = {data.phi:.4g} "
                                    "(decision: score > phi)")
    sf_fn, sf_fp = body.subfigures(1, 2)
    _block(sf_fn, data, [(int(i), f"FN {classes_col[i]}") for i in fn],
           f"false negatives ({n_fn} in all; lowest scores)", "no false negatives at phi", slots)
    _block(sf_fp, data, [(int(i), f"FP {classes_col[i]}") for i in fp],
           f"false positives ({n_fp} in all; highest scores)", "no false positives at phi", slots)
    paths.append(_save(fig, out_png.with_name(out_png.stem + "_errors.png"), palette=True))
    return paths


# ----------------------------------------------------------------------------- all


def _row_figures(row: str, files: RowFiles, out_dir: Path, per_group: int) -> list[Path]:
    """The figures of one row (see :func:`make_figures`)."""
    made: list[Path] = []
    calibration = _read_json(files.calibration)
    scores_dir = Path(files.scores)
    has_scores = (scores_dir / "test.csv").exists()
    title = f"{row} (seed {files.seed})"
    if calibration is not None and has_scores:
        made.append(score_histograms(title, scores_dir, calibration,
                                     out_dir / row / "scores.png"))
    history = _read_json(files.history)
    if history:
        made.append(loss_curves(title, history, out_dir / row / "losses.png"))
    if calibration is not None and has_scores and files.processed is not None:
        made.extend(aam_gallery(title, files.processed, scores_dir, calibration,
                                out_dir / row / "gallery.png", per_group=per_group))
    return made


def make_figures(rows: dict[str, RowFiles], out_dir: Path, per_group: int = 3,
                 workers: int = 0) -> dict[str, list[Path]]:
    """Every figure into ``out_dir``: ``roc.png`` (key ``"overview"``), and per row (key = the
    row) ``<row>/scores.png``, ``<row>/losses.png`` (when its model's ``history.json`` exists),
    ``<row>/gallery.png`` and ``<row>/gallery_errors.png``, each of the seed ``files.seed``. A
    row without its calibration, scores or ``files.processed`` (the scans its model saw) gets
    only the figures its files allow.

    The rows are drawn in ``workers`` processes (0: one per core, at most one per row): matplotlib
    renders while holding the GIL, so threads would not run them side by side."""
    import concurrent.futures
    import multiprocessing
    import os

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {"overview": [roc_overlay(rows, out_dir / "roc.png")]}
    workers = min(workers or os.cpu_count() or 1, len(rows))
    if workers <= 1:
        figures.update({row: _row_figures(row, files, out_dir, per_group)
                        for row, files in rows.items()})
        return figures
    # spawn, not fork: the parent may hold torch's thread pools, which a forked child inherits
    # in a broken state
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {row: pool.submit(_row_figures, row, files, out_dir, per_group)
                for row, files in rows.items()}
        figures.update({row: job.result() for row, job in jobs.items()})
    return figures
