"""Stage report: all variants side by side.

Writes ``reports/metrics.json`` (one entry per variant, with the paired test of sparse_gan against
it), ``reports/table1.md``, ``reports/roc.csv``, the figures in ``reports/figures/`` and the
self-contained page ``reports/index.html``, which is also logged to MLflow (run ``report``); the
registered screening model of the row with the best validation AUC gets the alias ``champion``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import PAPER_TABLE1, compare_to_reference, summarize
from .figures import make_figures
from .html_report import write_index
from .params import Params
from .tracking import _git, flatten


def build_report(params: Params, processed_dir: Path, scores_root: Path, models_root: Path,
                 variants_dir: Path, reports_root: Path, log_mlflow: bool = True) -> dict:
    variants = list(params.variants)
    results = summarize(variants, variants_dir, reports_root)
    for other, cmp in compare_to_reference(variants, scores_root, "sparse_gan",
                                           seed=params.seed).items():
        results[other].update({f"vs_sparse_gan_{k}": v for k, v in cmp.items()})
    (reports_root / "metrics.json").write_text(json.dumps(results, indent=1))
    figures = make_figures(variants, processed_dir, scores_root, variants_dir, models_root,
                           reports_root / "figures")
    provenance = {"seed": params.seed, "data.source": params.data.source,
                  "image size": params.data.image_size, "split": params.data.split.protocol,
                  "git commit": _git("rev-parse", "--short", "HEAD") or "unknown",
                  "command": "dvc repro"}
    index = write_index(results, figures, reports_root / "index.html", PAPER_TABLE1, provenance)
    if log_mlflow:
        import mlflow

        from .tracking import start_run
        with start_run("report"):
            mlflow.log_params({k: v for k, v in flatten(params).items()
                               if k.split(".")[0] in ("seed", "data", "calibrate")})
            mlflow.log_metrics({f"{v}.{k}": float(x) for v, m in results.items()
                                for k, x in m.items() if k.startswith("vs_sparse_gan_")})
            mlflow.log_artifact(str(index))
            mlflow.log_artifact(str(reports_root / "table1.md"))
            mlflow.log_artifact(str(reports_root / "metrics.json"))
            from .serving import set_champion
            champion = set_champion({v: m["val_auc"] for v, m in results.items()})
            if champion:
                mlflow.set_tag("champion", champion)
    return results
