"""Shared pieces of the reliability suite: a tiny repository (params.yaml + processed arrays) that
the real stage scripts can run in, and a way to run a stage as a subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
STAGES = REPO / "stages"
PYTHON = sys.executable

# 32x32 images, base width 4, batches of 8, one thread: each epoch takes a few ms.
TINY: dict = {
    "data": {"image_size": 32},
    "model": {"base_channels": 4},
    "train": {"epochs": 4, "batch_size": 8},
    "runtime": {"num_threads": 1, "device": "cpu"},
    "fanogan": {"latent_dim": 8, "epochs": 3, "encoder_epochs": 2, "n_critic": 5},
    "anogan": {"latent_dim": 8, "epochs": 2},
    "score": {"anogan": {"search_steps": 2}},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(root: Path, over: dict | None = None, text: str | None = None) -> Path:
    """``root/params.yaml``: TINY updated with ``over`` (or exactly ``text``)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(merge(TINY, over or {})))
    return path


def make_processed(root: Path, n_train: int = 48, n_val: int = 16, size: int = 32,
                   seed: int = 0) -> Path:
    """``root/data/processed/raw/{train,val}.{npy,csv}`` (the variant every model reads by
    default) in the format of ``load_split``: smooth random uint8 images (normal train; val half
    "diseased" with a bright blob)."""
    out = root / "data" / "processed" / "raw"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for name, n in (("train", n_train), ("val", n_val)):
        a = np.empty((n, 1, size, size), np.uint8)
        labels = [0] * n if name == "train" else [i % 2 for i in range(n)]
        for i in range(n):
            f = rng.uniform(1, 4, 2)
            img = 0.5 + 0.3 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx + rng.random()))
            img += 0.05 * rng.standard_normal((size, size))
            if labels[i]:
                cy, cx = rng.uniform(0.3, 0.7, 2)
                img += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
            a[i, 0] = np.clip(img * 255, 0, 255).astype(np.uint8)
        np.save(out / f"{name}.npy", a)
        pd.DataFrame({"path": [f"raw/{name}{i}.jpeg" for i in range(n)], "label": labels,
                      "class": ["CNV" if y else "NORMAL" for y in labels],
                      "patient": [str(i) for i in range(n)], "mask": [""] * n}
                     ).to_csv(out / f"{name}.csv", index=False)
    return out


def stage_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def stage_cmd(stage: str, *args: str) -> list[str]:
    return [PYTHON, str(STAGES / f"{stage}.py"), *args]


def run_stage(stage: str, *args: str, cwd: Path, timeout: float = 120,
              **env: str) -> subprocess.CompletedProcess:
    """Run ``stages/<stage>.py args`` in ``cwd`` (a tiny repository), as `dvc repro` would."""
    return subprocess.run(stage_cmd(stage, *args), cwd=cwd, env=stage_env(**env), text=True,
                          capture_output=True, timeout=timeout)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def error_line(stderr: str) -> str:
    """The stage's error: exactly one ``error: ...`` line, the last of stderr (MLflow may log
    INFO lines before it), and no traceback."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in stderr and len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]
