"""End to end: `dvc repro` of the whole pipeline on tiny synthetic data, in a temporary copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["autoencoder", "anogan", "fanogan", "pix2pix_image", "pix2pix_latent", "sparse_gan"]

TINY = {
    "data": {"image_size": 32,
             "synthetic": {"train_normal": 48, "train_per_disease": 12, "test_per_class": 8,
                           "scans_per_patient": 2, "workers": 1},
             "split": {"val_normal": 8, "val_per_disease": 4}},
    "preprocess": {"workers": 1},
    "model": {"base_channels": 4},
    "train": {"epochs": 1, "batch_size": 16, "num_threads": 1},
    "anogan": {"epochs": 1, "search_steps": 3},
    "fanogan": {"epochs": 1, "encoder_epochs": 1, "n_critic": 2},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(cwd)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("repo")
    for name in ("sparsegan", "stages"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], work)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
          "-m", "init"], work)
    _run([sys.executable, "-m", "dvc", "init", "-q"], work)
    _run([sys.executable, "-m", "dvc", "repro"], work)
    return work


def test_repro_writes_metrics_for_every_variant(pipeline: Path):
    metrics = json.loads((pipeline / "reports/metrics.json").read_text())
    assert sorted(metrics) == sorted(VARIANTS)
    for variant, m in metrics.items():
        for key in ("val_auc", "test_auc", "test_accuracy", "test_sensitivity", "test_specificity"):
            assert 0.0 <= m[key] <= 1.0, (variant, key, m[key])
        # phi comes from validation: the stored calibration is what evaluate used
        cal = json.loads((pipeline / f"reports/variants/{variant}/calibration.json").read_text())
        assert m["phi"] == cal["phi"] and m["val_auc"] == cal["validation"]["auc"]
        assert m["test_images_per_s"] > 0
    for variant in ("pix2pix_latent", "sparse_gan"):
        assert 0.0 <= metrics[variant]["pixel_auroc_aam"] <= 1.0
        assert 0.0 <= metrics[variant]["pixel_auroc_aam_residual"] <= 1.0
    table = (pipeline / "reports/table1.md").read_text()
    assert "Sparse-GAN" in table and "0.925" in table  # the paper's number beside ours
    for variant in VARIANTS:
        if variant != "sparse_gan":
            assert 0.0 <= metrics[variant]["vs_sparse_gan_p_value"] <= 1.0
    html = (pipeline / "reports/index.html").read_text()
    assert html.count('data-variant="') >= len(VARIANTS) and "https://" not in html


def test_mlflow_runs_hold_the_same_numbers(pipeline: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sparse-gan-oct")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    by_variant = {r.data.tags["variant"]: r for r in runs}
    assert sorted(by_variant) == sorted(VARIANTS + ["report"])
    metrics = json.loads((pipeline / "reports/metrics.json").read_text())
    report = by_variant.pop("report")
    artifacts = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"index.html", "table1.md", "metrics.json"} <= artifacts
    assert report.data.metrics["autoencoder.vs_sparse_gan_p_value"] == pytest.approx(
        metrics["autoencoder"]["vs_sparse_gan_p_value"])
    for variant, run in by_variant.items():
        assert run.data.metrics["test_auc"] == pytest.approx(metrics[variant]["test_auc"])
        assert run.data.tags["git_commit"] != "unknown"
        assert "loss_g" in run.data.metrics or "loss_d" in run.data.metrics
        (data,) = run.inputs.dataset_inputs  # the training arrays, with their digest
        assert data.dataset.name == "train (synthetic)" and data.dataset.digest
        assert data.dataset.source.endswith('train.npy"}') or "train.npy" in data.dataset.source
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "roc.csv", "calibration.json"} <= logged
    model_runs = client.search_logged_models([exp.experiment_id])
    assert {m.source_run_id for m in model_runs} == {r.info.run_id for r in by_variant.values()}
    # one registered screening model per row; champion = the best validation AUC
    assert {m.name for m in client.search_registered_models()} == {
        f"sparse-gan-oct-{v}" for v in VARIANTS}
    calibration = json.loads((pipeline / "reports/variants/sparse_gan/calibration.json")
                             .read_text())  # the map shown: chosen on validation lesion masks
    assert calibration["map"] == max(calibration["val_pixel_auroc"],
                                     key=calibration["val_pixel_auroc"].get)
    assert "patient" in calibration and "test_patient_auc" in metrics["sparse_gan"]
    best = max(VARIANTS, key=lambda v: metrics[v]["val_auc"])
    assert client.get_model_version_by_alias(f"sparse-gan-oct-{best}", "champion")
    assert report.data.tags["champion"] == best


def test_changing_lambda_sp_reruns_only_sparse_gan(pipeline: Path):
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["train"]["lambda_sp"] = 5.0
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], pipeline)
                        .strip().splitlines()[-1])
    assert "train@sparse_gan" in status
    assert all(stage.endswith("@sparse_gan") for stage in status), status
    out = _run([sys.executable, "-m", "dvc", "repro"], pipeline)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"train@sparse_gan", "score@sparse_gan", "calibrate@sparse_gan",
                   "evaluate@sparse_gan", "report"}
