"""Stage report: all rows side by side, over the training seeds.

Writes ``reports/metrics.json`` (one entry per row: mean, spread and per-seed metrics, with the
paired comparison of sparse_gan against it), ``reports/table1.md``, ``reports/roc.csv``, the
figures in ``reports/figures/`` (of the first seed) and the self-contained page
``reports/index.html``, which is also logged to the pipeline's parent MLflow run; the registered
screening model of the row with the best mean validation AUC (its seed with the best validation
AUC) gets the alias ``champion``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import PAPER_TABLE1, compare_to_reference, summarize
from .figures import RowFiles, make_figures
from .html_report import write_index
from .layout import calibration_file, model_dir, processed_dir, scores_dir
from .params import Params
from .tracking import _git, flatten


# Each row's seed-mean metrics logged to the pipeline's parent run (``<row>.<metric>``).
ROW_METRICS = ("val_auc", "test_auc", "test_accuracy", "test_sensitivity", "test_specificity",
               "test_patient_auc")


def row_files(params: Params, row: str, seed: int, processed_root: Path, scores_root: Path,
              models_root: Path, rows_dir: Path) -> RowFiles:
    """Where the files of ``row``'s model of ``seed`` are (the layout of dvc.yaml)."""
    model, score = params.rows[row]
    return RowFiles(seed=seed, scores=scores_dir(model, seed, scores_root) / score,
                    calibration=calibration_file(row, seed, rows_dir),
                    history=model_dir(model, seed, models_root) / "history.json",
                    roc=rows_dir / row / "roc.csv", metrics=rows_dir / row / "metrics.json",
                    processed=processed_dir(params.preprocess.variant_of(model), processed_root))


def build_report(params: Params, processed_root: Path, scores_root: Path, models_root: Path,
                 rows_dir: Path, reports_root: Path, log_mlflow: bool = True) -> dict:
    rows = list(params.rows)
    results = summarize(rows, rows_dir, reports_root)
    for other, cmp in compare_to_reference(params, scores_root, "sparse_gan").items():
        results[other].update({f"vs_sparse_gan_{k}": v for k, v in cmp.items()})
    (reports_root / "metrics.json").write_text(json.dumps(results, indent=1))
    first = params.seeds[0]
    figures = make_figures({r: row_files(params, r, first, processed_root, scores_root,
                                         models_root, rows_dir) for r in rows},
                           reports_root / "figures")
    provenance = {"seeds": ", ".join(map(str, params.seeds)),
                  "figures": f"seed {first}", "data.source": params.data.source,
                  "image size": params.data.image_size, "split": params.data.split.protocol,
                  "git commit": _git("rev-parse", "--short", "HEAD") or "unknown",
                  "command": "dvc repro"}
    index = write_index(results, figures, reports_root / "index.html", PAPER_TABLE1, provenance)
    if log_mlflow:
        import mlflow

        from .serving import set_champion
        from .tracking import start_pipeline_run, ui_url
        with start_pipeline_run() as run:
            # every param and every row's AUCs on the parent: two experiments compared side
            # by side in the UI show the param that differs and each row's numbers
            mlflow.log_params(flatten(params))
            mlflow.log_metrics({f"{r}.{k}": float(x) for r, m in results.items()
                                for k, x in m.items()
                                if (k.startswith("vs_sparse_gan_") or k in ROW_METRICS)
                                and isinstance(x, (int, float))})
            mlflow.log_metrics({f"{r}.{k}_sd": float(m["spread"][k]["sd"])
                                for r, m in results.items() for k in ("val_auc", "test_auc")
                                if k in m.get("spread", {}) and m["spread"][k]["sd"] == m[
                                    "spread"][k]["sd"]})
            for path in (index, reports_root / "table1.md", reports_root / "metrics.json"):
                mlflow.log_artifact(str(path))
            champion = set_champion({r: {int(s): m["val_auc"] for s, m in res["seeds"].items()}
                                     for r, res in results.items()})
            if champion:
                mlflow.set_tag("champion", f"{champion[0]} s{champion[1]}")
        print(f"[report] compare runs: `mlflow ui`, then {ui_url(run.info.experiment_id)}")
    return results
