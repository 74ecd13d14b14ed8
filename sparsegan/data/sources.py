"""The acquire stage: the one place that knows where images come from (``data.source``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..params import Params


def acquire(params: Params, raw_dir: Path, downloads_dir: Path = Path("data/downloads")) -> None:
    """Write ``raw_dir/manifest.csv`` (the contract of :mod:`sparsegan.data`) for the chosen source.

    ``synthetic`` generates an OCT2017-shaped tree under ``raw_dir``; ``oct2017`` downloads into
    ``downloads_dir`` (kept outside DVC's outputs, so a re-run never throws a 5 GB download away)
    and extracts there; ``folder`` indexes the user's copy in place, never copying or modifying it.
    """
    d = params.data
    raw_dir.mkdir(parents=True, exist_ok=True)
    if d.source == "synthetic":
        from .synthetic import write_dataset
        manifest = write_dataset(raw_dir / "synthetic", d.synthetic)
    elif d.source == "oct2017":
        from .oct2017 import fetch_oct2017
        manifest = fetch_oct2017(d.oct2017, downloads_dir, raw_dir)
    else:
        from .oct2017 import folder_manifest
        manifest = folder_manifest(d.folder, raw_dir, d.patients)
    manifest.to_csv(raw_dir / "manifest.csv", index=False)
    skipped = manifest.attrs.get("skipped", [])
    pd.DataFrame(skipped, columns=["file", "reason"]).to_csv(raw_dir / "skipped.csv", index=False)
    origin = manifest.attrs.get("patient_from")
    if origin and origin.get("unknown"):
        print(f"[acquire] patient unknown for {origin['unknown']} of {len(manifest)} files (no "
              f"OCT2017 name, not in a patients.csv): each is its own group in the split")
    if skipped:
        print(f"[acquire] {len(skipped)} files skipped, listed in {raw_dir / 'skipped.csv'}")
