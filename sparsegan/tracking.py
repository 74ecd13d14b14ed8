"""MLflow tracking: one run per variant, in a sqlite store at the main repository's root.

``dvc exp run --temp/--queue`` runs stages in ``.dvc/tmp/exps/...``; a relative
``sqlite:///mlflow.db`` would be created there and lost, so the default store is resolved to the
main repository (git's common dir knows it). ``MLFLOW_TRACKING_URI`` overrides everything.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

EXPERIMENT = "sparse-gan-oct"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def main_repo_root(cwd: Path | None = None) -> Path:
    """The main working tree's root, also from a DVC temp workspace or a git worktree.

    ``dvc exp run --temp/--queue`` runs in ``<repo>/.dvc/tmp/exps/<dir>`` with a git repository of
    its own, so the path says where the main repo is; a git worktree's common dir says it too."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    common = _git("-C", str(cwd), "rev-parse", "--path-format=absolute", "--git-common-dir")
    return Path(common).parent if common else cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params dataclass -> {"train.lambda_sp": 50.0, ...}."""
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: ",".join(obj) if isinstance(obj, tuple) else obj}


def start_run(variant: str, run_id: str | None = None):
    """Start (or, given ``run_id``, resume) the MLflow run of ``variant``, tagged with the
    variant, the git commit and the DVC experiment name."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if run_id:
        try:
            return mlflow.start_run(run_id=run_id)
        except Exception:  # the run lives in another store (e.g. restored from DVC's cache)
            pass
    mlflow.set_experiment(EXPERIMENT)
    return mlflow.start_run(run_name=variant, tags={
        "variant": variant,
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
    })
