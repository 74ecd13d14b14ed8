"""Real vs synthetic OCT B-scans, side by side: one row per class, 2 real + 2 synthetic scans.

Usage (from the repository root)::

    python scripts/figure_samples.py [REAL_DIR] [--out docs/figures/real_vs_synthetic.png] [--seed 0]

``REAL_DIR`` holds ``<CLASS>/<CLASS>-<patient>-<n>.jpeg`` (default ``../shared/oct_samples``,
next to the repository); two scans of different patients are shown per class. The synthetic scans
come from :mod:`sparsegan.data.synthetic`, each from its own synthetic patient.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from sparsegan.data import synthetic
from sparsegan.params import CLASSES

TILE = (256, 248)  # width, height of one scan in the grid (the real aspect 512x496)


def pick_real(folder: Path, cls: str, n: int = 2) -> list[Path]:
    """The first ``n`` scans of distinct patients, in name order."""
    out, seen = [], set()
    for f in sorted((folder / cls).glob("*.jpeg")):
        patient = f.stem.split("-")[1]
        if patient not in seen:
            out.append(f)
            seen.add(patient)
        if len(out) == n:
            break
    return out


def synthetic_scans(cls: str, seed: int, n: int = 2) -> list[np.ndarray]:
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, CLASSES.index(cls), k])
        h, w = synthetic.draw_size(rng)
        anatomy = synthetic.draw_anatomy(rng, h, w)
        out.append(synthetic.render_scan(rng, cls, h, w, anatomy).image)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("real_dir", nargs="?", default=str(ROOT.parent / "shared" / "oct_samples"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures" / "real_vs_synthetic.png"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_dir = Path(args.real_dir)
    if not real_dir.is_dir():
        raise SystemExit(f"{real_dir}: no such folder of real scans (<CLASS>/<name>.jpeg)")
    fig, axes = plt.subplots(len(CLASSES), 4, figsize=(4 * 2.9, len(CLASSES) * 2.95), dpi=90)
    for r, cls in enumerate(CLASSES):
        tiles = [(f"real {f.stem}", np.asarray(Image.open(f).convert("L")))
                 for f in pick_real(real_dir, cls)]
        tiles += [(f"synthetic {cls} ({img.shape[1]}x{img.shape[0]})", img)
                  for img in synthetic_scans(cls, args.seed)]
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(tiles):
                title, img = tiles[c]
                ax.imshow(np.asarray(Image.fromarray(img).resize(TILE, Image.BILINEAR)),
                          cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(title, fontsize=9, fontweight="bold" if c >= 2 else "normal")
    fig.suptitle("Real OCT2017 scans (left pair) vs synthetic scans (right pair, bold titles)",
                 fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    # grey levels quantised to 6 bits keep the PNG small without visible banding
    img = Image.open(buf).convert("L").point(lambda v: (v // 4) * 4 + 2 if v < 252 else 255)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
    return out


if __name__ == "__main__":
    main()
