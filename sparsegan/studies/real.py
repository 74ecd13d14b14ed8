"""The real-data split of the studies: which ``dvc exp run -S`` overrides put a real OCT tree
(``data.source=folder``) through the pipeline.

Every scan of the tree's ``train/`` that is not NORMAL goes to validation (training sees normals
only anyway), with 300 NORMAL scans; ``test/`` is the test set. The counts are those of
``../shared/oct_real`` (the README's real study)."""

from __future__ import annotations

from pathlib import Path

REAL_SPLIT = {"val_normal": 300, "val_per_disease": {"CNV": 305, "DME": 36, "DRUSEN": 28}}


def real_overrides(folder: Path, patients: Path | None) -> dict[str, str]:
    """``-S`` overrides (key -> value text) that run the pipeline on ``folder``."""
    out = {"data.source": "folder",
           "data.split.val_normal": str(REAL_SPLIT["val_normal"]),
           "data.split.val_per_disease": "{" + ",".join(
               f"{c}:{n}" for c, n in REAL_SPLIT["val_per_disease"].items()) + "}",
           "data.folder": str(Path(folder).resolve())}
    if patients is not None:
        out["data.patients"] = str(Path(patients).resolve())
    return out
